//! Property tests of the SAE kernels and metrics (STYLE.md §2.9 item 5): every fast path
//! against a naive reference.

use proptest::prelude::*;
use saepipe::eval::{Metrics, ReconStats};
use saepipe::kernels::{self, topk_naive, topk_select, Codes};
use saepipe::sae::{topk, ArchConfig, Workspace};

fn sorted(mut v: Vec<(u32, f32)>) -> Vec<(u32, u32)> {
    v.sort_by_key(|e| e.0);
    v.into_iter().map(|(i, x)| (i, x.to_bits())).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The buffered selection equals a full sort, ties included (values from a small set).
    #[test]
    fn chunked_topk_equals_naive_sort(row in prop::collection::vec(-4i32..4, 1..3000), k in 1usize..80) {
        let row: Vec<f32> = row.into_iter().map(|v| v as f32 * 0.5).collect();
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        topk_select(&row, k, &mut scratch, &mut out);
        prop_assert_eq!(sorted(out), sorted(topk_naive(&row, k)));
    }

    #[test]
    fn chunked_topk_equals_naive_sort_on_floats(row in prop::collection::vec(-1e3f32..1e3, 1..5000), k in 1usize..300) {
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        topk_select(&row, k, &mut scratch, &mut out);
        prop_assert_eq!(sorted(out), sorted(topk_naive(&row, k)));
    }

    /// Signed zeros, NaN and infinities (where IEEE `<` and the selection's total order
    /// disagree, which the block skip must respect) select as in the full sort.
    #[test]
    fn chunked_topk_equals_naive_sort_on_special_values(row in prop::collection::vec(0usize..7, 1..2000), k in 1usize..60) {
        const V: [f32; 7] = [-0.0, 0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -1.0];
        let row: Vec<f32> = row.into_iter().map(|i| V[i]).collect();
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        topk_select(&row, k, &mut scratch, &mut out);
        prop_assert_eq!(sorted(out), sorted(topk_naive(&row, k)));
    }

    /// TopK never activates more than k latents on any token.
    #[test]
    fn topk_l0_at_most_k(seed in 0u64..1000, k in 1usize..12, n in 1usize..40) {
        let (d, f) = (8, 24);
        let sae = ArchConfig::new(topk::Config { k, ..Default::default() }).build(d, f, seed).unwrap();
        let mut rng = saepipe::util::rng::Rng::new(seed);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32 * 3.0).collect();
        let mut ws = Workspace::default();
        sae.encode(&x, n, &mut ws).unwrap();
        for b in 0..n {
            prop_assert!(ws.codes.row(b).0.len() <= k);
        }
    }

    /// Sparse decode (both the sparse and the dense-fallback path) equals the dense matmul.
    #[test]
    fn sparse_decode_equals_dense_matmul(seed in 0u64..1000, density in 0.0f64..0.6) {
        let (n, d, f) = (30, 7, 20);
        let mut rng = saepipe::util::rng::Rng::new(seed);
        let w: Vec<f32> = (0..f * d).map(|_| rng.normal() as f32).collect();
        let bias: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
        let mut codes = Codes::default();
        codes.clear();
        for _ in 0..n {
            for i in 0..f {
                if rng.uniform() < density {
                    codes.idx.push(i as u32);
                    codes.val.push(rng.normal() as f32);
                }
            }
            codes.indptr.push(codes.idx.len());
        }
        let mut ws = Workspace::default();
        let mut out = Vec::new();
        kernels::decode(&mut ws.scratch, &codes, &w, d, f, Some(&bias), &mut out);
        let dense = codes.to_dense(f);
        for b in 0..n {
            for j in 0..d {
                let want: f32 = (0..f).map(|i| dense[b * f + i] * w[i * d + j]).sum::<f32>() + bias[j];
                prop_assert!((out[b * d + j] - want).abs() <= 1e-4 * (1.0 + want.abs()), "{} vs {}", out[b * d + j], want);
            }
        }
    }

    /// Streaming metrics do not depend on the batch split (bit for bit) and equal a
    /// two-pass reference.
    #[test]
    fn streaming_metrics_split_invariant(seed in 0u64..1000, cuts in prop::collection::vec(1usize..50, 1..6)) {
        let (n, d, f) = (60, 5, 12);
        let mut rng = saepipe::util::rng::Rng::new(seed);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32 * 2.0 + 1.0).collect();
        let r: Vec<f32> = x.iter().map(|v| v + 0.3 * rng.normal() as f32).collect();
        let mut codes = Codes::default();
        codes.clear();
        for _ in 0..n {
            for i in 0..f {
                if rng.uniform() < 0.2 {
                    codes.idx.push(i as u32);
                    codes.val.push(rng.normal() as f32);
                }
            }
            codes.indptr.push(codes.idx.len());
        }
        let slice = |lo: usize, hi: usize| {
            let mut c = Codes::default();
            c.clear();
            for b in lo..hi {
                let (ix, vs) = codes.row(b);
                c.idx.extend_from_slice(ix);
                c.val.extend_from_slice(vs);
                c.indptr.push(c.idx.len());
            }
            c
        };
        let mut whole = Metrics::new(d, f);
        whole.update(&x, &r, &codes);
        let mut parts = Metrics::new(d, f);
        let mut lo = 0;
        for c in cuts.iter().chain(std::iter::once(&n)) {
            let hi = (lo + c).min(n);
            parts.update(&x[lo * d..hi * d], &r[lo * d..hi * d], &slice(lo, hi));
            lo = hi;
            if lo == n { break; }
        }
        let (a, b) = (whole.finish(), parts.finish());
        prop_assert_eq!(&a, &b);
        // two-pass reference
        let mu: Vec<f64> = (0..d).map(|j| (0..n).map(|t| x[t * d + j] as f64).sum::<f64>() / n as f64).collect();
        let sst: f64 = (0..n).map(|t| (0..d).map(|j| (x[t * d + j] as f64 - mu[j]).powi(2)).sum::<f64>()).sum();
        let sse: f64 = (0..n).map(|t| (0..d).map(|j| (x[t * d + j] as f64 - r[t * d + j] as f64).powi(2)).sum::<f64>()).sum();
        prop_assert!((a.r2 - (1.0 - sse / sst)).abs() < 1e-9);
        prop_assert!((a.mse - sse / n as f64).abs() < 1e-9);
        let nnz = codes.val.iter().filter(|v| **v != 0.0).count();
        prop_assert!((a.l0 - nnz as f64 / n as f64).abs() < 1e-12);
        let l1: f64 = codes.val.iter().map(|v| v.abs() as f64).sum::<f64>() / n as f64;
        prop_assert!((a.l1 - l1).abs() < 1e-9);
        let fired: std::collections::HashSet<u32> = codes.idx.iter().copied().collect();
        prop_assert!((a.dead_frac - (f - fired.len()) as f64 / f as f64).abs() < 1e-12);
    }
}

#[test]
fn r2_reference_points() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let mut m = ReconStats::new(1);
    m.update(&x, &x);
    assert_eq!(m.r2(), 1.0);
    let mut m = ReconStats::new(1);
    m.update(&x, &[2.5; 4]);
    assert!(m.r2().abs() < 1e-12);
}
