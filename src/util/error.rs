//! Error types shared by several modules.

/// A number that should be finite is not.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NumericError {
    /// A NaN or infinity appeared in `what` (at training step `step`, when known).
    #[error("non-finite value ({value}) in {what} at index {index}{}", step.map(|s| format!(" at step {s}")).unwrap_or_default())]
    NonFinite {
        what: String,
        index: usize,
        value: f32,
        step: Option<u64>,
    },
}

/// Fail with [`NumericError::NonFinite`] naming `what` and `step` if any value is NaN or
/// infinite. Never let a NaN pass silently (STYLE.md §2.4).
pub fn ensure_finite(xs: &[f32], what: &str, step: Option<u64>) -> Result<(), NumericError> {
    match xs.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(NumericError::NonFinite {
            what: what.to_string(),
            index,
            value: xs[index],
            step,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_bad_value() {
        assert!(ensure_finite(&[1.0, 2.0], "x", None).is_ok());
        let err = ensure_finite(&[1.0, f32::NAN, f32::INFINITY], "loss", Some(7)).unwrap_err();
        let NumericError::NonFinite { index, step, .. } = &err;
        assert_eq!((*index, *step), (1, Some(7)));
        assert!(err.to_string().contains("loss"));
        assert!(err.to_string().contains("step 7"));
    }
}
