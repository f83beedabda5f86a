//! `saepipe plan`'s time estimate (issue 14 item 4): a short calibration on this machine,
//! scaled to the pipeline's sizes.
//!
//! What is measured, each the mean of timed repeats after an untimed first run (one run
//! alone when it takes more than [`LONG`]):
//! - the model: one block of the pipeline's model shape ([`ModelShape::random_model`]:
//!   real width, heads, MLP, attention kind; random weights in `model.dtype` on
//!   `model.device`) with the vocabulary cut to [`CAL_VOCAB`], on one window of
//!   `data.context_len` tokens: the block stopped there recording the capture's sites
//!   (copied to host f32 as the capture does), and the full forward (final norm +
//!   unembedding); plus the CE arithmetic (f64 log-sum-exp per position) on
//!   its logits;
//! - the store: writing and reading back one shard of random rows of the capture's width
//!   and dtype in a temporary folder;
//! - the SAEs: one trainer per distinct (variant, d_sae, batch_tokens, optimizer, train
//!   device and backend) of the pipeline, built by the training engine from that unit's own
//!   trainer config on random rows, with d_sae cut to [`CAL_D_SAE`] and the batch to
//!   [`CAL_BATCH`]; its step, and its inference encode + decode.
//!
//! Decision: the estimates scale those figures linearly — a block's time by the depth a
//! stage runs and by windows (per window at batch 1; batching only helps), the head and the
//! CE arithmetic by `vocab / CAL_VOCAB`, a step by `batch_tokens / CAL_BATCH × d_sae /
//! CAL_D_SAE` — and the plan prints which of these were extrapolated. Not counted: the
//! download, reading and tokenizing text, the SAE spliced into the CE passes, the
//! power-diagram pass of TopK evaluations, the JSAE stage, checkpoints. ReLU-family SAEs are
//! timed at their initial density (about half the latents active): an upper bound, as
//! their L0 falls while they train.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::ce::row_nll;
use super::disk::set_plan;
use super::train::all_groups;
use super::unit::{units, Unit};
use crate::config::Pipeline;
use crate::models::shape::ModelShape;
use crate::models::{Hookpoint, NoHooks, Recorder};
use crate::sae::Workspace;
use crate::store::schema::ActMeta;
use crate::store::writer::{Rows, ShardWriter, WriterSettings};
use crate::store::{ActivationSource, InMemorySource};
use crate::train::Trainer;

/// Vocabulary of the calibration model (the real one when smaller).
pub const CAL_VOCAB: usize = 4096;
/// Widest SAE timed (wider ones are scaled from this width).
pub const CAL_D_SAE: usize = 2048;
/// Largest training batch timed (larger ones are scaled from this batch).
pub const CAL_BATCH: usize = 512;
/// Rows of the store shard written and read back.
const CAL_ROWS: usize = 2048;
/// A first run longer than this (seconds) is taken as the measurement (no repeats).
const LONG: f64 = 1.0;
/// Timed repeats stop once they add up to this many seconds, or after [`MAX_REPEATS`].
const ENOUGH: f64 = 0.25;
const MAX_REPEATS: usize = 5;

/// One stage's estimate.
#[derive(Debug, Clone)]
pub struct StageTime {
    /// `capture`, `train`, `evaluate`.
    pub stage: &'static str,
    /// Seconds, when estimated.
    pub seconds: Option<f64>,
    /// How it was estimated (or why not).
    pub how: String,
}

/// The calibration's result.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Wall seconds the calibration itself took.
    pub seconds: f64,
    /// What was run.
    pub what: String,
    /// Per stage.
    pub stages: Vec<StageTime>,
    /// Which figures are extrapolated, one line each.
    pub extrapolated: Vec<String>,
}

/// Mean seconds of `f` (module doc: one untimed run, then timed repeats).
fn time_it<T>(mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let t0 = Instant::now();
    f()?;
    let first = t0.elapsed().as_secs_f64();
    if first > LONG {
        return Ok(first);
    }
    let (mut total, mut n) = (0.0, 0);
    while n < MAX_REPEATS && (n == 0 || total < ENOUGH) {
        let t = Instant::now();
        f()?;
        total += t.elapsed().as_secs_f64();
        n += 1;
    }
    Ok(total / n as f64)
}

/// Deterministic pseudo-normal values (the calibration's random data).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::util::rng::Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Per-window model costs, seconds.
struct ModelCost {
    /// One block, recording the capture's sites (what the capture runs per block; the CE
    /// passes, which record nothing, are slightly over-estimated by it).
    block: f64,
    /// Final norm + unembedding at [`CAL_VOCAB`] (or the real vocabulary).
    head: f64,
    /// CE arithmetic of the window's positions at that vocabulary.
    nll: f64,
    /// The vocabulary timed.
    vocab: usize,
}

fn model_cost(pipeline: &Pipeline, shape: &ModelShape) -> Result<ModelCost> {
    let c = &pipeline.config;
    let device = c.model.device.open("model.device")?;
    let vocab = shape.info.vocab_size.min(CAL_VOCAB);
    let model = shape
        .random_model(1, vocab, c.model.dtype.candle(), &device, 0)
        .context("building the calibration model")?;
    let t = c.data.context_len.max(2);
    let ids: Vec<u32> = (0..t as u32)
        .map(|i| (i * 7919 + 1) % vocab as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (1, t), &device)?;
    let mut sites: Vec<_> = c.capture.hookpoints.iter().map(|h| h.site).collect();
    sites.sort();
    sites.dedup();
    // The block as the capture runs it: recording its sites, copied to host f32.
    let block = time_it(|| {
        let mut rec = Recorder::new(sites.iter().map(|&s| Hookpoint::new(0, s)));
        model.forward_hooked(&ids, &mut rec, Some(0))?;
        for a in rec.acts.values() {
            a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        }
        Ok(())
    })?;
    let mut logits = None;
    let full = time_it(|| {
        logits = model.forward_hooked(&ids, &mut NoHooks, None)?;
        Ok(())
    })?;
    let logits = logits.context("the calibration model returned no logits")?;
    let flat = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let nll = time_it(|| {
        let mut s = 0.0;
        for (p, row) in flat.chunks(vocab).enumerate().take(t - 1) {
            s += row_nll(row, ((p * 31 + 3) % vocab) as u32);
        }
        Ok(s)
    })?;
    Ok(ModelCost {
        block,
        head: (full - block).max(0.0),
        nll,
        vocab,
    })
}

/// Seconds per row of writing and of reading back a shard of the capture's width/dtype.
fn store_cost(pipeline: &Pipeline, d: usize) -> Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("saepipe-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = store_cost_in(pipeline, d, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn store_cost_in(pipeline: &Pipeline, d: usize, dir: &std::path::Path) -> Result<(f64, f64)> {
    let c = &pipeline.config;
    let path = dir.join("part-00000.parquet");
    let meta = ActMeta {
        saepipe_version: env!("CARGO_PKG_VERSION").into(),
        model_repo: "calibration".into(),
        model_revision: "calibration".into(),
        hookpoint: "blocks.0.hook_resid_post".into(),
        d_model: d,
        dtype: c.capture.dtype,
        context_len: c.data.context_len,
        tokenizer_sha256: String::new(),
        dataset: "calibration".into(),
        config_hash: String::new(),
        split: "train".into(),
        exclude_special_tokens: false,
        excluded_token_ids: Vec::new(),
        packing: String::new(),
    };
    let settings = WriterSettings {
        row_group_rows: c.capture.row_group_rows,
        compression: c.capture.compression,
        ..WriterSettings::default()
    };
    let rows = CAL_ROWS;
    let act = noise(rows * d, 1);
    let write = time_it(|| {
        let mut w = ShardWriter::create(&path, &meta, &settings)?;
        w.write(Rows {
            seq: (0..rows as u64).collect(),
            pos: vec![0; rows],
            token_id: vec![0; rows],
            act: act.clone(),
        })?;
        Ok(w.finish()?)
    })?;
    let read = time_it(|| {
        let mut n = 0;
        for b in crate::store::reader::SeqReader::new(vec![path.clone()], d, 4096) {
            n += b?.act.len();
        }
        Ok(n)
    })?;
    Ok((write / rows as f64, read / rows as f64))
}

/// Seconds per training step and per evaluated row of one SAE, and whether they were
/// scaled from a smaller one.
type SaeCost = (f64, f64, bool);

/// [`SaeCost`] of one unit's SAE at its real size.
fn sae_cost(u: &Unit, d: usize) -> Result<SaeCost> {
    let mut cfg = u.point.config.trainer_config();
    let real_batch = cfg.batch_tokens.max(1);
    let real_d_sae = u.point.config.sae.d_sae(d);
    let batch = real_batch.min(CAL_BATCH);
    let pam = matches!(cfg.optimizer, crate::train::Optimizer::PamSgd(_));
    cfg.batch_tokens = batch;
    cfg.init_tokens = batch;
    cfg.total_tokens = batch as u64 * 1000;
    cfg.checkpoint_every = 0;
    let data = noise(2 * batch * d, 2);
    let arch = &u.point.config.sae.arch;
    // PAM-SGD's decoder solve is cubic in d_sae: never scale its width.
    let small = if pam {
        real_d_sae
    } else {
        real_d_sae.min(CAL_D_SAE)
    };
    let mut src = InMemorySource::new(data.clone(), d);
    let (mut tr, d_sae) = match Trainer::new(cfg.clone(), arch, small, &mut src) {
        Ok(t) => (t, small),
        Err(_) if small != real_d_sae => {
            let mut src = InMemorySource::new(data.clone(), d);
            (Trainer::new(cfg, arch, real_d_sae, &mut src)?, real_d_sae)
        }
        Err(e) => return Err(e.into()),
    };
    let step = time_it(|| {
        src.seek(0)?;
        Ok(tr.step(&mut src)?)
    })?;
    let mut ws = Workspace::default();
    let mut out = Vec::new();
    let x = &data[..batch * d];
    let sae = tr.sae();
    let eval = time_it(|| {
        sae.encode(x, batch, &mut ws)?;
        let codes = std::mem::take(&mut ws.codes);
        sae.decode(&codes, &mut out, &mut ws);
        ws.codes = codes;
        Ok(())
    })?;
    let width = real_d_sae as f64 / d_sae as f64;
    let scaled = d_sae != real_d_sae || batch != real_batch;
    Ok((
        step * width * real_batch as f64 / batch as f64,
        eval * width / batch as f64,
        scaled,
    ))
}

/// The key of an SAE's cost: what the step's time depends on.
fn cost_key(u: &Unit, d: usize) -> String {
    let cfg = u.point.config.trainer_config();
    format!(
        "{} d_sae {} batch {} {:?} {:?} {:?}",
        u.point.config.sae.arch.kind(),
        u.point.config.sae.d_sae(d),
        cfg.batch_tokens,
        match cfg.optimizer {
            crate::train::Optimizer::Adam => "adam",
            crate::train::Optimizer::PamSgd(_) => "pam_sgd",
            crate::train::Optimizer::Signum(_) => "signum",
            crate::train::Optimizer::Muon(_) => "muon",
        },
        cfg.device,
        cfg.backend
    )
}

/// Seconds for people: `812 µs`, `4.2 ms`, `3.1 s`, `12.5 min`, `7.3 h`, `2.4 days`.
pub fn fmt_s(s: f64) -> String {
    match s {
        s if s < 1e-3 => format!("{:.0} µs", s * 1e6),
        s if s < 1.0 => format!("{:.1} ms", s * 1e3),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86400.0),
    }
}

/// Calibrate on this machine and estimate every stage of `pipeline` (module doc).
pub fn calibrate(pipeline: &Pipeline, shape: &ModelShape) -> Result<Calibration> {
    let t0 = Instant::now();
    let c = &pipeline.config;
    let d = shape.info.d_model;
    let mut extrapolated = Vec::new();
    let mut stages = Vec::new();

    // The model and the store.
    let m = model_cost(pipeline, shape);
    let store = store_cost(pipeline, d);
    let n_hp = c.capture.hookpoints.len() as f64;
    let depth = c
        .capture
        .hookpoints
        .iter()
        .map(|h| h.layer + 1)
        .max()
        .unwrap_or(1);
    let tr = set_plan(c, d, c.data.n_tokens);
    let ev = set_plan(c, d, c.data.eval_tokens);
    let windows = tr.windows + ev.windows;
    let rows = (tr.tokens + ev.tokens) as f64;
    match (&m, &store) {
        (Ok(m), Ok((write, _))) => {
            let per_window = depth as f64 * m.block;
            stages.push(StageTime {
                stage: "capture",
                seconds: Some(windows as f64 * per_window + rows * n_hp * write),
                how: format!(
                    "{windows} windows × {} (blocks 0..={} at {} a block) + {} rows × {} hookpoint(s) × {} writing",
                    fmt_s(per_window),
                    depth - 1,
                    fmt_s(m.block),
                    rows,
                    n_hp,
                    fmt_s(*write)
                ),
            });
            if depth > 1 {
                extrapolated.push(format!(
                    "capture: one block timed, scaled to the {depth} blocks the deepest hookpoint needs"
                ));
            }
        }
        (Err(e), _) | (_, Err(e)) => stages.push(StageTime {
            stage: "capture",
            seconds: None,
            how: format!("not estimated: {e:#}"),
        }),
    }

    // Training, and the SAE half of the evaluation.
    let all = units(pipeline, None)?;
    let mut costs: Vec<(String, Result<SaeCost>)> = Vec::new();
    for u in &all {
        let key = cost_key(u, d);
        if !costs.iter().any(|(k, _)| *k == key) {
            let r = sae_cost(u, d).with_context(|| format!("timing {}", u.point.id));
            costs.push((key, r));
        }
    }
    let cost_of = |u: &Unit| -> Result<SaeCost> {
        let key = cost_key(u, d);
        match costs.iter().find(|(k, _)| *k == key).map(|(_, r)| r) {
            Some(Ok(v)) => Ok(*v),
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no calibration for {key}")),
        }
    };
    let eval_rows = c
        .eval
        .eval_tokens
        .unwrap_or(c.data.eval_tokens)
        .min(c.data.eval_tokens) as f64;
    let mut train_s = Ok(0.0);
    let mut eval_sae_s = Ok(0.0);
    let mut any_scaled = false;
    let groups = all_groups(&all, d);
    for g in &groups {
        let batch = g[0].point.config.train.batch_tokens as f64;
        let mut steps_max = 0u64;
        for u in g {
            let steps = u.point.config.trainer_config().total_steps();
            steps_max = steps_max.max(steps);
            match cost_of(u) {
                Ok((step, eval, scaled)) => {
                    any_scaled |= scaled;
                    train_s = train_s.map(|s| s + steps as f64 * step);
                    eval_sae_s = eval_sae_s.map(|s| s + eval_rows * eval);
                }
                Err(e) => {
                    train_s = Err(anyhow::anyhow!("{e:#}"));
                    eval_sae_s = Err(anyhow::anyhow!("{e:#}"));
                }
            }
        }
        if let Ok((_, read)) = &store {
            train_s = train_s.map(|s| s + steps_max as f64 * batch * read);
        }
    }
    let n_shapes = costs.len();
    match (&train_s, &store) {
        (Ok(s), Ok(_)) => stages.push(StageTime {
            stage: "train",
            seconds: Some(*s),
            how: format!(
                "{} SAEs in {} lockstep groups: steps × the step time of each of {n_shapes} SAE shape(s) + one read of each group's batches",
                all.len(),
                groups.len()
            ),
        }),
        (Err(e), _) | (_, Err(e)) => stages.push(StageTime {
            stage: "train",
            seconds: None,
            how: format!("not estimated: {e:#}"),
        }),
    }
    if any_scaled {
        extrapolated.push(format!(
            "train/evaluate: SAE steps timed at d_sae ≤ {CAL_D_SAE} and batch ≤ {CAL_BATCH}, scaled linearly to each SAE's d_sae and batch_tokens"
        ));
    }

    // Evaluation: the SAEs on the held-out rows, then the CE passes.
    let ce_seqs = c.eval.ce_sequences as f64;
    let n_ce_passes = if c.eval.ce_sequences > 0 {
        1 + c.capture.hookpoints.len() + all.len()
    } else {
        0
    };
    match (&eval_sae_s, &m) {
        (Ok(s), Ok(m)) => {
            let v = shape.info.vocab_size as f64 / m.vocab as f64;
            let per_window = shape.info.n_layers as f64 * m.block + v * (m.head + m.nll);
            stages.push(StageTime {
                stage: "evaluate",
                seconds: Some(s + n_ce_passes as f64 * ce_seqs * per_window),
                how: format!(
                    "{} SAEs × {eval_rows} held-out rows + {n_ce_passes} CE passes × {ce_seqs} windows × {} (all {} blocks, head and CE arithmetic)",
                    all.len(),
                    fmt_s(per_window),
                    shape.info.n_layers
                ),
            });
            if n_ce_passes > 0 && shape.info.n_layers > 1 {
                extrapolated.push(format!(
                    "evaluate: the CE passes' block time scaled from one block to {}",
                    shape.info.n_layers
                ));
            }
            if n_ce_passes > 0 && m.vocab < shape.info.vocab_size {
                extrapolated.push(format!(
                    "evaluate: unembedding and CE arithmetic timed at vocab {}, scaled to {}",
                    m.vocab, shape.info.vocab_size
                ));
            }
        }
        (Err(e), _) => stages.push(StageTime {
            stage: "evaluate",
            seconds: None,
            how: format!("not estimated: {e:#}"),
        }),
        (_, Err(e)) => stages.push(StageTime {
            stage: "evaluate",
            seconds: None,
            how: format!("not estimated: {e:#}"),
        }),
    }
    if windows > 1 {
        extrapolated.push(
            "capture/evaluate: one window timed (batch 1), scaled by windows (batching only speeds it up)"
                .into(),
        );
    }
    let what = format!(
        "1 block of the model at vocab {} in {} on {}, 1 window of {} tokens; {} rows written and read ({}); {n_shapes} SAE shape(s), a few steps each",
        shape.info.vocab_size.min(CAL_VOCAB),
        c.model.dtype.name(),
        c.model.device,
        c.data.context_len,
        CAL_ROWS,
        c.capture.dtype.name()
    );
    Ok(Calibration {
        seconds: t0.elapsed().as_secs_f64(),
        what,
        stages,
        extrapolated,
    })
}
