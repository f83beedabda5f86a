//! Device-resident training state of the tensor backend (issue #13 item 2): what the engine
//! (`train/mod.rs`) keeps on the device between steps when `train.backend = "tensor"` and
//! the model has a device-resident form ([`Model::tensor_resident`]).
//!
//! Lives on the device for the whole run: every trainable parameter (a candle [`Var`],
//! updated in place), Adam's moments, PAM-SGD's encoder anchors and decoder statistics
//! (`G = Σ zᵀz`, `C = Σ zᵀx`, `s_z`, `s_x`, in f64), the tokens-since-fired counters (f64,
//! exact to 2⁵³ tokens), and the step's gradients and dense codes. The engine's step on it:
//! 1. [`Resident::forward_backward`]: upload the scaled batch (and any non-trainable
//!    parameter whose host copy changed), the model's [`Model::tensor_step`], autograd;
//! 2. [`Resident::prepare`] (PAM-SGD: decoder gradients dropped, proximal pull and its loss
//!    term), [`Resident::project`] (unit-norm rows: `g ← g − (g·w/‖w‖²) w`),
//!    [`Resident::grad_sq`]; then one download of the loss parts and `‖g‖²`
//!    ([`Resident::scalars`]) for the engine's NaN guard, clipping decision and log;
//! 3. [`Resident::update`]: clip scale, Adam with the scheduled LR, row renormalisation;
//!    [`Resident::after_step`]: PAM-SGD statistics by device GEMMs and, every
//!    `solve_every` steps, the decoder solve;
//! 4. [`Resident::fire`]: counters, then one download of `nnz` and the dead count per SAE,
//!    and of the `d_sae`-byte dead mask only when some latent is dead;
//! 5. [`Resident::revive`]: the variant's host [`crate::sae::Sae::revive_dead`] on steps
//!    with dead latents; the entries it resets are scattered into the device tensors.
//!
//! The host copy of the model ([`Model::sae`]) is canonical for non-trainable state
//! (running statistics: the variants' host hooks write it; it is re-uploaded when it
//! changed) and otherwise stale until [`Resident::sync_host`] (the engine calls it after the
//! last step, at the end of [`super::Trainer::run`], before PAM-SGD's host solve and when a
//! caller asks for mutable access). Checkpoints are written from the device state directly
//! ([`Resident::named`]), under the same names as the host optimisers' (`sae{s}.adam_m.*`,
//! `pam.*`), so the format does not depend on the backend.
//!
//! Decision: PAM-SGD's closed-form solve stays on the host: it is a Cholesky of the
//! `d_sae × d_sae` system (`O(d_sae³)`, the f64 kernels of `pam.rs`) once per `solve_every`
//! steps, against which downloading `G` (8·d_sae² bytes) and the parameters, and uploading
//! them after the variant's `install_decoder` (which moves decoder norms into the
//! encoder), are small. The statistics themselves are accumulated by device GEMMs from the
//! dense codes (f32 products, f64 sums).
//! Decision: variants' hooks: [`crate::sae::Sae::tensor_update_state`] is the device form of
//! `update_state` (BatchTopK's threshold EMA reads one scalar); a variant with running
//! statistics but without one ([`crate::sae::Sae::tensor_state_resident`] false: the
//! k-means-style baselines, whose updates read the kernels' workspace) is not made
//! resident: it trains on the tensor backend's host round trip, as before. `revive_dead`
//! runs on the host copy (its contract: it writes, never reads, trainable entries), only on
//! steps with dead latents.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::{self, Checkpoint, TensorRef};
use super::config::Optimizer as OptKind;
use super::model::{Model, StepCtx};
use super::optim::{moment_key, Adam, Optimizer};
use super::pam::{PamConfig, PamState, DECODER_PARAMS};
use super::TrainError;
use crate::kernels::Workspace;
use crate::sae::SaeError;

/// A candle error of the resident state, named by the model.
fn terr(arch: &'static str) -> impl Fn(candle_core::Error) -> TrainError {
    move |e| TrainError::Sae(SaeError::tensor(arch, e))
}

/// One parameter of one SAE on the device.
enum DevParam {
    /// Trainable: an autograd variable, updated in place.
    Train(Var),
    /// Non-trainable: the host copy is canonical; `last` is what was uploaded.
    Fixed { t: Tensor, last: Vec<f32> },
}

impl DevParam {
    fn tensor(&self) -> &Tensor {
        match self {
            DevParam::Train(v) => v.as_tensor(),
            DevParam::Fixed { t, .. } => t,
        }
    }
}

/// PAM-SGD's device state (single-SAE models).
struct DevPam {
    cfg: PamConfig,
    w_dec: usize,
    b_dec: usize,
    /// Anchors of the encoder parameters (`None`: decoder or non-trainable).
    anchors: Vec<Option<Tensor>>,
    g: Tensor,
    c: Tensor,
    sz: Tensor,
    sx: Tensor,
    n: f64,
}

/// The tensor backend's device-resident training state (see the module docs).
pub struct Resident {
    arch: &'static str,
    params: Vec<Vec<DevParam>>,
    m: Vec<Vec<Option<Tensor>>>,
    v: Vec<Vec<Option<Tensor>>>,
    frozen: Vec<Vec<bool>>,
    hp: Adam,
    pam: Option<DevPam>,
    tsf: Vec<Tensor>,
    grads: Vec<Vec<Option<Tensor>>>,
    codes: Vec<Tensor>,
    x: Vec<Tensor>,
}

/// Upload a host buffer of a checkpoint tensor.
fn upload(t: TensorRef, shape: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
    match t {
        TensorRef::F32(v) => Tensor::from_slice(v, shape, dev),
        TensorRef::F64(v) => Tensor::from_slice(v, shape, dev),
        TensorRef::U64(v) => {
            let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            Tensor::from_slice(&f, shape, dev)
        }
    }
}

fn f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

fn f64s(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// Rows of `w` (`[len/d, d]` view) rescaled to unit norm; zero rows left alone.
fn unit_rows(w: &Tensor, d: usize) -> candle_core::Result<Tensor> {
    let shape = w.shape().clone();
    let r = w.reshape(((), d))?;
    let n = r.sqr()?.sum_keepdim(1)?.sqrt()?;
    let zero = n.eq(0f32)?.to_dtype(DType::F32)?;
    let inv = (n + zero)?.recip()?;
    r.broadcast_mul(&inv)?.reshape(shape)
}

impl Resident {
    /// Whether the optimiser has a device form (Adam, PAM-SGD); other optimisers train on
    /// the tensor backend's host round trip.
    pub fn supports(opt: &OptKind) -> bool {
        matches!(opt, OptKind::Adam | OptKind::PamSgd(_))
    }

    /// Upload the engine's host state: `model`'s parameters, the optimiser's state (by the
    /// names of [`Optimizer::state`]) and the firing counters `tsf`.
    pub fn new(
        device: &Device,
        kind: &OptKind,
        hp: Adam,
        model: &dyn Model,
        opt: &dyn Optimizer,
        tsf: &[&[u64]],
    ) -> Result<Self, TrainError> {
        let arch = model.name();
        let e = terr(arch);
        let state: HashMap<String, TensorRef> = opt.state(model).into_iter().collect();
        let get = |k: &str| {
            state.get(k).copied().ok_or_else(|| TrainError::Checkpoint {
                path: PathBuf::from("<optimiser state>"),
                msg: format!("the tensor backend found no `{k}` in the optimiser's state"),
            })
        };
        let n_saes = model.n_saes();
        let mut params = Vec::with_capacity(n_saes);
        let (mut m, mut v, mut frozen) = (Vec::new(), Vec::new(), Vec::new());
        for s in 0..n_saes {
            let sae = model.sae(s);
            let mut ps = Vec::new();
            let (mut ms, mut vs, mut fs) = (Vec::new(), Vec::new(), Vec::new());
            for p in sae.params() {
                let t = Tensor::from_slice(&p.data, p.shape.as_slice(), device).map_err(&e)?;
                if p.trainable {
                    ps.push(DevParam::Train(Var::from_tensor(&t).map_err(&e)?));
                    let mk = moment_key(s, "m", p.name);
                    let vk = moment_key(s, "v", p.name);
                    ms.push(Some(upload(get(&mk)?, &p.shape, device).map_err(&e)?));
                    vs.push(Some(upload(get(&vk)?, &p.shape, device).map_err(&e)?));
                } else {
                    ps.push(DevParam::Fixed {
                        t,
                        last: p.data.clone(),
                    });
                    ms.push(None);
                    vs.push(None);
                }
                fs.push(false);
            }
            params.push(ps);
            m.push(ms);
            v.push(vs);
            frozen.push(fs);
        }
        let tsf = tsf
            .iter()
            .map(|t| upload(TensorRef::U64(t), &[t.len()], device))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&e)?;
        let pam = match kind {
            OptKind::PamSgd(cfg) => {
                let sae = model.sae(0);
                let (d, f) = sae.dims();
                let find = |name: &str| {
                    sae.params()
                        .iter()
                        .position(|p| p.name == name)
                        .ok_or_else(|| {
                            TrainError::Config(format!("PAM-SGD needs a `{name}` parameter"))
                        })
                };
                let (w_dec, b_dec) = (find("W_dec")?, find("b_dec")?);
                frozen[0][w_dec] = true;
                frozen[0][b_dec] = true;
                let mut anchors = Vec::new();
                for p in sae.params() {
                    anchors.push(if p.trainable && !DECODER_PARAMS.contains(&p.name) {
                        let k = format!("pam.anchor.{}", p.name);
                        Some(upload(get(&k)?, &p.shape, device).map_err(&e)?)
                    } else {
                        None
                    });
                }
                let stat = |k: &str, shape: &[usize]| -> Result<Tensor, TrainError> {
                    upload(get(k)?, shape, device).map_err(&e)
                };
                let n = match get("pam.n")? {
                    TensorRef::F64(v) => v.first().copied().unwrap_or(0.0),
                    _ => 0.0,
                };
                Some(DevPam {
                    cfg: cfg.clone(),
                    w_dec,
                    b_dec,
                    anchors,
                    g: stat("pam.G", &[f, f])?,
                    c: stat("pam.C", &[f, d])?,
                    sz: stat("pam.sz", &[f])?,
                    sx: stat("pam.sx", &[d])?,
                    n,
                })
            }
            _ => None,
        };
        Ok(Self {
            arch,
            grads: params
                .iter()
                .map(|ps| ps.iter().map(|_| None).collect())
                .collect(),
            params,
            m,
            v,
            frozen,
            hp,
            pam,
            tsf,
            codes: Vec::new(),
            x: Vec::new(),
        })
    }

    /// Step 1: upload the batch (and changed non-trainable state), the model's tensor step,
    /// backward. Returns the loss parts (device scalars) and the model's diagnostics.
    #[allow(clippy::type_complexity)]
    pub fn forward_backward(
        &mut self,
        model: &mut dyn Model,
        ctx: &StepCtx,
        ws: &mut [Workspace],
    ) -> Result<(Vec<(&'static str, Tensor)>, Vec<(&'static str, f64)>), TrainError> {
        let e = terr(self.arch);
        let device = self.tsf[0].device().clone();
        for (s, ps) in self.params.iter_mut().enumerate() {
            for (dp, p) in ps.iter_mut().zip(model.sae(s).params()) {
                if let DevParam::Fixed { t, last } = dp {
                    if *last != p.data {
                        *t =
                            Tensor::from_slice(&p.data, p.shape.as_slice(), &device).map_err(&e)?;
                        last.copy_from_slice(&p.data);
                    }
                }
            }
        }
        self.x = ctx
            .inputs
            .iter()
            .enumerate()
            .map(|(s, x)| Tensor::from_slice(x, (ctx.n, model.sae(s).dims().0), &device))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&e)?;
        let params: Vec<Vec<Tensor>> = self
            .params
            .iter()
            .map(|ps| ps.iter().map(|p| p.tensor().clone()).collect())
            .collect();
        let out = model.tensor_step(ctx, &self.x, &params, ws)?;
        let mut total = Tensor::zeros((), DType::F32, &device).map_err(&e)?;
        for (_, l) in &out.losses {
            total = (&total + l.to_dtype(DType::F32).map_err(&e)?).map_err(&e)?;
        }
        let store = total.backward().map_err(&e)?;
        for (gs, ps) in self.grads.iter_mut().zip(&self.params) {
            for (g, p) in gs.iter_mut().zip(ps) {
                *g = match p {
                    DevParam::Train(v) => store.get(v.as_tensor()).map(|t| t.detach()),
                    DevParam::Fixed { .. } => None,
                };
            }
        }
        self.codes = out.codes;
        Ok((out.losses, out.metrics))
    }

    /// Step 2a: the optimiser's gradient adjustment and loss terms (PAM-SGD: decoder
    /// gradients dropped, `2μ(p − p^t)` added to the encoder's, the `prox` term).
    pub fn prepare(
        &mut self,
        model: &dyn Model,
    ) -> Result<Vec<(&'static str, Tensor)>, TrainError> {
        let e = terr(self.arch);
        let Some(pam) = &self.pam else {
            return Ok(Vec::new());
        };
        let device = self.tsf[0].device().clone();
        self.grads[0][pam.w_dec] = None;
        self.grads[0][pam.b_dec] = None;
        let mut prox = Tensor::zeros((), DType::F64, &device).map_err(&e)?;
        for (i, p) in model.sae(0).params().iter().enumerate() {
            let Some(a) = &pam.anchors[i] else { continue };
            let mu = PamState::prox_weight(&pam.cfg, &p.shape);
            if mu == 0.0 {
                continue;
            }
            let diff = (self.params[0][i].tensor() - a).map_err(&e)?;
            let pull = (&diff * (2.0 * mu) as f64).map_err(&e)?;
            self.grads[0][i] = Some(match &self.grads[0][i] {
                Some(g) => (g + pull).map_err(&e)?,
                None => pull,
            });
            let sq = diff
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_dtype(DType::F64))
                .and_then(|t| t * mu as f64)
                .map_err(&e)?;
            prox = (prox + sq).map_err(&e)?;
        }
        Ok(vec![("prox", prox)])
    }

    /// Step 2b: project the gradients of unit-norm rows onto their tangent space.
    pub fn project(&mut self, model: &dyn Model) -> Result<(), TrainError> {
        let e = terr(self.arch);
        for (s, gs) in self.grads.iter_mut().enumerate() {
            let sae = model.sae(s);
            let d = sae.dims().0;
            for ((g, p), dp) in gs.iter_mut().zip(sae.params()).zip(&self.params[s]) {
                let (Some(gt), true) = (g.as_ref(), p.unit_rows) else {
                    continue;
                };
                let run = || -> candle_core::Result<Tensor> {
                    let w = dp.tensor().reshape(((), d))?;
                    let gr = gt.reshape(((), d))?;
                    let dot = (&gr * &w)?.sum_keepdim(1)?;
                    let nn = w.sqr()?.sum_keepdim(1)?;
                    let nn = (&nn + nn.eq(0f32)?.to_dtype(DType::F32)?)?;
                    let c = (dot / nn)?;
                    (gr - w.broadcast_mul(&c)?)?.reshape(gt.shape())
                };
                *g = Some(run().map_err(&e)?);
            }
        }
        Ok(())
    }

    /// Step 2c: `Σ ‖g‖²` over every trainable parameter's gradient (a device scalar).
    pub fn grad_sq(&self) -> Result<Tensor, TrainError> {
        let e = terr(self.arch);
        let device = self.tsf[0].device().clone();
        let mut sq = Tensor::zeros((), DType::F64, &device).map_err(&e)?;
        for g in self.grads.iter().flatten().flatten() {
            let t = g
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_dtype(DType::F64))
                .map_err(&e)?;
            sq = (sq + t).map_err(&e)?;
        }
        Ok(sq)
    }

    /// Device scalars to the host, in one transfer.
    pub fn scalars(&self, ts: &[&Tensor]) -> Result<Vec<f64>, TrainError> {
        if ts.is_empty() {
            return Ok(Vec::new());
        }
        let e = terr(self.arch);
        let parts = ts
            .iter()
            .map(|t| t.to_dtype(DType::F64).and_then(|t| t.reshape(1)))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&e)?;
        Tensor::cat(&parts, 0)
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(&e)
    }

    /// Step 3a: gradients times `clip` (when clipping cut), Adam at 1-based step `t` with
    /// learning rate `lr`, then unit-norm rows renormalised — the host [`Adam::update`]'s
    /// arithmetic, elementwise on the device.
    pub fn update(
        &mut self,
        model: &dyn Model,
        clip: Option<f32>,
        lr: f32,
        t: u64,
    ) -> Result<(), TrainError> {
        let e = terr(self.arch);
        let hp = self.hp;
        let (b1, b2) = (hp.beta1, hp.beta2);
        let bc1 = 1.0 - (b1 as f64).powi(t as i32);
        let bc2 = 1.0 - (b2 as f64).powi(t as i32);
        let step = (lr as f64 * bc2.sqrt() / bc1.max(1e-30)) as f32;
        let eps = (hp.eps as f64 * bc2.sqrt()) as f32;
        for s in 0..self.params.len() {
            let sae = model.sae(s);
            let d = sae.dims().0;
            for (i, p) in sae.params().iter().enumerate() {
                let DevParam::Train(var) = &self.params[s][i] else {
                    continue;
                };
                if self.frozen[s][i] {
                    continue;
                }
                let (Some(m), Some(v)) = (&self.m[s][i], &self.v[s][i]) else {
                    continue;
                };
                let w = var.as_tensor();
                let run = || -> candle_core::Result<(Tensor, Tensor)> {
                    let g = match &self.grads[s][i] {
                        Some(g) => g.clone(),
                        None => w.zeros_like()?,
                    };
                    let g = match clip {
                        Some(c) => (g * c as f64)?,
                        None => g,
                    };
                    let m = ((m * b1 as f64)? + (&g * (1.0 - b1) as f64)?)?;
                    let v = ((v * b2 as f64)? + (g.sqr()? * (1.0 - b2) as f64)?)?;
                    let mut new = (w - ((&m * step as f64)? / (v.sqrt()? + eps as f64)?)?)?;
                    if p.unit_rows {
                        new = unit_rows(&new, d)?;
                    }
                    var.set(&new)?;
                    Ok((m, v))
                };
                let (m, v) = run().map_err(&e)?;
                self.m[s][i] = Some(m);
                self.v[s][i] = Some(v);
            }
        }
        Ok(())
    }

    /// Step 3b: PAM-SGD's statistics from this step's codes and inputs, and the decoder
    /// solve every `solve_every` steps and at the end (`t` 0-based).
    pub fn after_step(
        &mut self,
        model: &mut dyn Model,
        t: u64,
        total: u64,
    ) -> Result<(), TrainError> {
        let e = terr(self.arch);
        let Some(pam) = &mut self.pam else {
            return Ok(());
        };
        let (z, x) = (&self.codes[0], &self.x[0]);
        let run = || -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
            let z = z.to_dtype(DType::F32)?;
            let zt = z.t()?;
            let g = (&pam.g + zt.matmul(&z)?.to_dtype(DType::F64)?)?;
            let c = (&pam.c + zt.matmul(x)?.to_dtype(DType::F64)?)?;
            let sz = (&pam.sz + z.sum(0)?.to_dtype(DType::F64)?)?;
            let sx = (&pam.sx + x.sum(0)?.to_dtype(DType::F64)?)?;
            Ok((g, c, sz, sx))
        };
        let (g, c, sz, sx) = run().map_err(&e)?;
        (pam.g, pam.c, pam.sz, pam.sx) = (g, c, sz, sx);
        pam.n += x.dim(0).map_err(&e)? as f64;
        if (t + 1).is_multiple_of(pam.cfg.solve_every) || t + 1 == total {
            self.solve(model)?;
        }
        Ok(())
    }

    /// PAM-SGD's decoder solve on the host (see the module docs), installed by the variant,
    /// uploaded; new anchors; statistics decayed.
    fn solve(&mut self, model: &mut dyn Model) -> Result<(), TrainError> {
        let e = terr(self.arch);
        self.params_to_host(model)?;
        let Some(pam) = &mut self.pam else {
            return Ok(());
        };
        let st = PamState::from_stats(
            f64s(&pam.g).map_err(&e)?,
            f64s(&pam.c).map_err(&e)?,
            f64s(&pam.sz).map_err(&e)?,
            f64s(&pam.sx).map_err(&e)?,
            pam.n,
        );
        let sae = model.sae_mut(0);
        let arch = sae.arch();
        let (w, b) = {
            let p = sae.params();
            st.solve(&pam.cfg, &p[pam.w_dec].data, &p[pam.b_dec].data)
                .map_err(|err| TrainError::Config(format!("{arch}: {err}")))?
        };
        sae.install_decoder(&w, &b)?;
        for (i, p) in sae.params().iter().enumerate() {
            if let DevParam::Train(var) = &self.params[0][i] {
                let t =
                    Tensor::from_slice(&p.data, p.shape.as_slice(), var.device()).map_err(&e)?;
                var.set(&t).map_err(&e)?;
            }
            if pam.anchors[i].is_some() {
                pam.anchors[i] = Some(self.params[0][i].tensor().copy().map_err(&e)?);
            }
        }
        let f = pam.cfg.stats_decay;
        let decay = |t: &Tensor| t * f;
        pam.g = decay(&pam.g).map_err(&e)?;
        pam.c = decay(&pam.c).map_err(&e)?;
        pam.sz = decay(&pam.sz).map_err(&e)?;
        pam.sx = decay(&pam.sx).map_err(&e)?;
        pam.n *= f;
        Ok(())
    }

    /// Step 4: tokens-since-fired counters from this step's codes (`n` tokens); `dead[s]`
    /// becomes the mask `tsf > dead_after` (downloaded only when some latent is dead).
    /// Returns `(Σ_s nnz_s / n, Σ_s dead_s / d_sae_s)`.
    pub fn fire(
        &mut self,
        n: usize,
        dead_after: u64,
        dead: &mut [Vec<bool>],
    ) -> Result<(f64, f64), TrainError> {
        let e = terr(self.arch);
        let mut sc = Vec::new();
        for (tsf, codes) in self.tsf.iter_mut().zip(&self.codes) {
            let run = || -> candle_core::Result<(Tensor, Tensor, Tensor)> {
                let nz = codes.ne(0f32)?.to_dtype(DType::F32)?;
                let fired = nz.max(0)?.ne(0f32)?;
                let next = fired.where_cond(&tsf.zeros_like()?, &(&*tsf + n as f64)?)?;
                let n_dead = next
                    .gt(dead_after as f64)?
                    .to_dtype(DType::F32)?
                    .sum_all()?;
                Ok((next, nz.sum_all()?, n_dead))
            };
            let (next, nnz, n_dead) = run().map_err(&e)?;
            *tsf = next;
            sc.push(nnz);
            sc.push(n_dead);
        }
        let refs: Vec<&Tensor> = sc.iter().collect();
        let vals = self.scalars(&refs)?;
        let (mut l0, mut frac) = (0.0, 0.0);
        for (s, (tsf, dm)) in self.tsf.iter().zip(dead.iter_mut()).enumerate() {
            let (nnz, n_dead) = (vals[2 * s], vals[2 * s + 1]);
            l0 += nnz / n as f64;
            frac += n_dead / dm.len().max(1) as f64;
            if n_dead > 0.0 {
                let mask = tsf
                    .gt(dead_after as f64)
                    .and_then(|t| t.to_vec1::<u8>())
                    .map_err(&e)?;
                dm.iter_mut().zip(mask).for_each(|(d, m)| *d = m != 0);
            } else {
                dm.fill(false);
            }
        }
        Ok((l0, frac))
    }

    /// The dead masks of the uploaded counters (before the first step).
    pub fn dead_masks(&self, dead_after: u64, dead: &mut [Vec<bool>]) -> Result<(), TrainError> {
        let e = terr(self.arch);
        for (tsf, dm) in self.tsf.iter().zip(dead.iter_mut()) {
            let mask = tsf
                .gt(dead_after as f64)
                .and_then(|t| t.to_vec1::<u8>())
                .map_err(&e)?;
            dm.iter_mut().zip(mask).for_each(|(d, m)| *d = m != 0);
        }
        Ok(())
    }

    /// Step 5: the variants' `revive_dead` on steps with dead latents (after `steps_done`
    /// steps); the entries they reset go to the device, their Adam moments to zero.
    pub fn revive(
        &mut self,
        model: &mut dyn Model,
        steps_done: u64,
        dead: &[Vec<bool>],
    ) -> Result<(), TrainError> {
        let e = terr(self.arch);
        for (s, dm) in dead.iter().enumerate() {
            if !dm.iter().any(|&d| d) {
                continue;
            }
            let sae = model.sae_mut(s);
            let mut by_param: HashMap<usize, Vec<usize>> = HashMap::new();
            for (pi, ei) in sae.revive_dead(steps_done, dm) {
                by_param.entry(pi).or_default().push(ei);
            }
            let mut pis: Vec<usize> = by_param.keys().copied().collect();
            pis.sort_unstable();
            for pi in pis {
                let DevParam::Train(var) = &self.params[s][pi] else {
                    continue; // non-trainable: the host copy is canonical
                };
                let mut ix = by_param.remove(&pi).unwrap_or_default();
                ix.sort_unstable();
                ix.dedup();
                let host = &sae.params()[pi].data;
                let vals: Vec<f32> = ix.iter().map(|&i| host[i]).collect();
                let ix32: Vec<u32> = ix.iter().map(|&i| i as u32).collect();
                let set = |t: &Tensor, vals: Option<&[f32]>| -> candle_core::Result<Tensor> {
                    let idx = Tensor::from_slice(&ix32, ix32.len(), t.device())?;
                    let flat = t.flatten_all()?;
                    let cur = flat.index_select(&idx, 0)?;
                    let want = match vals {
                        Some(v) => Tensor::from_slice(v, v.len(), t.device())?,
                        None => cur.zeros_like()?,
                    };
                    flat.index_add(&idx, &(want - cur)?, 0)?.reshape(t.shape())
                };
                let run = || -> candle_core::Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
                    let new = set(var.as_tensor(), Some(&vals))?;
                    var.set(&new)?;
                    let m = self.m[s][pi].as_ref().map(|m| set(m, None)).transpose()?;
                    let v = self.v[s][pi].as_ref().map(|v| set(v, None)).transpose()?;
                    Ok((new, m, v))
                };
                let (_, m, v) = run().map_err(&e)?;
                if m.is_some() {
                    self.m[s][pi] = m;
                    self.v[s][pi] = v;
                }
            }
        }
        Ok(())
    }

    /// Download every trainable parameter into the host model.
    pub fn params_to_host(&self, model: &mut dyn Model) -> Result<(), TrainError> {
        let e = terr(self.arch);
        for (s, ps) in self.params.iter().enumerate() {
            for (dp, p) in ps.iter().zip(model.sae_mut(s).params_mut()) {
                if let DevParam::Train(v) = dp {
                    let host = f32s(v.as_tensor()).map_err(&e)?;
                    p.data.copy_from_slice(&host);
                }
            }
        }
        Ok(())
    }

    /// Everything the next step depends on, by checkpoint name: parameters (non-trainable
    /// ones from the host copy), counters, and the optimiser state under
    /// [`Optimizer::state`]'s names.
    pub fn named(
        &self,
        model: &dyn Model,
    ) -> Result<HashMap<String, checkpoint::Tensor>, TrainError> {
        let e = terr(self.arch);
        let mut out = HashMap::new();
        for (s, ps) in self.params.iter().enumerate() {
            let sae = model.sae(s);
            for (i, (dp, p)) in ps.iter().zip(sae.params()).enumerate() {
                let data = match dp {
                    DevParam::Train(v) => f32s(v.as_tensor()).map_err(&e)?,
                    DevParam::Fixed { .. } => p.data.clone(),
                };
                out.insert(
                    format!("sae{s}.param.{}", p.name),
                    checkpoint::Tensor::F32(data),
                );
                if let (Some(m), Some(v)) = (&self.m[s][i], &self.v[s][i]) {
                    out.insert(
                        moment_key(s, "m", p.name),
                        checkpoint::Tensor::F32(f32s(m).map_err(&e)?),
                    );
                    out.insert(
                        moment_key(s, "v", p.name),
                        checkpoint::Tensor::F32(f32s(v).map_err(&e)?),
                    );
                }
            }
            let tsf: Vec<u64> = f64s(&self.tsf[s])
                .map_err(&e)?
                .into_iter()
                .map(|v| v as u64)
                .collect();
            out.insert(
                format!("sae{s}.tokens_since_fired"),
                checkpoint::Tensor::U64(tsf),
            );
        }
        if let Some(pam) = &self.pam {
            for (a, p) in pam.anchors.iter().zip(model.sae(0).params()) {
                if let Some(a) = a {
                    out.insert(
                        format!("pam.anchor.{}", p.name),
                        checkpoint::Tensor::F32(f32s(a).map_err(&e)?),
                    );
                }
            }
            for (k, t) in [
                ("pam.G", &pam.g),
                ("pam.C", &pam.c),
                ("pam.sz", &pam.sz),
                ("pam.sx", &pam.sx),
            ] {
                out.insert(k.to_string(), checkpoint::Tensor::F64(f64s(t).map_err(&e)?));
            }
            out.insert("pam.n".to_string(), checkpoint::Tensor::F64(vec![pam.n]));
        }
        Ok(out)
    }

    /// Bring the whole state to the host: the model's parameters, the counters `tsf` and
    /// the optimiser (through its own [`Optimizer::restore`]).
    pub fn sync_host(
        &self,
        model: &mut dyn Model,
        opt: &mut dyn Optimizer,
        tsf: &mut [&mut Vec<u64>],
    ) -> Result<(), TrainError> {
        let ck = Checkpoint {
            path: PathBuf::from("<tensor backend state>"),
            meta: serde_json::Value::Null,
            tensors: self.named(model)?,
        };
        self.params_to_host(model)?;
        for (s, t) in tsf.iter_mut().enumerate() {
            let n = t.len();
            t.copy_from_slice(ck.u64(&format!("sae{s}.tokens_since_fired"), n)?);
        }
        opt.restore(&*model, &ck)
    }
}
