//! The sections of a pipeline file (`pipelines/*.toml`), one struct per `[section]`.
//!
//! Implements `../shared/specs/pipeline.md` §2 and STYLE.md §2.6. Every field says its
//! unit and default; model-specific fields (source, context length, budgets, hookpoints)
//! have no default.
//!
//! Decision: the section structs do not carry `#[serde(deny_unknown_fields)]`; unknown
//! keys are still errors, but they are collected by [`super::load`] (with `serde_ignored`)
//! so that every unknown key in a file is reported at once instead of only the first.
//! Always build a [`super::Pipeline`] through `load`, never with `toml::from_str` alone.
//! The small enums and the optimizer variants do deny unknown fields.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::arch::ArchConfig;
pub use crate::data::DataConfig;
use crate::models::Hookpoint;
pub use crate::store::{ActCompression, ActDtype};

/// A whole pipeline file after defaults: what `config.resolved.toml` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// `[run]`: name, seed, output folder.
    pub run: RunConfig,
    /// `[model]`: which language model.
    pub model: ModelConfig,
    /// `[data]`: which text, how it becomes token windows, and how many tokens.
    pub data: DataConfig,
    /// `[capture]`: which hookpoints and how activations are stored.
    pub capture: CaptureConfig,
    /// `[train]`: optimiser, schedules and budgets of SAE training. Optional section.
    #[serde(default)]
    pub train: TrainSection,
    /// `[sae]`: width and architecture of the SAE (the base point of the grid).
    pub sae: SaeConfig,
    /// `[eval]`: evaluation budgets. Optional section.
    #[serde(default)]
    pub eval: EvalConfig,
    /// `[jsae]`: Jacobian SAE pairs around one MLP (jsae_pamsgd.md §1). Optional section;
    /// absent: no JSAE stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsae: Option<JsaeConfig>,
    /// `[sweep]`: grid axes, `"dotted.key" = [values...]`; the grid is their Cartesian
    /// product. Optional section; empty means a single point (the file itself).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub sweep: toml::Table,
    /// `[synthetic]`: train and evaluate on a known sparse dictionary instead of a model's
    /// activations (no download or capture; `[model]`, `[capture]` and `data.files` may be
    /// left out). Optional section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<crate::synthetic::SyntheticSection>,
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Name of the run; outputs go to `<data_dir>/<name>/`. Letters, digits, `.`, `_`,
    /// `-` only. Required.
    pub name: String,
    /// Master seed: SAE (and JSAE pair) initialisation and the order in which training
    /// reads the captured rows. The document order of capture is `data.shuffle_seed`'s.
    /// Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Folder that holds every run's outputs, relative to the working directory, or
    /// `"s3://bucket/prefix"` for S3-compatible object storage (credentials and endpoint
    /// from the AWS environment variables; the run is staged in a local folder, see README
    /// "Running on a cluster"). Default `"data"`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Resolve hub files from the local hub cache only, never the network (same as
    /// `--offline` or `HF_HUB_OFFLINE=1`). Default false.
    #[serde(default)]
    pub offline: bool,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

/// Floating-point type of model weights and compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// The value as written in a pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The candle dtype the model is loaded in.
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Where the model runs: `"cpu"`, `"cuda"` (GPU 0) or `"cuda:N"`
/// ([`crate::models::DeviceSpec`]).
pub type DeviceKind = crate::models::DeviceSpec;

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The model: a hub repo id `"org/name"`, `"local:<dir>"` (a Hugging Face layout
    /// folder: config.json, tokenizer.json, model.safetensors or a sharded index) or
    /// `"gguf:<file>"` (a llama-family GGUF). Paths are relative to the working
    /// directory. Required.
    pub source: String,
    /// Pinned revision of a hub repo: a commit sha (preferred) or a tag. Required for hub
    /// sources; moving branches (`main`, `master`) are refused. Ignored for local/gguf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Weight and compute dtype: `"f32"` (default), `"bf16"` or `"f16"`. Weights are loaded
    /// straight into it (half the memory of f32 for bf16/f16); matmuls run in it, norms and
    /// the attention softmax in f32 as transformers does; captured activations are stored
    /// as `capture.dtype` says. Used by capture, CE splicing and the JSAE stage (whose
    /// Jacobian reads f32 copies of the MLP weights).
    #[serde(default)]
    pub dtype: Dtype,
    /// Device: `"cpu"` (default), `"cuda"` (GPU 0) or `"cuda:N"`. CUDA needs a binary built
    /// with `--features cuda` (checked at load) and a GPU (checked before the model is
    /// resolved or downloaded).
    #[serde(default)]
    pub device: DeviceKind,
    /// Replace every trained weight by a random one (the JSAE paper's randomised-LLM
    /// control, jsae_pamsgd.md §1.6 item 6): matrices and embeddings ~ N(0, σ²) with σ the
    /// config's `initializer_range` (0.02 when absent, and for GGUF), biases 0, norm gains 1.
    /// Seeded by `random_init_seed`. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub random_init: bool,
    /// Seed of `random_init`. Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub random_init_seed: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl ModelConfig {
    /// The seed of the random re-initialisation, when `random_init` is on.
    pub fn random_init(&self) -> Option<u64> {
        self.random_init.then_some(self.random_init_seed)
    }
}

/// `[capture]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureConfig {
    /// Hookpoints to capture, `blocks.{L}.hook_{site}`. Required, non-empty, no repeats.
    pub hookpoints: Vec<Hookpoint>,
    /// Sequences per forward pass. Default 8.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Stored activation dtype: `"f32"` (default), `"f16"` or `"bf16"` (stored as its bits
    /// in `UInt16` items; see README, Activations).
    #[serde(default)]
    pub dtype: ActDtype,
    /// Drop positions holding BOS/EOS/pad tokens (their norms are extreme). Default true.
    #[serde(default = "yes")]
    pub exclude_special_tokens: bool,
    /// Rows (tokens) per Parquet row group. Default 8192.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// Tokens of context per shard file: shard i holds windows [i·W, (i+1)·W) with
    /// W = max(1, shard_tokens / data.context_len). The unit of resume. Default 65536.
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: u64,
    /// Parquet compression of the shards: `"none"` (default; floats barely compress),
    /// `"snappy"` or `"zstd"`.
    #[serde(default)]
    pub compression: ActCompression,
    /// Keep every captured shard (default true). `false` streams: `saepipe run` captures
    /// a chunk of shards, trains every SAE on it, deletes it and captures the next, so the
    /// activations folder stays within `disk_budget_bytes` (README, Streaming with bounded
    /// disk). Left out of the resolved file when true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub keep: bool,
    /// With `keep = false`: bytes the activations folder may hold (the held-out split,
    /// kept, plus one chunk of training shards). Required then; at least the held-out
    /// split plus two shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_budget_bytes: Option<u64>,
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_shard_tokens() -> u64 {
    65_536
}

fn default_batch_size() -> usize {
    8
}

fn default_row_group_rows() -> usize {
    8192
}

/// The optimiser of SAE training (`{ kind = "adam", lr = 2e-4 }`).
///
/// Decision: only Adam, because it is what the trainer implements (`train::optim`); a new
/// optimiser is one more variant here and one more arm in [`PipelineConfig::trainer_config`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Adam.
    Adam {
        /// Peak learning rate (after warmup). Absent: the variant's recommendation for
        /// the run's number of steps (sae_variants.md §9 for long runs, e.g.
        /// 2e-4/√(d_sae/2^14) for TopK; a measured larger one for short runs such as the
        /// default sweep's, `sae::registry::budget_lr`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// First-moment decay. Absent: the variant's recommendation (0 for Gated and
        /// JumpReLU, else 0.9).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta1: Option<f64>,
        /// Second-moment decay. Absent: 0.999.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta2: Option<f64>,
        /// Denominator epsilon. Default 1e-8.
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// PAM-SGD (`jsae_pamsgd.md` §2.2), for `topk` and `relu_l1` SAEs: the encoder by Adam
    /// (settings as for `adam`) with a proximal term, the decoder by an exact closed-form
    /// solve from statistics streamed over each outer iteration.
    PamSgd {
        /// Encoder Adam peak learning rate. Absent: the variant's recommendation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// Encoder Adam β1. Absent: the variant's recommendation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta1: Option<f64>,
        /// Encoder Adam β2. Absent: 0.999.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta2: Option<f64>,
        /// Encoder Adam epsilon. Default 1e-8.
        #[serde(default = "default_eps")]
        eps: f64,
        /// Optimiser steps per outer iteration (one decoder solve). Default 8.
        #[serde(default = "default_solve_every")]
        solve_every: u64,
        /// μ_enc, proximal weight on ‖W_enc − W_enc^t‖². Default 1e-3.
        #[serde(default = "default_enc_prox")]
        encoder_prox: f64,
        /// ν_enc, proximal weight on ‖b_enc − b_enc^t‖². Default 1e-3.
        #[serde(default = "default_enc_prox")]
        encoder_bias_prox: f64,
        /// μ̃_dec, proximal weight on ‖W_dec − W_dec^t‖² per token of statistics. Default 1e-4.
        #[serde(default = "default_dec_prox")]
        decoder_prox: f64,
        /// ν̃_dec, proximal weight on ‖b_dec − b_dec^t‖² per token. Default 0.
        #[serde(default)]
        decoder_bias_prox: f64,
        /// α̃, ridge on ‖W_dec‖² per token of statistics. Default 1e-6.
        #[serde(default = "default_ridge")]
        ridge: f64,
        /// β̃, ridge on ‖b_dec‖² per token. Default 0.
        #[serde(default)]
        bias_ridge: f64,
        /// Statistics kept after each solve: 0 = fresh per outer iteration, in (0, 1) = an
        /// exponential average. Default 0.5.
        #[serde(default = "default_stats_decay")]
        stats_decay: f64,
    },
    /// EleutherAI sparsify's default (`train::schedule_free`): sign descent inside
    /// schedule-free averaging; the averaged point is what is exported and evaluated. CPU
    /// kernels only; `train.lr_warmup_steps` and `lr_decay` do not apply.
    Signum {
        /// Step size γ. Absent: 5e-3/√(d_sae/2^14) (sparsify's rule).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// Schedule-free interpolation β. Default 0.95 (sparsify).
        #[serde(default = "default_sf_momentum")]
        momentum: f64,
        /// Linear warmup of γ in steps. Default 0 (sparsify).
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Muon (`train::muon`, sparsify's `muon`): Newton–Schulz-orthogonalised Nesterov
    /// momentum for the matrices, Adam (the variant's betas) for the rest, one LR schedule.
    /// CPU kernels only.
    Muon {
        /// Learning rate of both parts. Absent: 2e-3 (sparsify's, for every width).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// Momentum. Default 0.95.
        #[serde(default = "default_sf_momentum")]
        momentum: f64,
        /// Nesterov momentum. Default true.
        #[serde(default = "default_true")]
        nesterov: bool,
        /// Newton–Schulz iterations. Default 5.
        #[serde(default = "default_ns_steps")]
        ns_steps: u32,
        /// Decoupled weight decay of the matrices. Default 0.1.
        #[serde(default = "default_muon_wd")]
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// `kind` as written in the file (`adam`, `pam_sgd`, `signum`, `muon`).
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerConfig::Adam { .. } => "adam",
            OptimizerConfig::PamSgd { .. } => "pam_sgd",
            OptimizerConfig::Signum { .. } => "signum",
            OptimizerConfig::Muon { .. } => "muon",
        }
    }

    /// The trainer's Muon settings when `kind = "muon"`.
    pub fn muon(&self) -> Option<crate::train::muon::MuonConfig> {
        match *self {
            OptimizerConfig::Muon {
                momentum,
                nesterov,
                ns_steps,
                weight_decay,
                ..
            } => Some(crate::train::muon::MuonConfig {
                momentum,
                nesterov,
                ns_steps,
                weight_decay,
            }),
            _ => None,
        }
    }

    /// The Adam settings `(lr, beta1, beta2, eps)` (of the encoder step for PAM-SGD; for
    /// signum its lr and the defaults).
    pub fn adam(&self) -> (Option<f64>, Option<f64>, Option<f64>, f64) {
        match *self {
            OptimizerConfig::Signum { lr, .. } | OptimizerConfig::Muon { lr, .. } => {
                (lr, None, None, default_eps())
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
            }
            | OptimizerConfig::PamSgd {
                lr,
                beta1,
                beta2,
                eps,
                ..
            } => (lr, beta1, beta2, eps),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_ns_steps() -> u32 {
    crate::train::muon::MuonConfig::default().ns_steps
}
fn default_muon_wd() -> f64 {
    crate::train::muon::MuonConfig::default().weight_decay
}
fn default_sf_momentum() -> f64 {
    crate::train::schedule_free::SignumConfig::default().momentum
}
fn default_solve_every() -> u64 {
    crate::train::pam::PamConfig::default().solve_every
}
fn default_enc_prox() -> f64 {
    crate::train::pam::PamConfig::default().encoder_prox as f64
}
fn default_dec_prox() -> f64 {
    crate::train::pam::PamConfig::default().decoder_prox
}
fn default_stats_decay() -> f64 {
    crate::train::pam::PamConfig::default().stats_decay
}
fn default_ridge() -> f64 {
    crate::train::pam::PamConfig::default().ridge
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adam {
            lr: None,
            beta1: None,
            beta2: None,
            eps: default_eps(),
        }
    }
}

fn default_eps() -> f64 {
    1e-8
}

/// Learning-rate decay at the end of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrDecay {
    /// Constant after warmup.
    None,
    /// Linear to 0 over the last `lr_decay_steps` steps (the April update).
    #[default]
    Linear,
}

/// How the decoder bias is initialised: the training engine's own type.
pub use crate::train::{BDecInit, Backend as TrainBackend};

/// `[train]`, as the file says it (steps and tokens, optional keys). It is not a copy of
/// the engine's [`crate::train::TrainConfig`] but its source: [`PipelineConfig::trainer_config`]
/// resolves it (with `run.seed` and `data.n_tokens`) into the engine's settings, the
/// LowArgs → HiArgs split of STYLE.md (ripgrep). Shared vocabulary (`BDecInit`, PAM-SGD's
/// defaults) is the engine's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSection {
    /// Optimiser table, `{ kind = "adam", lr = 2e-4, beta1 = 0.9, beta2 = 0.999 }`.
    /// Default Adam with the variant's recommended lr and betas.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Linear LR warmup from 0, in optimiser steps (the trainer caps it at 10% of the
    /// run). Default 1000.
    #[serde(default = "default_lr_warmup_steps")]
    pub lr_warmup_steps: u64,
    /// LR decay at the end: `"linear"` (to 0) or `"none"`. Default `"linear"`.
    #[serde(default)]
    pub lr_decay: LrDecay,
    /// Steps over which the LR decays to 0 at the end of training. Absent: the last 20%
    /// of the steps (the April update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_decay_steps: Option<u64>,
    /// Tokens per optimiser step. Default 4096.
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: usize,
    /// Training tokens per SAE (may exceed the captured `data.n_tokens`: more epochs).
    /// Absent: `data.n_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_tokens: Option<u64>,
    /// Linear warmup of the sparsity coefficient from 0, in optimiser steps. Absent: the
    /// first 5% of the steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l1_warmup_steps: Option<u64>,
    /// Global gradient-norm clip; 0 turns clipping off. Default 1.0.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// A latent is dead when it has not fired for this many training tokens. Default
    /// 10,000,000.
    #[serde(default = "default_dead_after_tokens")]
    pub dead_after_tokens: u64,
    /// Decoder-bias initialisation. Default `"geometric_median"`.
    #[serde(default)]
    pub b_dec_init: BDecInit,
    /// Activation rows used to estimate the input scale and initialise `b_dec`.
    /// Default 8192.
    #[serde(default = "default_init_tokens")]
    pub init_tokens: usize,
    /// Scale inputs so that E‖x‖ = √d_in during training; folded into the weights on
    /// export. Default true.
    #[serde(default = "yes")]
    pub scale_inputs: bool,
    /// Write a checkpoint every this many training tokens. Absent: every 1000 steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// Write a training-log row every this many steps (and at the last). Default 10.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Bytes of the mixing buffer that shuffles the captured rows for training (f32 rows:
    /// it holds `shuffle_buffer_bytes / (4·d_model)` tokens, at least two batches), one
    /// per lockstep group. Read from the base file, like the data order's `run.seed`.
    /// Default 2147483648 (2 GiB).
    #[serde(default = "default_shuffle_buffer_bytes")]
    pub shuffle_buffer_bytes: u64,
    /// Consecutive tokens per randomly placed chunk: the buffer is filled with chunks of
    /// this many rows drawn in a seeded random order from all shards, so it holds
    /// fragments of many windows; smaller mixes better and reads more randomly. 0 reads
    /// the shards in order. Default 16.
    #[serde(default = "default_shuffle_chunk_tokens")]
    pub shuffle_chunk_tokens: usize,
    /// Device of the SAE training step: `"cpu"` or `"cuda"` (a build with `--features
    /// cuda`). Absent: `model.device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceKind>,
    /// Implementation of the training step: `"kernels"` (the sparse CPU kernels) or
    /// `"tensor"` (candle tensors and autograd on `train.device`; the variants of
    /// `ArchConfig::tensor_kinds`). Absent: kernels on the CPU, tensor on cuda.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<TrainBackend>,
    /// Operand dtype of the tensor backend's encoder/decoder GEMMs: `"f32"` (default),
    /// `"bf16"` or `"f16"` (mixed precision: weights, optimiser state, selection and
    /// reductions stay f32). Tensor backend only.
    #[serde(default)]
    pub compute_dtype: crate::train::ComputeDtype,
}

impl TrainSection {
    /// `train.device`, or `model.device` when absent.
    pub fn device(&self, model: &ModelConfig) -> DeviceKind {
        self.device.unwrap_or(model.device)
    }
    /// `train.backend`, or its default for the device.
    pub fn backend(&self, model: &ModelConfig) -> TrainBackend {
        self.backend.unwrap_or(match self.device(model) {
            DeviceKind::Cpu => TrainBackend::Kernels,
            DeviceKind::Cuda(_) => TrainBackend::Tensor,
        })
    }
}

fn default_shuffle_buffer_bytes() -> u64 {
    crate::store::shuffle::DEFAULT_BUFFER_BYTES
}
fn default_shuffle_chunk_tokens() -> usize {
    crate::store::shuffle::DEFAULT_CHUNK_ROWS
}

fn default_lr_warmup_steps() -> u64 {
    1000
}
fn default_batch_tokens() -> usize {
    4096
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_dead_after_tokens() -> u64 {
    10_000_000
}
fn default_init_tokens() -> usize {
    8192
}
fn default_log_every() -> u64 {
    10
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::Table::new()
            .try_into()
            .expect("invariant: every TrainSection field has a default")
    }
}

/// `[sae]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeConfig {
    /// Latents per input dimension: d_sae = expansion_factor × d_model. Exactly one of
    /// `expansion_factor` and `d_sae` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion_factor: Option<usize>,
    /// Number of latents, directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_sae: Option<usize>,
    /// Architecture: a table with `kind` plus that variant's hyperparameters. Required.
    pub arch: ArchConfig,
}

impl SaeConfig {
    /// The number of latents for an input of width `d_in`.
    pub fn d_sae(&self, d_in: usize) -> usize {
        match (self.d_sae, self.expansion_factor) {
            (Some(d), _) => d,
            (None, Some(x)) => x * d_in,
            (None, None) => d_in,
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Evaluation tokens per SAE, at most `data.eval_tokens`. Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_tokens: Option<u64>,
    /// A latent counts as dead in the metrics when it has not fired in this many of the
    /// last evaluation tokens. Absent: all evaluation tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_window_tokens: Option<u64>,
    /// Sequences on which the CE-loss delta (SAE spliced in) is measured. Default 16.
    #[serde(default = "default_ce_sequences")]
    pub ce_sequences: usize,
    /// Power-diagram diagnostics of TopK / AbsTopK SAEs (`pd_*` columns): R, the candidates
    /// after the K-th searched for the nearest cell facet. Absent: 16; 0 turns them off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_candidates: Option<usize>,
    /// Smallest top-1 group of the local-affine gap (`pd_affine_*`). Absent: 2·d_in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_min_cell_tokens: Option<u64>,
}

fn default_ce_sequences() -> usize {
    16
}

impl Default for EvalConfig {
    fn default() -> Self {
        toml::Table::new()
            .try_into()
            .expect("invariant: every EvalConfig field has a default")
    }
}

/// `[jsae]`: a JSAE pair (and, by default, a plain TopK pair at the same k) around the MLP
/// of one block, trained on the captured `blocks.L.hook_mlp_in` / `hook_mlp_out`
/// activations (both must be in `capture.hookpoints`). Training reads `[train]`
/// (optimizer, batch_tokens, train_tokens, schedules, grad_clip, scale_inputs,
/// b_dec_init, init_tokens); evaluation reads `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsaeConfig {
    /// The block whose MLP the pair sits around. Required.
    pub layer: usize,
    /// Active latents per token of both SAEs. Default 32.
    #[serde(default = "default_jsae_k")]
    pub k: usize,
    /// Latents of each SAE per input dimension. Default 8 (ignored when `d_sae` is set).
    #[serde(default = "default_jsae_expansion")]
    pub expansion_factor: usize,
    /// Latents of each SAE, directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_sae: Option<usize>,
    /// Jacobian coefficient λ. Absent: the authors' rule 0.5·k²/d_model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    /// Also train the plain pair (λ = 0) on the same batches, the paper's baseline.
    /// Default true.
    #[serde(default = "yes")]
    pub baseline: bool,
    /// Where the MLP gains of J are evaluated: `"true_input"` (default, the authors' code),
    /// `"reconstruction"` (the paper's e_y∘f∘d_x: at x̂, output latents of f(x̂)) or
    /// `"reconstruction_true_latents"` (at x̂, output latents of the true y).
    #[serde(default)]
    pub jac_at: crate::jsae::JacAt,
    /// Adam learning rate when `[train].optimizer` sets none. Default 5e-4 (the authors').
    #[serde(default = "default_jsae_lr")]
    pub lr: f64,
}

fn default_jsae_k() -> usize {
    32
}
fn default_jsae_expansion() -> usize {
    8
}
fn default_jsae_lr() -> f64 {
    5e-4
}

fn yes() -> bool {
    true
}
