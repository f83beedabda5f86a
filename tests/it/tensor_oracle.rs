//! The tensor path is the CPU kernels' oracle (issue #13 item 3): on candle's CPU device,
//! every variant with a tensor implementation ([`ArchConfig::tensor_kinds`]) and its
//! hand-written kernels agree on the loss parts, the codes and every gradient, on a few
//! training steps from the same init, with and without dead latents (AuxK).
//! (The k-means baselines' state updates, and SA-GSAE's step-0 threshold calibration, are
//! compared in `tensor_oracle_state.rs`.)
//!
//! "Agree" is `max |tensor − kernel| ≤ 1e-5 · max |kernel|` per tensor (loss parts: the
//! same on the scalar): both sides are f32 with different summation orders, so elementwise
//! relative error is meaningless for entries that cancel to near zero. Codes must also have
//! the same support (the same latents selected on every token). With `--features cuda`
//! (`make test-gpu`) the same comparison runs with the tensor side on the GPU.

use saepipe::kernels::Workspace;
use saepipe::sae::{ArchConfig, Sae, StepInput};
use saepipe::store::InMemorySource;
use saepipe::synthetic::{SyntheticConfig, SyntheticData};
use saepipe::train::pam::PamConfig;
use saepipe::train::tensor::TensorBackend;
use saepipe::train::{Backend, Optimizer, TrainConfig, TrainDevice, TrainError, Trainer};
use saepipe::util::progress::Silent;

const D: usize = 16;
const F: usize = 48;
const N: usize = 96;
const TOL: f64 = 1e-5;

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
        total_tokens: 6 * N as u64,
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

/// One step's comparison of the two implementations on the SAE's current state.
/// Returns the kernels' loss parts.
fn compare(
    sae: &mut dyn Sae,
    (x, step, dead): (&[f32], u64, &[bool]),
    what: &str,
    (device, tol): (TrainDevice, f64),
) -> Vec<(&'static str, f64)> {
    let input = StepInput {
        x,
        n: N,
        step,
        sparsity_scale: 0.7,
        dead,
    };
    let zeros: Vec<Vec<f32>> = sae
        .params()
        .iter()
        .map(|p| vec![0.0; p.data.len()])
        .collect();
    let (mut gk, mut gt) = (zeros.clone(), zeros);
    let (mut wk, mut wt) = (Workspace::default(), Workspace::default());
    let ok = sae.forward_backward(&input, &mut gk, &mut wk).unwrap();
    let backend = TensorBackend::new(device).unwrap();
    let ot = backend
        .forward_backward(sae, &input, &mut gt, &mut wt)
        .unwrap();
    // loss parts: same names, same values
    let names = |o: &saepipe::sae::StepOutput| o.losses.iter().map(|l| l.0).collect::<Vec<_>>();
    assert_eq!(names(&ot), names(&ok), "{what}: loss parts");
    for ((name, t), (_, k)) in ot.losses.iter().zip(&ok.losses) {
        let e = (t - k).abs() / k.abs().max(1e-30);
        assert!(
            e <= tol || (t - k).abs() < 1e-12,
            "{what}: loss {name} tensor {t} vs kernels {k} (rel {e:.2e})"
        );
    }
    let e = (ot.loss - ok.loss).abs() / ok.loss.abs().max(1e-30);
    assert!(e <= tol, "{what}: loss {} vs {}", ot.loss, ok.loss);
    // codes: same support on every token, same values
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
    let e = rel(&ct, &ck);
    assert!(e <= tol, "{what}: codes differ (rel {e:.2e})");
    assert!(
        wk.codes.nnz() > 0,
        "{what}: no active latent, nothing tested"
    );
    // every gradient
    for (p, (a, b)) in sae.params().iter().zip(gt.iter().zip(&gk)) {
        if !p.trainable {
            continue;
        }
        let e = rel(a, b);
        assert!(
            e <= TOL,
            "{what}: gradient of {} differs (rel {e:.2e})",
            p.name
        );
        assert!(
            b.iter().any(|&v| v != 0.0),
            "{what}: gradient of {} is zero, nothing tested",
            p.name
        );
    }
    ok.losses
}

/// SA-GSAE's options beyond the example: each changes the loss or its gradients.
fn sa_gsae_options() -> Vec<ArchConfig> {
    use saepipe::sae::sa_gsae::{Config, DecoderNorm, OutputSign, SparsityPenalty};
    let base = Config::default();
    [
        Config {
            threshold_ste: true,
            ..base.clone()
        },
        Config {
            sparsity: SparsityPenalty::L0,
            ..base.clone()
        },
        Config {
            decoder_norm: DecoderNorm::Penalty,
            threshold_ste: true,
            ..base.clone()
        },
        Config {
            output: OutputSign::Raw,
            tied_thresholds: false,
            tied_magnitudes: false,
            ..base.clone()
        },
        Config {
            negative_side: false,
            pre_encoder_bias: false,
            sparsity: SparsityPenalty::L0,
            ..base
        },
    ]
    .into_iter()
    .map(ArchConfig::new)
    .collect()
}

#[test]
fn tensor_and_kernels_agree_on_loss_codes_and_gradients() {
    agree_on(TrainDevice::Cpu, TOL);
}

/// The same on the GPU (`make test-gpu`): cuBLAS sums in other orders, hence a looser bound.
#[cfg(feature = "cuda")]
#[test]
fn cuda_tensor_backend_agrees_with_the_kernels() {
    agree_on(TrainDevice::Cuda(0), 1e-4);
}

fn agree_on(device: TrainDevice, tol: f64) {
    let archs: Vec<ArchConfig> = ArchConfig::examples()
        .into_iter()
        .filter(|a| a.supports_tensor())
        .chain(sa_gsae_options())
        .collect();
    for kind in [
        "relu_l1",
        "topk",
        "batchtopk",
        "jumprelu",
        "gated",
        "abs_topk",
        "sa_gsae",
        "kmeans",
        "kmeans_pca",
        "local_pca",
        "kflats",
    ] {
        assert!(
            archs.iter().any(|a| a.kind() == kind),
            "the tensor backend covers {kind}"
        );
    }
    let raw = data(6 * N, 11);
    let some_dead: Vec<bool> = (0..F).map(|i| i % 3 == 1).collect();
    let none_dead = vec![false; F];
    for arch in &archs {
        let mut src = InMemorySource::new(raw.clone(), D);
        let mut tr = Trainer::new(cfg(Backend::Kernels), arch, F, &mut src).unwrap();
        let scale = tr.scale();
        let mut aux_seen = false;
        for step in 0..3u64 {
            let batch = &raw[step as usize * N * D..(step as usize + 1) * N * D];
            let x: Vec<f32> = batch.iter().map(|v| v * scale).collect();
            for (dead, tag) in [(&some_dead, "dead"), (&none_dead, "alive")] {
                let what = format!("{} step {step} ({tag}): {arch:?}", arch.kind());
                let parts = compare(tr.sae_mut(), (&x, step, dead), &what, (device, tol));
                let aux = parts.iter().find(|p| p.0 == "auxk").map(|p| p.1);
                assert!(
                    tag == "dead" || aux.is_none_or(|a| a == 0.0),
                    "{what}: AuxK without dead latents"
                );
                aux_seen |= aux.is_some_and(|a| a > 0.0);
            }
            tr.step_on(&[batch], N).unwrap();
        }
        let has_aux = arch.kind().contains("topk");
        assert!(!has_aux || aux_seen, "{}: AuxK never tested", arch.kind());
    }
}

/// The engine picks the backend from the config, and both backends train the same run to
/// the same place (up to f32 rounding amplified by Adam), with Adam and, where the variant
/// supports it, PAM-SGD (whose decoder solve reads the codes the tensor step returns).
#[test]
fn the_tensor_backend_runs_the_engine_loop() {
    let raw = data(6 * N, 12);
    let pam = Optimizer::PamSgd(PamConfig {
        solve_every: 2,
        ..PamConfig::default()
    });
    let runs = ArchConfig::examples()
        .into_iter()
        .filter(|a| a.supports_tensor())
        .flat_map(|a| {
            let p = a.supports_pam_sgd().then(|| (a.clone(), pam.clone()));
            [(a, Optimizer::Adam)].into_iter().chain(p)
        });
    for (arch, optimizer) in runs {
        let mut losses = Vec::new();
        for backend in [Backend::Kernels, Backend::Tensor] {
            let mut src = InMemorySource::new(raw.clone(), D);
            let c = TrainConfig {
                optimizer: optimizer.clone(),
                ..cfg(backend)
            };
            let mut tr = Trainer::new(c, &arch, F, &mut src).unwrap();
            tr.run(&mut src, None, &Silent, None).unwrap();
            tr.sae().check_invariants().unwrap();
            losses.push(tr.log().column("loss").unwrap_or_default().to_vec());
        }
        assert_eq!(losses[0].len(), 6);
        for (s, (t, k)) in losses[1].iter().zip(&losses[0]).enumerate() {
            assert!(
                (t - k).abs() <= 1e-2 * k.abs(),
                "{} ({}) step {s}: tensor backend loss {t} vs kernels {k}",
                arch.kind(),
                optimizer.name()
            );
        }
    }
}

/// Unsupported combinations are refused before the first step, naming the key and the variant.
#[test]
fn unsupported_variants_are_refused_by_name() {
    let raw = data(4 * N, 13);
    for arch in ArchConfig::examples()
        .into_iter()
        .filter(|a| !a.supports_tensor())
    {
        let mut src = InMemorySource::new(raw.clone(), D);
        let err = Trainer::new(cfg(Backend::Tensor), &arch, F, &mut src)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("train.device") && err.contains(arch.kind()),
            "{}: {err}",
            arch.kind()
        );
    }
    let c = TrainConfig {
        device: TrainDevice::Cuda(0),
        ..cfg(Backend::Kernels)
    };
    let mut src = InMemorySource::new(raw, D);
    let arch = &ArchConfig::examples()[0];
    let e = Trainer::new(c, arch, F, &mut src).err();
    assert!(
        matches!(&e, Some(TrainError::Config(m)) if m.contains("train.backend")),
        "{e:?}"
    );
}
