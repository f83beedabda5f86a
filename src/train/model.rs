//! What the training engine trains: a [`Model`] is one or more SAEs and the loss that ties
//! them together. A single SAE ([`SingleSae`]) is the common case; a Jacobian SAE pair
//! (`crate::jsae::JsaePair`) is two TopK SAEs and a penalty on the Jacobian between them.
//!
//! The engine ([`super::Trainer`]) owns everything that is the same for every model: input
//! scaling and `b_dec` initialisation per SAE, gradient buffers, the optimiser, unit-norm
//! decoder constraints, gradient clipping, the LR schedule, firing counters and the dead
//! mask, checkpoints and the log. A model only computes its loss and gradients.

use candle_core::{DType, Tensor, Var};

use super::tensor::TensorBackend;
use super::TrainError;
use crate::kernels::Workspace;
use crate::sae::tensor::TensorInput;
use crate::sae::{ArchConfig, Sae, SaeError, StepInput};

/// One training step's inputs, as the engine hands them to [`Model::forward_backward`].
#[derive(Debug, Clone, Copy)]
pub struct StepCtx<'a> {
    /// Scaled inputs `[n, d_in]`, one per SAE of the model (`inputs[i]` feeds SAE `i`).
    pub inputs: &'a [Vec<f32>],
    /// The same rows before scaling (a model that runs another network on them, such as
    /// the JSAE pair's MLP, needs the raw activations).
    pub raw: &'a [&'a [f32]],
    /// Tokens in the batch.
    pub n: usize,
    /// Optimiser step (0-based).
    pub step: u64,
    /// Steps of the whole run (for a model's own schedules).
    pub total_steps: u64,
    /// Sparsity-coefficient warmup factor in `[0, 1]`.
    pub sparsity_scale: f32,
    /// `dead[i][j]`: latent `j` of SAE `i` has not fired for more than the dead window.
    pub dead: &'a [Vec<bool>],
    /// Operand dtype of the tensor backend's GEMMs (`train.compute_dtype`).
    pub gemm: candle_core::DType,
}

/// What a model reports for one step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelOutput {
    /// Total loss that was differentiated.
    pub loss: f64,
    /// Its parts, each already weighted; they sum to `loss`.
    pub losses: Vec<(&'static str, f64)>,
    /// Diagnostics that are not part of the loss (logged beside it).
    pub metrics: Vec<(&'static str, f64)>,
}

/// What [`Model::tensor_step`] returns.
#[derive(Debug)]
pub struct TensorStep {
    /// Named loss parts (device scalars, each already weighted); their sum is differentiated.
    pub losses: Vec<(&'static str, Tensor)>,
    /// Diagnostics that are not part of the loss.
    pub metrics: Vec<(&'static str, f64)>,
    /// Dense training codes `[n, d_sae]` of each SAE, detached.
    pub codes: Vec<Tensor>,
}

/// Something the engine can train.
pub trait Model: Send + std::any::Any {
    /// Name for messages and checkpoints (the SAE variant, or `jsae_pair`).
    fn name(&self) -> &'static str;
    /// How many SAEs the model holds.
    fn n_saes(&self) -> usize;
    /// SAE `i`.
    fn sae(&self, i: usize) -> &dyn Sae;
    /// SAE `i`, mutable (optimiser updates, initialisation, checkpoint restore).
    fn sae_mut(&mut self, i: usize) -> &mut dyn Sae;
    /// The model's configuration as JSON: a checkpoint made with another one is refused.
    fn config_json(&self) -> serde_json::Value;
    /// Recommended Adam `(lr, β1, β2)` for a run of `steps` optimiser steps, when the
    /// training config leaves them unset.
    fn recommended_adam(&self, steps: u64) -> (f32, f32, f32);
    /// Whether PAM-SGD can train it (a single SAE of a variant that installs a decoder).
    fn supports_pam_sgd(&self) -> bool {
        false
    }
    /// Whether the tensor backend can train it ([`Model::forward_backward_tensor`]).
    fn supports_tensor(&self) -> bool {
        false
    }
    /// [`Model::forward_backward`] on the tensor backend: the same outputs, from the
    /// variants' [`Sae::tensor_forward`] and candle autograd. The engine only calls it when
    /// [`Model::supports_tensor`]; the default refuses.
    fn forward_backward_tensor(
        &mut self,
        ctx: &StepCtx,
        grads: &mut [Vec<Vec<f32>>],
        ws: &mut [Workspace],
        backend: &TensorBackend,
    ) -> Result<ModelOutput, TrainError> {
        let _ = (ctx, grads, ws, backend);
        Err(TrainError::Config(format!(
            "the tensor backend cannot train {}",
            self.name()
        )))
    }
    /// Whether the tensor backend can keep this model's training state on the device
    /// ([`Model::tensor_step`], `super::resident`); otherwise it runs
    /// [`Model::forward_backward_tensor`], a host round trip of the parameters per step.
    fn tensor_resident(&self) -> bool {
        false
    }
    /// One step's loss on the device, for [`Model::tensor_resident`] models: `x[i]` the
    /// scaled inputs of SAE `i` and `params[i]` its parameters (in `sae(i).params()` order;
    /// trainable ones are autograd variables), all on the backend's device. Returns the
    /// loss parts the engine differentiates and each SAE's dense codes, and updates the
    /// model's non-trainable state ([`Sae::tensor_update_state`]; `ws` is the engine's
    /// host workspace, for a model whose update needs one). The default refuses.
    fn tensor_step(
        &mut self,
        ctx: &StepCtx,
        x: &[Tensor],
        params: &[Vec<Tensor>],
        ws: &mut [Workspace],
    ) -> Result<TensorStep, TrainError> {
        let _ = (ctx, x, params, ws);
        Err(TrainError::Config(format!(
            "the tensor backend cannot keep {} on the device",
            self.name()
        )))
    }
    /// The model as [`std::any::Any`], so that a stage can reach its own type back
    /// through [`super::Trainer::model_as`].
    fn as_any(&self) -> &dyn std::any::Any;
    /// Mutable [`Model::as_any`].
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// Told once the engine knows the input scale of every SAE (at init and on resume).
    fn set_scales(&mut self, scales: &[f32]) {
        let _ = scales;
    }
    /// Forward and backward pass: write the gradient of every parameter of SAE `i` into
    /// `grads[i]` (zeroed by the engine, same order as `sae(i).params()`), the training codes
    /// of SAE `i` into `ws[i].codes`, and update non-trainable state (thresholds, centroids).
    fn forward_backward(
        &mut self,
        ctx: &StepCtx,
        grads: &mut [Vec<Vec<f32>>],
        ws: &mut [Workspace],
    ) -> Result<ModelOutput, TrainError>;
}

/// One SAE trained on its own reconstruction loss.
pub struct SingleSae {
    arch: ArchConfig,
    sae: Box<dyn Sae>,
}

impl SingleSae {
    /// Wrap an SAE built from `arch`.
    pub fn new(arch: ArchConfig, sae: Box<dyn Sae>) -> Self {
        Self { arch, sae }
    }

    /// The architecture it was built from.
    pub fn arch(&self) -> &ArchConfig {
        &self.arch
    }

    /// The SAE's step input from the engine's context.
    fn input<'a>(&self, ctx: &StepCtx<'a>) -> StepInput<'a> {
        StepInput {
            x: &ctx.inputs[0],
            n: ctx.n,
            step: ctx.step,
            sparsity_scale: ctx.sparsity_scale,
            dead: &ctx.dead[0],
        }
    }
}

impl Model for SingleSae {
    fn name(&self) -> &'static str {
        self.sae.arch()
    }
    fn n_saes(&self) -> usize {
        1
    }
    fn sae(&self, _i: usize) -> &dyn Sae {
        &*self.sae
    }
    fn sae_mut(&mut self, _i: usize) -> &mut dyn Sae {
        &mut *self.sae
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.arch).unwrap_or(serde_json::Value::Null)
    }
    fn recommended_adam(&self, steps: u64) -> (f32, f32, f32) {
        self.arch.recommended_adam(self.sae.dims().1, steps)
    }
    fn supports_pam_sgd(&self) -> bool {
        self.arch.supports_pam_sgd()
    }
    fn supports_tensor(&self) -> bool {
        self.arch.supports_tensor()
    }
    fn tensor_resident(&self) -> bool {
        self.arch.supports_tensor() && self.sae.tensor_state_resident()
    }
    fn tensor_step(
        &mut self,
        ctx: &StepCtx,
        x: &[Tensor],
        params: &[Vec<Tensor>],
        _ws: &mut [Workspace],
    ) -> Result<TensorStep, TrainError> {
        let out = self.sae.tensor_forward(
            &params[0],
            &TensorInput {
                x: &x[0],
                n: ctx.n,
                step: ctx.step,
                sparsity_scale: ctx.sparsity_scale,
                dead: &ctx.dead[0],
                gemm: ctx.gemm,
            },
        )?;
        // State updates right after the pass whose codes they read, as on the kernels.
        self.sae.tensor_update_state(&out.codes)?;
        Ok(TensorStep {
            losses: out.losses,
            metrics: out.metrics,
            codes: vec![out.codes],
        })
    }
    fn forward_backward_tensor(
        &mut self,
        ctx: &StepCtx,
        grads: &mut [Vec<Vec<f32>>],
        ws: &mut [Workspace],
        backend: &TensorBackend,
    ) -> Result<ModelOutput, TrainError> {
        let input = self.input(ctx);
        let out = backend.forward_backward(&*self.sae, &input, &mut grads[0], &mut ws[0])?;
        self.sae.update_state(&input, &ws[0]);
        Ok(ModelOutput {
            loss: out.loss,
            losses: out.losses,
            metrics: out.metrics,
        })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn forward_backward(
        &mut self,
        ctx: &StepCtx,
        grads: &mut [Vec<Vec<f32>>],
        ws: &mut [Workspace],
    ) -> Result<ModelOutput, TrainError> {
        let input = self.input(ctx);
        let out = self
            .sae
            .forward_backward(&input, &mut grads[0], &mut ws[0])?;
        // State updates (BatchTopK's threshold, k-means centroids) right after the pass
        // whose codes they read, before the optimiser step.
        self.sae.update_state(&input, &ws[0]);
        Ok(ModelOutput {
            loss: out.loss,
            losses: out.losses,
            metrics: out.metrics,
        })
    }
}

/// The host round trip of a model's [`Model::tensor_step`] (a model whose loss spans
/// several SAEs, such as the JSAE pair): upload every SAE's parameters (trainable ones as
/// [`Var`]s) and scaled batch, the model's tensor step, `backward()`, each trainable
/// parameter's gradient into `grads[i]` and each SAE's codes as CSR into `ws[i].codes`;
/// the engine's host optimiser, constraints and counters then run as on the kernels.
pub fn round_trip(
    model: &mut dyn Model,
    ctx: &StepCtx,
    grads: &mut [Vec<Vec<f32>>],
    ws: &mut [Workspace],
    backend: &TensorBackend,
) -> Result<ModelOutput, TrainError> {
    let arch = model.name();
    let terr = |e| TrainError::Sae(SaeError::tensor(arch, e));
    let dev = backend.device();
    let n_saes = model.n_saes();
    let mut vars: Vec<Vec<Option<Var>>> = Vec::with_capacity(n_saes);
    let mut params: Vec<Vec<Tensor>> = Vec::with_capacity(n_saes);
    let mut xs = Vec::with_capacity(n_saes);
    for s in 0..n_saes {
        let sae = model.sae(s);
        let (mut vs, mut ts) = (Vec::new(), Vec::new());
        for p in sae.params() {
            let t = Tensor::from_slice(&p.data, p.shape.as_slice(), dev).map_err(terr)?;
            if p.trainable {
                let v = Var::from_tensor(&t).map_err(terr)?;
                ts.push(v.as_tensor().clone());
                vs.push(Some(v));
            } else {
                ts.push(t);
                vs.push(None);
            }
        }
        vars.push(vs);
        params.push(ts);
        xs.push(Tensor::from_slice(&ctx.inputs[s], (ctx.n, sae.dims().0), dev).map_err(terr)?);
    }
    let out = model.tensor_step(ctx, &xs, &params, ws)?;
    let mut total = Tensor::zeros((), DType::F32, dev).map_err(terr)?;
    let mut losses = Vec::with_capacity(out.losses.len());
    for (name, l) in &out.losses {
        total = (&total + l.to_dtype(DType::F32).map_err(terr)?).map_err(terr)?;
        let v = l.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>());
        losses.push((*name, v.map_err(terr)?));
    }
    let store = total.backward().map_err(terr)?;
    for (vs, gs) in vars.iter().zip(grads.iter_mut()) {
        for (v, g) in vs.iter().zip(gs.iter_mut()) {
            let Some(v) = v else { continue };
            match store.get(v.as_tensor()) {
                Some(gt) => {
                    let gv = gt
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(terr)?;
                    g.copy_from_slice(&gv);
                }
                None => g.iter_mut().for_each(|x| *x = 0.0),
            }
        }
    }
    for (c, w) in out.codes.iter().zip(ws.iter_mut()) {
        super::tensor::codes_to_csr(c, &mut w.codes).map_err(terr)?;
    }
    Ok(ModelOutput {
        loss: losses.iter().map(|l| l.1).sum(),
        losses,
        metrics: out.metrics,
    })
}
