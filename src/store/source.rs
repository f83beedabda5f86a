//! Where training activations come from: the [`ActivationSource`] trait and an in-memory
//! implementation. The capture stage's Parquet reader implements the same trait.
//!
//! Decision: a source is a finite, seekable sequence of rows (tokens); the trainer wraps
//! around to position 0 when it runs out (epochs), and a checkpoint stores
//! [`ActivationSource::position`] so a resumed run reads exactly the rows it would have.

/// Errors from an activation source.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// I/O or format problem in the underlying files.
    #[error("{0}")]
    Read(String),
    /// Seek past the end.
    #[error("cannot seek to row {pos}: the source has {len} rows")]
    Seek {
        /// Requested row.
        pos: u64,
        /// Rows available.
        len: u64,
    },
}

/// A finite, seekable stream of activation rows of width [`ActivationSource::d_in`].
pub trait ActivationSource: Send {
    /// Values per row.
    fn d_in(&self) -> usize;
    /// Total rows, if known.
    fn len_rows(&self) -> Option<u64>;
    /// Append up to `rows` rows (row-major) to `out`; return how many were appended.
    /// Returns 0 only at the end of the data.
    fn next_batch(&mut self, rows: usize, out: &mut Vec<f32>) -> Result<usize, DataError>;
    /// Current row position (what a checkpoint stores).
    fn position(&self) -> u64;
    /// Continue from row `pos` (0 = the beginning).
    fn seek(&mut self, pos: u64) -> Result<(), DataError>;
}

/// Rows held in memory.
#[derive(Debug, Clone)]
pub struct InMemorySource {
    data: Vec<f32>,
    d: usize,
    pos: usize,
}

impl InMemorySource {
    /// `data` is `[n, d]` row-major (a trailing partial row is ignored).
    pub fn new(data: Vec<f32>, d: usize) -> Self {
        Self {
            data,
            d: d.max(1),
            pos: 0,
        }
    }
    fn rows(&self) -> usize {
        self.data.len() / self.d
    }
}

impl ActivationSource for InMemorySource {
    fn d_in(&self) -> usize {
        self.d
    }
    fn len_rows(&self) -> Option<u64> {
        Some(self.rows() as u64)
    }
    fn next_batch(&mut self, rows: usize, out: &mut Vec<f32>) -> Result<usize, DataError> {
        let take = rows.min(self.rows() - self.pos);
        out.extend_from_slice(&self.data[self.pos * self.d..(self.pos + take) * self.d]);
        self.pos += take;
        Ok(take)
    }
    fn position(&self) -> u64 {
        self.pos as u64
    }
    fn seek(&mut self, pos: u64) -> Result<(), DataError> {
        if pos > self.rows() as u64 {
            return Err(DataError::Seek {
                pos,
                len: self.rows() as u64,
            });
        }
        self.pos = pos as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seeks_and_ends() {
        let mut s = InMemorySource::new((0..10).map(|v| v as f32).collect(), 2);
        let mut out = Vec::new();
        assert_eq!(s.next_batch(3, &mut out).unwrap(), 3);
        assert_eq!(out, vec![0., 1., 2., 3., 4., 5.]);
        assert_eq!(s.position(), 3);
        assert_eq!(s.next_batch(5, &mut out).unwrap(), 2);
        assert_eq!(s.next_batch(5, &mut out).unwrap(), 0);
        s.seek(1).unwrap();
        out.clear();
        s.next_batch(1, &mut out).unwrap();
        assert_eq!(out, vec![2., 3.]);
        assert!(s.seek(6).is_err());
    }
}
