//! The evaluation encode on candle tensors (issue #13 item 2): a loaded SAE
//! ([`super::export::LoadedSae`]) with its tensors on a [`Device`], encoding and decoding
//! raw activations there (built by [`super::export::Folded::to_device`]). Each
//! `architecture` brings its tensor encode in its [`super::export::Format`]
//! (`tensor_encode`, beside the kernels' `encode`, in the variant file that owns it), so
//! the evaluate stage and CE splicing stay generic.
//!
//! The tensor encode computes the same codes as the kernels' (the same pre-activations up
//! to f32 summation order, the same selections: top-k by [`super::tensor::topk_mask`], ties
//! to the lower index); `tests/it/eval_tensor_encode.rs` checks R², L0 and dead fraction for
//! every format.

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::Workspace;

/// `Format::tensor_encode`: dense codes `[n, d_sae]` of `xt` (raw input rows, minus
/// `b_dec` when `apply_b_dec_to_input`) with the device tensors.
pub type TensorEncode = fn(&DeviceSae, &Tensor) -> Result<Tensor>;

/// A loaded SAE on a device.
#[derive(Debug)]
pub struct DeviceSae {
    /// `W_encᵀ [d_in, d_sae]`.
    pub w_enc_t: Tensor,
    /// `W_dec [d_sae, d_in]` (unit rows).
    pub w_dec: Tensor,
    /// `b_dec [1, d_in]`.
    pub b_dec: Tensor,
    pub(crate) per_latent: Vec<(String, Tensor)>,
    pub(crate) k: Option<usize>,
    pub(crate) extra_cfg: Vec<(String, serde_json::Value)>,
    pub(crate) apply_b_dec_to_input: bool,
    pub(crate) d_in: usize,
    pub(crate) d_sae: usize,
    pub(crate) encode: TensorEncode,
}

impl DeviceSae {
    /// The device.
    pub fn device(&self) -> &Device {
        self.w_dec.device()
    }

    /// `(d_in, d_sae)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_sae)
    }

    /// The per-latent tensor `name`, `[1, d_sae]`.
    pub fn per(&self, name: &str) -> Result<&Tensor> {
        self.per_latent
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| candle_core::Error::Msg(format!("no per-latent tensor `{name}`")))
    }

    /// TopK `k` (1 when the file has none, as the kernels').
    pub fn k(&self) -> usize {
        self.k.unwrap_or(1)
    }

    /// An extra `cfg.json` key.
    pub fn extra(&self, key: &str) -> Option<&serde_json::Value> {
        self.extra_cfg
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// `xt W_encᵀ (+ the per-latent bias `bias`)`, `[n, d_sae]`.
    pub fn pre(&self, xt: &Tensor, bias: Option<&str>) -> Result<Tensor> {
        let u = xt.matmul(&self.w_enc_t)?;
        match bias {
            Some(b) => u.broadcast_add(self.per(b)?),
            None => Ok(u),
        }
    }

    /// Dense codes `[n, d_sae]` of raw activations `x [n, d_in]` (`f32`, on this device).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let xt = if self.apply_b_dec_to_input {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x.clone()
        };
        (self.encode)(self, &xt)
    }

    /// Reconstructions `codes W_dec + b_dec`, `[n, d_in]`.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        codes.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)
    }

    /// Encode and decode host rows `x [n, d_in]` on the device: the codes into `ws.codes`
    /// (CSR, exact zeros dropped), the reconstruction into `recon`, as the kernels'
    /// `LoadedSae::encode` + `decode` do.
    pub fn run(&self, x: &[f32], n: usize, ws: &mut Workspace, recon: &mut Vec<f32>) -> Result<()> {
        let xt = Tensor::from_slice(x, (n, self.d_in), self.device())?;
        let codes = self.encode(&xt)?;
        *recon = self.decode(&codes)?.flatten_all()?.to_vec1::<f32>()?;
        let dense = codes.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        ws.codes.clear();
        for row in &dense {
            for (i, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    ws.codes.idx.push(i as u32);
                    ws.codes.val.push(v);
                }
            }
            ws.codes.indptr.push(ws.codes.idx.len());
        }
        Ok(())
    }
}

/// `f32` 0/1 of a comparison.
pub fn mask(t: Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}
