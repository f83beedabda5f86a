//! The shared SAE trainer (sae_variants.md §1): one loop for every variant, which only sees
//! the [`Sae`] trait.
//!
//! Per step:
//! 1. read `batch_tokens` rows from the [`ActivationSource`] (wrapping at its end), scale by `c`;
//! 2. zero gradients; `dead[i] = tokens_since_fired[i] > dead_after_tokens`;
//! 3. `Sae::forward_backward` (λ multiplied by the sparsity warmup);
//! 4. NaN guard on the loss terms (the error names the step and the variant);
//! 5. project unit-norm decoder gradients (§1.3 A), clip the global norm, Adam with the
//!    scheduled LR, renormalise unit-norm rows;
//! 6. firing bookkeeping in tokens since last fired (§1.5), log row, progress, checkpoint;
//! 7. [`Sae::revive_dead`] with the updated dead mask (Adam moments of reset entries zeroed).
//!
//! Before step 0: estimate `c = √d / E‖x‖₂` (§1.1, SAELens `expected_average_only_in`) and
//! initialise `b_dec` (geometric median by Weiszfeld, §1.2, or the mean) on the first
//! `init_tokens` rows; then rewind the source.
//!
//! Decision: the LR warmup is capped at 10% of the run, so short runs are not all warmup.

pub mod checkpoint;
pub mod optim;
pub mod pam;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::{self, Workspace};
use crate::sae::export::{self, ExportError, ExportMeta, Folded};
use crate::sae::{ArchConfig, Sae, SaeError, StepInput};
pub use crate::store::{ActivationSource, DataError, InMemorySource};
use crate::util::error::{ensure_finite, NumericError};
use crate::util::progress::Reporter;
use crate::util::rng::Rng;
pub use checkpoint::TrainLog;
use optim::Adam;

/// Checkpoint file name inside the output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Training log file name inside the output directory.
pub const LOG_FILE: &str = "train_log.parquet";

/// How `b_dec` is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// Geometric median of the init sample (Weiszfeld, ≤100 iterations).
    #[default]
    GeometricMedian,
    /// Mean of the init sample.
    Mean,
    /// Zero.
    Zero,
}

/// The optimiser of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Optimizer {
    /// Adam on every trainable parameter.
    #[default]
    Adam,
    /// PAM-SGD (`jsae_pamsgd.md` §2.2): Adam with a proximal term on the encoder, the
    /// decoder by a closed-form solve every `solve_every` steps. TopK and ReLU+L1 only.
    PamSgd(pam::PamConfig),
}

impl Optimizer {
    /// Name as in the metrics tables (`adam`, `pam_sgd`).
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Adam => "adam",
            Optimizer::PamSgd(_) => "pam_sgd",
        }
    }
}

/// Training hyperparameters shared by every variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Tokens per optimiser step. Default 4096.
    pub batch_tokens: usize,
    /// Tokens to train on (steps = total_tokens / batch_tokens). Default 100_000_000.
    pub total_tokens: u64,
    /// Adam learning rate; `None` = the variant's recommendation (§9). Default None.
    pub lr: Option<f32>,
    /// Adam β1; `None` = the variant's recommendation (0 for Gated/JumpReLU, else 0.9). Default None.
    pub adam_beta1: Option<f32>,
    /// Adam β2; `None` = 0.999. Default None.
    pub adam_beta2: Option<f32>,
    /// Adam ε. Default 1e-8.
    pub adam_eps: f32,
    /// Linear LR warmup in steps (capped at 10% of the run). Default 1000.
    pub lr_warmup_steps: u64,
    /// Fraction of the run over which the LR decays linearly to 0 at the end. Default 0.2.
    pub lr_decay_frac: f32,
    /// Fraction of the run over which λ warms up linearly from 0. Default 0.05.
    pub sparsity_warmup_frac: f32,
    /// Global gradient-norm clip; `None` = no clipping. Default Some(1.0).
    pub grad_clip: Option<f32>,
    /// A latent is dead after this many tokens without firing. Default 10_000_000.
    pub dead_after_tokens: u64,
    /// `b_dec` initialisation. Default geometric_median.
    pub b_dec_init: BDecInit,
    /// Rows used to estimate the input scale and initialise `b_dec`. Default 8192.
    pub init_tokens: usize,
    /// Scale inputs so that `E‖x‖ = √d_in` (folded into the weights at export). Default true.
    pub scale_inputs: bool,
    /// Seed of the initialisation. Default 0.
    pub seed: u64,
    /// Log a row every this many steps (and at the last step). Default 10.
    pub log_every: u64,
    /// Checkpoint every this many steps (0 = only at the end). Default 1000.
    pub checkpoint_every: u64,
    /// Optimiser: Adam (default) or PAM-SGD (whose encoder step uses the Adam settings above).
    pub optimizer: Optimizer,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_tokens: 4096,
            total_tokens: 100_000_000,
            lr: None,
            adam_beta1: None,
            adam_beta2: None,
            adam_eps: 1e-8,
            lr_warmup_steps: 1000,
            lr_decay_frac: 0.2,
            sparsity_warmup_frac: 0.05,
            grad_clip: Some(1.0),
            dead_after_tokens: 10_000_000,
            b_dec_init: BDecInit::GeometricMedian,
            init_tokens: 8192,
            scale_inputs: true,
            seed: 0,
            log_every: 10,
            checkpoint_every: 1000,
            optimizer: Optimizer::Adam,
        }
    }
}

impl TrainConfig {
    /// Total optimiser steps.
    pub fn total_steps(&self) -> u64 {
        self.total_tokens / self.batch_tokens.max(1) as u64
    }
}

/// Training errors.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad configuration.
    #[error("invalid training config: {0}")]
    Config(String),
    /// The SAE rejected its config or input.
    #[error(transparent)]
    Sae(#[from] SaeError),
    /// The activation source failed.
    #[error("reading activations: {0}")]
    Data(#[from] DataError),
    /// The activations do not fit the SAE.
    #[error("the activations have d_in = {found} but the SAE expects {expected}; train an SAE for this hookpoint's width")]
    Width {
        /// SAE width.
        expected: usize,
        /// Data width.
        found: usize,
    },
    /// Nothing to train on.
    #[error("the activation set is {0}; capture activations first (saepipe capture)")]
    EmptyData(&'static str),
    /// A NaN or infinity appeared.
    #[error("training {arch} stopped at step {step}: {source}; lower the learning rate or check the activations")]
    NonFinite {
        /// Variant.
        arch: &'static str,
        /// Step.
        step: u64,
        /// Which value.
        source: NumericError,
    },
    /// Checkpoint unreadable or from a different run.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// File.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Export failed.
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Steps completed after this one.
    pub step: u64,
    /// Tokens consumed so far.
    pub tokens: u64,
    /// Total loss.
    pub loss: f64,
    /// Loss parts, then metrics ([`crate::sae::StepOutput`]), as logged.
    pub terms: Vec<(&'static str, f64)>,
    /// Mean active latents per token (training codes).
    pub l0: f64,
    /// Fraction of latents dead by the token counter.
    pub dead_frac: f64,
    /// LR used.
    pub lr: f32,
}

/// Trainer state: the SAE, optimiser state, counters and the log.
pub struct Trainer {
    cfg: TrainConfig,
    sae: Box<dyn Sae>,
    grads: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    adam: Adam,
    step: u64,
    tokens: u64,
    total_steps: u64,
    rng: Rng,
    scale: f32,
    tsf: Vec<u64>,
    dead: Vec<bool>,
    fired: Vec<bool>,
    log: TrainLog,
    ws: Workspace,
    batch: Vec<f32>,
    pam: Option<PamRun>,
}

/// PAM-SGD bookkeeping of a run.
struct PamRun {
    cfg: pam::PamConfig,
    state: pam::PamState,
    /// Indices of `W_dec` and `b_dec` in the SAE's parameters.
    w_dec: usize,
    b_dec: usize,
}

impl PamRun {
    /// Set up for `sae`, or explain why PAM-SGD cannot train it.
    fn new(cfg: &pam::PamConfig, arch: &ArchConfig, sae: &dyn Sae) -> Result<Self, TrainError> {
        if !arch.supports_pam_sgd() {
            return Err(TrainError::Config(format!(
                "train.optimizer.kind = \"pam_sgd\" supports sae.arch kinds {}; this SAE is `{}` (use kind = \"adam\" for it)",
                ArchConfig::pam_sgd_kinds().join(", "),
                arch.kind()
            )));
        }
        let find = |name: &str| {
            sae.params()
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| {
                    TrainError::Config(format!(
                        "PAM-SGD needs a `{name}` parameter, which {} does not have",
                        arch.kind()
                    ))
                })
        };
        let (w_dec, b_dec) = (find("W_dec")?, find("b_dec")?);
        let (d, f) = sae.dims();
        let state = pam::PamState::new(
            f,
            d,
            sae.params().iter().map(|p| {
                (
                    p.trainable && !pam::DECODER_PARAMS.contains(&p.name),
                    &p.data[..],
                )
            }),
        );
        Ok(Self {
            cfg: cfg.clone(),
            state,
            w_dec,
            b_dec,
        })
    }

    fn is_decoder(&self, i: usize) -> bool {
        i == self.w_dec || i == self.b_dec
    }

    /// Closed-form decoder from the statistics, installed by the variant; then new anchors.
    fn solve(&mut self, sae: &mut dyn Sae) -> Result<(), TrainError> {
        let arch = sae.arch();
        let (w, b) = {
            let p = sae.params();
            self.state
                .solve(&self.cfg, &p[self.w_dec].data, &p[self.b_dec].data)
                .map_err(|e| TrainError::Config(format!("{arch}: {e}")))?
        };
        sae.install_decoder(&w, &b)?;
        self.state.refresh_anchors(sae.params());
        self.state.decay(self.cfg.stats_decay);
        Ok(())
    }
}

fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
    let mut bad = Vec::new();
    if cfg.batch_tokens == 0 {
        bad.push("batch_tokens must be > 0".to_string());
    }
    if cfg.total_steps() == 0 {
        bad.push(format!(
            "total_tokens ({}) must be at least batch_tokens ({})",
            cfg.total_tokens, cfg.batch_tokens
        ));
    }
    if cfg.lr.is_some_and(|l| !(l > 0.0 && l.is_finite())) {
        bad.push("lr must be positive".into());
    }
    if cfg.adam_beta1.is_some_and(|b| !(0.0..1.0).contains(&b))
        || cfg.adam_beta2.is_some_and(|b| !(0.0..1.0).contains(&b))
    {
        bad.push("adam betas must be in [0, 1)".into());
    }
    if cfg.grad_clip.is_some_and(|c| c.is_nan() || c <= 0.0) {
        bad.push("grad_clip must be positive".into());
    }
    if cfg.init_tokens == 0 {
        bad.push("init_tokens must be > 0".into());
    }
    if let Optimizer::PamSgd(p) = &cfg.optimizer {
        bad.extend(p.problems());
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Config(bad.join("; ")))
    }
}

/// Read up to `rows` rows from the start of `src` (then rewind).
fn read_init(src: &mut dyn ActivationSource, rows: usize) -> Result<Vec<f32>, TrainError> {
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

fn mean_rows(x: &[f32], d: usize) -> Vec<f32> {
    let n = (x.len() / d).max(1);
    let mut s = vec![0.0f64; d];
    for r in x.chunks(d) {
        for (a, b) in s.iter_mut().zip(r) {
            *a += *b as f64;
        }
    }
    s.iter().map(|v| (v / n as f64) as f32).collect()
}

impl Trainer {
    /// Estimate the input scale, build the SAE of width `d_sae` and initialise `b_dec` from
    /// the start of `src` (which is rewound).
    pub fn new(
        cfg: TrainConfig,
        arch: &ArchConfig,
        d_sae: usize,
        src: &mut dyn ActivationSource,
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        let d = src.d_in();
        let mut sae = arch.build(d, d_sae, cfg.seed)?;
        let init = read_init(src, cfg.init_tokens)?;
        if init.is_empty() {
            return Err(TrainError::EmptyData("empty"));
        }
        ensure_finite(&init, "activations (init sample)", None).map_err(|source| {
            TrainError::NonFinite {
                arch: sae.arch(),
                step: 0,
                source,
            }
        })?;
        let mean_norm = init
            .chunks(d)
            .map(|r| (kernels::dot(r, r) as f64).sqrt())
            .sum::<f64>()
            / (init.len() / d) as f64;
        if mean_norm == 0.0 {
            return Err(TrainError::EmptyData("all zeros (mean norm 0)"));
        }
        let scale = if cfg.scale_inputs {
            ((d as f64).sqrt() / mean_norm) as f32
        } else {
            1.0
        };
        let scaled: Vec<f32> = init.iter().map(|v| v * scale).collect();
        let b_dec = match cfg.b_dec_init {
            BDecInit::GeometricMedian => geometric_median(&scaled, d),
            BDecInit::Mean => mean_rows(&scaled, d),
            BDecInit::Zero => vec![0.0; d],
        };
        if let Some(p) = sae.params_mut().iter_mut().find(|p| p.name == "b_dec") {
            p.data.copy_from_slice(&b_dec);
        }
        sae.init_from_sample(&scaled, scaled.len() / d)?;
        let (lr0, b1, b2) = arch.recommended_adam(d_sae);
        let adam = Adam {
            lr: cfg.lr.unwrap_or(lr0),
            beta1: cfg.adam_beta1.unwrap_or(b1),
            beta2: cfg.adam_beta2.unwrap_or(b2),
            eps: cfg.adam_eps,
        };
        let zeros = |sae: &dyn Sae| {
            sae.params()
                .iter()
                .map(|p| {
                    if p.trainable {
                        vec![0.0; p.data.len()]
                    } else {
                        Vec::new()
                    }
                })
                .collect::<Vec<_>>()
        };
        let rng = Rng::new(cfg.seed.wrapping_add(0xA11CE));
        let pam = match &cfg.optimizer {
            Optimizer::PamSgd(p) => Some(PamRun::new(p, arch, &*sae)?),
            Optimizer::Adam => None,
        };
        Ok(Self {
            pam,
            grads: sae
                .params()
                .iter()
                .map(|p| vec![0.0; p.data.len()])
                .collect(),
            m: zeros(&*sae),
            v: zeros(&*sae),
            adam,
            step: 0,
            tokens: 0,
            total_steps: cfg.total_steps(),
            rng,
            scale,
            tsf: vec![0; d_sae],
            dead: vec![false; d_sae],
            fired: vec![false; d_sae],
            log: TrainLog::default(),
            ws: Workspace::default(),
            batch: Vec::new(),
            sae,
            cfg,
        })
    }

    /// Continue from a checkpoint written by [`Trainer::save_checkpoint`]. `arch` and `cfg`
    /// must be the ones the checkpoint was made with; `src` is positioned where it was.
    pub fn resume(
        path: &Path,
        cfg: TrainConfig,
        arch: &ArchConfig,
        src: &mut dyn ActivationSource,
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        let ck = checkpoint::load(path)?;
        let cerr = |msg: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        if ck.meta.arch_kind != arch.kind() {
            return Err(cerr(format!(
                "it holds a {} SAE but the config asks for {}; point to the matching checkpoint or start a new run",
                ck.meta.arch_kind,
                arch.kind()
            )));
        }
        let want_arch = serde_json::to_value(arch).map_err(|e| cerr(e.to_string()))?;
        if ck.meta.arch != want_arch {
            return Err(cerr(format!(
                "architecture config differs: checkpoint {} vs requested {want_arch}",
                ck.meta.arch
            )));
        }
        let want_opt = serde_json::to_value(&cfg.optimizer).map_err(|e| cerr(e.to_string()))?;
        let have_opt = ck
            .meta
            .train
            .get("optimizer")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({ "kind": "adam" }));
        if have_opt != want_opt {
            return Err(cerr(format!(
                "it was trained with optimizer {have_opt} but the config asks for {want_opt}; resume with the same train.optimizer or start a new run"
            )));
        }
        if src.d_in() != ck.meta.d_in {
            return Err(TrainError::Width {
                expected: ck.meta.d_in,
                found: src.d_in(),
            });
        }
        let mut sae = arch.build(ck.meta.d_in, ck.meta.d_sae, cfg.seed)?;
        let (lr0, b1, b2) = arch.recommended_adam(ck.meta.d_sae);
        let mut m = Vec::new();
        let mut v = Vec::new();
        for p in sae.params_mut() {
            let get = |k: String, len: usize| -> Result<Vec<f32>, TrainError> {
                let t = ck
                    .tensors
                    .get(&k)
                    .ok_or_else(|| cerr(format!("missing tensor {k}")))?;
                if t.len() != len {
                    return Err(cerr(format!(
                        "tensor {k} has {} values, expected {len}",
                        t.len()
                    )));
                }
                Ok(t.clone())
            };
            p.data = get(format!("param.{}", p.name), p.data.len())?;
            if p.trainable {
                m.push(get(format!("adam_m.{}", p.name), p.data.len())?);
                v.push(get(format!("adam_v.{}", p.name), p.data.len())?);
            } else {
                m.push(Vec::new());
                v.push(Vec::new());
            }
        }
        let pam = match &cfg.optimizer {
            Optimizer::PamSgd(p) => {
                let mut pr = PamRun::new(p, arch, &*sae)?;
                for (a, p) in pr.state.anchors.iter_mut().zip(sae.params()) {
                    if !a.is_empty() {
                        let k = format!("pam_anchor.{}", p.name);
                        let t = ck.tensors.get(&k).ok_or_else(|| {
                            cerr(format!(
                                "missing tensor {k}: the checkpoint was not made with PAM-SGD"
                            ))
                        })?;
                        if t.len() != a.len() {
                            return Err(cerr(format!("tensor {k} has the wrong length")));
                        }
                        a.copy_from_slice(t);
                    }
                }
                let st = &mut pr.state;
                let mut n = [0.0f64];
                for (k, dst) in [
                    ("pam.G", &mut st.g[..]),
                    ("pam.C", &mut st.c[..]),
                    ("pam.sz", &mut st.sz[..]),
                    ("pam.sx", &mut st.sx[..]),
                    ("pam.n", &mut n[..]),
                ] {
                    let t = ck
                        .tensors64
                        .get(k)
                        .ok_or_else(|| cerr(format!("missing PAM-SGD statistics {k}")))?;
                    if t.len() != dst.len() {
                        return Err(cerr(format!("tensor {k} has the wrong length")));
                    }
                    dst.copy_from_slice(t);
                }
                st.n = n[0];
                Some(pr)
            }
            Optimizer::Adam => None,
        };
        let rng_state: Result<Vec<u64>, _> = ck.meta.rng.iter().map(|s| s.parse::<u64>()).collect();
        let rng_state = rng_state.map_err(|e| cerr(format!("bad rng state: {e}")))?;
        src.seek(ck.meta.data_position)?;
        let d_sae = ck.meta.d_sae;
        if ck.tokens_since_fired.len() != d_sae {
            return Err(cerr("tokens_since_fired has the wrong length".into()));
        }
        Ok(Self {
            pam,
            grads: sae
                .params()
                .iter()
                .map(|p| vec![0.0; p.data.len()])
                .collect(),
            m,
            v,
            adam: Adam {
                lr: cfg.lr.unwrap_or(lr0),
                beta1: cfg.adam_beta1.unwrap_or(b1),
                beta2: cfg.adam_beta2.unwrap_or(b2),
                eps: cfg.adam_eps,
            },
            step: ck.meta.step,
            tokens: ck.meta.tokens,
            total_steps: ck.meta.total_steps,
            rng: Rng::from_state([rng_state[0], rng_state[1], rng_state[2], rng_state[3]]),
            scale: ck.meta.scale,
            tsf: ck.tokens_since_fired,
            dead: vec![false; d_sae],
            fired: vec![false; d_sae],
            log: ck.log,
            ws: Workspace::default(),
            batch: Vec::new(),
            sae,
            cfg,
        })
    }

    /// The SAE being trained.
    pub fn sae(&self) -> &dyn Sae {
        &*self.sae
    }
    /// Mutable access to the SAE (benchmarks, custom initialisation before step 0).
    pub fn sae_mut(&mut self) -> &mut dyn Sae {
        &mut *self.sae
    }
    /// The input scale `c` (activations are multiplied by it before the SAE sees them).
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.step
    }
    /// Total steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }
    /// The log so far.
    pub fn log(&self) -> &TrainLog {
        &self.log
    }
    /// The RNG (for components that draw during training).
    pub fn rng_mut(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn read_batch(&mut self, src: &mut dyn ActivationSource) -> Result<(), TrainError> {
        let (d, rows) = (src.d_in(), self.cfg.batch_tokens);
        if d != self.sae.dims().0 {
            return Err(TrainError::Width {
                expected: self.sae.dims().0,
                found: d,
            });
        }
        self.batch.clear();
        let mut wrapped = false;
        while self.batch.len() < rows * d {
            let got = src.next_batch(rows - self.batch.len() / d, &mut self.batch)?;
            if got == 0 {
                if wrapped {
                    return Err(TrainError::EmptyData("empty"));
                }
                src.seek(0)?;
                wrapped = true;
            } else {
                wrapped = false;
            }
        }
        let s = self.scale;
        if s != 1.0 {
            self.batch
                .par_chunks_mut(1 << 14)
                .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
        }
        Ok(())
    }

    /// One optimiser step on the next batch of `src`.
    pub fn step(&mut self, src: &mut dyn ActivationSource) -> Result<StepRecord, TrainError> {
        let t = self.step;
        let arch = self.sae.arch();
        let nonfinite = |source| TrainError::NonFinite {
            arch,
            step: t,
            source,
        };
        // 1. batch
        self.read_batch(src)?;
        ensure_finite(&self.batch, "activation batch", Some(t)).map_err(nonfinite)?;
        let n = self.cfg.batch_tokens;
        // 2. zero grads, dead mask
        for g in &mut self.grads {
            kernels::zero(g);
        }
        for (dd, &c) in self.dead.iter_mut().zip(&self.tsf) {
            *dd = c > self.cfg.dead_after_tokens;
        }
        let sw = (self.cfg.sparsity_warmup_frac.clamp(0.0, 1.0) as f64 * self.total_steps as f64)
            .ceil() as u64;
        let input = StepInput {
            x: &self.batch,
            n,
            step: t,
            sparsity_scale: optim::sparsity_factor(t, sw),
            dead: &self.dead,
        };
        // 3. forward/backward
        let mut out = self
            .sae
            .forward_backward(&input, &mut self.grads, &mut self.ws)?;
        self.sae.update_state(&input, &self.ws);
        // 3b. PAM-SGD: the decoder is frozen during the encoder step, which gets the
        //     proximal term towards its anchor.
        if let Some(pr) = &self.pam {
            kernels::zero(&mut self.grads[pr.w_dec]);
            kernels::zero(&mut self.grads[pr.b_dec]);
            let params = self.sae.params();
            pr.state.add_prox_grads(&pr.cfg, params, &mut self.grads);
            let prox = pr.state.prox_loss(&pr.cfg, params);
            out.loss += prox;
            out.losses.push(("prox", prox));
        }
        // 4. NaN guard
        let mut vals: Vec<f32> = vec![out.loss as f32];
        vals.extend(out.losses.iter().chain(&out.metrics).map(|t| t.1 as f32));
        ensure_finite(&vals, "loss terms", Some(t)).map_err(nonfinite)?;
        // 5. project, clip, Adam, renormalise
        let d = self.sae.dims().0;
        {
            let params = self.sae.params();
            for (p, g) in params.iter().zip(self.grads.iter_mut()) {
                if p.unit_rows {
                    kernels::project_rows(g, &p.data, d);
                }
            }
            if let Some(clip) = self.cfg.grad_clip {
                let norm: f64 = params
                    .iter()
                    .zip(&self.grads)
                    .filter(|(p, _)| p.trainable)
                    .map(|(_, g)| optim::sum_sq(g))
                    .sum::<f64>()
                    .sqrt();
                if !norm.is_finite() {
                    return Err(nonfinite(NumericError::NonFinite {
                        what: "gradient norm".into(),
                        index: 0,
                        value: norm as f32,
                        step: Some(t),
                    }));
                }
                if norm > clip as f64 {
                    let s = (clip as f64 / norm) as f32;
                    for g in &mut self.grads {
                        optim::scale(g, s);
                    }
                }
            }
        }
        let warm = self.cfg.lr_warmup_steps.min(self.total_steps / 10);
        let lr = self.adam.lr * optim::lr_factor(t, self.total_steps, warm, self.cfg.lr_decay_frac);
        for (i, p) in self.sae.params_mut().iter_mut().enumerate() {
            if !p.trainable || self.pam.as_ref().is_some_and(|pr| pr.is_decoder(i)) {
                continue;
            }
            self.adam.update(
                lr,
                t + 1,
                &mut p.data,
                &self.grads[i],
                &mut self.m[i],
                &mut self.v[i],
            );
            if p.unit_rows {
                kernels::normalize_rows(&mut p.data, d);
            }
        }
        // 5b. PAM-SGD: statistics of this batch's codes; the decoder solve closes an outer
        //     iteration every `solve_every` steps and at the end of the run.
        if let Some(pr) = &mut self.pam {
            pr.state.accumulate(&self.ws.codes, &self.batch, d);
            if (t + 1).is_multiple_of(pr.cfg.solve_every) || t + 1 == self.total_steps {
                pr.solve(&mut *self.sae)?;
            }
        }
        // 6. firing bookkeeping
        self.fired.iter_mut().for_each(|f| *f = false);
        for &i in &self.ws.codes.idx {
            self.fired[i as usize] = true;
        }
        let mut n_dead = 0usize;
        for (c, &f) in self.tsf.iter_mut().zip(&self.fired) {
            *c = if f { 0 } else { *c + n as u64 };
            if *c > self.cfg.dead_after_tokens {
                n_dead += 1;
            }
        }
        self.step += 1;
        self.tokens += n as u64;
        // 7. variant-specific revival of dead latents (SA-GSAE threshold resets)
        for (dd, &c) in self.dead.iter_mut().zip(&self.tsf) {
            *dd = c > self.cfg.dead_after_tokens;
        }
        for (pi, e) in self.sae.revive_dead(self.step, &self.dead) {
            if let (Some(m), Some(v)) = (self.m[pi].get_mut(e), self.v[pi].get_mut(e)) {
                *m = 0.0;
                *v = 0.0;
            }
        }
        let rec = StepRecord {
            step: self.step,
            tokens: self.tokens,
            loss: out.loss,
            terms: out.losses.into_iter().chain(out.metrics).collect(),
            l0: self.ws.codes.nnz() as f64 / n as f64,
            dead_frac: n_dead as f64 / self.tsf.len() as f64,
            lr,
        };
        if self.step.is_multiple_of(self.cfg.log_every.max(1)) || self.step == self.total_steps {
            let mut row = vec![
                ("step".to_string(), rec.step as f64),
                ("tokens".to_string(), rec.tokens as f64),
                ("loss".to_string(), rec.loss),
            ];
            row.extend(rec.terms.iter().map(|(k, v)| (k.to_string(), *v)));
            row.extend([
                ("l0".to_string(), rec.l0),
                ("dead_frac".to_string(), rec.dead_frac),
                ("lr".to_string(), rec.lr as f64),
            ]);
            self.log.push(&row);
        }
        Ok(rec)
    }

    /// Train until `total_steps` (or `stop_at` steps, for tests), checkpointing into
    /// `out_dir` every `checkpoint_every` steps and at the end, with progress through
    /// `reporter`. Writes `train_log.parquet` with each checkpoint.
    pub fn run(
        &mut self,
        src: &mut dyn ActivationSource,
        out_dir: Option<&Path>,
        reporter: &dyn Reporter,
        stop_at: Option<u64>,
    ) -> Result<(), TrainError> {
        let end = stop_at.unwrap_or(self.total_steps).min(self.total_steps);
        let prog = reporter.start(
            &format!("train {}", self.sae.arch()),
            Some(self.total_steps),
        );
        prog.set_position(self.step);
        while self.step < end {
            let r = self.step(src)?;
            prog.advance(1);
            if r.step % self.cfg.log_every.max(1) == 0 || r.step == end {
                prog.set_message(format!(
                    "loss {:.4} L0 {:.1} dead {:.3}",
                    r.loss, r.l0, r.dead_frac
                ));
            }
            if let Some(dir) = out_dir {
                let ce = self.cfg.checkpoint_every;
                if (ce > 0 && r.step % ce == 0) || r.step == end {
                    self.save_checkpoint(&dir.join(CHECKPOINT_FILE), src.position())?;
                    self.log.write_parquet(&dir.join(LOG_FILE))?;
                }
            }
        }
        prog.finish();
        Ok(())
    }

    /// Write a checkpoint (weights, Adam moments, step, RNG, data position) atomically.
    pub fn save_checkpoint(&self, path: &Path, data_position: u64) -> Result<(), TrainError> {
        let (d_in, d_sae) = self.sae.dims();
        let cerr = |e: serde_json::Error| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let meta = checkpoint::CheckpointMeta {
            format: checkpoint::FORMAT.into(),
            arch_kind: self.sae.arch().into(),
            arch: serde_json::to_value(self.sae.config()).map_err(cerr)?,
            train: serde_json::to_value(&self.cfg).map_err(cerr)?,
            d_in,
            d_sae,
            step: self.step,
            tokens: self.tokens,
            total_steps: self.total_steps,
            rng: self.rng.state().map(|s| s.to_string()),
            data_position,
            scale: self.scale,
            log_columns: self.log.columns.clone(),
        };
        let mut tensors: Vec<(String, &[f32])> = Vec::new();
        for (i, p) in self.sae.params().iter().enumerate() {
            tensors.push((format!("param.{}", p.name), &p.data));
            if p.trainable {
                tensors.push((format!("adam_m.{}", p.name), &self.m[i]));
                tensors.push((format!("adam_v.{}", p.name), &self.v[i]));
            }
        }
        let mut tensors64: Vec<(String, &[f64])> = Vec::new();
        if let Some(pr) = &self.pam {
            for (p, a) in self.sae.params().iter().zip(&pr.state.anchors) {
                if !a.is_empty() {
                    tensors.push((format!("pam_anchor.{}", p.name), a));
                }
            }
            let st = &pr.state;
            tensors64.extend([
                ("pam.G".to_string(), &st.g[..]),
                ("pam.C".to_string(), &st.c[..]),
                ("pam.sz".to_string(), &st.sz[..]),
                ("pam.sx".to_string(), &st.sx[..]),
                ("pam.n".to_string(), std::slice::from_ref(&st.n)),
            ]);
        }
        checkpoint::save(path, &meta, &tensors, &tensors64, &self.tsf, &self.log)
    }

    /// Export the SAE in SAELens v6 format (scale and decoder norms folded) into `dir`.
    pub fn export(&self, dir: &Path, meta: &ExportMeta) -> Result<Folded, TrainError> {
        Ok(export::save_saelens(&*self.sae, self.scale, meta, dir)?)
    }
}
