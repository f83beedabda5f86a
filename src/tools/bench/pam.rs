//! `saepipe bench pam`: PAM-SGD against Adam at small token budgets on synthetic data
//! (`jsae_pamsgd.md` §2.2–2.3, the paper's Fig. 1 protocol with an untied Adam baseline):
//! held-out R² and L0 per (variant, optimiser, token budget), averaged over seeds, as a table.
//!
//! Both optimisers train the same SAE from the same initialisation on the same batches with
//! the same encoder Adam settings (lr 2e-3, no warmup or decay, no AuxK); only the decoder
//! update differs. `tests/it/pam_sgd.rs` asserts the measured ordering.

use clap::Parser;

use crate::sae::{relu_l1, topk, ArchConfig, Workspace};
use crate::store::InMemorySource;
use crate::synthetic::{SyntheticConfig, SyntheticData};
use crate::train::pam::PamConfig;
use crate::train::{Optimizer, TrainConfig, TrainError, Trainer};

/// One comparison run.
#[derive(Debug, Clone)]
pub struct FitSpec {
    /// The synthetic data.
    pub synth: SyntheticConfig,
    /// Latents.
    pub d_sae: usize,
    /// Variant.
    pub arch: ArchConfig,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// Training tokens (batches of 256).
    pub tokens: u64,
    /// SAE seed.
    pub seed: u64,
}

/// Held-out results of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitResult {
    /// Pooled R² on 4096 held-out tokens (scaled space).
    pub r2: f64,
    /// Mean active latents per held-out token.
    pub l0: f64,
}

/// TopK with `k` and AuxK off (the comparison is about the optimiser).
pub fn topk_arch(k: usize) -> ArchConfig {
    ArchConfig::new(topk::Config {
        k,
        aux_coefficient: 0.0,
        ..Default::default()
    })
}

/// Train as `spec` says and evaluate on held-out tokens.
pub fn fit(spec: &FitSpec) -> FitResult {
    try_fit(spec).unwrap_or(FitResult {
        r2: f64::NAN,
        l0: f64::NAN,
    })
}

/// [`fit`], with the training error.
pub fn try_fit(spec: &FitSpec) -> Result<FitResult, TrainError> {
    let s = SyntheticData::new(spec.synth.clone());
    let d = spec.synth.d;
    let mut src = InMemorySource::new(s.sample(1 << 15, 5), d);
    let cfg = TrainConfig {
        batch_tokens: 256,
        total_tokens: spec.tokens,
        lr: Some(2e-3),
        lr_warmup_steps: 0,
        lr_decay_frac: 0.0,
        sparsity_warmup_frac: 0.0,
        dead_after_tokens: 1 << 30,
        checkpoint_every: 0,
        seed: spec.seed,
        optimizer: spec.optimizer.clone(),
        ..Default::default()
    };
    let mut t = Trainer::new(cfg, &spec.arch, spec.d_sae, &mut src)?;
    t.run(&mut src, None, &crate::util::progress::Silent, None)?;
    let n = 4096;
    let x: Vec<f32> = s.sample(n, 99).iter().map(|v| v * t.scale()).collect();
    let mut ws = Workspace::default();
    t.sae().encode(&x, n, &mut ws)?;
    let codes = std::mem::take(&mut ws.codes);
    let mut out = Vec::new();
    t.sae().decode(&codes, &mut out, &mut ws);
    let mut mean = vec![0.0f64; d];
    for r in x.chunks(d) {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += *v as f64 / n as f64;
        }
    }
    let sse: f64 = x
        .iter()
        .zip(&out)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let sst: f64 = x
        .chunks(d)
        .flat_map(|r| r.iter().zip(&mean).map(|(a, m)| (*a as f64 - m).powi(2)))
        .sum();
    Ok(FitResult {
        r2: 1.0 - sse / sst,
        l0: codes.nnz() as f64 / n as f64,
    })
}

/// Options of `saepipe bench pam`.
#[derive(Debug, Parser)]
#[command(
    name = "saepipe bench pam",
    about = "PAM-SGD vs Adam sample efficiency on synthetic data"
)]
pub struct BenchPamArgs {
    /// Token budgets (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,32768,131072")]
    pub tokens: Vec<u64>,
    /// Seeds averaged per cell.
    #[arg(long, default_value_t = 2)]
    pub seeds: u64,
    /// TopK k.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// ReLU+L1 coefficient.
    #[arg(long, default_value_t = 1.0)]
    pub l1: f32,
    /// PAM-SGD steps per decoder solve.
    #[arg(long, default_value_t = PamConfig::default().solve_every)]
    pub solve_every: u64,
    /// PAM-SGD statistics decay.
    #[arg(long, default_value_t = PamConfig::default().stats_decay)]
    pub stats_decay: f64,
}

/// Run the comparison and return the table.
pub fn run(args: &[String]) -> Result<String, super::BenchError> {
    let a = BenchPamArgs::try_parse_from(
        std::iter::once("saepipe bench pam".to_string()).chain(args.iter().cloned()),
    )
    .map_err(|e| super::BenchError::Usage(e.to_string()))?;
    let synth = SyntheticConfig {
        d: 32,
        n_features: 64,
        mean_active: 3.0,
        noise: 0.01,
        bipolar: false,
        seed: 11,
    };
    let pam = Optimizer::PamSgd(PamConfig {
        solve_every: a.solve_every,
        stats_decay: a.stats_decay,
        ..PamConfig::default()
    });
    let archs = [
        topk_arch(a.k),
        ArchConfig::new(relu_l1::Config {
            l1_coefficient: a.l1,
            ..Default::default()
        }),
    ];
    let mut out = String::from(
        "synthetic d=32, 64 true features (~3 active), d_sae=128, batch 256, encoder Adam lr 2e-3\n",
    );
    out.push_str(&format!(
        "{:<8} {:>8} {:>10} {:>8} {:>10} {:>8}\n",
        "arch", "tokens", "R² adam", "L0 adam", "R² pam", "L0 pam"
    ));
    for arch in &archs {
        for &tokens in &a.tokens {
            let mut cells = [0.0f64; 4];
            for seed in 1..=a.seeds.max(1) {
                for (j, opt) in [Optimizer::Adam, pam.clone()].into_iter().enumerate() {
                    let r = try_fit(&FitSpec {
                        synth: synth.clone(),
                        d_sae: 128,
                        arch: arch.clone(),
                        optimizer: opt,
                        tokens,
                        seed,
                    })
                    .map_err(|e| super::BenchError::Train(e.to_string()))?;
                    cells[2 * j] += r.r2 / a.seeds.max(1) as f64;
                    cells[2 * j + 1] += r.l0 / a.seeds.max(1) as f64;
                }
            }
            out.push_str(&format!(
                "{:<8} {:>8} {:>10.3} {:>8.1} {:>10.3} {:>8.1}\n",
                arch.kind(),
                tokens,
                cells[0],
                cells[1],
                cells[2],
                cells[3]
            ));
        }
    }
    Ok(out)
}
