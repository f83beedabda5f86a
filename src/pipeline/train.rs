//! The train stage: every (grid point × hookpoint) unit of a pipeline, trained from the
//! captured activations, resumable, with one pass over the data feeding several SAEs.
//!
//! Implements `pipeline.md` §1 (`saepipe train`), §4 (SAE folders) and issue 5's shared
//! data pass.
//!
//! Layout: `data/<run>/saes/<point-id>/<hookpoint>/` holds `cfg.json` +
//! `sae_weights.safetensors` (SAELens v6), `train_log.parquet` and `train_done.json`, the
//! completion marker, written last. A unit is skipped when its marker records the same
//! point hash; anything else in the folder is overwritten.
//!
//! Decision: units of the same hookpoint and batch size train in lockstep on the same
//! batches: each batch is read and decoded from Parquet once and handed to every SAE of
//! the group (no anchor library does this by default; the read is the shared cost). So
//! `run.seed` varies the SAE's initialisation, not the data order, which follows the
//! pipeline's base `run.seed`.
//! Decision: every unit checkpoints into its own folder (`checkpoint.safetensors`, the
//! training engine's format) every `train.checkpoint_every` tokens. After a kill, a unit
//! with a checkpoint of its point hash continues from it: its group replays the shared
//! batch stream (reading only) from the earliest step of its units, and each unit steps
//! only on the batches it has not seen, so every SAE ends byte-identical to an
//! uninterrupted run. The checkpoint is removed once the unit's marker is written.
//! Decision: a `[synthetic]` pipeline trains on [`SyntheticSource`] rows (the training
//! stream of its dictionary, in order) instead of captured activations.
//! Decision: the SAEs of a group take each step in parallel (rayon), so `train_seconds` is
//! an SAE's wall time while it shares the cores with the rest of its group.
//! Decision: the shared reader shuffles through `train.shuffle_buffer_bytes` of memory
//! filled with `train.shuffle_chunk_tokens`-row chunks from all shards (store/shuffle.rs),
//! both read from the base file like `run.seed`.
//! Decision: groups are capped by memory (weights, gradients and both Adam moments of
//! every SAE in the group: 16 bytes per parameter) at [`GROUP_BYTES`].
//! Decision (issue 15): a *train unit* of an array task is one (grid point × hookpoint),
//! index `i` of [`units`] (points in sweep order, hookpoints in pipeline order), not a
//! lockstep group: groups depend on what is still pending and on the memory cap, a unit
//! does not, and every unit is independent. A unit trained alone reads the same shuffled
//! stream (seeded by the base `run.seed`, keyed by its batch size) as in a group, so it
//! ends with the same weights; only the read is no longer shared. When the pipeline has
//! `[jsae]`, one more train unit (index = number of SAE units) trains every JSAE pair.

use std::ops::Range;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::config::Pipeline;
use crate::data::Split;
use crate::models::Hookpoint;
use crate::pipeline::capture::activations_dir;
use crate::sae::export::ExportMeta;
use crate::store::reader::{ActivationSet, Expect};
use crate::store::set_dir;
use crate::store::shuffle::{ParquetSource, ShuffleConfig};
use crate::store::{ActivationSource, DataError};
use crate::synthetic::SyntheticSource;
use crate::train::{SingleSae, StepRecord, Trainer, CHECKPOINT_FILE, LOG_FILE};
use crate::util::progress::Reporter;

/// Memory cap of one lockstep group (weights, grads, Adam moments), bytes.
pub const GROUP_BYTES: u64 = 6 << 30;

pub use super::unit::{read_done, units, TrainDone, Unit, METRICS_FILE, TRAIN_DONE, UNIT_LOCK};

/// Whether the unit is trained with its current config: its marker records this unit and
/// its point hash, and the folder's files are the ones training wrote for it
/// ([`super::unit_check`]).
pub fn is_trained(u: &Unit) -> bool {
    read_done(&u.dir).is_some_and(|d| d.point_hash == u.point.hash)
        && matches!(super::unit_check::check_unit_folder(u), Ok(None))
}

/// Rows held in a borrowed slice: how one shared batch is handed to each trainer.
struct SliceSource<'a> {
    data: &'a [f32],
    d: usize,
    pos: usize,
}

impl ActivationSource for SliceSource<'_> {
    fn d_in(&self) -> usize {
        self.d
    }
    fn len_rows(&self) -> Option<u64> {
        Some((self.data.len() / self.d) as u64)
    }
    fn next_batch(&mut self, rows: usize, out: &mut Vec<f32>) -> Result<usize, DataError> {
        let n = rows.min(self.data.len() / self.d - self.pos);
        out.extend_from_slice(&self.data[self.pos * self.d..(self.pos + n) * self.d]);
        self.pos += n;
        Ok(n)
    }
    fn position(&self) -> u64 {
        self.pos as u64
    }
    fn seek(&mut self, pos: u64) -> Result<(), DataError> {
        let len = (self.data.len() / self.d) as u64;
        if pos > len {
            return Err(DataError::Seek { pos, len });
        }
        self.pos = pos as usize;
        Ok(())
    }
}

/// The training rows of one lockstep group.
struct Data<'s> {
    src: &'s mut dyn ActivationSource,
    /// Rows available.
    rows: u64,
    /// What `cfg.json` records about the data (`hook_name` is set per unit).
    export: ExportMeta,
}

/// Fill `buf` with exactly `rows` rows from `src`, starting again at row 0 at the end.
fn read_rows(src: &mut dyn ActivationSource, rows: usize, buf: &mut Vec<f32>) -> Result<()> {
    buf.clear();
    let d = src.d_in();
    let mut wrapped = false;
    while buf.len() < rows * d {
        let got = src.next_batch(rows - buf.len() / d, buf)?;
        if got == 0 {
            if wrapped {
                bail!("the activation set is empty");
            }
            src.seek(0)?;
            wrapped = true;
        } else {
            wrapped = false;
        }
    }
    Ok(())
}

/// Train every unit of `pipeline` (or of grid point `only`) that is not trained yet (all of
/// them with `force`). Returns the number of units trained.
pub fn train_stage(
    pipeline: &Pipeline,
    only: Option<&str>,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<usize> {
    super::capture::refuse_streamed(pipeline, "train")?;
    let all = units(pipeline, only)?;
    train_list(pipeline, &all, None, force, reporter)
}

/// Train unit `index` of [`units`] alone (an array task), holding its [`UNIT_LOCK`]; a
/// trained unit is skipped. Returns the number trained (0 or 1).
pub fn train_unit(
    pipeline: &Pipeline,
    index: usize,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<usize> {
    super::capture::refuse_streamed(pipeline, "train")?;
    let all = units(pipeline, None)?;
    let Some(u) = all.get(index) else {
        bail!(
            "train unit {index} does not exist: {} has {} SAE units (see `saepipe units`)",
            pipeline.path.display(),
            all.len()
        );
    };
    let _lock = crate::util::lock::UnitLock::acquire(&u.dir.join(UNIT_LOCK))?;
    train_list(pipeline, &all, Some(index), force, reporter)
}

/// Train the units of `all` that are pending (all with `force`), only `pick` when given.
fn train_list(
    pipeline: &Pipeline,
    all: &[Unit],
    pick: Option<usize>,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<usize> {
    let mut pending: Vec<&Unit> = Vec::new();
    for (i, u) in all.iter().enumerate() {
        if pick.is_some_and(|p| p != i) {
            continue;
        }
        // A folder holding another unit's SAE is trained again (and replaced), never kept.
        let foreign = super::unit_check::check_unit_folder(u)?;
        if let Some(m) = &foreign {
            reporter.message(&format!(
                "train: {} does not hold the SAE of its unit: {m}; training it again",
                u.dir.display()
            ));
        }
        let done = read_done(&u.dir).is_some_and(|d| d.point_hash == u.point.hash);
        if force || foreign.is_some() || !done {
            pending.push(u);
        }
    }
    if pending.is_empty() && pick.is_some() {
        reporter.message("train: this unit is already trained");
        return Ok(0);
    }
    if pending.is_empty() {
        reporter.message(&format!("train: all {} SAEs already trained", all.len()));
        return Ok(0);
    }
    reporter.message(&format!(
        "train: {} of {} SAEs to train",
        pending.len(),
        all.len()
    ));
    let acts = activations_dir(pipeline);
    let mut hookpoints: Vec<Hookpoint> = pending.iter().map(|u| u.hookpoint).collect();
    hookpoints.sort();
    hookpoints.dedup();
    let mut trained = 0;
    for hp in hookpoints {
        let mut mine: Vec<&Unit> = pending
            .iter()
            .copied()
            .filter(|u| u.hookpoint == hp)
            .collect();
        mine.sort_by_key(|u| u.point.config.train.batch_tokens);
        if let Some(syn) = &pipeline.config.synthetic {
            // A known dictionary instead of captured activations (synthetic.rs).
            let n = pipeline.config.data.n_tokens;
            for group in groups(&mine, syn.d) {
                let mut src = SyntheticSource::new(syn.data(), syn.train_seed(), n);
                let data = Data {
                    src: &mut src,
                    rows: n,
                    export: super::export_meta::synthetic(pipeline, &hp.to_string()),
                };
                trained += train_group(data, &group, &whole, force, reporter)
                    .with_context(|| format!("training SAEs on synthetic data ({hp})"))?;
            }
            continue;
        }
        let dir = set_dir(&acts, hp, Split::Train);
        let set = ActivationSet::open(
            &dir,
            &Expect {
                hookpoint: Some(hp.to_string()),
                split: Some("train".into()),
                model_repo: Some(pipeline.config.model.source.clone()),
                ..Expect::default()
            },
        )
        .with_context(|| {
            format!(
                "opening the {hp} activations in {}; run `saepipe capture` first (after shard tasks: `saepipe capture --finalize`)",
                dir.display()
            )
        })?;
        let d = set.d_model();
        for group in groups(&mine, d) {
            let batch = group[0].point.config.train.batch_tokens;
            let t = &pipeline.config.train;
            let mut src = ParquetSource::new(
                set.clone(),
                ShuffleConfig::for_training(
                    batch,
                    t.shuffle_buffer_bytes,
                    t.shuffle_chunk_tokens,
                    d,
                    pipeline.config.run.seed,
                ),
            )?;
            let data = Data {
                src: &mut src,
                rows: set.n_tokens(),
                export: super::export_meta::from_activations(pipeline, &set.manifest.meta)?,
            };
            trained += train_group(data, &group, &whole, force, reporter)
                .with_context(|| format!("training SAEs on {hp}"))?;
        }
    }
    Ok(trained)
}

/// The steps a unit takes in one group: all of them, `[0, total)` (keep-everything mode).
fn whole(_: &Unit, total: u64) -> Range<u64> {
    0..total
}

/// Train `units` (pending units of `set`'s hookpoint) on one chunk of a streamed run
/// (pipeline::stream): unit `u` takes steps `span(u, total_steps)`, the chunk's shuffled
/// stream (seeded by `seed`) starting at the first of them; a unit that does not end
/// there is checkpointed at the chunk boundary. Returns the number of units finished.
pub(crate) fn train_chunk(
    pipeline: &Pipeline,
    set: &ActivationSet,
    units: &[&Unit],
    span: &dyn Fn(&Unit, u64) -> Range<u64>,
    seed: u64,
    reporter: &dyn Reporter,
) -> Result<usize> {
    let mut mine = units.to_vec();
    mine.sort_by_key(|u| u.point.config.train.batch_tokens);
    let d = set.d_model();
    let t = &pipeline.config.train;
    let mut trained = 0;
    for group in groups(&mine, d) {
        let batch = group[0].point.config.train.batch_tokens;
        let mut src = ParquetSource::new(
            set.clone(),
            ShuffleConfig::for_training(
                batch,
                t.shuffle_buffer_bytes,
                t.shuffle_chunk_tokens,
                d,
                seed,
            ),
        )?;
        let data = Data {
            src: &mut src,
            rows: set.n_tokens(),
            export: super::export_meta::from_activations(pipeline, &set.manifest.meta)?,
        };
        trained += train_group(data, &group, span, false, reporter)
            .with_context(|| format!("training SAEs on {}", set.dir.display()))?;
    }
    Ok(trained)
}

/// Bytes of one SAE's training state as the group cap counts them: weights, gradients and
/// both Adam moments (16 bytes per parameter) of its `2·d·d_sae` matrix parameters.
pub fn sae_state_bytes(d: usize, d_sae: usize) -> u64 {
    16 * 2 * (d * d_sae) as u64
}

/// Split units (sorted by batch size) into lockstep groups: same batch size, memory-capped.
pub fn groups<'a, 'b>(units: &[&'b Unit<'a>], d: usize) -> Vec<Vec<&'b Unit<'a>>> {
    let mut out: Vec<Vec<&Unit>> = Vec::new();
    let mut bytes = 0u64;
    for &u in units {
        let d_sae = u.point.config.sae.d_sae(d);
        let b = sae_state_bytes(d, d_sae);
        let same_batch = out.last().is_some_and(|g| {
            g[0].point.config.train.batch_tokens == u.point.config.train.batch_tokens
        });
        if same_batch && bytes + b <= GROUP_BYTES {
            bytes += b;
            out.last_mut()
                .expect("invariant: same_batch implies a group")
                .push(u);
        } else {
            bytes = b;
            out.push(vec![u]);
        }
    }
    out
}

/// Every unit's lockstep group as a full train stage forms them (by hookpoint in name
/// order, then by batch size): what `saepipe plan` costs.
pub fn all_groups<'a, 'b>(all: &'b [Unit<'a>], d: usize) -> Vec<Vec<&'b Unit<'a>>> {
    let mut hps: Vec<_> = all.iter().map(|u| u.hookpoint).collect();
    hps.sort();
    hps.dedup();
    let mut out = Vec::new();
    for hp in hps {
        let mut mine: Vec<&Unit> = all.iter().filter(|u| u.hookpoint == hp).collect();
        mine.sort_by_key(|u| u.point.config.train.batch_tokens);
        out.extend(groups(&mine, d));
    }
    out
}

struct Running<'u, 'a> {
    unit: &'u Unit<'a>,
    trainer: Trainer,
    seconds: f64,
    /// The unit's total steps.
    steps: u64,
    /// The step that row 0 of the group's stream feeds.
    first: u64,
    /// One past the last step this group takes (`steps`, or a chunk boundary).
    end: u64,
}

/// Train one lockstep group; `force` ignores the units' checkpoints (train from step 0).
/// Unit `u` takes steps `span(u, total_steps)` of the stream (the whole run: `[0, total)`,
/// or one chunk of a streamed run), and is checkpointed at the span's end when it does not
/// finish there.
fn train_group(
    data: Data,
    group: &[&Unit],
    span: &dyn Fn(&Unit, u64) -> Range<u64>,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<usize> {
    let src = data.src;
    let d = src.d_in();
    let batch = group[0].point.config.train.batch_tokens;
    // 1. One init sample for every SAE of the group (scale estimate, b_dec init).
    let init_rows = group
        .iter()
        .map(|u| u.point.config.train.init_tokens)
        .max()
        .unwrap_or(1)
        .min(data.rows as usize);
    let mut buf = Vec::new();
    read_rows(src, init_rows, &mut buf)?;
    src.seek(0)?;
    let mut running = Vec::with_capacity(group.len());
    for &u in group {
        let t0 = Instant::now();
        let resumed = if force { None } else { resume_unit(u, d)? };
        let (trainer, seconds) = match resumed {
            Some((trainer, seconds)) => {
                reporter.message(&format!(
                    "train: resuming {} at {} from step {} of {} ({})",
                    u.point.id,
                    u.hookpoint,
                    trainer.step_count(),
                    trainer.total_steps(),
                    u.dir.join(CHECKPOINT_FILE).display()
                ));
                (trainer, seconds)
            }
            None => {
                let cfg = u.point.config.trainer_config();
                let d_sae = u.point.config.sae.d_sae(d);
                let mut s = SliceSource {
                    data: &buf,
                    d,
                    pos: 0,
                };
                let trainer = Trainer::new(cfg, &u.point.config.sae.arch, d_sae, &mut s)
                    .with_context(|| format!("setting up {} at {}", u.point.id, u.hookpoint))?;
                (trainer, 0.0)
            }
        };
        let steps = trainer.total_steps();
        let Range { start: first, end } = span(u, steps);
        let at = trainer.step_count();
        if at < first || at > end {
            bail!(
                "{} at {} is at step {at}, but this data feeds steps {first}..{end}; the data of its other steps is gone (a streamed run deletes its chunks): train it again with --force",
                u.point.id,
                u.hookpoint
            );
        }
        running.push(Running {
            unit: u,
            steps,
            first,
            end,
            trainer,
            seconds: seconds + t0.elapsed().as_secs_f64(),
        });
    }
    let total: u64 = running.iter().map(|r| r.end - r.first).sum();
    let max_steps = running.iter().map(|r| r.end - r.first).max().unwrap_or(0);
    let start = running
        .iter()
        .map(|r| r.trainer.step_count() - r.first)
        .min()
        .unwrap_or(0);
    let prog = reporter.start(
        &format!("train {}", group[0].hookpoint),
        Some(total * batch as u64),
    );
    prog.advance(
        running
            .iter()
            .map(|r| (r.trainer.step_count() - r.first) * batch as u64)
            .sum(),
    );
    // 2. Replay the stream (reading only) up to the earliest resumed step.
    for _ in 0..start {
        read_rows(src, batch, &mut buf)?;
    }
    // 3. Lockstep: one read per step; every unit that is at this step takes it.
    let mut done = 0;
    for step in start..max_steps {
        let t0 = Instant::now();
        read_rows(src, batch, &mut buf)?;
        // `step` counts the stream's batches; unit `r` takes it as its step `first + step`.
        let due = |r: &Running| r.first + step < r.end && r.trainer.step_count() == r.first + step;
        let active = running.iter().filter(|r| due(r)).count().max(1);
        let read_share = t0.elapsed().as_secs_f64() / active as f64;
        // The SAEs of the group step in parallel (each also parallel inside, through rayon's
        // shared pool): at these sizes one SAE's kernels are too small to keep both cores
        // busy on their own.
        let prog_ref = &prog;
        let records: Vec<Result<(usize, StepRecord)>> = running
            .par_iter_mut()
            .enumerate()
            .filter(|(_, r)| due(r))
            .map(|(i, r)| {
                let t1 = Instant::now();
                let mut s = SliceSource {
                    data: &buf,
                    d,
                    pos: 0,
                };
                let rec = r.trainer.step(&mut s).with_context(|| {
                    format!("training {} at {}", r.unit.point.id, r.unit.hookpoint)
                })?;
                r.seconds += t1.elapsed().as_secs_f64() + read_share;
                prog_ref.advance(batch as u64);
                Ok((i, rec))
            })
            .collect();
        let mut msg = String::new();
        for res in records {
            let (i, rec) = res?;
            let r = &running[i];
            if msg.is_empty() {
                msg = format!(
                    "{}: loss {:.4} L0 {:.1} dead {:.3}",
                    r.unit.point.id, rec.loss, rec.l0, rec.dead_frac
                );
            }
            let at = r.trainer.step_count();
            if at == r.steps {
                finish(&data.export, r)?;
                done += 1;
            } else if at == r.end || r.trainer.checkpoint_due() {
                save_unit_checkpoint(r)?;
            }
        }
        prog.set_message(msg);
    }
    prog.finish();
    Ok(done)
}

/// Write a unit's checkpoint into its folder (atomically), with its point hash and seconds.
fn save_unit_checkpoint(r: &Running) -> Result<()> {
    let u = r.unit;
    std::fs::create_dir_all(&u.dir).with_context(|| format!("creating {}", u.dir.display()))?;
    let path = u.dir.join(CHECKPOINT_FILE);
    r.trainer
        .save_checkpoint_with(
            &path,
            serde_json::json!({ "point_hash": u.point.hash, "train_seconds": r.seconds }),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The engine of a unit restored from its checkpoint, when there is one of this unit's
/// point hash; `None` to start from step 0 (no checkpoint, or one of another config).
fn resume_unit(u: &Unit, d: usize) -> Result<Option<(Trainer, f64)>> {
    let path = u.dir.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let ck = match crate::train::checkpoint::load(&path) {
        Ok(ck) => ck,
        Err(e) => {
            tracing::warn!(
                "{e}; training {} at {} from the start",
                u.point.id,
                u.hookpoint
            );
            return Ok(None);
        }
    };
    if ck.get::<String>("point_hash").ok().as_deref() != Some(u.point.hash.as_str()) {
        return Ok(None);
    }
    let arch = &u.point.config.sae.arch;
    let cfg = u.point.config.trainer_config();
    let sae = arch.build(d, u.point.config.sae.d_sae(d), cfg.seed)?;
    let trainer = Trainer::restore(&ck, cfg, Box::new(SingleSae::new(arch.clone(), sae)))
        .with_context(|| format!("resuming from {}", path.display()))?;
    let seconds = ck.get::<f64>("train_seconds").unwrap_or(0.0);
    Ok(Some((trainer, seconds)))
}

/// Export a finished SAE, its log, then the completion marker.
fn finish(export: &ExportMeta, r: &Running) -> Result<()> {
    let u = r.unit;
    std::fs::create_dir_all(&u.dir).with_context(|| format!("creating {}", u.dir.display()))?;
    let meta = ExportMeta {
        hook_name: u.hookpoint.to_string(),
        ..export.clone()
    };
    r.trainer
        .export(&u.dir, &meta)
        .with_context(|| format!("exporting {}", u.dir.display()))?;
    r.trainer
        .log()
        .write_parquet(&u.dir.join(LOG_FILE))
        .with_context(|| format!("writing {}", u.dir.join(LOG_FILE).display()))?;
    let (d_in, d_sae) = r.trainer.sae().dims();
    // The evaluation of whatever the folder held before is not one of these weights.
    let old_metrics = u.dir.join(METRICS_FILE);
    match std::fs::remove_file(&old_metrics) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", old_metrics.display()))
        }
        _ => {}
    }
    let sha = |name: &str| super::unit_check::file_sha256(&u.dir.join(name)).map(Some);
    let done = TrainDone {
        point_id: u.point.id.clone(),
        hookpoint: u.hookpoint.to_string(),
        point_hash: u.point.hash.clone(),
        d_in,
        d_sae,
        train_tokens: r.steps * u.point.config.train.batch_tokens as u64,
        train_seconds: r.seconds,
        cfg_sha256: sha(crate::sae::export::CFG_FILE)?,
        weights_sha256: sha(crate::sae::export::WEIGHTS_FILE)?,
    };
    let text = serde_json::to_string_pretty(&done)?;
    crate::util::fs::atomic_write(&u.dir.join(TRAIN_DONE), text.as_bytes())
        .with_context(|| format!("writing {}", u.dir.join(TRAIN_DONE).display()))?;
    let ck = u.dir.join(CHECKPOINT_FILE);
    match std::fs::remove_file(&ck) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", ck.display()))
        }
        _ => Ok(()),
    }
}
