//! The training engine (sae_variants.md §1): one loop, one optimiser step and one
//! checkpoint format for everything saepipe trains: a single SAE of any variant, the SAEs of
//! a lockstep group (one engine each, fed the same batches), and a JSAE pair (a [`Model`] of
//! two SAEs). The engine only sees the [`Model`] and [`crate::sae::Sae`] traits.
//!
//! Per step ([`Trainer::step_on`]):
//! 1. scale each input by its SAE's `c`; NaN guard on the batch;
//! 2. zero gradients; `dead[i] = tokens_since_fired[i] > dead_after_tokens` per SAE;
//! 3. [`Model::forward_backward`] (λ multiplied by the sparsity warmup), or on the tensor
//!    backend (`train.backend = "tensor"`, the default for `train.device = "cuda"`) the
//!    variants' candle-tensor forward and autograd ([`tensor`]): with the training state
//!    resident on the device ([`resident`], every single SAE under Adam or PAM-SGD), where
//!    steps 4–7 below run as device tensor ops with only scalars coming back, or else
//!    [`Model::forward_backward_tensor`], a host round trip after which steps 4–7 are the
//!    host code. The backend is a strategy inside each step of this one loop;
//! 4. [`optim::Optimizer::prepare`] (PAM-SGD: frozen decoder, proximal pull), NaN guard on
//!    the loss terms (the error names the step and the model);
//! 5. project unit-norm decoder gradients (§1.3 A), clip the global norm over every SAE,
//!    [`optim::Optimizer::update`] with the scheduled LR (renormalising unit-norm rows),
//!    [`optim::Optimizer::after_step`] (PAM-SGD statistics and decoder solve);
//! 6. firing bookkeeping in tokens since last fired (§1.5), log row;
//! 7. [`crate::sae::Sae::revive_dead`] with the updated dead mask (the optimiser forgets the
//!    moments of reset entries); after the last step, [`optim::Optimizer::finish`] (schedule-free
//!    `signum` puts its averaged point into the model, the one exported and evaluated).
//!
//! Before step 0 ([`Trainer::with_model`]): per SAE, estimate `c = √d / E‖x‖₂` (§1.1, SAELens
//! `expected_average_only_in`) and initialise `b_dec` (geometric median by Weiszfeld, §1.2,
//! or the mean) on the init sample, then the variant's data-dependent init.
//! [`Trainer::resume`] / [`Trainer::restore`] rebuild the same state from a checkpoint.
//!
//! On the device-resident backend the host copy of the model is behind the device between
//! syncs: [`Trainer::save_checkpoint`] writes the device state, the last step and
//! [`Trainer::run`] bring it back ([`Trainer::sync_host`]), mutable access
//! ([`Trainer::sae_mut`]) brings it back and uploads the caller's changes at the next step.
//!
//! Decision: the LR warmup is capped at 10% of the run, so short runs are not all warmup.

pub mod checkpoint;
pub mod config;
mod init;
pub mod model;
pub mod muon;
pub mod optim;
pub mod pam;
pub mod resident;
pub mod schedule_free;
pub mod tensor;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::{self, Workspace};
use crate::sae::export::{self, ExportError, ExportMeta, Folded};
use crate::sae::{ArchConfig, Sae, SaeError};
use crate::store::{ActivationSource, DataError};
use crate::util::error::{ensure_finite, NumericError};
use crate::util::profile::{self, Phase};
use crate::util::progress::Reporter;
use crate::util::rng::Rng;
pub use checkpoint::TrainLog;
use checkpoint::{Checkpoint, TensorRef};
use config::validate;
pub use config::{BDecInit, Backend, ComputeDtype, Optimizer, TrainConfig, TrainDevice};
pub use init::geometric_median;
use init::{mean_rows, read_init};
pub use model::{Model, ModelOutput, SingleSae, StepCtx};
use optim::{Adam, AdamOptimizer};
use resident::Resident;
use tensor::TensorBackend;

/// Checkpoint file name inside the output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Training log file name inside the output directory.
pub const LOG_FILE: &str = "train_log.parquet";

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
    #[error("the training activations are {0}")]
    EmptyData(&'static str),
    /// A NaN or infinity in the input activations: a data problem, before any training.
    #[error("training {arch} stopped at step {step}: {source}; the input activations are not finite: a problem of the data, not of training, so no trainer setting fixes it — fix or re-create the activation source")]
    NonFiniteInput {
        /// Variant.
        arch: &'static str,
        /// Step.
        step: u64,
        /// Which value.
        source: NumericError,
    },
    /// A NaN or infinity arose in training from finite inputs.
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
    /// Loss terms (they sum to `loss`).
    pub terms: Vec<(&'static str, f64)>,
    /// Diagnostics of the model (not part of the loss).
    pub metrics: Vec<(&'static str, f64)>,
    /// Mean active latents per token (training codes; mean over the model's SAEs).
    pub l0: f64,
    /// Fraction of latents dead by the token counter (mean over the model's SAEs).
    pub dead_frac: f64,
    /// LR used.
    pub lr: f32,
}

/// Firing bookkeeping of one SAE.
struct Firing {
    /// Tokens since each latent last fired.
    tsf: Vec<u64>,
    dead: Vec<bool>,
    fired: Vec<bool>,
}

impl Firing {
    fn new(d_sae: usize) -> Self {
        Self {
            tsf: vec![0; d_sae],
            dead: vec![false; d_sae],
            fired: vec![false; d_sae],
        }
    }
}

/// The engine: a model, its optimiser, counters, and the log.
pub struct Trainer {
    cfg: TrainConfig,
    model: Box<dyn Model>,
    opt: Box<dyn optim::Optimizer>,
    step: u64,
    tokens: u64,
    total_steps: u64,
    rng: Rng,
    scales: Vec<f32>,
    firing: Vec<Firing>,
    dead: Vec<Vec<bool>>,
    grads: Vec<Vec<Vec<f32>>>,
    ws: Vec<Workspace>,
    inputs: Vec<Vec<f32>>,
    log: TrainLog,
    batch: Vec<f32>,
    /// `Some` on the tensor backend (`train.backend = "tensor"`).
    tensor: Option<TensorBackend>,
    /// The tensor backend keeps this model's state on the device ([`resident`]).
    wants_resident: bool,
    /// That state, once uploaded (at the first step after construction or host access).
    resident: Option<Resident>,
    /// The device state is ahead of the host copy.
    stale: bool,
    /// An error of a device sync that could not be returned where it happened.
    deferred: Option<TrainError>,
}

/// The Adam hyperparameters of a config for `model` (its recommendations for the config's
/// number of steps where unset).
fn adam_hp(cfg: &TrainConfig, model: &dyn Model) -> Adam {
    let (lr0, b1, b2) = model.recommended_adam(cfg.total_steps());
    Adam {
        lr: cfg.lr.unwrap_or(lr0),
        beta1: cfg.adam_beta1.unwrap_or(b1),
        beta2: cfg.adam_beta2.unwrap_or(b2),
        eps: cfg.adam_eps,
    }
}

/// The optimiser a config asks for, over `model`.
fn build_optimizer(
    cfg: &TrainConfig,
    model: &dyn Model,
) -> Result<Box<dyn optim::Optimizer>, TrainError> {
    let adam = adam_hp(cfg, model);
    Ok(match &cfg.optimizer {
        Optimizer::Adam => Box::new(AdamOptimizer::new(adam, model)),
        Optimizer::PamSgd(p) => Box::new(pam::PamSgd::new(p, adam, model)?),
        Optimizer::Signum(c) => Box::new(schedule_free::Signum::new(c, cfg.lr, model)),
        Optimizer::Muon(c) => Box::new(muon::Muon::new(c, cfg.lr, adam, model)),
    })
}

/// The scalars of a checkpoint that identify what it holds.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    model: String,
    model_config: serde_json::Value,
    optimizer: serde_json::Value,
    dims: Vec<(usize, usize)>,
}

impl Trainer {
    /// Build a single SAE of width `d_sae` from `arch`, estimate its input scale and
    /// initialise `b_dec` from the start of `src` (which is rewound).
    pub fn new(
        cfg: TrainConfig,
        arch: &ArchConfig,
        d_sae: usize,
        src: &mut dyn ActivationSource,
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        let sae = arch.build(src.d_in(), d_sae, cfg.seed)?;
        let init = read_init(src, cfg.init_tokens)?;
        Self::with_model(cfg, Box::new(SingleSae::new(arch.clone(), sae)), &[&init])
    }

    /// Train `model`: `init[i]` is the init sample of SAE `i` (raw rows), from which its
    /// input scale and `b_dec` are set before the variant's own data-dependent init.
    pub fn with_model(
        cfg: TrainConfig,
        mut model: Box<dyn Model>,
        init: &[&[f32]],
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        if init.len() != model.n_saes() {
            return Err(TrainError::Config(format!(
                "{} init samples for a model of {} SAEs",
                init.len(),
                model.n_saes()
            )));
        }
        let mut scales = Vec::with_capacity(init.len());
        for (s, sample) in init.iter().enumerate() {
            let sae = model.sae_mut(s);
            let d = sae.dims().0;
            if sample.is_empty() {
                return Err(TrainError::EmptyData("empty; run `saepipe capture` first (a finished capture holds data.n_tokens rows)"));
            }
            if !sample.len().is_multiple_of(d) {
                return Err(TrainError::Config(format!(
                    "the init sample of SAE {s} has {} values, not whole rows of d_in = {d}; pass [n, {d}] rows of that SAE's hookpoint",
                    sample.len()
                )));
            }
            ensure_finite(sample, "activations (init sample)", None).map_err(|source| {
                TrainError::NonFiniteInput {
                    arch: sae.arch(),
                    step: 0,
                    source,
                }
            })?;
            let mean_norm = sample
                .chunks(d)
                .map(|r| (kernels::dot(r, r) as f64).sqrt())
                .sum::<f64>()
                / (sample.len() / d) as f64;
            if mean_norm == 0.0 {
                return Err(TrainError::EmptyData("all zeros (mean norm 0) in the init sample: this hookpoint carries no signal on this data, so no SAE can learn from it; train on another hookpoint (capture.hookpoints)"));
            }
            let scale = if cfg.scale_inputs {
                ((d as f64).sqrt() / mean_norm) as f32
            } else {
                1.0
            };
            let scaled: Vec<f32> = sample.iter().map(|v| v * scale).collect();
            let b_dec = match cfg.b_dec_init {
                BDecInit::GeometricMedian => geometric_median(&scaled, d),
                BDecInit::Mean => mean_rows(&scaled, d),
                BDecInit::Zeros => vec![0.0; d],
            };
            if let Some(p) = sae.params_mut().iter_mut().find(|p| p.name == "b_dec") {
                p.data.copy_from_slice(&b_dec);
            }
            sae.init_from_sample(&scaled, scaled.len() / d)?;
            scales.push(scale);
        }
        model.set_scales(&scales);
        let opt = build_optimizer(&cfg, &*model)?;
        let mut t = Self::assemble(cfg, model, opt, scales)?;
        t.announce_total_steps();
        Ok(t)
    }

    /// The state every constructor shares: zero counters and buffers, and the backend
    /// (a model the tensor backend cannot train is refused here, before any step).
    fn assemble(
        cfg: TrainConfig,
        model: Box<dyn Model>,
        opt: Box<dyn optim::Optimizer>,
        scales: Vec<f32>,
    ) -> Result<Self, TrainError> {
        let tensor = match cfg.backend {
            Backend::Kernels => None,
            Backend::Tensor if !model.supports_tensor() => {
                return Err(TensorBackend::unsupported(model.name(), cfg.device))
            }
            Backend::Tensor => {
                Some(TensorBackend::new(cfg.device)?.with_gemm(cfg.compute_dtype.dtype()))
            }
        };
        let wants_resident =
            tensor.is_some() && model.tensor_resident() && Resident::supports(&cfg.optimizer);
        let n = model.n_saes();
        let widths: Vec<usize> = (0..n).map(|s| model.sae(s).dims().1).collect();
        Ok(Self {
            step: 0,
            tokens: 0,
            total_steps: cfg.total_steps(),
            rng: Rng::new(cfg.seed.wrapping_add(0xA11CE)),
            firing: widths.iter().map(|&f| Firing::new(f)).collect(),
            dead: widths.iter().map(|&f| vec![false; f]).collect(),
            grads: (0..n)
                .map(|s| {
                    model
                        .sae(s)
                        .params()
                        .iter()
                        .map(|p| vec![0.0; p.data.len()])
                        .collect()
                })
                .collect(),
            ws: (0..n).map(|_| Workspace::default()).collect(),
            inputs: vec![Vec::new(); n],
            log: TrainLog::default(),
            batch: Vec::new(),
            tensor,
            wants_resident,
            resident: None,
            stale: false,
            deferred: None,
            scales,
            opt,
            model,
            cfg,
        })
    }

    /// Continue a single SAE from a checkpoint written by [`Trainer::save_checkpoint`].
    /// `arch` and `cfg` must be the ones it was made with; `src` is positioned where it was.
    pub fn resume(
        path: &Path,
        cfg: TrainConfig,
        arch: &ArchConfig,
        src: &mut dyn ActivationSource,
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        let ck = checkpoint::load(path)?;
        let id: Identity = ck.get("identity")?;
        if id.model != arch.kind() {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                msg: format!(
                    "it holds a {} SAE but the config asks for {}; point to the matching checkpoint or start a new run",
                    id.model,
                    arch.kind()
                ),
            });
        }
        let &[(d_in, d_sae)] = id.dims.as_slice() else {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("it holds a model of {} SAEs, not one", id.dims.len()),
            });
        };
        if src.d_in() != d_in {
            return Err(TrainError::Width {
                expected: d_in,
                found: src.d_in(),
            });
        }
        let sae = arch.build(d_in, d_sae, cfg.seed)?;
        let t = Self::restore(&ck, cfg, Box::new(SingleSae::new(arch.clone(), sae)))?;
        src.seek(ck.get("data_position")?)?;
        Ok(t)
    }

    /// Rebuild the engine for `model` (freshly built from the same configuration) from a
    /// checkpoint: parameters, optimiser state, scales, counters, RNG and log.
    pub fn restore(
        ck: &Checkpoint,
        cfg: TrainConfig,
        mut model: Box<dyn Model>,
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        let cerr = |msg: String| TrainError::Checkpoint {
            path: ck.path.clone(),
            msg,
        };
        let id: Identity = ck.get("identity")?;
        if id.model != model.name() {
            return Err(cerr(format!(
                "it holds a {} model but the config asks for {}; point to the matching checkpoint or start a new run",
                id.model,
                model.name()
            )));
        }
        if id.model_config != model.config_json() {
            return Err(cerr(format!(
                "architecture config differs: checkpoint {} vs requested {}",
                id.model_config,
                model.config_json()
            )));
        }
        let want_opt = serde_json::to_value(&cfg.optimizer).map_err(|e| cerr(e.to_string()))?;
        if id.optimizer != want_opt {
            return Err(cerr(format!(
                "it was trained with optimizer {} but the config asks for {want_opt}; resume with the same train.optimizer or start a new run",
                id.optimizer
            )));
        }
        let dims: Vec<(usize, usize)> = (0..model.n_saes()).map(|s| model.sae(s).dims()).collect();
        if id.dims != dims {
            return Err(cerr(format!(
                "it holds SAEs of (d_in, d_sae) {:?}, the model has {dims:?}",
                id.dims
            )));
        }
        for s in 0..model.n_saes() {
            for p in model.sae_mut(s).params_mut() {
                let n = p.data.len();
                p.data
                    .copy_from_slice(ck.f32(&format!("sae{s}.param.{}", p.name), n)?);
            }
        }
        let scales: Vec<f32> = ck.get("scales")?;
        if scales.len() != model.n_saes() {
            return Err(cerr("wrong number of input scales".into()));
        }
        model.set_scales(&scales);
        let mut opt = build_optimizer(&cfg, &*model)?;
        opt.restore(&*model, ck)?;
        let mut t = Self::assemble(cfg, model, opt, scales)?;
        for (s, f) in t.firing.iter_mut().enumerate() {
            let n = f.tsf.len();
            f.tsf
                .copy_from_slice(ck.u64(&format!("sae{s}.tokens_since_fired"), n)?);
        }
        let rng: [String; 4] = ck.get("rng")?;
        let mut state = [0u64; 4];
        for (dst, s) in state.iter_mut().zip(&rng) {
            *dst = s.parse().map_err(|e| cerr(format!("bad rng state: {e}")))?;
        }
        t.rng = Rng::from_state(state);
        t.step = ck.get("step")?;
        t.tokens = ck.get("tokens")?;
        t.total_steps = ck.get("total_steps")?;
        t.log = ck.log()?;
        t.announce_total_steps();
        Ok(t)
    }

    /// Tell every SAE the run's length ([`Sae::set_total_steps`]).
    fn announce_total_steps(&mut self) {
        for s in 0..self.model.n_saes() {
            self.model.sae_mut(s).set_total_steps(self.total_steps);
        }
    }

    /// On the tensor backend, bring the device state (parameters, optimiser state,
    /// counters) back into the host copy that [`Trainer::model`] and [`Trainer::sae`] show.
    /// The engine does so after the last step and at the end of [`Trainer::run`]; between
    /// those, the host copy of a device-resident run is behind. A no-op otherwise.
    pub fn sync_host(&mut self) -> Result<(), TrainError> {
        if let (Some(r), true) = (&self.resident, self.stale) {
            let mut tsf: Vec<&mut Vec<u64>> = self.firing.iter_mut().map(|f| &mut f.tsf).collect();
            r.sync_host(&mut *self.model, &mut *self.opt, &mut tsf)?;
            self.stale = false;
        }
        Ok(())
    }

    /// Sync, then drop the device state: the host copy (which the caller may change) is
    /// uploaded again at the next step. A failed sync is returned by that step.
    fn release_device(&mut self) {
        if let Err(e) = self.sync_host() {
            self.deferred.get_or_insert(e);
        }
        self.resident = None;
    }

    /// Train on the tensor backend's host round trip (parameters up, gradients and codes
    /// down, the host optimiser, every step) instead of its device-resident state: the
    /// comparison row of `saepipe bench gpu` and of the agreement tests.
    pub fn force_host_round_trip(&mut self) {
        self.release_device();
        self.wants_resident = false;
    }

    /// Whether the steps run on the tensor backend's device-resident state.
    pub fn device_resident(&self) -> bool {
        self.wants_resident
    }

    /// Upload the host state to the device, when the tensor backend keeps it there and it
    /// is not there yet.
    fn ensure_resident(&mut self) -> Result<(), TrainError> {
        if !self.wants_resident || self.resident.is_some() {
            return Ok(());
        }
        let Some(b) = &self.tensor else {
            return Ok(());
        };
        let hp = adam_hp(&self.cfg, &*self.model);
        let tsf: Vec<&[u64]> = self.firing.iter().map(|f| &f.tsf[..]).collect();
        let r = Resident::new(
            b.device(),
            &self.cfg.optimizer,
            hp,
            &*self.model,
            &*self.opt,
            &tsf,
        )?;
        r.dead_masks(self.cfg.dead_after_tokens, &mut self.dead)?;
        self.resident = Some(r);
        Ok(())
    }

    /// The model being trained.
    pub fn model(&self) -> &dyn Model {
        &*self.model
    }
    /// The model, mutable (on the tensor backend: brought back from the device first, and
    /// uploaded again, with the caller's changes, at the next step).
    pub fn model_mut(&mut self) -> &mut dyn Model {
        self.release_device();
        &mut *self.model
    }
    /// The model as its own type `M` (`None` if it is another one).
    pub fn model_as<M: Model>(&self) -> Option<&M> {
        self.model.as_any().downcast_ref()
    }
    /// Mutable [`Trainer::model_as`] (see [`Trainer::model_mut`]).
    pub fn model_as_mut<M: Model>(&mut self) -> Option<&mut M> {
        self.release_device();
        self.model.as_any_mut().downcast_mut()
    }
    /// The first (for a single-SAE model: the) SAE being trained.
    pub fn sae(&self) -> &dyn Sae {
        self.model.sae(0)
    }
    /// Mutable access to the SAE (benchmarks, custom initialisation before step 0; see
    /// [`Trainer::model_mut`]).
    pub fn sae_mut(&mut self) -> &mut dyn Sae {
        self.release_device();
        self.model.sae_mut(0)
    }
    /// The input scale `c` of the first SAE (activations are multiplied by it).
    pub fn scale(&self) -> f32 {
        self.scales[0]
    }
    /// The input scale of every SAE of the model.
    pub fn scales(&self) -> &[f32] {
        &self.scales
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
    /// The optimiser's name (`adam`, `pam_sgd`).
    pub fn optimizer_name(&self) -> &'static str {
        self.opt.name()
    }

    /// Fill `self.batch` with the next `batch_tokens` rows of `src`, wrapping at its end.
    fn read_batch(&mut self, src: &mut dyn ActivationSource) -> Result<(), TrainError> {
        let (d, rows) = (src.d_in(), self.cfg.batch_tokens);
        if d != self.model.sae(0).dims().0 {
            return Err(TrainError::Width {
                expected: self.model.sae(0).dims().0,
                found: d,
            });
        }
        self.batch.clear();
        let mut wrapped = false;
        while self.batch.len() < rows * d {
            let got = src.next_batch(rows - self.batch.len() / d, &mut self.batch)?;
            if got == 0 {
                if wrapped {
                    return Err(TrainError::EmptyData("empty; run `saepipe capture` first (a finished capture holds data.n_tokens rows)"));
                }
                src.seek(0)?;
                wrapped = true;
            } else {
                wrapped = false;
            }
        }
        Ok(())
    }

    /// One optimiser step of a single-SAE model on the next batch of `src`.
    pub fn step(&mut self, src: &mut dyn ActivationSource) -> Result<StepRecord, TrainError> {
        self.read_batch(src)?;
        let batch = std::mem::take(&mut self.batch);
        let r = self.step_on(&[&batch], self.cfg.batch_tokens);
        self.batch = batch;
        r
    }

    /// One optimiser step on `n` raw rows per SAE (`raw[i]` is `[n, d_in]` for SAE `i`).
    pub fn step_on(&mut self, raw: &[&[f32]], n: usize) -> Result<StepRecord, TrainError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let t = self.step;
        let arch = self.model.name();
        let nonfinite = |source| TrainError::NonFinite {
            arch,
            step: t,
            source,
        };
        let n_saes = self.model.n_saes();
        if raw.len() != n_saes || n == 0 {
            return Err(TrainError::Config(format!(
                "a step of {arch} needs {n_saes} non-empty batches, got {}",
                raw.len()
            )));
        }
        // 1. scaled inputs
        for (s, x) in raw.iter().enumerate() {
            let d = self.model.sae(s).dims().0;
            if x.len() != n * d {
                return Err(TrainError::Width {
                    expected: d,
                    found: x.len() / n,
                });
            }
            ensure_finite(x, "activation batch", Some(t)).map_err(|source| {
                TrainError::NonFiniteInput {
                    arch,
                    step: t,
                    source,
                }
            })?;
            let sc = self.scales[s];
            let inp = &mut self.inputs[s];
            inp.clear();
            inp.extend_from_slice(x);
            if sc != 1.0 {
                inp.par_chunks_mut(1 << 14)
                    .for_each(|c| c.iter_mut().for_each(|v| *v *= sc));
            }
            ensure_finite(inp, "scaled activation batch", Some(t)).map_err(nonfinite)?;
        }
        // 2. zero grads, dead masks (on the device-resident backend the masks are kept by
        //    its counters, step 6)
        self.ensure_resident()?;
        let on_device = self.resident.is_some();
        if !on_device {
            let _t = profile::time(Phase::Backward);
            for g in self.grads.iter_mut().flatten() {
                kernels::zero(g);
            }
            for (dm, f) in self.dead.iter_mut().zip(&self.firing) {
                for (dd, &c) in dm.iter_mut().zip(&f.tsf) {
                    *dd = c > self.cfg.dead_after_tokens;
                }
            }
        }
        let sw = (self.cfg.sparsity_warmup_frac.clamp(0.0, 1.0) as f64 * self.total_steps as f64)
            .ceil() as u64;
        // 3. forward/backward
        let ctx = StepCtx {
            inputs: &self.inputs,
            raw,
            n,
            step: t,
            total_steps: self.total_steps,
            sparsity_scale: optim::sparsity_factor(t, sw),
            dead: &self.dead,
            gemm: self.cfg.compute_dtype.dtype(),
        };
        // `Some(‖g‖²)` from the device, where the norm was taken there
        let mut device_sq = None;
        let mut out = match (&mut self.resident, &self.tensor) {
            (Some(r), _) => {
                let (losses, metrics) = r.forward_backward(&mut *self.model, &ctx, &mut self.ws)?;
                // 4. (device) the optimiser's own terms, 5a. projection, ‖g‖²: then one
                //    download of every scalar
                let extra = r.prepare(&*self.model)?;
                r.project(&*self.model)?;
                let sq = match self.cfg.grad_clip {
                    Some(_) => Some(r.grad_sq()?),
                    None => None,
                };
                let ts: Vec<&candle_core::Tensor> = losses
                    .iter()
                    .chain(&extra)
                    .map(|l| &l.1)
                    .chain(&sq)
                    .collect();
                let vals = r.scalars(&ts)?;
                let named: Vec<(&'static str, f64)> = losses
                    .iter()
                    .chain(&extra)
                    .map(|l| l.0)
                    .zip(vals.iter().copied())
                    .collect();
                device_sq = sq.and(vals.last().copied());
                let (model_terms, opt_terms) = named.split_at(losses.len());
                let mut o = ModelOutput {
                    loss: model_terms.iter().map(|l| l.1).sum(),
                    losses: model_terms.to_vec(),
                    metrics,
                };
                for &(k, v) in opt_terms {
                    o.loss += v;
                    o.losses.push((k, v));
                }
                o
            }
            (None, None) => self
                .model
                .forward_backward(&ctx, &mut self.grads, &mut self.ws)?,
            (None, Some(b)) => {
                self.model
                    .forward_backward_tensor(&ctx, &mut self.grads, &mut self.ws, b)?
            }
        };
        // 4. the optimiser's own terms (PAM-SGD), NaN guard
        if !on_device {
            for (k, v) in self.opt.prepare(&*self.model, &mut self.grads) {
                out.loss += v;
                out.losses.push((k, v));
            }
        }
        let mut vals: Vec<f32> = vec![out.loss as f32];
        vals.extend(out.losses.iter().chain(&out.metrics).map(|t| t.1 as f32));
        ensure_finite(&vals, "loss terms", Some(t)).map_err(nonfinite)?;
        // 5. project, clip, update, constraints
        let t_opt = profile::time(Phase::Optimizer);
        if !on_device {
            for s in 0..n_saes {
                let sae = self.model.sae(s);
                let d = sae.dims().0;
                for (p, g) in sae.params().iter().zip(self.grads[s].iter_mut()) {
                    if p.unit_rows {
                        kernels::project_rows(g, &p.data, d);
                    }
                }
            }
        }
        let mut clip_scale = None;
        if let Some(clip) = self.cfg.grad_clip {
            let sq = match device_sq {
                Some(sq) => sq,
                None => {
                    let mut sq = 0.0f64;
                    for s in 0..n_saes {
                        for (p, g) in self.model.sae(s).params().iter().zip(&self.grads[s]) {
                            if p.trainable {
                                sq += optim::sum_sq(g);
                            }
                        }
                    }
                    sq
                }
            };
            let norm = sq.sqrt();
            if !norm.is_finite() {
                return Err(nonfinite(NumericError::NonFinite {
                    what: "gradient norm".into(),
                    index: 0,
                    value: norm as f32,
                    step: Some(t),
                }));
            }
            if norm > clip as f64 {
                clip_scale = Some((clip as f64 / norm) as f32);
            }
        }
        let warm = self.cfg.lr_warmup_steps.min(self.total_steps / 10);
        let lr = self
            .opt
            .scheduled_lr(t, self.total_steps, warm, self.cfg.lr_decay_frac);
        match &mut self.resident {
            Some(r) => {
                self.stale = true;
                r.update(&*self.model, clip_scale, lr, t + 1)?;
                r.after_step(&mut *self.model, t, self.total_steps)?;
            }
            None => {
                self.opt
                    .update_scaled(&mut *self.model, &mut self.grads, clip_scale, lr, t + 1);
                self.opt.after_step(
                    &mut *self.model,
                    &self.inputs,
                    &self.ws,
                    t,
                    self.total_steps,
                )?;
            }
        }
        drop(t_opt);
        // 6. firing bookkeeping
        let (mut l0, mut dead_frac) = (0.0, 0.0);
        match &mut self.resident {
            Some(r) => (l0, dead_frac) = r.fire(n, self.cfg.dead_after_tokens, &mut self.dead)?,
            None => {
                for (f, ws) in self.firing.iter_mut().zip(&self.ws) {
                    f.fired.iter_mut().for_each(|x| *x = false);
                    for &i in &ws.codes.idx {
                        f.fired[i as usize] = true;
                    }
                    let mut n_dead = 0usize;
                    for (c, &fi) in f.tsf.iter_mut().zip(&f.fired) {
                        *c = if fi { 0 } else { *c + n as u64 };
                        if *c > self.cfg.dead_after_tokens {
                            n_dead += 1;
                        }
                    }
                    l0 += ws.codes.nnz() as f64 / n as f64;
                    dead_frac += n_dead as f64 / f.tsf.len() as f64;
                }
            }
        }
        self.step += 1;
        self.tokens += n as u64;
        // 7. variant-specific revival of dead latents (SA-GSAE threshold resets)
        match &mut self.resident {
            Some(r) => r.revive(&mut *self.model, self.step, &self.dead)?,
            None => {
                for s in 0..n_saes {
                    let f = &mut self.firing[s];
                    for (dd, &c) in f.dead.iter_mut().zip(&f.tsf) {
                        *dd = c > self.cfg.dead_after_tokens;
                    }
                    for (pi, e) in self.model.sae_mut(s).revive_dead(self.step, &f.dead) {
                        self.opt.reset_entry(s, pi, e);
                    }
                }
            }
        }
        // the final state comes back to the host after the last step
        if self.step == self.total_steps {
            self.sync_host()?;
            self.opt.finish(&mut *self.model);
        }
        let rec = StepRecord {
            step: self.step,
            tokens: self.tokens,
            loss: out.loss,
            terms: out.losses,
            metrics: out.metrics,
            l0: l0 / n_saes as f64,
            dead_frac: dead_frac / n_saes as f64,
            lr,
        };
        if self.step.is_multiple_of(self.cfg.log_every.max(1)) || self.step == self.total_steps {
            let mut row = vec![
                ("step".to_string(), rec.step as f64),
                ("tokens".to_string(), rec.tokens as f64),
                ("loss".to_string(), rec.loss),
            ];
            row.extend(
                rec.terms
                    .iter()
                    .chain(&rec.metrics)
                    .map(|(k, v)| (k.to_string(), *v)),
            );
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
            &format!("train {}", self.model.name()),
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
                if self.checkpoint_due() || r.step == end {
                    self.save_checkpoint(&dir.join(CHECKPOINT_FILE), src.position())?;
                    self.log.write_parquet(&dir.join(LOG_FILE))?;
                }
            }
        }
        prog.finish();
        self.sync_host()
    }

    /// Whether `checkpoint_every` asks for a checkpoint after the step just taken.
    pub fn checkpoint_due(&self) -> bool {
        let ce = self.cfg.checkpoint_every;
        ce > 0 && self.step.is_multiple_of(ce)
    }

    /// Write a checkpoint (weights, optimiser state, step, RNG, data position) atomically.
    pub fn save_checkpoint(&self, path: &Path, data_position: u64) -> Result<(), TrainError> {
        self.save_checkpoint_with(path, serde_json::json!({ "data_position": data_position }))
    }

    /// Write a checkpoint with the caller's own scalars (a JSON object) beside the engine's.
    pub fn save_checkpoint_with(
        &self,
        path: &Path,
        mut extra: serde_json::Value,
    ) -> Result<(), TrainError> {
        let cerr = |e: serde_json::Error| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let m = &*self.model;
        let id = Identity {
            model: m.name().into(),
            model_config: m.config_json(),
            optimizer: serde_json::to_value(&self.cfg.optimizer).map_err(cerr)?,
            dims: (0..m.n_saes()).map(|s| m.sae(s).dims()).collect(),
        };
        let ours = serde_json::json!({
            "identity": id,
            "train": self.cfg,
            "step": self.step,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "rng": self.rng.state().map(|s| s.to_string()),
            "scales": self.scales,
        });
        let obj = extra
            .as_object_mut()
            .ok_or_else(|| TrainError::Checkpoint {
                path: path.to_path_buf(),
                msg: "extra checkpoint metadata must be a JSON object".into(),
            })?;
        if let serde_json::Value::Object(o) = ours {
            obj.extend(o);
        }
        // On the device-resident backend, the same names with the device's values.
        let device_state = match (&self.resident, self.stale) {
            (Some(r), true) => Some(r.named(m)?),
            _ => None,
        };
        let mut tensors: Vec<(String, TensorRef)> = Vec::new();
        for s in 0..m.n_saes() {
            for p in m.sae(s).params() {
                tensors.push((format!("sae{s}.param.{}", p.name), TensorRef::F32(&p.data)));
            }
            tensors.push((
                format!("sae{s}.tokens_since_fired"),
                TensorRef::U64(&self.firing[s].tsf),
            ));
        }
        tensors.extend(self.opt.state(m));
        if let Some(dev) = &device_state {
            for (name, t) in tensors.iter_mut() {
                *t = dev
                    .get(name.as_str())
                    .ok_or_else(|| TrainError::Checkpoint {
                        path: path.to_path_buf(),
                        msg: format!("the tensor backend's device state has no `{name}`"),
                    })?
                    .as_ref();
            }
        }
        checkpoint::save(path, extra, &tensors, &self.log)
    }

    /// Export SAE `i` in SAELens v6 format (scale and decoder norms folded) into `dir`.
    pub fn export_sae(
        &self,
        i: usize,
        dir: &Path,
        meta: &ExportMeta,
    ) -> Result<Folded, TrainError> {
        if self.stale {
            return Err(TrainError::Config(format!(
                "exporting SAE {i} in the middle of a tensor-backend run: its parameters are on the device; call Trainer::sync_host first (the engine does after the last step)"
            )));
        }
        Ok(export::save_saelens(
            self.model.sae(i),
            self.scales[i],
            meta,
            dir,
        )?)
    }

    /// Export the (first) SAE in SAELens v6 format into `dir`.
    pub fn export(&self, dir: &Path, meta: &ExportMeta) -> Result<Folded, TrainError> {
        self.export_sae(0, dir, meta)
    }
}
