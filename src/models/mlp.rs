//! One block's MLP as plain `f32` matrices: the frozen function that a Jacobian SAE pair
//! sits around (`../shared/specs/jsae_pamsgd.md` §1.2, §1.8).
//!
//! The function is exactly the model's MLP, from its input `mlp_in` (the output of the
//! pre-MLP norm, gain and bias included, so the norm is *not* part of it) to `mlp_out`
//! (biases included, before the residual add):
//!
//! ```text
//! plain (GPT-NeoX):  z = W_in x + b_in;             y = W_out φ(z) + b_out
//! gated (Llama):     a = W_gate x (+b), u = W_up x (+b);  y = W_down (φ(a) ⊙ u) (+b)
//! ∂y/∂x = Σ_p W_outᵀ diag(g_p) W_p   with the gains
//!   plain: g_1 = φ'(z)                       (projections W_in)
//!   gated: g_1 = φ'(a) ⊙ u,  g_2 = φ(a)      (projections W_gate, W_up)
//! ```
//!
//! Matrices keep Hugging Face's `[out, in]` layout, row-major; the transposes the Jacobian
//! kernels need are stored next to them once.

use candle_core::Tensor;

use super::nn::Act;

/// Why an MLP could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum MlpError {
    /// The layer index is past the last block.
    #[error("layer {layer} is out of range: the model has {n_layers} layers; use 0..={max}", max = n_layers.saturating_sub(1))]
    Layer {
        /// Requested layer.
        layer: usize,
        /// Blocks in the model.
        n_layers: usize,
    },
    /// The model does not expose its MLP weights.
    #[error("{model_type}: extracting MLP weights is not implemented for this model")]
    Unsupported {
        /// The model type.
        model_type: String,
    },
    /// Reading a weight tensor failed.
    #[error("reading the MLP weights of layer {layer}: {source}")]
    Candle {
        /// Layer.
        layer: usize,
        /// Cause.
        #[source]
        source: candle_core::Error,
    },
}

/// The MLP's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpAct {
    /// Exact (erf) GELU.
    GeluErf,
    /// Tanh-approximated GELU.
    GeluTanh,
    /// SiLU / swish.
    Silu,
    /// ReLU.
    Relu,
}

impl From<Act> for MlpAct {
    fn from(a: Act) -> Self {
        match a {
            Act::GeluErf => MlpAct::GeluErf,
            Act::GeluTanh => MlpAct::GeluTanh,
            Act::Silu => MlpAct::Silu,
            Act::Relu => MlpAct::Relu,
        }
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

impl MlpAct {
    /// `φ(z)`, computed as candle computes it.
    #[inline]
    pub fn value(self, z: f32) -> f32 {
        match self {
            MlpAct::GeluErf => {
                0.5 * z
                    * (1.0 + candle_core::cpu::erf::erf_f32(z * std::f32::consts::FRAC_1_SQRT_2))
            }
            MlpAct::GeluTanh => {
                0.5 * z * (1.0 + (SQRT_2_OVER_PI * (z + GELU_C * z * z * z)).tanh())
            }
            MlpAct::Silu => z / (1.0 + (-z).exp()),
            MlpAct::Relu => z.max(0.0),
        }
    }

    /// `φ'(z)` (spec §1.2; SiLU: `σ(z)(1 + z(1 − σ(z)))`).
    #[inline]
    pub fn deriv(self, z: f32) -> f32 {
        match self {
            MlpAct::GeluErf => {
                let cdf = 0.5
                    * (1.0 + candle_core::cpu::erf::erf_f32(z * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * z * z).exp() * 0.398_942_3;
                cdf + z * pdf
            }
            MlpAct::GeluTanh => {
                let t = (SQRT_2_OVER_PI * (z + GELU_C * z * z * z)).tanh();
                0.5 * (1.0 + t)
                    + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * z * z)
            }
            MlpAct::Silu => {
                let s = 1.0 / (1.0 + (-z).exp());
                s * (1.0 + z * (1.0 - s))
            }
            MlpAct::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// Plain (GPT-NeoX) or gated (SwiGLU, Llama/SmolLM) MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `W_out φ(W_in x + b_in) + b_out`.
    Plain,
    /// `W_down (φ(W_gate x) ⊙ W_up x)`.
    Gated,
}

/// One MLP's weights as `f32` matrices in Hugging Face layout (`[out, in]`, row-major).
#[derive(Debug, Clone)]
pub struct MlpWeights {
    /// Plain or gated.
    pub kind: MlpKind,
    /// Nonlinearity.
    pub act: MlpAct,
    /// Input / output width (d_model).
    pub d: usize,
    /// Hidden width.
    pub h: usize,
    /// The input projections `[h, d]`: `[W_in]` (plain) or `[W_gate, W_up]` (gated).
    pub w_in: Vec<Vec<f32>>,
    /// Their biases `[h]` (zeros when the model has none).
    pub b_in: Vec<Vec<f32>>,
    /// Transposes of `w_in`, `[d, h]` each.
    pub w_in_t: Vec<Vec<f32>>,
    /// Output projection `[d, h]`.
    pub w_out: Vec<f32>,
    /// Its transpose `[h, d]`.
    pub w_out_t: Vec<f32>,
    /// Output bias `[d]` (zeros when absent).
    pub b_out: Vec<f32>,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

fn vec_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl MlpWeights {
    /// Build from `[out, in]` tensors of candle `Linear`s: `ins` are the input projections
    /// (one for plain, gate then up for gated) with optional biases, `out` the output one.
    pub(crate) fn from_linears(
        kind: MlpKind,
        act: MlpAct,
        ins: &[&candle_nn::Linear],
        out: &candle_nn::Linear,
    ) -> candle_core::Result<Self> {
        let (d, h) = out.weight().dims2()?;
        let mut w_in = Vec::new();
        let mut b_in = Vec::new();
        for l in ins {
            w_in.push(vec_of(l.weight())?);
            b_in.push(match l.bias() {
                Some(b) => vec_of(b)?,
                None => vec![0.0; h],
            });
        }
        let w_out = vec_of(out.weight())?;
        let b_out = match out.bias() {
            Some(b) => vec_of(b)?,
            None => vec![0.0; d],
        };
        Ok(Self::new(kind, act, d, h, w_in, b_in, w_out, b_out))
    }

    /// Assemble from raw matrices (`w_in[p]: [h, d]`, `w_out: [d, h]`); transposes are
    /// computed here.
    #[allow(clippy::too_many_arguments)] // the fields of the struct, in order
    pub fn new(
        kind: MlpKind,
        act: MlpAct,
        d: usize,
        h: usize,
        w_in: Vec<Vec<f32>>,
        b_in: Vec<Vec<f32>>,
        w_out: Vec<f32>,
        b_out: Vec<f32>,
    ) -> Self {
        let w_in_t = w_in.iter().map(|w| transpose(w, h, d)).collect();
        let w_out_t = transpose(&w_out, d, h);
        Self {
            kind,
            act,
            d,
            h,
            w_in,
            b_in,
            w_in_t,
            w_out,
            w_out_t,
            b_out,
        }
    }

    /// Number of input projections (and gain vectors): 1 plain, 2 gated.
    pub fn n_proj(&self) -> usize {
        self.w_in.len()
    }

    fn pre(&self, p: usize, x: &[f32], out: &mut [f32]) {
        let (d, w, b) = (self.d, &self.w_in[p], &self.b_in[p]);
        for (c, o) in out.iter_mut().enumerate() {
            *o = crate::kernels::dot(&w[c * d..(c + 1) * d], x) + b[c];
        }
    }

    /// The MLP on one token: `y = f(x)`, `x, y: [d]`; `hid: [h]` scratch.
    pub fn forward_token(&self, x: &[f32], hid: &mut Vec<f32>, y: &mut [f32]) {
        let h = self.h;
        hid.resize(2 * h, 0.0);
        let (a, u) = hid.split_at_mut(h);
        self.pre(0, x, a);
        match self.kind {
            MlpKind::Plain => a.iter_mut().for_each(|z| *z = self.act.value(*z)),
            MlpKind::Gated => {
                self.pre(1, x, u);
                for (z, uu) in a.iter_mut().zip(u.iter()) {
                    *z = self.act.value(*z) * uu;
                }
            }
        }
        for (j, o) in y.iter_mut().enumerate() {
            *o = crate::kernels::dot(&self.w_out[j * h..(j + 1) * h], a) + self.b_out[j];
        }
    }

    /// The gains at input `x` (module docs): `gains[p·h..(p+1)·h] = g_{p+1}`, `n_proj()·h`
    /// values; `tmp: [h]` scratch.
    pub fn gains(&self, x: &[f32], tmp: &mut Vec<f32>, gains: &mut [f32]) {
        let h = self.h;
        tmp.resize(h, 0.0);
        match self.kind {
            MlpKind::Plain => {
                self.pre(0, x, &mut gains[..h]);
                gains[..h].iter_mut().for_each(|z| *z = self.act.deriv(*z));
            }
            MlpKind::Gated => {
                let (g1, g2) = gains.split_at_mut(h);
                self.pre(0, x, tmp);
                self.pre(1, x, g2);
                for c in 0..h {
                    let a = tmp[c];
                    let u = g2[c];
                    g1[c] = self.act.deriv(a) * u;
                    g2[c] = self.act.value(a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivatives_match_finite_differences() {
        for act in [MlpAct::GeluErf, MlpAct::GeluTanh, MlpAct::Silu] {
            for &z in &[-3.0f32, -1.2, -0.3, 0.0, 0.4, 1.7, 3.1] {
                let e = 1e-2f64;
                let fd = (act.value((z as f64 + e) as f32) as f64
                    - act.value((z as f64 - e) as f32) as f64)
                    / (2.0 * e);
                let an = act.deriv(z) as f64;
                assert!(
                    (fd - an).abs() < 2e-3,
                    "{act:?} at {z}: fd {fd} analytic {an}"
                );
            }
        }
    }

    #[test]
    fn transposes_are_transposes() {
        let w = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        assert_eq!(transpose(&w, 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
