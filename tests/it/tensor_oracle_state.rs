//! The tensor backend for the variants whose step is mostly state, not gradient (issue #13
//! items 1–3): the k-means baselines (`kmeans`, `kmeans_pca`, `local_pca`, `kflats`) and
//! SA-GSAE's step-0 `init_threshold_quantile` calibration. On candle's CPU device, trained
//! side by side from the same init on the same batches, the two backends make the same
//! assignments (same code support, the same token counts per cluster) and the same state
//! (centroids, accumulated moments, refitted flats, calibrated thresholds) within a tight
//! tolerance: both sum the same f32 values in f64 in different orders.
//!
//! Tolerances: state `max |tensor − kernel| ≤ 1e-6 · max |kernel|` per tensor (f64 sums of
//! f32 inputs, f32 storage); trainable parameters (the `kmeans_pca` subspaces, by Adam,
//! which turns last-bit gradient differences into up to an LR-sized step) 1e-2; code values
//! 1e-5 as in `tensor_oracle.rs`.

use saepipe::kernels::Workspace;
use saepipe::sae::{ArchConfig, Sae, StepInput};
use saepipe::store::InMemorySource;
use saepipe::synthetic::{SyntheticConfig, SyntheticData};
use saepipe::train::tensor::TensorBackend;
use saepipe::train::{Backend, TrainConfig, TrainDevice, Trainer};

const D: usize = 16;
const F: usize = 48;
const N: usize = 96;
const STEPS: usize = 6;

fn data(n: usize, seed: u64) -> Vec<f32> {
    SyntheticData::new(SyntheticConfig {
        d: D,
        n_features: 32,
        mean_active: 3.0,
        noise: 0.01,
        bipolar: false,
        seed: 3,
    })
    .sample(n, seed)
}

fn cfg(backend: Backend) -> TrainConfig {
    TrainConfig {
        batch_tokens: N,
        total_tokens: (STEPS * N) as u64,
        lr: Some(3e-3),
        lr_warmup_steps: 0,
        lr_decay_frac: 0.0,
        sparsity_warmup_frac: 0.5,
        dead_after_tokens: 2 * N as u64,
        init_tokens: 4 * N,
        log_every: 1,
        checkpoint_every: 0,
        backend,
        ..Default::default()
    }
}

/// `max |a − b| / max |b|` (0 when both are zero).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if err == 0.0 {
        0.0
    } else {
        err / scale.max(1e-30)
    }
}

/// Both implementations' step on `sae`'s current state: the same loss and the same codes.
fn same_step(sae: &mut dyn Sae, x: &[f32], step: u64, what: &str) {
    let dead = vec![false; F];
    let input = StepInput {
        x,
        n: N,
        step,
        sparsity_scale: 1.0,
        dead: &dead,
    };
    let zeros: Vec<Vec<f32>> = sae
        .params()
        .iter()
        .map(|p| vec![0.0; p.data.len()])
        .collect();
    let (mut gk, mut gt) = (zeros.clone(), zeros);
    let (mut wk, mut wt) = (Workspace::default(), Workspace::default());
    let ok = sae.forward_backward(&input, &mut gk, &mut wk).unwrap();
    let backend = TensorBackend::new(TrainDevice::Cpu).unwrap();
    let ot = backend
        .forward_backward(sae, &input, &mut gt, &mut wt)
        .unwrap();
    let e = (ot.loss - ok.loss).abs() / ok.loss.abs().max(1e-30);
    assert!(e <= 1e-5, "{what}: loss {} vs {}", ot.loss, ok.loss);
    assert_eq!(ot.metrics, ok.metrics, "{what}: metrics");
    let (ck, ct) = (wk.codes.to_dense(F), wt.codes.to_dense(F));
    for (i, (a, b)) in ct.iter().zip(&ck).enumerate() {
        assert_eq!(
            *a != 0.0,
            *b != 0.0,
            "{what}: token {} latent {}: tensor code {a} vs kernel {b}",
            i / F,
            i % F
        );
    }
    assert!(rel(&ct, &ck) <= 1e-5, "{what}: code values");
    for (p, (a, b)) in sae.params().iter().zip(gt.iter().zip(&gk)) {
        if p.trainable {
            assert!(rel(a, b) <= 1e-5, "{what}: gradient of {}", p.name);
        }
    }
}

#[test]
fn kmeans_baselines_train_the_same_on_both_backends() {
    let raw = data(STEPS * N, 21);
    let kinds = ["kmeans", "kmeans_pca", "local_pca", "kflats"];
    for kind in kinds {
        let arch = ArchConfig::examples()
            .into_iter()
            .find(|a| a.kind() == kind)
            .unwrap();
        assert!(arch.supports_tensor(), "{kind} has a tensor implementation");
        let mut tk = Trainer::new(
            cfg(Backend::Kernels),
            &arch,
            F,
            &mut InMemorySource::new(raw.clone(), D),
        )
        .unwrap();
        let mut tt = Trainer::new(
            cfg(Backend::Tensor),
            &arch,
            F,
            &mut InMemorySource::new(raw.clone(), D),
        )
        .unwrap();
        let scale = tk.scale();
        assert_eq!(scale, tt.scale());
        let mut fit_passes = Vec::new();
        for step in 0..STEPS {
            let batch = &raw[step * N * D..(step + 1) * N * D];
            let x: Vec<f32> = batch.iter().map(|v| v * scale).collect();
            let what = format!("{kind} step {step}");
            same_step(tk.sae_mut(), &x, step as u64, &what);
            tk.step_on(&[batch], N).unwrap();
            tt.step_on(&[batch], N).unwrap();
            for (pt, pk) in tt.sae().params().iter().zip(tk.sae().params()) {
                let e = rel(&pt.data, &pk.data);
                if pt.name == "counts" {
                    assert_eq!(pt.data, pk.data, "{what}: tokens per cluster");
                } else if pt.trainable {
                    assert!(e <= 1e-2, "{what}: {} (Adam) rel {e:.2e}", pt.name);
                } else {
                    assert!(e <= 1e-6, "{what}: state {} rel {e:.2e}", pt.name);
                }
            }
            let col = |t: &Trainer, c: &str| t.log().column(c).map(|v| v.to_vec());
            assert_eq!(col(&tt, "fit_pass"), col(&tk, "fit_pass"), "{what}");
            fit_passes = col(&tk, "fit_pass").unwrap_or_default();
        }
        if kind == "kflats" {
            // k-means, PCA and one k-flats pass (with a refit at the end of each)
            assert_eq!(fit_passes.last().copied(), Some(2.0), "{fit_passes:?}");
        }
        // the tensor-trained model reconstructs like the kernels-trained one
        let lk = tk.log().column("loss").unwrap().to_vec();
        let lt = tt.log().column("loss").unwrap().to_vec();
        for (s, (a, b)) in lt.iter().zip(&lk).enumerate() {
            assert!(
                (a - b).abs() <= 1e-2 * b.abs(),
                "{kind} step {s}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn sa_gsae_threshold_quantile_calibrates_the_same_on_tensors() {
    use saepipe::sae::sa_gsae::Config;
    let arch = ArchConfig::new(Config {
        init_threshold_quantile: Some(0.8),
        ..Config::default()
    });
    assert!(arch.supports_tensor());
    let raw = data(STEPS * N, 22);
    let make =
        |b| Trainer::new(cfg(b), &arch, F, &mut InMemorySource::new(raw.clone(), D)).unwrap();
    let (mut tk, mut tt) = (make(Backend::Kernels), make(Backend::Tensor));
    let x: Vec<f32> = raw[..N * D].iter().map(|v| v * tk.scale()).collect();
    let dead = vec![false; F];
    let input = StepInput {
        x: &x,
        n: N,
        step: 0,
        sparsity_scale: 1.0,
        dead: &dead,
    };
    let grads = |s: &dyn Sae| -> Vec<Vec<f32>> {
        s.params().iter().map(|p| vec![0.0; p.data.len()]).collect()
    };
    let before: Vec<Vec<f32>> = tk.sae().params().iter().map(|p| p.data.clone()).collect();
    // kernels: calibration inside the step; tensor: calibrated in the forward, installed by
    // update_state
    let (mut gk, mut wk) = (grads(tk.sae()), Workspace::default());
    let ok = tk
        .sae_mut()
        .forward_backward(&input, &mut gk, &mut wk)
        .unwrap();
    tk.sae_mut().update_state(&input, &wk);
    let (mut gt, mut wt) = (grads(tt.sae()), Workspace::default());
    let backend = TensorBackend::new(TrainDevice::Cpu).unwrap();
    let ot = backend
        .forward_backward(tt.sae(), &input, &mut gt, &mut wt)
        .unwrap();
    tt.sae_mut().update_state(&input, &wt);
    let mut calibrated = 0;
    for ((pt, pk), b) in tt.sae().params().iter().zip(tk.sae().params()).zip(&before) {
        let e = rel(&pt.data, &pk.data);
        assert!(e <= 1e-5, "{}: tensor vs kernels rel {e:.2e}", pt.name);
        calibrated += usize::from(pk.data != *b);
    }
    assert!(calibrated > 0, "the quantile moved no threshold");
    // the thresholds sit on one token per latent: a gate there may open on one side only,
    // so the loss agrees to a looser bound than tensor_oracle.rs's
    let e = (ot.loss - ok.loss).abs() / ok.loss.abs();
    assert!(e <= 1e-2, "loss {} vs {}", ot.loss, ok.loss);
    // and the engine trains it on both backends to the same place
    let (mut tk, mut tt) = (make(Backend::Kernels), make(Backend::Tensor));
    for step in 0..STEPS {
        let batch = &raw[step * N * D..(step + 1) * N * D];
        tk.step_on(&[batch], N).unwrap();
        tt.step_on(&[batch], N).unwrap();
    }
    let lk = tk.log().column("loss").unwrap().to_vec();
    let lt = tt.log().column("loss").unwrap().to_vec();
    for (s, (a, b)) in lt.iter().zip(&lk).enumerate() {
        assert!((a - b).abs() <= 5e-2 * b.abs(), "step {s}: {a} vs {b}");
    }
}
