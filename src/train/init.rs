//! Data-dependent initialisation before step 0 (sae_variants.md §1.1–§1.2): the init
//! sample and the `b_dec` estimates (geometric median by Weiszfeld, or the mean).

use rayon::prelude::*;

use super::TrainError;
use crate::store::ActivationSource;

/// Read up to `rows` rows from the start of `src` (then rewind).
pub(crate) fn read_init(
    src: &mut dyn ActivationSource,
    rows: usize,
) -> Result<Vec<f32>, TrainError> {
    src.seek(0)?;
    let mut out = Vec::new();
    while out.len() / src.d_in() < rows {
        let need = rows - out.len() / src.d_in();
        if src.next_batch(need, &mut out)? == 0 {
            break;
        }
    }
    src.seek(0)?;
    Ok(out)
}

/// Geometric median of the rows of `x: [n, d]` (Weiszfeld, §1.2).
pub fn geometric_median(x: &[f32], d: usize) -> Vec<f32> {
    let n = x.len() / d;
    let mut y = mean_rows(x, d);
    for _ in 0..100 {
        let w: Vec<f64> = x
            .par_chunks(d)
            .map(|r| {
                let s: f64 = r
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                1.0 / s.sqrt().max(1e-8)
            })
            .collect();
        let wsum: f64 = w.iter().sum();
        let mut ny = vec![0.0f64; d];
        for b in 0..n {
            for j in 0..d {
                ny[j] += w[b] * x[b * d + j] as f64;
            }
        }
        let ny: Vec<f32> = ny.iter().map(|v| (v / wsum) as f32).collect();
        let delta: f64 = ny
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        y = ny;
        if delta < 1e-5 {
            break;
        }
    }
    y
}

pub(crate) fn mean_rows(x: &[f32], d: usize) -> Vec<f32> {
    let n = (x.len() / d).max(1);
    let mut s = vec![0.0f64; d];
    for r in x.chunks(d) {
        for (a, b) in s.iter_mut().zip(r) {
            *a += *b as f64;
        }
    }
    s.iter().map(|v| (v / n as f64) as f32).collect()
}
