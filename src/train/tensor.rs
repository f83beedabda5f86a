//! The tensor backend of the training engine (issue #13 item 2; `train.backend = "tensor"`,
//! the default for `train.device = "cuda"`): each step's loss and gradients from a
//! variant's [`Sae::tensor_forward`] and candle autograd, on a CPU or CUDA [`Device`].
//!
//! Two ways to run it, both inside the engine's one loop (`train/mod.rs`):
//! - **device-resident** (`super::resident`), for models with a device-resident form
//!   ([`super::Model::tensor_resident`]: every single SAE with a tensor forward) and the
//!   optimisers with a device form (Adam, PAM-SGD): parameters, optimiser state, unit-norm
//!   projection and renormalisation, clipping, the schedules' application and the dead
//!   counters stay on the device for the whole run; the batch goes up and the scalars come
//!   back each step; the full state only for checkpoints, the final save and the variants'
//!   host hooks that need it;
//! - **host round trip** ([`TensorBackend::forward_backward`]), for the rest (the JSAE pair,
//!   other optimisers) and as the agreement tests' reference:
//!   1. upload every parameter (trainable ones as [`Var`]s) and the scaled batch;
//!   2. the variant's tensor forward; the loss is the sum of its parts;
//!   3. `backward()`; copy each trainable parameter's gradient into the engine's buffer;
//!   4. the dense codes come back as CSR into `ws.codes`, for the engine's firing counters,
//!      L0, BatchTopK's threshold and PAM-SGD's statistics; the engine's host optimiser,
//!      constraints and counters then run as on the kernels.
//!
//! Decision: the round trip is kept (not deleted) because it is the tensor forward with
//! the engine's host optimiser: comparing it with the resident path isolates the device
//! optimiser, and models whose loss spans two SAEs (the JSAE pair) train through it until
//! they get a [`super::Model::tensor_step`].

use candle_core::{DType, Device, Tensor, Var};

use super::TrainError;
use crate::kernels::{Codes, Workspace};
use crate::sae::tensor::TensorInput;
use crate::sae::{ArchConfig, Sae, SaeError, StepInput, StepOutput};

/// Where the training step runs (`train.device`): the models' device type, so that
/// `train.device` defaults to `model.device` without a conversion.
pub type TrainDevice = crate::models::DeviceSpec;

/// The device a tensor step runs on.
#[derive(Debug, Clone)]
pub struct TensorBackend {
    device: Device,
    gemm: DType,
}

impl TensorBackend {
    /// Open `device` (`cuda` needs a build with `--features cuda` and a visible GPU).
    pub fn new(device: TrainDevice) -> Result<Self, TrainError> {
        let device = device
            .open("train.device")
            .map_err(|e| TrainError::Config(e.to_string()))?;
        Ok(Self {
            device,
            gemm: DType::F32,
        })
    }

    /// The same backend with the GEMMs' operands in `gemm` (`train.compute_dtype`).
    pub fn with_gemm(mut self, gemm: DType) -> Self {
        self.gemm = gemm;
        self
    }

    /// The candle device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The refusal for a model the tensor backend cannot train.
    pub fn unsupported(name: &str, device: TrainDevice) -> TrainError {
        TrainError::Config(format!(
            "train.device = \"{}\" with train.backend = \"tensor\" cannot train {name}: the tensor backend implements sae.arch kinds {} (single SAEs); use train.device = \"cpu\" with train.backend = \"kernels\"",
            device,
            ArchConfig::tensor_kinds().join(", ")
        ))
    }

    /// One forward/backward pass of `sae` on tensors: gradients into `grads` (laid out like
    /// [`Sae::params`]; entries of non-trainable parameters are left alone), codes into
    /// `ws.codes`.
    pub fn forward_backward(
        &self,
        sae: &dyn Sae,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, TrainError> {
        let arch = sae.arch();
        let terr = |e| TrainError::Sae(SaeError::tensor(arch, e));
        let (d, _) = sae.dims();
        let n = input.n;
        if input.x.len() != n * d {
            return Err(TrainError::Width {
                expected: d,
                found: input.x.len().checked_div(n).unwrap_or(0),
            });
        }
        // 1. upload
        let mut vars: Vec<Option<Var>> = Vec::with_capacity(sae.params().len());
        let mut ts: Vec<Tensor> = Vec::with_capacity(sae.params().len());
        for p in sae.params() {
            let t = Tensor::from_slice(&p.data, p.shape.as_slice(), &self.device).map_err(terr)?;
            if p.trainable {
                let v = Var::from_tensor(&t).map_err(terr)?;
                ts.push(v.as_tensor().clone());
                vars.push(Some(v));
            } else {
                ts.push(t);
                vars.push(None);
            }
        }
        let x = Tensor::from_slice(input.x, (n, d), &self.device).map_err(terr)?;
        // 2. forward
        let out = sae.tensor_forward(
            &ts,
            &TensorInput {
                x: &x,
                n,
                step: input.step,
                sparsity_scale: input.sparsity_scale,
                dead: input.dead,
                gemm: self.gemm,
            },
        )?;
        let mut total = Tensor::zeros((), DType::F32, &self.device).map_err(terr)?;
        let mut losses = Vec::with_capacity(out.losses.len());
        for (name, l) in &out.losses {
            total = (&total + l).map_err(terr)?;
            let v = l.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>());
            losses.push((*name, v.map_err(terr)?));
        }
        // 3. backward
        let store = total.backward().map_err(terr)?;
        for ((v, g), p) in vars.iter().zip(grads.iter_mut()).zip(sae.params()) {
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
            debug_assert_eq!(g.len(), p.data.len());
        }
        // 4. codes as CSR
        codes_to_csr(&out.codes, &mut ws.codes).map_err(terr)?;
        Ok(StepOutput {
            loss: losses.iter().map(|l| l.1).sum(),
            losses,
            metrics: out.metrics,
        })
    }
}

/// Dense device codes `[n, d_sae]` into host CSR (a download of the whole matrix).
pub fn codes_to_csr(codes: &Tensor, out: &mut Codes) -> candle_core::Result<()> {
    let dense = codes.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    out.clear();
    for row in &dense {
        for (i, &v) in row.iter().enumerate() {
            if v != 0.0 {
                out.idx.push(i as u32);
                out.val.push(v);
            }
        }
        out.indptr.push(out.idx.len());
    }
    Ok(())
}
