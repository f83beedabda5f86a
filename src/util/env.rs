//! Boolean environment variables, read the way the Hugging Face hub reads them
//! (`huggingface_hub.constants._is_true`): `1`, `true`, `yes`, `on` (any case) mean yes;
//! `0`, `false`, `no`, `off` and the empty string mean no.
//!
//! Decision: a value outside both sets means no, as on the hub, but [`flag`] logs a warning
//! naming the variable and the values it accepts, so a typo does not pass silently.

/// `Some(true)` / `Some(false)` for a recognised spelling, `None` otherwise.
pub fn boolish(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" | "t" => Some(true),
        "0" | "false" | "no" | "off" | "n" | "f" | "" => Some(false),
        _ => None,
    }
}

/// Whether the boolean environment variable `name` is set to a yes value.
pub fn flag(name: &str) -> bool {
    let Ok(v) = std::env::var(name) else {
        return false;
    };
    boolish(&v).unwrap_or_else(|| {
        tracing::warn!(
            "{name}={v:?} is not a boolean (1/0, true/false, yes/no, on/off); treating it as false"
        );
        false
    })
}

#[cfg(test)]
mod tests {
    use super::boolish;

    #[test]
    fn the_hub_spellings_parse_in_any_case() {
        for v in ["1", "true", "TRUE", "Yes", "on", " ON "] {
            assert_eq!(boolish(v), Some(true), "{v}");
        }
        for v in ["0", "false", "False", "no", "OFF", ""] {
            assert_eq!(boolish(v), Some(false), "{v}");
        }
        assert_eq!(boolish("maybe"), None);
    }
}
