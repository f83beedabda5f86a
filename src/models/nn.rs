//! Building blocks shared by the model files: linear layers, rotary tables, the causal
//! attention core, activations, HF config helpers and the hook-visit helper.
//!
//! Implements the numerics of `../shared/specs/pipeline.md` §3. An f32 model runs in f32
//! throughout. A bf16/f16 model follows transformers' numerics for that dtype: matmuls,
//! residual adds, activations and RoPE run in the model dtype (RoPE tables computed in f32
//! and rounded, as `LlamaRotaryEmbedding` / `GPTNeoXRotaryEmbedding` do); RMSNorm
//! normalises in f32 and multiplies by the gain in the model dtype (`LlamaRMSNorm`);
//! LayerNorm runs in f32 with one rounding of its output (torch's CPU/GPU kernels
//! accumulate in f32); attention scores are scaled, masked and soft-maxed in f32
//! (`softmax(..., dtype=torch.float32)` of the eager path) and rounded before `· V`.
//!
//! Decision: attention handles grouped-query attention without `repeat_kv` copies: the
//! query heads that share a key/value head are folded into the row dimension of one
//! batched matmul, `(b, kv, g·l, d) × (b, kv, d, l)`.

use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::error::ModelError;
use super::hooks::{Hookpoint, Hooks};
use super::weights::Weights;

/// A linear layer `y = x Wᵀ (+ b)` with `W` of shape `(out, in)` as stored by
/// Hugging Face, loaded from `{prefix}.weight` (and `{prefix}.bias`).
pub(crate) fn linear(
    w: &Weights,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<Linear, ModelError> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = if bias {
        Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Rotary position embedding, rotate-half (GPT-NeoX / Hugging Face) convention, over the
/// first `rot_dim` dimensions of each head.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// `1 / base^(2i / rot_dim)` for `i < rot_dim / 2`, computed in f32 as transformers does.
    inv_freq: Vec<f32>,
    /// Number of rotated dimensions per head (even).
    pub rot_dim: usize,
}

impl Rope {
    /// Rotary embedding over `rot_dim` dims with base `theta`.
    pub fn new(rot_dim: usize, theta: f64) -> Self {
        let base = theta as f32;
        let inv_freq = (0..rot_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / rot_dim as f32))
            .collect();
        Self { inv_freq, rot_dim }
    }

    /// `(cos, sin)`, each `(seq, rot_dim / 2)` in `dtype` (computed in f32, then rounded),
    /// for positions `0..seq`.
    pub fn tables(
        &self,
        seq: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in 0..seq {
            for &f in &self.inv_freq {
                // f32 product, as torch computes `positions.float() @ inv_freq`.
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (seq, half), device)?.to_dtype(dtype)?,
        ))
    }
}

/// Additive causal mask `(seq, seq)`: 0 on and below the diagonal, −∞ above.
pub(crate) fn causal_mask(seq: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)
}

/// Causal softmax attention.
///
/// `q`: `(b, h, l, d)`, `k`, `v`: `(b, kv, l, d)` with `h` a multiple of `kv` (query head
/// `i` reads key/value head `i / (h / kv)`, as transformers' `repeat_kv`); all contiguous,
/// all of one dtype; `mask` f32. Returns `(b, l, h·d)` in that dtype, heads concatenated as
/// the output projection expects. Below f32 the scores are scaled, masked and soft-maxed in
/// f32 (module docs).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let g = h / kv;
    let dtype = q.dtype();
    // 1. Scores per key/value group: (b, kv, g·l, d) × (b, kv, d, l) -> (b, kv, g·l, l).
    let scores = if dtype == DType::F32 {
        (q * scale)?.reshape((b, kv, g * l, d))?.matmul(&k.t()?)?
    } else {
        let s = q.reshape((b, kv, g * l, d))?.matmul(&k.t()?)?;
        (s.to_dtype(DType::F32)? * scale)?
    };
    // 2. Causal mask and softmax over keys, in f32: (b, h, l, l).
    let probs =
        candle_nn::ops::softmax_last_dim(&scores.reshape((b, h, l, l))?.broadcast_add(mask)?)?
            .to_dtype(dtype)?;
    // 3. Weighted values: (b, kv, g·l, l) × (b, kv, l, d) -> (b, h, l, d).
    let out = probs.reshape((b, kv, g * l, l))?.matmul(v)?;
    // 4. Heads back next to each other: (b, l, h·d).
    out.reshape((b, h, l, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, l, h * d))
}

/// An MLP activation, by its Hugging Face `hidden_act` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// `gelu`: exact, erf-based.
    GeluErf,
    /// `gelu_new`, `gelu_fast`, `gelu_pytorch_tanh`: tanh approximation.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
    /// `relu`.
    Relu,
}

impl Act {
    /// Parse a Hugging Face `hidden_act`; `None` if unsupported.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Act::GeluErf),
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Some(Act::GeluTanh),
            "silu" | "swish" => Some(Act::Silu),
            "relu" => Some(Act::Relu),
            _ => None,
        }
    }

    /// Apply elementwise.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::GeluErf => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::Silu => candle_nn::ops::silu(x),
            Act::Relu => x.relu(),
        }
    }
}

/// Visit hookpoint `hp` with activation `x` if `hooks` wants it; a replacement (which
/// must have `x`'s shape) takes `x`'s place for the rest of the forward pass.
pub(crate) fn visit(
    hooks: &mut dyn Hooks,
    hp: Hookpoint,
    x: Tensor,
) -> candle_core::Result<Tensor> {
    if !hooks.wants(hp) {
        return Ok(x);
    }
    match hooks.visit(hp, &x)? {
        None => Ok(x),
        Some(r) => {
            if r.dims() != x.dims() {
                candle_core::bail!(
                    "hook at {hp} returned shape {:?}, the activation has shape {:?}",
                    r.dims(),
                    x.dims()
                )
            }
            // Back in the model's dtype (an SAE reconstruction comes in f32).
            r.to_dtype(x.dtype())?.contiguous()
        }
    }
}

/// RMSNorm `x / sqrt(mean(x²) + eps) · w` over the last dim. f32 input: candle's fused
/// kernel. Below f32, `LlamaRMSNorm`: normalised in f32, rounded to the input dtype, then
/// multiplied by `w` (in that dtype).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return candle_nn::ops::rms_norm(x, w, eps);
    }
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps as f64)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

/// LayerNorm with f32 `weight` and `bias` (the model dtype's values, widened): f32 input
/// runs as is; below f32 the input is widened, normed in f32 and rounded once, as torch's
/// `layer_norm` kernels accumulate in f32.
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return candle_nn::ops::layer_norm(x, weight, bias, eps);
    }
    candle_nn::ops::layer_norm(&x.to_dtype(DType::F32)?, weight, bias, eps)?.to_dtype(dtype)
}

/// Check the `(batch, seq)` token ids and the `stop_after` layer before a forward pass.
pub(crate) fn check_inputs(
    ids: &Tensor,
    stop_after: Option<usize>,
    n_layers: usize,
) -> candle_core::Result<(usize, usize, usize)> {
    let (b, l) = ids.dims2()?;
    if l == 0 || b == 0 {
        candle_core::bail!("forward pass on an empty batch {:?}", ids.dims())
    }
    let last = match stop_after {
        Some(s) if s >= n_layers => {
            candle_core::bail!("stop_after = {s} but the model has {n_layers} layers")
        }
        Some(s) => s,
        None => n_layers - 1,
    };
    Ok((b, l, last))
}

/// Embedding lookup: `(b, l)` ids -> `(b, l, d)`.
pub(crate) fn embed(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (b, l) = ids.dims2()?;
    let (vocab, d) = table.dims2()?;
    let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
    // candle's index_select would fail deep inside; say which id is out of range.
    let max = ids.max(0)?.to_scalar::<u32>()?;
    if max as usize >= vocab {
        candle_core::bail!("token id {max} is out of range for a vocabulary of {vocab}")
    }
    table.index_select(&ids, 0)?.reshape((b, l, d))
}

/// One or several token ids (`eos_token_id` is either in Hugging Face configs).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl OneOrMany {
    /// As a list.
    pub fn to_vec(opt: &Option<OneOrMany>) -> Vec<u32> {
        match opt {
            None => vec![],
            Some(OneOrMany::One(x)) => vec![*x],
            Some(OneOrMany::Many(v)) => v.clone(),
        }
    }
}

/// transformers ≥ 5 writes RoPE settings under `rope_parameters`; hub checkpoints use the
/// older top-level keys. Both are read.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RopeParameters {
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// `default` for plain RoPE.
    pub rope_type: Option<String>,
    /// GPT-NeoX: fraction of head dims rotated.
    pub partial_rotary_factor: Option<f64>,
}

/// Fail unless `rope_scaling` / `rope_parameters.rope_type` ask for plain RoPE.
pub(crate) fn check_plain_rope(
    path: &std::path::Path,
    rope_scaling: &Option<serde_json::Value>,
    params: &Option<RopeParameters>,
) -> Result<(), ModelError> {
    let unsupported = |value: String| ModelError::UnsupportedConfig {
        path: path.to_path_buf(),
        key: "rope_scaling".into(),
        value,
        fix: "only unscaled RoPE is implemented; use a checkpoint without rope_scaling".into(),
    };
    if let Some(v) = rope_scaling {
        if !v.is_null() {
            let ty = v.get("rope_type").or_else(|| v.get("type"));
            if ty.and_then(|t| t.as_str()) != Some("default") {
                return Err(unsupported(v.to_string()));
            }
        }
    }
    if let Some(RopeParameters {
        rope_type: Some(t), ..
    }) = params
    {
        if t != "default" {
            return Err(unsupported(format!("{{\"rope_type\": \"{t}\"}}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_attention_matches_repeated_heads() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, h, kv, l, d) = (2, 4, 2, 5, 3);
        let q = Tensor::randn(0f32, 1., (b, h, l, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, kv, l, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, kv, l, d), &dev)?;
        let mask = causal_mask(l, &dev)?;
        let ours = attention(&q, &k, &v, &mask, 0.5)?;
        // Reference: repeat each kv head h/kv times, plain per-head attention.
        let rep = |t: &Tensor| -> candle_core::Result<Tensor> {
            let parts: Vec<Tensor> = (0..h)
                .map(|i| t.narrow(1, i / (h / kv), 1))
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&parts, 1)
        };
        let (k2, v2) = (rep(&k)?, rep(&v)?);
        let s = (q.matmul(&k2.t()?)? * 0.5)?.broadcast_add(&mask)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let want = p.matmul(&v2)?.transpose(1, 2)?.reshape((b, l, h * d))?;
        let diff = (&ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        // Causality: the first position attends only to itself, so its output is v[.., 0].
        let first = ours.narrow(1, 0, 1)?.reshape((b, h, d))?;
        let v0 = v2.narrow(2, 0, 1)?.reshape((b, h, d))?;
        let diff = (first - v0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "causal diff {diff}");
        Ok(())
    }

    #[test]
    fn rope_tables_rotate_by_position() -> candle_core::Result<()> {
        let r = Rope::new(4, 10000.0);
        let (cos, sin) = r.tables(3, &Device::Cpu, DType::F32)?;
        assert_eq!(cos.dims(), &[3, 2]);
        let c = cos.to_vec2::<f32>()?;
        let s = sin.to_vec2::<f32>()?;
        assert_eq!(c[0], vec![1.0, 1.0]);
        assert!((c[2][0] - 2f32.cos()).abs() < 1e-6);
        assert!((s[2][1] - (2.0f32 * 0.01).sin()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn activations_by_hf_name() {
        assert_eq!(Act::from_hf("gelu"), Some(Act::GeluErf));
        assert_eq!(Act::from_hf("silu"), Some(Act::Silu));
        assert_eq!(Act::from_hf("mish"), None);
    }
}
