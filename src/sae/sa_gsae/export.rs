//! SA-GSAE export and its two SAELens-style formats (sae_variants.md §6.3; SAELens itself
//! cannot load them): `bi_jumprelu` (tied magnitudes: one affine map, two thresholds) and
//! `sa_gsae` (untied magnitudes: the gate form). Both read the `cfg.json` key
//! `sign_consistent` when present.

use super::*;
use crate::sae::export::{Folded, Format};
use crate::sae::export_tensor::{mask, DeviceSae};
use candle_core::Tensor;

impl SaGsae {
    pub(super) fn export(&self) -> ExportParts {
        let (d, f) = (self.d, self.f);
        let p = &self.params;
        let ix = self.ix;
        let th: [Vec<f32>; 2] = [0, 1].map(|s| {
            if s == 1 && !self.cfg.negative_side {
                vec![f32::INFINITY; f]
            } else {
                p[ix.t[s]].data.iter().map(|t| t.exp()).collect()
            }
        });
        let raw = self.cfg.output == OutputSign::Raw;
        if !self.cfg.tied_magnitudes {
            return ExportParts {
                architecture: ARCH,
                w_enc: p[ix.w_enc].data.clone(),
                w_dec: p[ix.w_dec].data.clone(),
                b_dec: p[ix.b_dec].data.clone(),
                per_latent: vec![
                    ("b_gate", p[ix.b_gate].data.clone(), Fold::ByDecoderNorm),
                    ("threshold_pos", th[0].clone(), Fold::ByDecoderNorm),
                    ("threshold_neg", th[1].clone(), Fold::ByDecoderNorm),
                    ("r_mag_pos", p[ix.r[0]].data.clone(), Fold::Keep),
                    ("r_mag_neg", p[ix.r[1]].data.clone(), Fold::Keep),
                    ("b_mag_pos", p[ix.bm[0]].data.clone(), Fold::ByDecoderNorm),
                    ("b_mag_neg", p[ix.bm[1]].data.clone(), Fold::ByDecoderNorm),
                ],
                apply_b_dec_to_input: self.cfg.pre_encoder_bias,
                extra_cfg: vec![("sign_consistent", serde_json::Value::Bool(!raw))],
            };
        }
        // Bi-Jump-ReLU (§6.3): m = W'x + b', f = m (1[m > τ⁺] + 1[m < τ⁻]).
        let (w, bg, bm, r) = (
            &p[ix.w_enc].data,
            &p[ix.b_gate].data,
            &p[ix.bm[0]].data,
            &p[ix.r[0]].data,
        );
        let bd = &p[ix.b_dec].data;
        let mut w2 = w.clone();
        let mut b2 = bm.clone();
        let mut tp = vec![0.0; f];
        let mut tn = vec![0.0; f];
        for i in 0..f {
            let a = r[i].exp();
            let row = &mut w2[i * d..(i + 1) * d];
            if self.cfg.pre_encoder_bias {
                b2[i] -= a * c::dot(row, bd);
            }
            row.iter_mut().for_each(|v| *v *= a);
            let up = a * (th[0][i] - bg[i]) + bm[i];
            let un = if self.cfg.negative_side {
                a * (-th[1][i] - bg[i]) + bm[i]
            } else {
                f32::NEG_INFINITY
            };
            (tp[i], tn[i]) = if raw {
                (up, un)
            } else {
                (up.max(0.0), un.min(0.0))
            };
        }
        ExportParts {
            architecture: EXPORT_BI_JUMPRELU,
            w_enc: w2,
            w_dec: p[ix.w_dec].data.clone(),
            b_dec: bd.clone(),
            per_latent: vec![
                ("b_enc", b2, Fold::ByDecoderNorm),
                ("threshold_pos", tp, Fold::ByDecoderNorm),
                ("threshold_neg", tn, Fold::ByDecoderNorm),
            ],
            apply_b_dec_to_input: false,
            extra_cfg: vec![],
        }
    }
}

/// The formats this variant loads.
pub(super) const FORMATS: &[Format] = &[
    Format {
        architecture: EXPORT_BI_JUMPRELU,
        per_latent: &["b_enc", "threshold_pos", "threshold_neg"],
        read_cfg,
        encode: encode_bi_jumprelu,
        tensor_encode: tensor_bi_jumprelu,
    },
    Format {
        architecture: ARCH,
        per_latent: &[
            "b_gate",
            "threshold_pos",
            "threshold_neg",
            "r_mag_pos",
            "r_mag_neg",
            "b_mag_pos",
            "b_mag_neg",
        ],
        read_cfg,
        encode: encode_gate_form,
        tensor_encode: tensor_gate_form,
    },
];

/// Keeps `sign_consistent` when the file has it.
fn read_cfg(
    cfg: &serde_json::Value,
    _f: usize,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    Ok(cfg
        .get("sign_consistent")
        .map(|v| ("sign_consistent".to_string(), v.clone()))
        .into_iter()
        .collect())
}

/// `bi_jumprelu`: `m = x W_enc + b_enc`, `f = m·(1[m > τ⁺] + 1[m < τ⁻])`.
fn encode_bi_jumprelu(t: &Folded, n: usize, ws: &mut Workspace) {
    let (tp, tn) = (t.per("threshold_pos"), t.per("threshold_neg"));
    c::encode_collect(
        ws,
        n,
        t.d_in,
        &t.w_enc,
        t.d_sae,
        Some(t.per("b_enc")),
        |_, row, buf| {
            for (i, &m) in row.iter().enumerate() {
                if (m > tp[i] || m < tn[i]) && m != 0.0 {
                    buf.main.push((i as u32, m));
                }
            }
        },
    );
}

/// [`encode_bi_jumprelu`] on tensors.
fn tensor_bi_jumprelu(s: &DeviceSae, xt: &Tensor) -> candle_core::Result<Tensor> {
    let m = s.pre(xt, Some("b_enc"))?;
    let open = (mask(m.broadcast_gt(s.per("threshold_pos")?)?)?
        + mask(m.broadcast_lt(s.per("threshold_neg")?)?)?)?
    .minimum(1f32)?;
    m * open
}

/// [`encode_gate_form`] on tensors.
fn tensor_gate_form(s: &DeviceSae, xt: &Tensor) -> candle_core::Result<Tensor> {
    let sign = !s
        .extra("sign_consistent")
        .is_some_and(|v| v == &serde_json::Value::Bool(false));
    let u = s.pre(xt, None)?;
    let pi = u.broadcast_add(s.per("b_gate")?)?;
    let g0 = mask(pi.broadcast_gt(s.per("threshold_pos")?)?)?;
    let g1 = (mask(pi.neg()?.broadcast_gt(s.per("threshold_neg")?)?)? * g0.affine(-1.0, 1.0)?)?;
    let mag = |r: &str, b: &str| -> candle_core::Result<Tensor> {
        u.broadcast_mul(&s.per(r)?.exp()?)?.broadcast_add(s.per(b)?)
    };
    let (m0, m1) = (mag("r_mag_pos", "b_mag_pos")?, mag("r_mag_neg", "b_mag_neg")?);
    let (k0, k1) = if sign {
        (mask(m0.gt(0f32)?)?, mask(m1.lt(0f32)?)?)
    } else {
        (mask(m0.ne(0f32)?)?, mask(m1.ne(0f32)?)?)
    };
    (m0 * (g0 * k0)?)? + (m1 * (g1 * k1)?)?
}

/// `sa_gsae` (gate form, untied magnitudes).
fn encode_gate_form(t: &Folded, n: usize, ws: &mut Workspace) {
    let sign = !t
        .extra_cfg
        .iter()
        .any(|(k, v)| k == "sign_consistent" && v == &serde_json::Value::Bool(false));
    let bg = t.per("b_gate");
    let th = [t.per("threshold_pos"), t.per("threshold_neg")];
    let r = [t.per("r_mag_pos"), t.per("r_mag_neg")];
    let bm = [t.per("b_mag_pos"), t.per("b_mag_neg")];
    c::encode_collect(ws, n, t.d_in, &t.w_enc, t.d_sae, None, |_, row, buf| {
        for (i, &u) in row.iter().enumerate() {
            let pi = u + bg[i];
            let s = if pi > th[0][i] {
                0
            } else if -pi > th[1][i] {
                1
            } else {
                continue;
            };
            let m = r[s][i].exp() * u + bm[s][i];
            let keep = match (sign, s) {
                (false, _) => m != 0.0,
                (true, 0) => m > 0.0,
                _ => m < 0.0,
            };
            if keep {
                buf.main.push((i as u32, m));
            }
        }
    });
}
