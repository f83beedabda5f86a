//! Conformance of the optimisers beside Adam and PAM-SGD — `signum` (sign descent inside
//! schedule-free averaging, `src/train/schedule_free.rs`) and `muon` (`src/train/muon.rs`) —
//! for every variant of `ArchConfig::examples()`: the loss falls, unit-norm rows stay
//! unit-norm after every update (and, for signum, at the averaged point the run ends on), a
//! run stopped mid-way and resumed from its checkpoint ends bit for bit where the
//! uninterrupted one does; and the pipeline keys map and refuse as documented.

use saepipe::sae::{ArchConfig, Param};
use saepipe::store::InMemorySource;
use saepipe::synthetic::{SyntheticConfig, SyntheticData};
use saepipe::train::muon::MuonConfig;
use saepipe::train::schedule_free::SignumConfig;
use saepipe::train::{Backend, Optimizer, TrainConfig, Trainer};
use saepipe::util::progress::Silent;

const D: usize = 16;
const F: usize = 48;

fn data(n: usize, seed: u64) -> Vec<f32> {
    SyntheticData::new(SyntheticConfig {
        d: D,
        n_features: 32,
        mean_active: 2.0,
        noise: 0.01,
        bipolar: false,
        seed: 3,
    })
    .sample(n, seed)
}

fn signum() -> Optimizer {
    Optimizer::Signum(SignumConfig::default())
}

/// Both new optimisers, each with a learning rate for this small problem.
fn optimizers() -> [(Optimizer, f32); 2] {
    [
        (signum(), 1e-2),
        (Optimizer::Muon(MuonConfig::default()), 1e-2),
    ]
}

fn cfg_with(opt: &(Optimizer, f32), steps: u64) -> TrainConfig {
    TrainConfig {
        lr: Some(opt.1),
        optimizer: opt.0.clone(),
        lr_warmup_steps: 0,
        lr_decay_frac: 0.0,
        ..cfg(steps)
    }
}

fn cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        batch_tokens: 128,
        total_tokens: steps * 128,
        lr: Some(1e-2),
        sparsity_warmup_frac: 0.0,
        dead_after_tokens: 512,
        init_tokens: 512,
        log_every: 1,
        checkpoint_every: 0,
        optimizer: signum(),
        ..Default::default()
    }
}

fn bits(ps: &[Param]) -> Vec<(String, Vec<u32>)> {
    ps.iter()
        .map(|p| {
            (
                p.name.to_string(),
                p.data.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn loss_falls_and_unit_rows_hold_at_every_step_and_at_the_end() {
    for opt in optimizers() {
        for arch in ArchConfig::examples() {
            // the k-means baselines start near their optimum (see tests/it/sae_conformance.rs)
            let loss_must_fall = !arch.kind().starts_with("kmeans") && arch.kind() != "local_pca";
            let mut src = InMemorySource::new(data(4096, 3), D);
            let mut t = Trainer::new(cfg_with(&opt, 60), &arch, F, &mut src).unwrap();
            let name = t.optimizer_name();
            assert_eq!(name, opt.0.name());
            let mut losses = Vec::new();
            for _ in 0..60 {
                let r = t.step(&mut src).unwrap();
                assert!(r.loss.is_finite(), "{name} {}: {r:?}", arch.kind());
                assert_eq!(r.lr, opt.1, "no LR schedule here");
                losses.push(r.loss);
                if let Err(e) = t.sae().check_invariants() {
                    panic!("{name} {} after step {}: {e}", arch.kind(), r.step);
                }
            }
            let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
            let last: f64 = losses[55..].iter().sum::<f64>() / 5.0;
            eprintln!("{name} {}: loss {first:.4} -> {last:.4}", arch.kind());
            assert!(
                last < 0.8 * first || (!loss_must_fall && last < first),
                "{name} {}: loss {first} -> {last}",
                arch.kind()
            );
        }
    }
}

#[test]
fn the_default_lr_is_sparsifys_rule_and_trains_topk() {
    let arch = ArchConfig::examples()
        .into_iter()
        .find(|a| a.kind() == "topk")
        .unwrap();
    let c = TrainConfig {
        lr: None,
        ..cfg(40)
    };
    let mut src = InMemorySource::new(data(4096, 3), D);
    let mut t = Trainer::new(c, &arch, F, &mut src).unwrap();
    let want = (5e-3 / (F as f64 / 16384.0).sqrt()) as f32;
    let r0 = t.step(&mut src).unwrap();
    assert!((r0.lr - want).abs() < 1e-7, "{} vs {want}", r0.lr);
    let mut last = r0.loss;
    for _ in 1..40 {
        last = t.step(&mut src).unwrap().loss;
    }
    assert!(last < 0.8 * r0.loss, "{} -> {last}", r0.loss);
    t.sae().check_invariants().unwrap();
}

#[test]
fn warmup_steps_ramp_the_lr() {
    let arch = ArchConfig::examples()[1].clone();
    let c = TrainConfig {
        optimizer: Optimizer::Signum(SignumConfig {
            warmup_steps: 4,
            ..SignumConfig::default()
        }),
        ..cfg(8)
    };
    let mut src = InMemorySource::new(data(2048, 3), D);
    let mut t = Trainer::new(c, &arch, F, &mut src).unwrap();
    let lrs: Vec<f32> = (0..8).map(|_| t.step(&mut src).unwrap().lr).collect();
    assert_eq!(&lrs[..4], &[2.5e-3, 5e-3, 7.5e-3, 1e-2]);
    assert!(lrs[4..].iter().all(|&l| l == 1e-2), "{lrs:?}");
}

#[test]
fn resume_mid_run_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    for opt in optimizers() {
        for arch in ArchConfig::examples() {
            let c = TrainConfig {
                checkpoint_every: 4,
                ..cfg_with(&opt, 10)
            };
            let name = opt.0.name();
            let mut src = InMemorySource::new(data(700, 5), D);
            let mut full = Trainer::new(c.clone(), &arch, F, &mut src).unwrap();
            full.run(&mut src, None, &Silent, None).unwrap();
            full.sae().check_invariants().unwrap();
            let out = dir.path().join(format!("{name}-{}", arch.kind()));
            let mut src = InMemorySource::new(data(700, 5), D);
            let mut first = Trainer::new(c.clone(), &arch, F, &mut src).unwrap();
            first.run(&mut src, Some(&out), &Silent, Some(6)).unwrap();
            drop(first);
            let ck = out.join(saepipe::train::CHECKPOINT_FILE);
            let mut src = InMemorySource::new(data(700, 5), D);
            let mut resumed = Trainer::resume(&ck, c.clone(), &arch, &mut src).unwrap();
            assert_eq!(
                resumed.step_count(),
                6,
                "stopped (and checkpointed) at step 6"
            );
            resumed.run(&mut src, None, &Silent, None).unwrap();
            assert_eq!(
                bits(resumed.sae().params()),
                bits(full.sae().params()),
                "{name} {}: resumed != uninterrupted",
                arch.kind()
            );
            assert_eq!(resumed.log(), full.log(), "{name} {}", arch.kind());
            // an Adam config does not silently continue the run
            let adam = TrainConfig {
                optimizer: Optimizer::Adam,
                ..c.clone()
            };
            let mut src = InMemorySource::new(data(700, 5), D);
            assert!(Trainer::resume(&ck, adam, &arch, &mut src).is_err());
        }
    }
}

#[test]
fn the_engine_refuses_them_on_the_tensor_backend_and_a_bad_momentum() {
    let arch = ArchConfig::examples()[1].clone();
    let mut src = InMemorySource::new(data(1024, 3), D);
    for opt in optimizers() {
        let c = TrainConfig {
            backend: Backend::Tensor,
            ..cfg_with(&opt, 4)
        };
        let e = Trainer::new(c, &arch, F, &mut src)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("train.optimizer.kind")
                && e.contains(opt.0.name())
                && e.contains("train.backend = \"kernels\""),
            "{e}"
        );
    }
    let c = TrainConfig {
        optimizer: Optimizer::Signum(SignumConfig {
            momentum: 0.0,
            ..SignumConfig::default()
        }),
        ..cfg(4)
    };
    let e = Trainer::new(c, &arch, F, &mut src)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("train.optimizer.momentum"), "{e}");
}

#[test]
fn pipeline_keys_map_onto_the_trainer_and_refuse_the_tensor_backend() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        saepipe::config::load(&path, &sets)
    };
    let p = load(&[
        "train.optimizer={ kind = \"signum\", lr = 2e-3, warmup_steps = 5 }",
        "sae.arch={ kind = \"topk\", k = 8 }",
    ])
    .unwrap();
    let t = p.config.trainer_config();
    assert_eq!(t.lr, Some(2e-3));
    assert_eq!(
        t.optimizer,
        Optimizer::Signum(SignumConfig {
            momentum: 0.95,
            warmup_steps: 5
        })
    );
    assert_eq!(p.config.train.optimizer.kind(), "signum");
    let e = load(&[
        "train.optimizer={ kind = \"signum\" }",
        "train.backend=\"tensor\"",
        "sae.arch={ kind = \"topk\", k = 8 }",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("train.optimizer.kind") && e.contains("train.backend = \"kernels\""),
        "{e}"
    );
    let e = load(&["train.optimizer={ kind = \"signum\", momentum = 1.5 }"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.optimizer.momentum"), "{e}");
    let e = load(&["train.optimizer={ kind = \"signum\", beta1 = 0.9 }"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("beta1"), "{e}");
    let p = load(&["train.optimizer={ kind = \"muon\", ns_steps = 3 }"]).unwrap();
    let t = p.config.trainer_config();
    assert_eq!(
        t.optimizer,
        Optimizer::Muon(MuonConfig {
            ns_steps: 3,
            ..MuonConfig::default()
        })
    );
    assert_eq!(t.lr, None);
    let e = load(&[
        "train.optimizer={ kind = \"muon\", weight_decay = -1.0 }",
        "train.backend=\"tensor\"",
        "sae.arch={ kind = \"topk\", k = 8 }",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("train.optimizer.weight_decay") && e.contains("\"muon\" runs on the CPU"),
        "{e}"
    );
}
