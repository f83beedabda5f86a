//! The SA-GSAE per-token gate (Bi-Jump-ReLU with the two-sided threshold, §6.2) shared by
//! inference and training, and the side bookkeeping of its entries.

use super::*;

/// Everything the per-token gate needs, borrowed from the parameters.
pub(super) struct Gate<'a> {
    bg: &'a [f32],
    th: [&'a [f32]; 2],
    a: [&'a [f32]; 2],
    bm: [&'a [f32]; 2],
    neg: bool,
    raw: bool,
    /// Half bandwidth when closed gates inside the band must be collected.
    half: Option<f32>,
}

impl Gate<'_> {
    /// One token: active latents → `buf.main` (value f); with `train`, open gates →
    /// `buf.aux` (value s) and closed band entries (value ±0.0).
    #[inline]
    pub(super) fn row(&self, row: &[f32], buf: &mut TaskBuf, train: bool) {
        for (i, &u) in row.iter().enumerate() {
            let pi = u + self.bg[i];
            let side = if pi > self.th[0][i] {
                0
            } else if self.neg && -pi > self.th[1][i] {
                1
            } else {
                if let (true, Some(h)) = (train, self.half) {
                    if self.th[0][i] - pi < h {
                        buf.aux.push((i as u32, 0.0));
                    } else if self.neg && self.th[1][i] + pi < h {
                        buf.aux.push((i as u32, -0.0));
                    }
                }
                continue;
            };
            let m = self.a[side][i] * u + self.bm[side][i];
            let keep = if self.raw {
                m != 0.0
            } else if side == 0 {
                m > 0.0
            } else {
                m < 0.0
            };
            if keep {
                buf.main.push((i as u32, m));
            }
            if train {
                let s = if side == 0 {
                    pi - self.th[0][i]
                } else {
                    pi + self.th[1][i]
                };
                buf.aux.push((i as u32, s));
            }
        }
    }
}

/// Side of an aux entry: negative when `s < 0`, or `s = −0.0` for a closed band entry.
#[inline]
pub(super) fn aux_side(s: f32) -> usize {
    s.is_sign_negative() as usize
}

impl SaGsae {
    pub(super) fn gate<'a>(&'a self, th: &'a [Vec<f32>; 2], a: &'a [Vec<f32>; 2], train: bool) -> Gate<'a> {
        let p = &self.params;
        let banded = self.cfg.threshold_ste || self.cfg.sparsity == SparsityPenalty::L0;
        Gate {
            bg: &p[self.ix.b_gate].data,
            th: [&th[0], &th[1]],
            a: [&a[0], &a[1]],
            bm: [&p[self.ix.bm[0]].data, &p[self.ix.bm[1]].data],
            neg: self.cfg.negative_side,
            raw: self.cfg.output == OutputSign::Raw,
            half: (train && banded).then_some(0.5 * self.cfg.bandwidth),
        }
    }

    /// Side of each main entry: from the sign of f (sign-consistent) or, for raw outputs,
    /// from the matching open-gate entry (both lists are in latent order per token).
    pub(super) fn main_sides(&mut self, codes: &Codes, aux: &Codes) {
        self.side.clear();
        if self.cfg.output == OutputSign::SignConsistent {
            self.side.extend(codes.val.iter().map(|&v| (v < 0.0) as u8));
            return;
        }
        for b in 0..codes.n() {
            let (ai, av) = aux.row(b);
            let mut j = 0;
            for &i in codes.row(b).0 {
                while ai[j] != i {
                    j += 1;
                }
                self.side.push(aux_side(av[j]) as u8);
            }
        }
    }
}
