//! Sparse-autoencoder variants behind one trait (STYLE.md §2.3; sae_variants.md §2–6).
//!
//! Every variant is one file (or folder) with its `Config` (`impl` [`ArchSpec`]: kind, build,
//! sparsity knob, recommended Adam), its SAE (`impl` [`Sae`]), the SAELens formats it loads
//! ([`export::Format`]: which tensors, how they encode) and a `pub static VARIANT:`
//! [`Variant`]. Adding a variant is that file plus one line in the `variants!` list below,
//! which declares the module and registers it in [`VARIANTS`]; [`ArchConfig`] (the
//! `[sae] arch` table), the conformance suite, the trainer and the SAELens loader find it
//! there (README "Adding an SAE variant"). The trainer, metrics and I/O only see [`Sae`],
//! [`Param`] and [`crate::kernels::Codes`].
//!
//! One step is [`Sae::forward_backward`] (loss parts in [`StepOutput::losses`], diagnostics
//! in [`StepOutput::metrics`], gradients) then [`Sae::update_state`] (running statistics
//! such as BatchTopK's threshold and the k-means centroids), then the optimiser.
//! Parameters are reached by name or through a variant's own typed accessors (the TopK
//! family shares [`topk_family::TopKParams`]); no index constants cross files.
//!
//! Decision: plain `f32` buffers and hand-written backward passes instead of candle
//! autograd (sae_variants.md §8 "Autograd"): generic autograd would materialise dense
//! `B × d_sae` gradients, and the sparse kernels in [`crate::kernels`] are what makes CPU training fast.
//! Decision: each variant also has (or may have) a second implementation on candle tensors,
//! [`Sae::tensor_forward`], differentiated by candle autograd: on a GPU a dense `B × d_sae`
//! gradient is what every peer does, and on the CPU device it is the kernels' oracle
//! (`tests/it/tensor_oracle.rs`). Shared tensor pieces are in [`tensor`].
//! Decision: the trait is written so that a signed, gated variant (SA-GSAE, §6) fits: codes
//! carry signed values (`≠ 0` means active), parameters are a named list with per-latent
//! vectors, and [`ExportParts`] lists per-latent tensors with how they fold.

pub mod export;
pub mod export_tensor;
pub mod registry;
pub mod tensor;
pub mod topk_family;

/// Declares each variant module and lists the [`Variant`]s it registers in [`VARIANTS`].
macro_rules! variants {
    ($($module:ident => [$($variant:ident),+ $(,)?]),+ $(,)?) => {
        $(pub mod $module;)+
        /// Every registered SAE variant, in the order of [`ArchConfig::examples`] and of the
        /// kinds listed in error messages.
        pub static VARIANTS: &[&Variant] = &[$($(&$module::$variant,)+)+];
    };
}

// The registry: one line per variant file (sae_variants.md; README "Adding an SAE variant").
variants! {
    relu_l1 => [VARIANT],
    topk => [VARIANT],
    batchtopk => [VARIANT],
    jumprelu => [VARIANT],
    gated => [VARIANT],
    kmeans => [VARIANT, PCA_VARIANT],
    sa_gsae => [VARIANT],
    abs_topk => [VARIANT],
    local_pca => [VARIANT],
    kflats => [VARIANT],
}

pub use crate::kernels::{Codes, Workspace};
pub use registry::{ArchConfig, ArchSpec, Variant};

/// Errors from building or running an SAE.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    /// The configuration cannot work.
    #[error("invalid {arch} SAE config: {msg}")]
    Config {
        /// Variant name.
        arch: &'static str,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// Input of the wrong width.
    #[error("{arch} SAE expects d_in = {expected} but the input has {found} values per token; use an SAE built for this hookpoint")]
    Shape {
        /// Variant name.
        arch: &'static str,
        /// SAE width.
        expected: usize,
        /// Width found.
        found: usize,
    },
    /// A candle operation of the tensor implementation failed.
    #[error("{arch} SAE, tensor step: {source}")]
    Tensor {
        /// Variant name.
        arch: &'static str,
        /// The candle error.
        source: candle_core::Error,
    },
}

impl SaeError {
    /// Wrap a candle error of variant `arch`'s tensor implementation.
    pub fn tensor(arch: &'static str, source: candle_core::Error) -> Self {
        Self::Tensor { arch, source }
    }
}

/// One named parameter (or non-trainable state) of an SAE.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Name; weights use SAELens names where one exists (`W_enc`, `b_dec`, …).
    pub name: &'static str,
    /// Shape (row-major). Matrices are `[d_sae, d_in]`.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// Updated by the optimiser (false for running statistics such as BatchTopK's threshold).
    pub trainable: bool,
    /// Rows are kept at unit norm (§1.3 A): the trainer projects their gradient before the
    /// step and renormalises after it.
    pub unit_rows: bool,
}

impl Param {
    /// A trainable parameter.
    pub fn new(name: &'static str, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name,
            shape,
            data,
            trainable: true,
            unit_rows: false,
        }
    }
}

/// Find a parameter by name.
pub fn param<'a>(params: &'a [Param], name: &str) -> Option<&'a Param> {
    params.iter().find(|p| p.name == name)
}

/// What the trainer hands to [`Sae::forward_backward`].
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// Scaled activations, `[n, d_in]` row-major.
    pub x: &'a [f32],
    /// Tokens in the batch.
    pub n: usize,
    /// Optimiser step (0-based).
    pub step: u64,
    /// Sparsity-coefficient warmup factor in `[0, 1]` (multiplies λ).
    pub sparsity_scale: f32,
    /// `dead[i]`: latent `i` has not fired for more than the dead window (AuxK input).
    pub dead: &'a [bool],
}

/// Loss and diagnostics of one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Total loss that was differentiated: the sum of [`StepOutput::losses`].
    pub loss: f64,
    /// Named loss parts (each already weighted), e.g. `("mse", …)`, `("l1", …)`, `("auxk", …)`.
    pub losses: Vec<(&'static str, f64)>,
    /// Named diagnostics that are not part of the loss, e.g. `("batchtopk_capped", 0/1)`.
    pub metrics: Vec<(&'static str, f64)>,
}

/// How a per-latent export tensor transforms when decoder norms are folded into the
/// encoder (§1.3 B): scaled by `‖d_i‖` (biases, thresholds in pre-activation space) or kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Multiply by the decoder row norm.
    ByDecoderNorm,
    /// Unchanged (e.g. Gated `r_mag`).
    Keep,
}

/// Raw export tensors before scaling and norm folding (see [`export`]).
#[derive(Debug, Clone)]
pub struct ExportParts {
    /// SAELens `architecture` string (`standard`, `topk`, `jumprelu`, `gated`).
    pub architecture: &'static str,
    /// Encoder rows `[d_sae, d_in]` (exported transposed as `W_enc [d_in, d_sae]`).
    pub w_enc: Vec<f32>,
    /// Decoder rows `[d_sae, d_in]`.
    pub w_dec: Vec<f32>,
    /// Decoder bias `[d_in]`.
    pub b_dec: Vec<f32>,
    /// Per-latent tensors (`b_enc`, `threshold`, `b_gate`, `b_mag`, `r_mag`).
    pub per_latent: Vec<(&'static str, Vec<f32>, Fold)>,
    /// SAELens `apply_b_dec_to_input`.
    pub apply_b_dec_to_input: bool,
    /// Extra `cfg.json` keys (e.g. `k` for topk).
    pub extra_cfg: Vec<(&'static str, serde_json::Value)>,
}

/// A sparse autoencoder: parameters plus forward/backward on plain buffers.
pub trait Sae: Send + Sync {
    /// Our variant name (`relu_l1`, `topk`, …), as in [`ArchConfig`]'s `kind`.
    fn arch(&self) -> &'static str;
    /// The configuration it was built from.
    fn config(&self) -> ArchConfig;
    /// `(d_in, d_sae)`.
    fn dims(&self) -> (usize, usize);
    /// Parameters and state, in a fixed order.
    fn params(&self) -> &[Param];
    /// Mutable parameters (optimiser, checkpoint restore).
    fn params_mut(&mut self) -> &mut [Param];
    /// Inference encode of `x: [n, d_in]` into `ws.codes` (BatchTopK uses its threshold).
    fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) -> Result<(), SaeError>;
    /// One training forward and backward pass. Writes the gradient of every parameter
    /// into `grads` (same order and sizes as [`Sae::params`]; the caller zeroes them), the
    /// training codes into `ws.codes` and the reconstruction into `ws.recon`.
    /// Running statistics are updated afterwards, by [`Sae::update_state`].
    fn forward_backward(
        &mut self,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError>;

    /// Update non-trainable state from the step just run (BatchTopK's threshold EMA, the
    /// k-means centroids). Called by the trainer right after [`Sae::forward_backward`], with
    /// the same `input` and the workspace it filled, before the optimiser step. Default:
    /// nothing.
    fn update_state(&mut self, input: &StepInput, ws: &Workspace) {
        let _ = (input, ws);
    }

    /// Whether the tensor backend may keep this SAE's training state on the device
    /// (`crate::train::resident`): true when [`Sae::tensor_update_state`] is the variant's
    /// whole state update there. Default: true exactly when the SAE has no non-trainable
    /// parameter (then, by its contract, [`Sae::update_state`] has nothing to update);
    /// variants with running statistics that implement `tensor_update_state` override it.
    /// Otherwise the tensor backend trains it through its host round trip.
    fn tensor_state_resident(&self) -> bool {
        self.params().iter().all(|p| p.trainable)
    }

    /// The device-resident form of [`Sae::update_state`]: update the non-trainable state
    /// (on the host) from the step's dense device codes `[n, d_sae]`, reading back only
    /// scalars. Called after the tensor forward whose codes it reads, before the optimiser
    /// step, when [`Sae::tensor_state_resident`]. Default: nothing.
    fn tensor_update_state(&mut self, codes: &candle_core::Tensor) -> Result<(), SaeError> {
        let _ = codes;
        Ok(())
    }

    /// Export tensors before folding.
    fn export_parts(&self) -> ExportParts;

    /// The training forward pass on candle tensors (the trainer's tensor backend,
    /// [`tensor`]): `params` are this SAE's parameters in [`Sae::params`] order, on the
    /// input's device (trainable ones are autograd variables). Returns the loss parts whose
    /// sum the backend differentiates and the dense codes; must agree with
    /// [`Sae::forward_backward`] (`tests/it/tensor_oracle.rs`). Variants without one keep this
    /// default, which refuses, and leave [`ArchSpec::supports_tensor`] false.
    fn tensor_forward(
        &self,
        params: &[candle_core::Tensor],
        input: &tensor::TensorInput,
    ) -> Result<tensor::TensorForward, SaeError> {
        let _ = (params, input);
        Err(SaeError::Config {
            arch: self.arch(),
            msg: format!(
                "no tensor implementation (train.backend = \"tensor\", or train.device = \"cuda\"); the tensor backend trains sae.arch kinds {}",
                ArchConfig::tensor_kinds().join(", ")
            ),
        })
    }

    /// Told by the trainer, before step 0 and on resume, how many steps the run has:
    /// variants fitted in passes over the stream (`local_pca`, `kflats`) schedule by it.
    /// Default: nothing.
    fn set_total_steps(&mut self, total_steps: u64) {
        let _ = total_steps;
    }

    /// Data-dependent initialisation, called once by the trainer before step 0 with the
    /// scaled init sample `x: [n, d_in]`, after `b_dec` is set. Default: nothing.
    fn init_from_sample(&mut self, x: &[f32], n: usize) -> Result<(), SaeError> {
        let _ = (x, n);
        Ok(())
    }

    /// PAM-SGD (`jsae_pamsgd.md` §2.2): install the closed-form decoder `w_dec [d_sae, d_in]`,
    /// `b_dec [d_in]` solved for the current codes, keeping the variant's own constraints.
    /// Variants that cannot be trained by PAM-SGD keep this default, which refuses.
    fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32]) -> Result<(), SaeError> {
        let _ = (w_dec, b_dec);
        Err(SaeError::Config {
            arch: self.arch(),
            msg: format!(
                "PAM-SGD (train.optimizer.kind = \"pam_sgd\") supports sae.arch kinds {}",
                ArchConfig::pam_sgd_kinds().join(", ")
            ),
        })
    }

    /// Called by the trainer after every step with the number of steps done and the dead
    /// mask (`tokens_since_fired > dead_after_tokens`): a variant may reset parameters of
    /// dead latents (SA-GSAE threshold resets, sae_variants.md §6.5). Returns the
    /// `(parameter index, element index)` pairs it reset; the trainer zeroes their Adam
    /// moments. It must not read trainable parameters: on the tensor backend they live on
    /// the device, the hook runs on the host copy and only the returned entries (and the
    /// non-trainable state) are copied back; it is skipped on steps without dead latents.
    /// Default: nothing.
    fn revive_dead(&mut self, _steps_done: u64, _dead: &[bool]) -> Vec<(usize, usize)> {
        Vec::new()
    }

    /// Decode codes into `out: [n, d_in]` (`x̂ = Σ f_i d_i + b_dec`, sparse).
    fn decode(&self, codes: &Codes, out: &mut Vec<f32>, ws: &mut Workspace) {
        let (d, f) = self.dims();
        let p = self.params();
        let w = &param(p, "W_dec")
            .expect("invariant: every variant has W_dec")
            .data;
        let b = &param(p, "b_dec")
            .expect("invariant: every variant has b_dec")
            .data;
        crate::kernels::decode(&mut ws.scratch, codes, w, d, f, Some(b), out);
    }

    /// Check invariants that must hold after every update: finite values and unit-norm
    /// rows where required. Returns a description of the first violation.
    fn check_invariants(&self) -> Result<(), String> {
        let d = self.dims().0;
        for p in self.params() {
            if let Some(i) = p.data.iter().position(|v| !v.is_finite()) {
                return Err(format!("{}[{i}] = {}", p.name, p.data[i]));
            }
            if p.unit_rows {
                for (r, row) in p.data.chunks(d).enumerate() {
                    let n = crate::kernels::dot(row, row).sqrt();
                    if (n - 1.0).abs() > 1e-4 {
                        return Err(format!("{} row {r} has norm {n}", p.name));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Check that the input width matches.
pub(crate) fn check_width(
    arch: &'static str,
    d_in: usize,
    x: &[f32],
    n: usize,
) -> Result<(), SaeError> {
    if n == 0 || x.len() != n * d_in {
        return Err(SaeError::Shape {
            arch,
            expected: d_in,
            found: x.len().checked_div(n).unwrap_or(0),
        });
    }
    Ok(())
}
