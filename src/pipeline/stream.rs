//! Streaming with bounded disk (issue 14 item 1): with `capture.keep = false`,
//! `saepipe run` captures the training split a chunk of shards at a time, trains every
//! pending SAE on that chunk, deletes it and captures the next, so the activations folder
//! never holds more than `capture.disk_budget_bytes`.
//!
//! Layout under `data/<run>/activations/`: the held-out split as in keep-everything mode
//! (`<hookpoint>/eval/`, captured first and kept for the evaluation); chunk `c` in
//! `chunk-NNNNN/<hookpoint>/` (ordinary `part-*.parquet` shards, the training split's
//! shards `[a, b)` under their usual names, and a `manifest.json` listing only them);
//! `chunk-NNNNN.done`, written once every SAE has consumed chunk `c` (its folder is then
//! deleted); `stream.json`, the chunk plan and the disk high-water mark.
//!
//! Decision: chunks are consecutive shard ranges packed greedily from the budget, with a
//! shard's size estimated as its rows × (d_model × dtype + 16) × 17/16 + 64 KiB per
//! hookpoint ([`shard_bytes`]) and the held-out split estimated the same way; the plan is
//! a function of the config and d_model alone. The budget must hold the held-out split
//! plus two shards; `stream.json` records the largest size of the folder measured after
//! each capture (when it is largest: shards only grow until the chunk is deleted).
//! Decision: a unit of `S` steps takes steps `[⌊S·R_c/N⌋, ⌊S·R_{c+1}/N⌋)` on chunk `c`
//! (`R_c` rows before chunk `c`, `N` all training rows), from the chunk's own shuffled
//! stream (the mixing buffer draws from the chunk's shards only, seeded by `run.seed`
//! mixed with `c`; chunk 0 uses `run.seed` itself, so a budget that holds the whole split
//! in one chunk trains exactly as keep-everything mode). Training more tokens than were
//! captured (epochs) is refused at load.
//! Decision: where training resumes follows from the units' checkpoints alone: a unit at
//! step `k` needs the first chunk whose span ends after `k`, and the run restarts at the
//! earliest chunk any pending unit needs (capturing it again if it was deleted: capture is
//! deterministic, so the chunk is byte-identical). Every unit is checkpointed at the end
//! of each chunk's span, so a SIGKILL anywhere (capture, training, between the marker and
//! the deletion) ends with the same weights as an uninterrupted streamed run.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::capture::{capture_select, shard_rows, Select};
use crate::config::Pipeline;
use crate::data::Split;
use crate::hub::HubOptions;
use crate::pipeline::capture::{activations_dir, prepare, write_resolved};
use crate::pipeline::train::{read_done, train_chunk, units, Unit};
use crate::store::reader::{ActivationSet, Expect};
use crate::store::{bytes_per_token, human_bytes, set_dir, ActDtype};
use crate::train::CHECKPOINT_FILE;
use crate::util::progress::Reporter;

/// The streamed run's record in the activations folder.
pub const STREAM_FILE: &str = "stream.json";
/// Estimated bytes a shard file holds beyond its rows (footer, metadata, page headers).
pub const SHARD_OVERHEAD: u64 = 64 << 10;
/// Room kept for manifests, markers and `stream.json`.
const SLACK: u64 = 64 << 10;

/// Estimated bytes of one shard file of `rows` rows.
pub fn shard_bytes(rows: u64, d_model: usize, dtype: ActDtype) -> u64 {
    rows * bytes_per_token(d_model, dtype) * 17 / 16 + SHARD_OVERHEAD
}

/// One chunk of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Training shards `[start, end)`.
    pub shards: Range<usize>,
    /// Training rows before this chunk.
    pub rows_before: u64,
    /// Rows of this chunk.
    pub rows: u64,
    /// Estimated bytes of the chunk (every hookpoint).
    pub est_bytes: u64,
}

/// `stream.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    /// `capture.disk_budget_bytes`.
    pub budget_bytes: u64,
    /// Estimated bytes of the held-out split.
    pub eval_est_bytes: u64,
    /// The chunks.
    pub chunks: Vec<Chunk>,
    /// Largest size of the activations folder measured (after each capture).
    pub high_water_bytes: u64,
}

/// The chunk plan of a streamed run at a budget: what [`run_streamed`] follows and what
/// `saepipe plan` prints (from estimated shard rows there, measured ones here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlan {
    /// The budget planned for.
    pub budget_bytes: u64,
    /// Estimated bytes of the held-out split (every hookpoint).
    pub eval_est_bytes: u64,
    /// Estimated bytes of the two largest consecutive training shards (every hookpoint).
    pub pair_bytes: u64,
    /// The least budget that works: held-out split + room for markers + two shards.
    pub min_budget: u64,
    /// The chunks (empty when the budget is below [`StreamPlan::min_budget`]).
    pub chunks: Vec<Chunk>,
}

impl StreamPlan {
    /// Whether the budget holds the held-out split and two shards.
    pub fn fits(&self) -> bool {
        self.budget_bytes >= self.min_budget
    }

    /// Estimated peak bytes of the activations folder: the held-out split plus the largest
    /// chunk (plus manifests and markers).
    pub fn peak_bytes(&self) -> u64 {
        self.eval_est_bytes + SLACK + self.chunks.iter().map(|c| c.est_bytes).max().unwrap_or(0)
    }
}

/// Plan the chunks of a streamed run (module doc): training shards of `train_rows` rows
/// each and held-out shards of `eval_rows`, `n_hp` distinct hookpoints of width `d_model`
/// stored as `dtype`, within `budget` bytes.
pub fn stream_plan(
    train_rows: &[u64],
    eval_rows: &[u64],
    n_hp: u64,
    d_model: usize,
    dtype: ActDtype,
    budget: u64,
) -> StreamPlan {
    let per_shard = |r: u64| n_hp * shard_bytes(r, d_model, dtype);
    let eval_est: u64 = eval_rows.iter().map(|&r| per_shard(r)).sum();
    // The budget must hold the held-out split and two shards (the two largest in a row).
    let pair = train_rows
        .windows(2)
        .map(|w| per_shard(w[0]) + per_shard(w[1]))
        .max()
        .unwrap_or_else(|| train_rows.iter().map(|&r| per_shard(r)).sum());
    let minimum = eval_est + SLACK + pair;
    let chunks = if budget >= minimum {
        plan_chunks(train_rows, &per_shard, budget - eval_est - SLACK)
    } else {
        Vec::new()
    };
    StreamPlan {
        budget_bytes: budget,
        eval_est_bytes: eval_est,
        pair_bytes: pair,
        min_budget: minimum,
        chunks,
    }
}

/// Distinct hookpoints of a pipeline (what the chunk estimate counts).
pub fn distinct_hookpoints(cfg: &crate::config::PipelineConfig) -> u64 {
    let mut h = cfg.capture.hookpoints.clone();
    h.sort();
    h.dedup();
    h.len() as u64
}

/// Pack the training shards (`rows[i]` rows each) into chunks of at most `avail` bytes
/// (`per_row`/`per_shard`: the estimate for all hookpoints together).
fn plan_chunks(rows: &[u64], per_shard: &dyn Fn(u64) -> u64, avail: u64) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    let mut before = 0;
    for (i, &r) in rows.iter().enumerate() {
        let b = per_shard(r);
        match out.last_mut() {
            Some(c) if c.est_bytes + b <= avail => {
                c.shards.end = i + 1;
                c.rows += r;
                c.est_bytes += b;
            }
            _ => out.push(Chunk {
                shards: i..i + 1,
                rows_before: before,
                rows: r,
                est_bytes: b,
            }),
        }
        before += r;
    }
    out
}

/// The steps of a unit of `total` steps on chunk `c` of a split of `n` rows.
fn span(c: &Chunk, total: u64, n: u64) -> Range<u64> {
    let at = |rows: u64| (total as u128 * rows as u128 / n.max(1) as u128) as u64;
    at(c.rows_before)..at(c.rows_before + c.rows)
}

fn chunk_dir(acts: &Path, c: usize) -> PathBuf {
    acts.join(format!("chunk-{c:05}"))
}

fn marker(acts: &Path, c: usize) -> PathBuf {
    acts.join(format!("chunk-{c:05}.done"))
}

/// Bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Chunk folders under `acts` (index, path).
fn chunk_dirs(acts: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(acts) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(i) = name
            .strip_prefix("chunk-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().is_dir() {
                out.push((i, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn remove_dir(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", p.display()))
        }
        _ => Ok(()),
    }
}

fn remove_file(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// The step a unit's checkpoint holds (0 without one of its point hash).
fn checkpoint_step(u: &Unit) -> u64 {
    let path = u.dir.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return 0;
    }
    match crate::train::checkpoint::load(&path) {
        Ok(ck) if ck.get::<String>("point_hash").ok().as_deref() == Some(&u.point.hash) => {
            ck.get::<u64>("step").unwrap_or(0)
        }
        _ => 0,
    }
}

/// Capture and train `pipeline` chunk by chunk (module doc). The evaluation follows as in
/// keep-everything mode, on the kept held-out split. Returns the number of units trained.
pub fn run_streamed(
    pipeline: &Pipeline,
    opts: &HubOptions,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<usize> {
    let cfg = &pipeline.config;
    let budget = cfg.capture.disk_budget_bytes.with_context(|| {
        "capture.disk_budget_bytes is required with capture.keep = false".to_string()
    })?;
    let acts = activations_dir(pipeline);
    let prep = prepare(pipeline, opts, force, reporter)?;
    let model = prep.loaded.model.as_ref();
    let d_model = model.info().d_model;
    let n_hp = distinct_hookpoints(cfg);
    let dtype = cfg.capture.dtype;
    let [train_rows, eval_rows] = shard_rows(model, prep.tokenizer.clone(), &prep.spec)
        .context("planning the chunks of the streamed run")?;
    let plan = stream_plan(&train_rows, &eval_rows, n_hp, d_model, dtype, budget);
    if !plan.fits() {
        bail!(
            "capture.disk_budget_bytes = {budget} is too small for this pipeline: the held-out split takes about {} and two training shards about {} ({n_hp} hookpoint(s) of d_model {d_model}, {}), so it must be at least {}; raise it, or lower capture.shard_tokens / data.eval_tokens",
            human_bytes(plan.eval_est_bytes),
            human_bytes(plan.pair_bytes),
            dtype.name(),
            plan.min_budget
        );
    }
    let (chunks, eval_est) = (plan.chunks, plan.eval_est_bytes);
    let n_rows: u64 = train_rows.iter().sum();
    let record_path = acts.join(STREAM_FILE);
    let old_high = std::fs::read(&record_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<StreamRecord>(&b).ok())
        .filter(|r| r.chunks == chunks && !force)
        .map_or(0, |r| r.high_water_bytes);
    let mut record = StreamRecord {
        budget_bytes: budget,
        eval_est_bytes: eval_est,
        chunks: chunks.clone(),
        high_water_bytes: old_high,
    };
    reporter.message(&format!(
        "stream: {} training shards in {} chunk(s) of at most {} (budget {}, held-out split about {})",
        train_rows.len(),
        chunks.len(),
        human_bytes(chunks.iter().map(|c| c.est_bytes).max().unwrap_or(0)),
        human_bytes(budget),
        human_bytes(eval_est)
    ));

    // The units still to train, and the step each has reached.
    let all = units(pipeline, None)?;
    let mut pending: Vec<(&Unit, u64, u64)> = Vec::new(); // (unit, total steps, at step)
    for u in &all {
        if force {
            remove_file(&u.dir.join(CHECKPOINT_FILE))?;
        }
        let foreign = super::unit_check::check_unit_folder(u)?;
        let done = read_done(&u.dir).is_some_and(|d| d.point_hash == u.point.hash);
        if force || foreign.is_some() || !done {
            let total = u.point.config.trainer_config().total_steps();
            pending.push((u, total, checkpoint_step(u)));
        }
    }
    let needs = |total: u64, at: u64| {
        chunks
            .iter()
            .position(|c| span(c, total, n_rows).end > at)
            .unwrap_or(chunks.len())
    };
    let first = pending
        .iter()
        .map(|&(_, total, at)| needs(total, at))
        .min()
        .unwrap_or(chunks.len());
    if pending.is_empty() {
        reporter.message(&format!("train: all {} SAEs already trained", all.len()));
    } else {
        reporter.message(&format!(
            "stream: {} of {} SAEs to train, from chunk {first}",
            pending.len(),
            all.len()
        ));
    }

    // 1. The held-out split, once, kept.
    std::fs::create_dir_all(&acts).with_context(|| format!("creating {}", acts.display()))?;
    if cfg.data.eval_tokens > 0 {
        let mut spec = prep.spec.clone();
        spec.out_dir = acts.clone();
        capture_select(
            model,
            prep.tokenizer.clone(),
            &spec,
            &Select::Chunk {
                split: Split::Eval,
                shards: 0..eval_rows.len(),
            },
            reporter,
        )
        .context("capturing the held-out split of the streamed run")?;
    }
    write_resolved(pipeline, &pipeline.run_dir())?;

    // 2. Chunk by chunk.
    let mut trained = 0;
    let seed = cfg.run.seed;
    for (ci, chunk) in chunks.iter().enumerate().skip(first) {
        let here: Vec<&Unit> = pending
            .iter()
            .filter(|&&(_, total, at)| {
                needs(total, at) <= ci && !span(chunk, total, n_rows).is_empty()
            })
            .map(|&(u, _, _)| u)
            .collect();
        // Only this chunk's folder may be on disk while it is captured.
        for (i, p) in chunk_dirs(&acts)? {
            if i != ci {
                remove_dir(&p)?;
            }
        }
        let dir = chunk_dir(&acts, ci);
        if !here.is_empty() {
            let mut spec = prep.spec.clone();
            spec.out_dir = dir.clone();
            capture_select(
                model,
                prep.tokenizer.clone(),
                &spec,
                &Select::Chunk {
                    split: Split::Train,
                    shards: chunk.shards.clone(),
                },
                reporter,
            )
            .with_context(|| format!("capturing chunk {ci} into {}", dir.display()))?;
            record.high_water_bytes = record.high_water_bytes.max(dir_bytes(&acts));
            write_record(&record_path, &record)?;
            let c_seed = seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut hps: Vec<_> = here.iter().map(|u| u.hookpoint).collect();
            hps.sort();
            hps.dedup();
            for hp in hps {
                let mine: Vec<&Unit> = here.iter().copied().filter(|u| u.hookpoint == hp).collect();
                let sdir = set_dir(&dir, hp, Split::Train);
                let set = ActivationSet::open(
                    &sdir,
                    &Expect {
                        hookpoint: Some(hp.to_string()),
                        split: Some("train".into()),
                        model_repo: Some(cfg.model.source.clone()),
                        ..Expect::default()
                    },
                )
                .with_context(|| format!("opening chunk {ci} of {hp} in {}", sdir.display()))?;
                let chunk_span = |_: &Unit, total: u64| span(chunk, total, n_rows);
                trained += train_chunk(pipeline, &set, &mine, &chunk_span, c_seed, reporter)
                    .with_context(|| format!("training chunk {ci} of {} ({hp})", chunks.len()))?;
            }
        }
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "chunk": ci,
            "shards": [chunk.shards.start, chunk.shards.end],
            "rows": chunk.rows,
            "units": here.len(),
        }))?;
        let m = marker(&acts, ci);
        crate::util::fs::atomic_write(&m, text.as_bytes())
            .with_context(|| format!("writing {}", m.display()))?;
        remove_dir(&dir)?;
    }
    for (_, p) in chunk_dirs(&acts)? {
        remove_dir(&p)?;
    }
    record.high_water_bytes = record.high_water_bytes.max(dir_bytes(&acts));
    write_record(&record_path, &record)?;
    Ok(trained)
}

fn write_record(path: &Path, r: &StreamRecord) -> Result<()> {
    let text = serde_json::to_string_pretty(r)?;
    crate::util::fs::atomic_write(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_pack_consecutive_shards_within_the_budget() {
        let rows = [100, 100, 100, 100, 40];
        let c = plan_chunks(&rows, &|r| r, 250);
        let shards: Vec<_> = c.iter().map(|c| c.shards.clone()).collect();
        assert_eq!(shards, vec![0..2, 2..5]);
        assert_eq!(c[1].rows_before, 200);
        assert!(c.iter().all(|c| c.est_bytes <= 250));
    }

    #[test]
    fn spans_tile_every_step_once() {
        let rows = [512, 512, 512, 300];
        let c = plan_chunks(&rows, &|r| r, 1100);
        let n: u64 = rows.iter().sum();
        for total in [1, 7, 15, 1836] {
            let mut at = 0;
            for ch in &c {
                let s = span(ch, total, n);
                assert_eq!(s.start, at);
                at = s.end;
            }
            assert_eq!(at, total);
        }
    }
}
