//! `[train]` (+ `run.seed`, `data.n_tokens`) → the trainer's `train::TrainConfig`.
//!
//! Decision: step counts in the pipeline file become the trainer's fractions of the run
//! (`l1_warmup_steps` → `sparsity_warmup_frac`, `lr_decay_steps` → `lr_decay_frac`), and
//! `checkpoint_every` in tokens becomes steps (rounded down, at least 1); absent keys
//! keep the trainer's defaults (5% warmup, 20% decay, every 1000 steps).

use super::schema::{LrDecay, OptimizerConfig, PipelineConfig};
use crate::train;

impl PipelineConfig {
    /// The trainer's PAM-SGD settings when `[train] optimizer` is `pam_sgd`.
    pub fn pam_config(opt: &OptimizerConfig) -> Option<train::pam::PamConfig> {
        match *opt {
            OptimizerConfig::Adam { .. }
            | OptimizerConfig::Signum { .. }
            | OptimizerConfig::Muon { .. } => None,
            OptimizerConfig::PamSgd {
                solve_every,
                encoder_prox,
                encoder_bias_prox,
                decoder_prox,
                decoder_bias_prox,
                ridge,
                bias_ridge,
                stats_decay,
                ..
            } => Some(train::pam::PamConfig {
                solve_every,
                encoder_prox: encoder_prox as f32,
                encoder_bias_prox: encoder_bias_prox as f32,
                decoder_prox,
                decoder_bias_prox,
                ridge,
                bias_ridge,
                stats_decay,
            }),
        }
    }

    /// The trainer's configuration for this pipeline (or sweep point).
    pub fn trainer_config(&self) -> train::TrainConfig {
        let t = &self.train;
        let defaults = train::TrainConfig::default();
        let total_tokens = t.train_tokens.unwrap_or(self.data.n_tokens);
        let batch = t.batch_tokens.max(1) as u64;
        let steps = (total_tokens / batch).max(1);
        let frac = |s: u64| (s as f64 / steps as f64).min(1.0) as f32;
        let (lr, beta1, beta2, eps) = t.optimizer.adam();
        let optimizer = match (Self::pam_config(&t.optimizer), &t.optimizer) {
            (Some(p), _) => train::Optimizer::PamSgd(p),
            (
                None,
                &OptimizerConfig::Signum {
                    momentum,
                    warmup_steps,
                    ..
                },
            ) => train::Optimizer::Signum(train::schedule_free::SignumConfig {
                momentum,
                warmup_steps,
            }),
            (None, o) => o
                .muon()
                .map_or(train::Optimizer::Adam, train::Optimizer::Muon),
        };
        train::TrainConfig {
            batch_tokens: t.batch_tokens,
            total_tokens,
            lr: lr.map(|x| x as f32),
            adam_beta1: beta1.map(|x| x as f32),
            adam_beta2: beta2.map(|x| x as f32),
            adam_eps: eps as f32,
            lr_warmup_steps: t.lr_warmup_steps,
            lr_decay_frac: match t.lr_decay {
                LrDecay::None => 0.0,
                LrDecay::Linear => t.lr_decay_steps.map_or(defaults.lr_decay_frac, frac),
            },
            sparsity_warmup_frac: t
                .l1_warmup_steps
                .map_or(defaults.sparsity_warmup_frac, frac),
            grad_clip: (t.grad_clip > 0.0).then_some(t.grad_clip as f32),
            dead_after_tokens: t.dead_after_tokens,
            b_dec_init: t.b_dec_init,
            init_tokens: t.init_tokens,
            scale_inputs: t.scale_inputs,
            seed: self.run.seed,
            log_every: t.log_every,
            checkpoint_every: t
                .checkpoint_every
                .map_or(defaults.checkpoint_every, |tok| (tok / batch).max(1)),
            optimizer,
            device: t.device(&self.model),
            backend: t.backend(&self.model),
            compute_dtype: t.compute_dtype,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config;

    #[test]
    fn smoke_maps_onto_the_trainer() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
        let p = config::load(
            &path,
            &["run.seed=3".into(), "train.checkpoint_every=1024".into()],
        )
        .unwrap();
        let t = p.config.trainer_config();
        assert_eq!(t.total_tokens, p.config.data.n_tokens);
        assert_eq!(t.batch_tokens, p.config.train.batch_tokens);
        assert_eq!(t.seed, 3);
        assert_eq!(
            t.checkpoint_every,
            1024 / p.config.train.batch_tokens as u64
        );
        let steps = t.total_steps();
        // smoke.toml: l1_warmup_steps = 2.
        assert!((t.sparsity_warmup_frac - 2.0 / steps as f32).abs() < 1e-6);
        assert_eq!(t.grad_clip, Some(1.0));
        let off = config::load(
            &path,
            &["train.grad_clip=0".into(), "train.lr_decay=\"none\"".into()],
        )
        .unwrap();
        let t = off.config.trainer_config();
        assert_eq!((t.grad_clip, t.lr_decay_frac), (None, 0.0));
    }

    #[test]
    fn pam_sgd_maps_onto_the_trainer_and_refuses_other_variants() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
        let p = config::load(
            &path,
            &[
                "train.optimizer={ kind = \"pam_sgd\", solve_every = 4, lr = 1e-3 }".into(),
                "sae.arch={ kind = \"topk\", k = 8 }".into(),
            ],
        )
        .unwrap();
        let t = p.config.trainer_config();
        assert_eq!(t.lr, Some(1e-3));
        match t.optimizer {
            crate::train::Optimizer::PamSgd(c) => {
                assert_eq!(c.solve_every, 4);
                assert_eq!(c.stats_decay, 0.5);
            }
            other => panic!("{other:?}"),
        }
        let e = config::load(
            &path,
            &[
                "train.optimizer={ kind = \"pam_sgd\" }".into(),
                "sae.arch={ kind = \"gated\" }".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("train.optimizer.kind") && e.contains("topk, relu_l1"),
            "{e}"
        );
        let e = config::load(
            &path,
            &["train.optimizer={ kind = \"pam_sgd\", stats_decay = 1.5, solvevery = 2 }".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("solvevery"), "{e}");
        let e = config::load(
            &path,
            &["train.optimizer={ kind = \"pam_sgd\", stats_decay = 1.5 }".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("train.optimizer.stats_decay"), "{e}");
    }

    #[test]
    fn train_device_and_backend_map_onto_the_trainer_and_refuse_what_cannot_run() {
        use crate::train::{Backend, TrainDevice};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
        let load = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            config::load(&path, &sets)
        };
        // default: the model's device (cpu) and the kernels there
        let t = load(&[]).unwrap().config.trainer_config();
        assert_eq!((t.device, t.backend), (TrainDevice::Cpu, Backend::Kernels));
        let t = load(&[
            "train.backend=\"tensor\"",
            "sae.arch={ kind = \"topk\", k = 8 }",
        ])
        .unwrap()
        .config
        .trainer_config();
        assert_eq!((t.device, t.backend), (TrainDevice::Cpu, Backend::Tensor));
        // a variant without a tensor implementation: named, with the key
        let untensored = crate::sae::ArchConfig::examples()
            .into_iter()
            .find(|a| !a.supports_tensor());
        if let Some(a) = untensored {
            let arch = format!("sae.arch={{ kind = \"{}\" }}", a.kind());
            let e = load(&["train.backend=\"tensor\"", &arch])
                .unwrap_err()
                .to_string();
            assert!(e.contains("train.backend") && e.contains(a.kind()), "{e}");
        }
        // kernels on cuda, and cuda in a build without it
        let e = load(&["train.device=\"cuda\"", "train.backend=\"kernels\""])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.backend"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = load(&["train.device=\"cuda\""]).unwrap_err().to_string();
            assert!(
                e.contains("train.device") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }
}
