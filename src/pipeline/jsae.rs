//! The JSAE stage of `saepipe run` (`[jsae]` in a pipeline file): train a JSAE pair and the
//! plain TopK pair around block L's MLP on the captured `mlp_in`/`mlp_out` activations,
//! evaluate both on the held-out split, and leave their rows for `metrics.parquet`.
//!
//! Implements `../shared/specs/jsae_pamsgd.md` §1.5–§1.6 (items 1–3 and 6). Layout:
//! `data/<run>/jsae/<variant>/` (`variant` = `jsae` or `topk_pair`) holds one SAELens folder
//! per SAE (`blocks.L.hook_mlp_in/`, `blocks.L.hook_mlp_out/`) and `jsae_done.json`, the
//! completion marker with both metrics rows, written last. While the pairs train,
//! `data/<run>/jsae/checkpoint.safetensors` holds all their states (one file, so they are
//! never caught at different steps) every `train.checkpoint_every` tokens; an interrupted
//! stage resumes from it with the same weights, bit for bit, as an uninterrupted run.
//!
//! ```text
//! rows per pair: one per SAE (hookpoint mlp_in / mlp_out), each with the pair's
//!   jacobian_sparsity = share of |J| > 0.01, jacobian_frac_{0_005,0_015,0_02,0_1,1},
//!   jacobian_mean_abs (over the k² entries per token), all with J in the units of the
//!   exported SAELens folders (J_export = J_scaled · c_x/c_y; recomputable from the
//!   folders and the model's MLP alone),
//!   jacobian_rms_frac_{0_1,1} = share with |J_t| / RMS(J_t) above 0.1 / 1,
//!   ce_spliced = CE with BOTH SAEs spliced in (mlp_in ← x̂, then mlp_out ← ŷ of the MLP
//!   output of x̂), ce_zero_abl = CE with both sites zeroed.
//! ```
//!
//! Decision: both pairs start from the same initialisation (`run.seed`) and see the same
//! batches, so they differ only in λ.
//! Decision: paired rows are read in capture order and shuffled within blocks of
//! [`SHUFFLE_ROWS`] rows (a seeded permutation per block), because the two hookpoints'
//! shuffle readers are independent; alignment of `(seq, pos)` is checked on every row.
//! Decision: the randomised-LLM control is a second run of the same file with
//! `--set model.random_init=true --set run.name=<other>`, so its activations, SAEs and
//! rows are kept apart (the `model` column is the same; the run name tells them apart).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::ce::{ce_context, ce_with, CeContext};
use crate::config::Pipeline;
use crate::data::pack::Window;
use crate::data::Split;
use crate::hub::HubOptions;
use crate::jsae::pair::{JsaePair, PairConfig, PairEval};
use crate::models::{HookedModel, Hookpoint, Hooks, Site};
use crate::pipeline::capture::activations_dir;
use crate::pipeline::results::MetricsRow;
use crate::store::reader::{ActBatch, ActivationSet, Expect, SeqReader};
use crate::store::set_dir;
use crate::train::{TrainConfig, Trainer};
use crate::util::progress::Reporter;
use crate::util::rng::Rng;

/// The completion marker of a trained and evaluated pair.
pub const JSAE_DONE: &str = "jsae_done.json";

/// The in-progress training state of a pair (`data/<run>/jsae/<variant>/`): the training
/// engine's checkpoint, written every `train.checkpoint_every` tokens (default: every 1000
/// steps) and removed once the pair's [`JSAE_DONE`] is written.
pub const JSAE_CHECKPOINT: &str = "checkpoint.safetensors";

/// Rows per shuffle block of the paired training reader.
pub const SHUFFLE_ROWS: usize = 1 << 15;

/// Rows per evaluation batch.
const EVAL_BATCH: usize = 2048;

/// What `jsae_done.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JsaeDone {
    config_hash: String,
    rows: Vec<MetricsRow>,
}

/// Where the checkpoint of one pair lives.
fn checkpoint_path(p: &Pipeline, variant: &str) -> PathBuf {
    variant_dir(p, variant).join(JSAE_CHECKPOINT)
}

/// A pair being trained: variant, λ, its engine, its training seconds.
type TrainingPair = (&'static str, f64, Trainer, f64);

/// What the Jacobian columns of a pair's rows mean; part of [`config_hash`], so rows
/// computed under an older meaning (J in the scaled training units; `jac_at =
/// "reconstruction"` with the true output's latents) are recomputed, never mixed in.
const JAC_SEMANTICS: &str = "exported-units.reselected-at-reconstruction";

/// Hash of everything that changes a pair: model, data, capture, train, eval, jsae, seed.
fn config_hash(p: &Pipeline) -> String {
    let c = &p.config;
    let v = serde_json::json!({
        "model": c.model, "data": c.data, "capture": c.capture, "train": c.train,
        "eval": c.eval, "jsae": c.jsae, "seed": c.run.seed, "jac": JAC_SEMANTICS,
    });
    hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..8])
}

/// The pairs of a pipeline whose MLP input is `d` wide: `(variant, λ)` (none without
/// `[jsae]`).
pub fn variants(p: &Pipeline, d: usize) -> Vec<(&'static str, f64)> {
    let Some(j) = &p.config.jsae else {
        return vec![];
    };
    let lam = j
        .lambda
        .unwrap_or(0.5 * (j.k * j.k) as f64 / d.max(1) as f64);
    let mut v = vec![("jsae", lam)];
    if j.baseline {
        v.push(("topk_pair", 0.0));
    }
    v
}

/// Folder of a variant.
pub fn variant_dir(p: &Pipeline, variant: &str) -> PathBuf {
    p.run_dir().join("jsae").join(variant)
}

fn read_done(dir: &Path) -> Option<JsaeDone> {
    let text = std::fs::read_to_string(dir.join(JSAE_DONE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The metrics rows of every finished, up-to-date pair of `pipeline` (none without `[jsae]`).
pub fn metric_rows(p: &Pipeline) -> Vec<MetricsRow> {
    if p.config.jsae.is_none() {
        return vec![];
    }
    let hash = config_hash(p);
    let mut rows = Vec::new();
    for variant in ["jsae", "topk_pair"] {
        if let Some(done) = read_done(&variant_dir(p, variant)) {
            if done.config_hash == hash {
                rows.extend(done.rows);
            }
        }
    }
    rows
}

/// Reads `mlp_in` and `mlp_out` rows in lockstep, checking that they come from the same
/// `(seq, pos)`.
struct PairedReader {
    sets: [ActivationSet; 2],
    readers: [SeqReader; 2],
    bufs: [ActBatch; 2],
    at: [usize; 2],
    d: usize,
}

impl PairedReader {
    fn new(sets: [ActivationSet; 2]) -> Self {
        let d = sets[0].d_model();
        let readers = [sets[0].batches(4096), sets[1].batches(4096)];
        Self {
            sets,
            readers,
            bufs: [ActBatch::default(), ActBatch::default()],
            at: [0, 0],
            d,
        }
    }

    fn restart(&mut self) {
        self.readers = [self.sets[0].batches(4096), self.sets[1].batches(4096)];
        self.bufs = [ActBatch::default(), ActBatch::default()];
        self.at = [0, 0];
    }

    /// Append up to `n` paired rows to `x`, `y`; returns how many (0 at the end).
    fn take(&mut self, n: usize, x: &mut Vec<f32>, y: &mut Vec<f32>) -> Result<usize> {
        let d = self.d;
        let mut got = 0;
        while got < n {
            for s in 0..2 {
                if self.at[s] >= self.bufs[s].seq.len() {
                    match self.readers[s].next() {
                        Some(b) => {
                            self.bufs[s] = b?;
                            self.at[s] = 0;
                        }
                        None => return Ok(got),
                    }
                }
            }
            let avail = (self.bufs[0].seq.len() - self.at[0])
                .min(self.bufs[1].seq.len() - self.at[1])
                .min(n - got);
            for r in 0..avail {
                let (a, b) = (self.at[0] + r, self.at[1] + r);
                if self.bufs[0].seq[a] != self.bufs[1].seq[b]
                    || self.bufs[0].pos[a] != self.bufs[1].pos[b]
                {
                    bail!(
                        "the mlp_in and mlp_out activations are not aligned: row {got} is (seq {}, pos {}) in {} but (seq {}, pos {}) in {}; capture both hookpoints in the same run (`saepipe capture --force`)",
                        self.bufs[0].seq[a],
                        self.bufs[0].pos[a],
                        self.sets[0].dir.display(),
                        self.bufs[1].seq[b],
                        self.bufs[1].pos[b],
                        self.sets[1].dir.display()
                    );
                }
            }
            x.extend_from_slice(&self.bufs[0].act[self.at[0] * d..(self.at[0] + avail) * d]);
            y.extend_from_slice(&self.bufs[1].act[self.at[1] * d..(self.at[1] + avail) * d]);
            self.at[0] += avail;
            self.at[1] += avail;
            got += avail;
        }
        Ok(got)
    }
}

/// Seeded block shuffle over a [`PairedReader`], cycling through the data.
struct Batches {
    reader: PairedReader,
    rng: Rng,
    block: (Vec<f32>, Vec<f32>),
    order: Vec<usize>,
    next: usize,
}

impl Batches {
    fn next_batch(&mut self, n: usize, x: &mut Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        let d = self.reader.d;
        x.clear();
        y.clear();
        for _ in 0..n {
            if self.next >= self.order.len() {
                self.block.0.clear();
                self.block.1.clear();
                let mut got =
                    self.reader
                        .take(SHUFFLE_ROWS, &mut self.block.0, &mut self.block.1)?;
                if got == 0 {
                    self.reader.restart();
                    got = self
                        .reader
                        .take(SHUFFLE_ROWS, &mut self.block.0, &mut self.block.1)?;
                    if got == 0 {
                        bail!("the mlp_in/mlp_out activation sets are empty");
                    }
                }
                self.order = (0..got).collect();
                for i in (1..got).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    self.order.swap(i, j);
                }
                self.next = 0;
            }
            let r = self.order[self.next];
            self.next += 1;
            x.extend_from_slice(&self.block.0[r * d..(r + 1) * d]);
            y.extend_from_slice(&self.block.1[r * d..(r + 1) * d]);
        }
        Ok(())
    }
}

fn open_pair(p: &Pipeline, layer: usize, split: Split) -> Result<[ActivationSet; 2]> {
    let acts = activations_dir(p);
    let open = |site| -> Result<ActivationSet> {
        let hp = Hookpoint::new(layer, site);
        let dir = set_dir(&acts, hp, split);
        ActivationSet::open(
            &dir,
            &Expect {
                hookpoint: Some(hp.to_string()),
                split: Some(split.name().into()),
                model_repo: Some(p.config.model.source.clone()),
                ..Expect::default()
            },
        )
        .with_context(|| {
            format!(
                "opening the {hp} activations in {}; run `saepipe capture` first",
                dir.display()
            )
        })
    };
    let sets = [open(Site::MlpIn)?, open(Site::MlpOut)?];
    if sets[0].n_tokens() != sets[1].n_tokens() || sets[0].d_model() != sets[1].d_model() {
        bail!(
            "{} has {} rows of width {} but {} has {} rows of width {}; capture both hookpoints in the same run",
            sets[0].dir.display(),
            sets[0].n_tokens(),
            sets[0].d_model(),
            sets[1].dir.display(),
            sets[1].n_tokens(),
            sets[1].d_model()
        );
    }
    Ok(sets)
}

/// Splices both SAEs of a pair in (or zeroes both sites), keeping special-token positions
/// clean as the evaluate stage does.
struct PairSplice<'a> {
    layer: usize,
    pair: Option<&'a mut JsaePair>,
    windows: &'a [Window],
    special: &'a [u32],
}

impl Hooks for PairSplice<'_> {
    fn wants(&self, hp: Hookpoint) -> bool {
        hp.layer == self.layer && matches!(hp.site, Site::MlpIn | Site::MlpOut)
    }
    fn visit(&mut self, hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, s, d) = x.dims3()?;
        let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let Some(pair) = self.pair.as_deref_mut() else {
            return Ok(Some(x.zeros_like()?));
        };
        let side = usize::from(hp.site == Site::MlpOut);
        let mut out = Vec::new();
        pair.reconstruct(side, &v, b * s, &mut out)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        for (bi, w) in self.windows.iter().enumerate().take(b) {
            for (t, id) in w.ids.iter().enumerate().take(s) {
                if self.special.contains(id) {
                    let at = (bi * s + t) * d;
                    out[at..at + d].copy_from_slice(&v[at..at + d]);
                }
            }
        }
        Ok(Some(
            Tensor::from_vec(out, (b, s, d), x.device())?.to_dtype(x.dtype())?,
        ))
    }
}

/// Load the pipeline's model (random-initialised when `model.random_init`).
fn load_model(
    p: &Pipeline,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<Box<dyn HookedModel>> {
    let (_, loaded) = crate::pipeline::capture::load_pipeline_model(p, opts, reporter)?;
    Ok(loaded.model)
}

fn ce_pair(ctx: &CeContext, layer: usize, mut pair: Option<&mut JsaePair>) -> Result<f64> {
    ce_with(
        ctx,
        &format!("blocks.{layer} (mlp_in + mlp_out)"),
        &mut |ids, chunk| {
            let mut hooks = PairSplice {
                layer,
                pair: pair.as_deref_mut(),
                windows: chunk,
                special: &ctx.special,
            };
            ctx.model.forward_hooked(ids, &mut hooks, None)
        },
    )
}

/// The pair and the engine settings of one variant: the pipeline's `[train]` as for any
/// SAE, always with Adam (under PAM-SGD, its encoder Adam settings), and `b_dec` at the
/// mean of the init sample unless `b_dec_init = "zeros"` (`None` without `[jsae]`).
pub fn pair_config(p: &Pipeline, d: usize, lambda: f64) -> Option<(PairConfig, TrainConfig)> {
    let c = &p.config;
    let j = c.jsae.as_ref()?;
    let mut train = c.trainer_config();
    train.optimizer = crate::train::Optimizer::Adam;
    train.b_dec_init = match train.b_dec_init {
        crate::train::BDecInit::Zeros => crate::train::BDecInit::Zeros,
        _ => crate::train::BDecInit::Mean,
    };
    let pair = PairConfig {
        k: j.k,
        d_sae: j.d_sae.unwrap_or(j.expansion_factor * d),
        lambda: lambda as f32,
        jac_at: j.jac_at,
        lr: j.lr as f32,
        seed: c.run.seed,
    };
    Some((pair, train))
}

/// Train and evaluate the pairs of `[jsae]` that are not done yet (all with `force`).
/// Returns the number of pairs trained (0 without `[jsae]`).
pub fn jsae_stage(
    p: &Pipeline,
    opts: &HubOptions,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<usize> {
    let Some(j) = &p.config.jsae else {
        return Ok(0);
    };
    let layer = j.layer;
    for site in [Site::MlpIn, Site::MlpOut] {
        let hp = Hookpoint::new(layer, site);
        if !p.config.capture.hookpoints.contains(&hp) {
            bail!("[jsae] layer = {layer} needs {hp} in capture.hookpoints; add it");
        }
    }
    let train_sets = open_pair(p, layer, Split::Train)?;
    let d = train_sets[0].d_model();
    let hash = config_hash(p);
    let todo: Vec<(&str, f64)> = variants(p, d)
        .into_iter()
        .filter(|(v, _)| {
            force || read_done(&variant_dir(p, v)).is_none_or(|dn| dn.config_hash != hash)
        })
        .collect();
    if todo.is_empty() {
        reporter.message("jsae: all pairs already trained");
        return Ok(0);
    }
    let c = &p.config;
    // 1. The model: its MLP (frozen, for J) and, unless eval.ce_sequences = 0, the CE windows.
    let (ce, own_model) = if c.eval.ce_sequences > 0 {
        let ce = ce_context(p, opts, reporter).context("loading the model for the JSAE stage")?;
        (Some(ce), None)
    } else {
        (None, Some(load_model(p, opts, reporter)?))
    };
    let model: &dyn HookedModel = match (&ce, &own_model) {
        (Some(ctx), _) => ctx.model.as_ref(),
        (None, Some(m)) => m.as_ref(),
        (None, None) => unreachable!("one of the two is loaded above"),
    };
    // f32 host copies of the MLP weights in the model's dtype and device (`model.dtype`
    // rounds them; the Jacobian kernels run in f32 on the CPU).
    let mlp = model
        .mlp_weights(layer)
        .with_context(|| format!("extracting the MLP of block {layer}"))?;
    anyhow::ensure!(
        mlp.d == d,
        "the model's MLP has width {} but the activations have {d}",
        mlp.d
    );
    // 2. Init sample, then the pairs (same seed: same init).
    let batch = c.train.batch_tokens.max(1);
    let mut batches = Batches {
        reader: PairedReader::new(train_sets.clone()),
        rng: Rng::new(c.run.seed ^ 0x4a53_4145),
        block: (Vec::new(), Vec::new()),
        order: Vec::new(),
        next: 0,
    };
    let (mut ix, mut iy) = (Vec::new(), Vec::new());
    let init_rows = c
        .train
        .init_tokens
        .min(train_sets[0].n_tokens() as usize)
        .max(1);
    PairedReader::new(train_sets.clone()).take(init_rows, &mut ix, &mut iy)?;
    // 3. One training engine per pair. Resume: a pair with a checkpoint of this config
    //    continues from it; the data stream is replayed (read only) from the earliest
    //    step, and each pair steps only on the batches it has not seen, so a resumed run
    //    sees the batches an uninterrupted one would and ends with the same weights.
    let mut pairs: Vec<TrainingPair> = Vec::new();
    for &(v, lam) in &todo {
        let (pcfg, tcfg) = pair_config(p, d, lam).context("the pipeline has no [jsae] section")?;
        let ckpt = checkpoint_path(p, v);
        let saved = if force || !ckpt.exists() {
            None
        } else {
            crate::train::checkpoint::load(&ckpt)
                .ok()
                .filter(|ck| ck.get::<String>("config_hash").ok().as_deref() == Some(&hash))
        };
        let model = Box::new(JsaePair::new(pcfg, mlp.clone())?);
        let (trainer, secs) = match saved {
            Some(ck) => (
                Trainer::restore(&ck, tcfg, model)
                    .with_context(|| format!("resuming the {v} pair from {}", ckpt.display()))?,
                ck.get::<f64>("train_seconds").unwrap_or(0.0),
            ),
            None => (Trainer::with_model(tcfg, model, &[&ix, &iy])?, 0.0),
        };
        pairs.push((v, lam, trainer, secs));
    }
    let total_steps = pairs[0].2.total_steps();
    let start = pairs.iter().map(|r| r.2.step_count()).min().unwrap_or(0);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let resumed: Vec<String> = pairs
        .iter()
        .filter(|r| r.2.step_count() > 0)
        .map(|r| format!("{} at step {}", r.0, r.2.step_count()))
        .collect();
    if !resumed.is_empty() {
        reporter.message(&format!(
            "jsae: resuming {} of {} pair(s) from their checkpoints in {} ({}); the data stream is replayed from step {start} of {total_steps}",
            resumed.len(),
            pairs.len(),
            p.run_dir().join("jsae").display(),
            resumed.join(", ")
        ));
    }
    for _ in 0..start {
        batches.next_batch(batch, &mut x, &mut y)?;
    }
    // 4. Lockstep training.
    let prog = reporter.start(
        &format!("jsae L{layer}"),
        Some(total_steps * batch as u64 * pairs.len() as u64),
    );
    prog.advance(pairs.iter().map(|r| r.2.step_count() * batch as u64).sum());
    for step in start..total_steps {
        batches.next_batch(batch, &mut x, &mut y)?;
        let mut msg = String::new();
        for (v, _, trainer, secs) in pairs.iter_mut() {
            if trainer.step_count() != step {
                continue;
            }
            let t0 = Instant::now();
            let s = trainer.step_on(&[&x, &y], batch)?;
            *secs += t0.elapsed().as_secs_f64();
            prog.advance(batch as u64);
            let term = |k: &str| {
                s.terms
                    .iter()
                    .chain(&s.metrics)
                    .find(|t| t.0 == k)
                    .map_or(f64::NAN, |t| t.1)
            };
            msg.push_str(&format!(
                "{v}: mse {:.3}/{:.3} |J| {:.4}  ",
                term("mse_x"),
                term("mse_y"),
                term("jac_mean_abs")
            ));
            if trainer.checkpoint_due() && step + 1 < total_steps {
                let dir = variant_dir(p, v);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                trainer.save_checkpoint_with(
                    &checkpoint_path(p, v),
                    serde_json::json!({ "config_hash": hash, "train_seconds": *secs }),
                )?;
            }
        }
        prog.set_message(msg);
    }
    prog.finish();
    // 5. Held-out metrics, CE with both SAEs spliced in, export, marker.
    let eval_sets = open_pair(p, layer, Split::Eval)
        .with_context(|| {
            if c.data.eval_tokens == 0 {
                "the JSAE stage evaluates on the held-out split, but data.eval_tokens is 0: set it > 0 (e.g. --set data.eval_tokens=1024) and run `saepipe run <pipeline.toml> --force` (the capture depends on it)".to_string()
            } else {
                "the JSAE stage evaluates on the held-out split".to_string()
            }
        })?;
    let limit = c
        .eval
        .eval_tokens
        .unwrap_or(u64::MAX)
        .min(eval_sets[0].n_tokens());
    let zero = match &ce {
        Some(ctx) => Some(ce_pair(ctx, layer, None).context("CE with mlp_in and mlp_out zeroed")?),
        None => None,
    };
    let revision = train_sets[0].manifest.meta.model_revision.clone();
    for (v, lam, trainer, secs) in pairs.iter_mut() {
        let pair = trainer
            .model_as_mut::<JsaePair>()
            .expect("invariant: the JSAE stage's engines train JSAE pairs");
        let mut acc = pair.new_eval();
        let mut reader = PairedReader::new(eval_sets.clone());
        let mut seen = 0u64;
        while seen < limit {
            x.clear();
            y.clear();
            let n = reader.take(EVAL_BATCH.min((limit - seen) as usize), &mut x, &mut y)?;
            if n == 0 {
                break;
            }
            pair.evaluate(&x, &y, n, &mut acc)?;
            seen += n as u64;
        }
        anyhow::ensure!(seen > 0, "no held-out mlp_in/mlp_out rows to evaluate on");
        let spliced = match &ce {
            Some(ctx) => Some(
                ce_pair(ctx, layer, Some(pair))
                    .with_context(|| format!("CE with the {v} pair spliced in"))?,
            ),
            None => None,
        };
        let dir = variant_dir(p, v);
        let mut rows = Vec::new();
        for (side, site) in [(0usize, Site::MlpIn), (1, Site::MlpOut)] {
            let hp = Hookpoint::new(layer, site);
            let sae_dir = dir.join(hp.to_string());
            std::fs::create_dir_all(&sae_dir)
                .with_context(|| format!("creating {}", sae_dir.display()))?;
            let (sae, scale): (&dyn crate::sae::Sae, f32) = if side == 0 {
                (&pair.sae_x, pair.scale_x)
            } else {
                (&pair.sae_y, pair.scale_y)
            };
            let meta = super::export_meta::from_activations(p, &train_sets[side].manifest.meta)?;
            crate::sae::export::save_saelens(sae, scale, &meta, &sae_dir)
                .with_context(|| format!("exporting {}", sae_dir.display()))?;
            rows.push(row(
                p,
                RowParts {
                    variant: v,
                    lambda: *lam,
                    hp,
                    acc: &acc,
                    side,
                    revision: &revision,
                    train_tokens: total_steps * batch as u64,
                    eval_tokens: seen,
                    ce: (ce.as_ref().map(|x| x.clean), spliced, zero),
                    secs: *secs,
                    dir: &sae_dir,
                    d_in: d,
                },
            ));
        }
        let text = serde_json::to_string_pretty(&JsaeDone {
            config_hash: hash.clone(),
            rows,
        })?;
        crate::util::fs::atomic_write(&dir.join(JSAE_DONE), text.as_bytes())
            .with_context(|| format!("writing {}", dir.join(JSAE_DONE).display()))?;
        let ckpt = checkpoint_path(p, v);
        match std::fs::remove_file(&ckpt) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", ckpt.display()));
            }
            _ => {}
        }
        reporter.message(&format!(
            "jsae {v} (λ = {lam:.4}): |J| > 0.01 on {:.1}% of entries, mean |J| {:.4}, R² {:.3} / {:.3}, CE {:?} → {:?}",
            100.0 * acc.jac.frac_above(0.01),
            acc.jac.mean_abs(),
            acc.recon_x.r2(),
            acc.recon_y.r2(),
            ce.as_ref().map(|x| x.clean),
            spliced
        ));
    }
    Ok(pairs.len())
}

struct RowParts<'a> {
    variant: &'a str,
    lambda: f64,
    hp: Hookpoint,
    acc: &'a PairEval,
    side: usize,
    revision: &'a str,
    train_tokens: u64,
    eval_tokens: u64,
    ce: (Option<f64>, Option<f64>, Option<f64>),
    secs: f64,
    dir: &'a Path,
    d_in: usize,
}

fn row(p: &Pipeline, r: RowParts) -> MetricsRow {
    let c = &p.config;
    let j = c.jsae.as_ref().expect("invariant: only called with [jsae]");
    let (recon, sp) = if r.side == 0 {
        (&r.acc.recon_x, &r.acc.sparsity_x)
    } else {
        (&r.acc.recon_y, &r.acc.sparsity_y)
    };
    let f = sp.fires().len();
    let expansion = f as f64 / r.d_in.max(1) as f64;
    let (clean, spliced, zero) = r.ce;
    MetricsRow {
        run: c.run.name.clone(),
        point_id: r.variant.to_string(),
        model: c.model.source.clone(),
        revision: r.revision.to_string(),
        hookpoint: r.hp.to_string(),
        arch: r.variant.to_string(),
        d_sae: f as u64,
        expansion,
        sparsity_param: "k".into(),
        sparsity_value: j.k as f64,
        seed: c.run.seed,
        optimizer: "adam".into(),
        train_tokens: r.train_tokens,
        eval_tokens: r.eval_tokens,
        r2: Some(recon.r2()).filter(|v| v.is_finite()),
        fvu: Some(recon.fvu()).filter(|v| v.is_finite()),
        mse: recon.mse(),
        l0: sp.l0(),
        l1: sp.l1(),
        dead_frac: sp.dead_frac(),
        dense_frac: sp.dense_frac(0.1),
        ce_clean: clean,
        ce_spliced: spliced,
        ce_delta: spliced.zip(clean).map(|(s, c)| s - c),
        ce_zero_abl: zero,
        ce_loss_score: match (clean, spliced, zero) {
            (Some(c), Some(s), Some(z)) if (z - c).abs() > 1e-12 => Some((z - s) / (z - c)),
            _ => None,
        },
        bipolar_frac: None,
        bipolar_var_share: None,
        jacobian_sparsity: Some(r.acc.jac.frac_above(0.01)),
        jacobian_frac_0_005: Some(r.acc.jac.frac_above(0.005)),
        jacobian_frac_0_015: Some(r.acc.jac.frac_above(0.015)),
        jacobian_frac_0_02: Some(r.acc.jac.frac_above(0.02)),
        jacobian_frac_0_1: Some(r.acc.jac.frac_above(0.1)),
        jacobian_frac_1: Some(r.acc.jac.frac_above(1.0)),
        jacobian_mean_abs: Some(r.acc.jac.mean_abs()),
        jacobian_rms_frac_0_1: Some(r.acc.jac.frac_above_rms(0.1)),
        jacobian_rms_frac_1: Some(r.acc.jac.frac_above_rms(1.0)),
        jsae_lambda: Some(r.lambda),
        feature_recovery: None,
        n_regions: None,
        train_seconds: r.secs,
        train_tokens_per_s: r.train_tokens as f64 / r.secs.max(1e-9),
        sae_path: r.dir.display().to_string(),
        power: Default::default(),
    }
}
