//! The engine's training settings: what `[train]` (`crate::config::TrainSection`) resolves
//! to, with every default filled in and step counts as fractions of the run, plus their
//! validation.

use serde::{Deserialize, Serialize};

use super::muon::MuonConfig;
use super::pam;
use super::schedule_free::SignumConfig;
pub use super::tensor::TrainDevice;
use super::TrainError;

/// How `b_dec` is initialised (`train.b_dec_init`: `"geometric_median"`, `"mean"`, `"zeros"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// Geometric median of the init sample (Weiszfeld, ≤100 iterations).
    #[default]
    GeometricMedian,
    /// Mean of the init sample.
    Mean,
    /// Zeros.
    Zeros,
}

/// Operand dtype of the tensor backend's GEMMs (`train.compute_dtype`): mixed precision as
/// in autocast — the encoder and decoder products take their operands in this dtype and
/// return f32; parameters, Adam's moments, the selection, every elementwise op and every
/// reduction stay f32. The CPU kernels compute in f32 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    /// f32 GEMMs (default).
    #[default]
    F32,
    /// bf16 operands (tensor cores on a GPU).
    Bf16,
    /// f16 operands.
    F16,
}

impl ComputeDtype {
    /// The candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
            ComputeDtype::F16 => candle_core::DType::F16,
        }
    }
    /// As in the pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F16 => "f16",
        }
    }
}

/// Which implementation computes each step's loss and gradients (`train.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The hand-written sparse CPU kernels ([`crate::sae::Sae::forward_backward`]).
    #[default]
    Kernels,
    /// Candle tensors and autograd on [`TrainConfig::device`]
    /// ([`crate::sae::Sae::tensor_forward`], [`super::tensor`]).
    Tensor,
}

impl Backend {
    /// As in the pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kernels => "kernels",
            Backend::Tensor => "tensor",
        }
    }
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
    /// EleutherAI sparsify's default: sign descent inside schedule-free averaging
    /// ([`super::schedule_free`]); lr default 5e-3/√(d_sae/2^14). CPU kernels only.
    Signum(SignumConfig),
    /// Newton–Schulz-orthogonalised momentum for the matrices, Adam for the rest
    /// ([`super::muon`]); lr default 2e-3. CPU kernels only.
    Muon(MuonConfig),
}

impl Optimizer {
    /// Name as in the metrics tables (`adam`, `pam_sgd`, `signum`, `muon`).
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Adam => "adam",
            Optimizer::PamSgd(_) => "pam_sgd",
            Optimizer::Signum(_) => "signum",
            Optimizer::Muon(_) => "muon",
        }
    }

    /// Whether it runs on the tensor backend (Adam and PAM-SGD; `signum` and `muon` are
    /// CPU-kernel only while the tensor backend keeps its own optimiser state).
    pub fn supports_tensor(&self) -> bool {
        matches!(self, Optimizer::Adam | Optimizer::PamSgd(_))
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
    /// Adam learning rate (signum: its γ); `None` = the variant's recommendation (§9; signum:
    /// 5e-3/√(d_sae/2^14)). Default None.
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
    /// Optimiser: Adam (default), PAM-SGD (whose encoder step uses the Adam settings above),
    /// schedule-free `signum` (which uses `lr` only, and none of the LR schedule) or `muon`.
    pub optimizer: Optimizer,
    /// Device of the training step. Default cpu.
    pub device: TrainDevice,
    /// Implementation of the training step: the CPU kernels (default) or candle tensors on
    /// `device` (the only one for cuda).
    pub backend: Backend,
    /// Operand dtype of the tensor backend's GEMMs ([`ComputeDtype`]). Default f32.
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
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
            device: TrainDevice::Cpu,
            backend: Backend::Kernels,
            compute_dtype: ComputeDtype::F32,
        }
    }
}

impl TrainConfig {
    /// Total optimiser steps.
    pub fn total_steps(&self) -> u64 {
        self.total_tokens / self.batch_tokens.max(1) as u64
    }
}

/// Why an optimiser `kind` is refused on the tensor backend (also the config check's text).
pub fn cpu_only_optimizer(kind: &str) -> String {
    format!("train.optimizer.kind = \"{kind}\" runs on the CPU kernels only, not train.backend = \"tensor\" (the default on train.device = \"cuda\"); set train.backend = \"kernels\" and train.device = \"cpu\", or use kind = \"adam\" there")
}

/// Every problem with `cfg`, in one error.
pub(crate) fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
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
    if cfg.device != TrainDevice::Cpu && cfg.backend == Backend::Kernels {
        bad.push(format!(
            "train.backend = \"kernels\" runs on the CPU only, not train.device = \"{}\"; use train.backend = \"tensor\" (the default there)",
            cfg.device
        ));
    }
    if let Optimizer::PamSgd(p) = &cfg.optimizer {
        bad.extend(p.problems());
    }
    match &cfg.optimizer {
        Optimizer::Signum(c) => bad.extend(c.problems()),
        Optimizer::Muon(c) => bad.extend(c.problems()),
        _ => {}
    }
    if cfg.backend == Backend::Tensor && !cfg.optimizer.supports_tensor() {
        bad.push(cpu_only_optimizer(cfg.optimizer.name()));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Config(bad.join("; ")))
    }
}
