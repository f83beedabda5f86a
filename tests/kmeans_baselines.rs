//! The k-means baselines (`jsae_pamsgd.md` §2.4) fit what they should, through the shared
//! trainer: k-means finds well-separated clusters; k-means + local PCA recovers per-cluster
//! planes (R² → 1 where k-means alone cannot); both evaluate identically after export.

use saepipe::sae::export::{save_saelens, ExportMeta, LoadedSae};
use saepipe::sae::{kmeans, ArchConfig, Workspace};
use saepipe::store::InMemorySource;
use saepipe::train::{TrainConfig, Trainer};
use saepipe::util::progress::Silent;
use saepipe::util::rng::Rng;

const D: usize = 8;

/// 4 clusters, each a random 2-d plane through a far-apart centre, plus small noise.
fn planes(n: usize, seed: u64) -> Vec<f32> {
    let mut g = Rng::new(7);
    let centres: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..D).map(|_| 6.0 * g.normal() as f32).collect())
        .collect();
    let bases: Vec<Vec<f32>> = (0..8)
        .map(|_| {
            (0..D)
                .map(|_| g.normal() as f32 / (D as f32).sqrt())
                .collect()
        })
        .collect();
    let mut r = Rng::new(seed);
    let mut x = Vec::with_capacity(n * D);
    for b in 0..n {
        let c = b % 4;
        let (u, v) = (r.normal() as f32, r.normal() as f32);
        for j in 0..D {
            x.push(
                centres[c][j]
                    + u * bases[2 * c][j]
                    + v * bases[2 * c + 1][j]
                    + 0.01 * r.normal() as f32,
            );
        }
    }
    x
}

fn r2(x: &[f32], xh: &[f32]) -> f64 {
    let n = x.len() / D;
    let mut mean = [0.0f64; D];
    for r in x.chunks(D) {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += *v as f64 / n as f64;
        }
    }
    let sse: f64 = x
        .iter()
        .zip(xh)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let sst: f64 = x
        .chunks(D)
        .flat_map(|r| r.iter().zip(&mean).map(|(a, m)| (*a as f64 - m).powi(2)))
        .sum();
    1.0 - sse / sst
}

/// Train on the planes, export, and return (R² of the trained SAE, R² of the export, L0)
/// on held-out raw tokens.
fn fit(arch: ArchConfig, d_sae: usize) -> (f64, f64, f64) {
    let mut src = InMemorySource::new(planes(8192, 1), D);
    let cfg = TrainConfig {
        batch_tokens: 256,
        total_tokens: 200 * 256,
        lr: Some(1e-2),
        lr_warmup_steps: 0,
        checkpoint_every: 0,
        ..Default::default()
    };
    let mut t = Trainer::new(cfg, &arch, d_sae, &mut src).unwrap();
    t.run(&mut src, None, &Silent, None).unwrap();
    let n = 1000;
    let raw = planes(n, 9);
    let x: Vec<f32> = raw.iter().map(|v| v * t.scale()).collect();
    let mut ws = Workspace::default();
    t.sae().encode(&x, n, &mut ws).unwrap();
    let l0 = ws.codes.nnz() as f64 / n as f64;
    let codes = std::mem::take(&mut ws.codes);
    let mut out = Vec::new();
    t.sae().decode(&codes, &mut out, &mut ws);
    let trained = r2(&x, &out);
    let dir = tempfile::tempdir().unwrap();
    save_saelens(t.sae(), t.scale(), &ExportMeta::default(), dir.path()).unwrap();
    let loaded = LoadedSae::load(dir.path()).unwrap();
    assert_eq!(loaded.t.architecture, "kmeans");
    let mut ws2 = Workspace::default();
    loaded.encode(&raw, n, &mut ws2);
    let codes2 = std::mem::take(&mut ws2.codes);
    let mut out2 = Vec::new();
    loaded.decode(&codes2, &mut out2, &mut ws2);
    // same latents fire in the export as in training space
    assert_eq!(codes2.idx, codes.idx, "{}", arch.kind());
    (trained, r2(&raw, &out2), l0)
}

#[test]
fn kmeans_and_local_pca_fit_and_export() {
    let (km, km_export, km_l0) = fit(ArchConfig::new(kmeans::Config {}), 4);
    let (pca, pca_export, pca_l0) = fit(ArchConfig::new(kmeans::PcaConfig { rank: 2 }), 12);
    eprintln!("kmeans R² {km:.4} (export {km_export:.4}, L0 {km_l0}); kmeans_pca R² {pca:.4} (export {pca_export:.4}, L0 {pca_l0})");
    assert_eq!(km_l0, 1.0);
    assert!(pca_l0 > 2.9 && pca_l0 <= 3.0, "{pca_l0}");
    // the centres carry most of the variance; the planes carry the rest
    assert!(km > 0.8, "kmeans R² {km}");
    assert!(
        pca > 0.999 && pca > km + 0.005,
        "kmeans_pca R² {pca} vs kmeans {km}"
    );
    assert!((km - km_export).abs() < 1e-4 && (pca - pca_export).abs() < 1e-4);
}
