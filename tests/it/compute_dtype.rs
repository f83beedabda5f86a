//! `train.compute_dtype` (issue #13 item 5): the tensor backend's encoder/decoder GEMMs in
//! bf16 or f16 (mixed precision: f32 parameters, optimiser state, selection and reductions).
//! On candle's CPU device, for every single-SAE variant with a tensor forward: the first
//! step's loss is within half-precision rounding of the f32 run's but not bit-equal (the
//! GEMMs really ran in the narrow dtype), the run stays finite and its loss falls, and the
//! trained weights are f32. The config check refuses a narrow dtype on the CPU kernels.

use saepipe::sae::ArchConfig;
use saepipe::store::InMemorySource;
use saepipe::synthetic::{SyntheticConfig, SyntheticData};
use saepipe::train::{Backend, ComputeDtype, TrainConfig, Trainer};
use saepipe::util::progress::Silent;

const D: usize = 16;
const F: usize = 48;
const N: usize = 128;
const STEPS: u64 = 30;

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

fn cfg(compute_dtype: ComputeDtype) -> TrainConfig {
    TrainConfig {
        batch_tokens: N,
        total_tokens: STEPS * N as u64,
        lr: Some(3e-3),
        lr_warmup_steps: 0,
        lr_decay_frac: 0.0,
        init_tokens: 4 * N,
        log_every: 1,
        checkpoint_every: 0,
        backend: Backend::Tensor,
        compute_dtype,
        ..Default::default()
    }
}

fn losses(arch: &ArchConfig, dt: ComputeDtype, raw: &[f32]) -> (Vec<f64>, Trainer) {
    let mut src = InMemorySource::new(raw.to_vec(), D);
    let mut t = Trainer::new(cfg(dt), arch, F, &mut src).unwrap();
    t.run(&mut src, None, &Silent, None).unwrap();
    let log = t.log();
    let col = log
        .columns
        .iter()
        .position(|c| c == "loss")
        .expect("a loss column");
    let l = log.data[col].clone();
    (l, t)
}

#[test]
fn narrow_gemms_train_within_rounding_of_f32() {
    let raw = data(STEPS as usize * N, 5);
    let single = [
        "relu_l1",
        "topk",
        "batchtopk",
        "jumprelu",
        "gated",
        "abs_topk",
        "sa_gsae",
    ];
    let archs: Vec<ArchConfig> = ArchConfig::examples()
        .into_iter()
        .filter(|a| single.contains(&a.kind()))
        .collect();
    assert_eq!(archs.len(), single.len(), "an example per variant");
    for arch in &archs {
        let (l32, _) = losses(arch, ComputeDtype::F32, &raw);
        for dt in [ComputeDtype::Bf16, ComputeDtype::F16] {
            let what = format!("{} {}", arch.kind(), dt.name());
            let (l, t) = losses(arch, dt, &raw);
            assert_eq!(l.len(), l32.len(), "{what}");
            let e = (l[0] - l32[0]).abs() / l32[0].abs();
            assert!(e < 0.05, "{what}: first loss {} vs f32 {}", l[0], l32[0]);
            assert!(
                l[0] != l32[0],
                "{what}: bit-equal to f32: the GEMMs did not narrow"
            );
            assert!(l.iter().all(|v| v.is_finite()), "{what}: {l:?}");
            let (head, tail) = (
                l[..5].iter().sum::<f64>(),
                l[l.len() - 5..].iter().sum::<f64>(),
            );
            assert!(tail < head, "{what}: loss did not fall: {l:?}");
            for p in t.sae().params() {
                assert!(p.data.iter().all(|v| v.is_finite()), "{what}: {}", p.name);
            }
        }
    }
}

#[test]
fn compute_dtype_maps_onto_the_trainer_and_is_refused_on_the_cpu_kernels() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        saepipe::config::load(&path, &sets)
    };
    let p = load(&["train.compute_dtype=\"bf16\"", "train.backend=\"tensor\""]).unwrap();
    assert_eq!(p.config.trainer_config().compute_dtype, ComputeDtype::Bf16);
    let p = load(&[]).unwrap();
    assert_eq!(p.config.trainer_config().compute_dtype, ComputeDtype::F32);
    let e = load(&["train.compute_dtype=\"bf16\""])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.compute_dtype") && e.contains("train.backend = \"tensor\""),
        "{e}"
    );
    let e = load(&["train.compute_dtype=\"f64\""])
        .unwrap_err()
        .to_string();
    assert!(e.contains("compute_dtype"), "{e}");
}
