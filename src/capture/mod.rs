//! Capture: text → token windows → one hooked forward pass per batch → one Parquet
//! activation set per (hookpoint, split).
//!
//! Implements `../shared/specs/pipeline.md` §1 (resumable, refuses a changed config unless
//! `--force`), §3 (stop after the deepest requested block; BOS/EOS/pad positions
//! excluded by default) and §4 (layout, schema, metadata, bounded memory).
//!
//! Layout: `<out>/<hookpoint>/part-NNNNN.parquet + manifest.json` for the training split
//! and `<out>/<hookpoint>/eval/…` for the held-out split.
//!
//! Decision: shard `i` of a split holds windows `[i·W, (i+1)·W)` of that split's window
//! stream (`W = shard_windows`), batches never straddle shards, and the budget is exact
//! (the window that reaches it keeps only the positions it needs). Shards are therefore a
//! function of the config alone: a killed capture redoes at most the shard in flight, and
//! the result equals an uninterrupted run byte for byte.
//! Decision: the config hash covers everything that determines one hookpoint's bytes
//! (model, revision, tokenizer hash, data, packing, split, budgets, shard size, batch
//! size, dtype, writer settings, exclusion policy) and not the other hookpoints, so adding
//! a hookpoint to a pipeline does not invalidate the ones already captured.
//! Decision (issue 15, array tasks): a *capture unit* is one shard index of the whole
//! capture, every hookpoint at once (one forward pass serves them all): units
//! `0..n_train` are the training split's shards, `n_train..n_train + n_eval` the held-out
//! split's. [`Select::Units`] computes only those shards; a shard's marker is its part file
//! itself (written as `.tmp`, renamed when complete; its footer records the config hash
//! and its rows). The manifests, the sets' completion markers, are written only by a
//! capture that sees every shard: plain `saepipe capture` ([`Select::All`]) or
//! `saepipe capture --finalize` ([`Select::Finalize`]: computes nothing and names the
//! missing units instead), which runs once after the shard tasks, so no two tasks race
//! on a manifest.

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod toy;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::data::{
    special_token_ids, tokenizer_sha256, DataError, DocSplit, PackSpec, SpecialIds, Split,
    TextSource, Window, WindowStream,
};
use crate::models::{HookedModel, Hookpoint, HookpointError, Recorder};
use crate::store::{
    bytes_per_token, human_bytes, manifest, reader, set_dir, shard_name, ActDtype, ActMeta,
    Manifest, Rows, ShardInfo, ShardWriter, StoreError, WriterSettings, MANIFEST,
};
use crate::util::error::{ensure_finite, NumericError};
use crate::util::progress::Reporter;

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading or writing the activation store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The corpus ran out before the budget was reached.
    #[error("the corpus ({source_desc}) yields only {have} {split} tokens after packing and exclusions, but the budget asks for {need}; lower data.n_tokens / data.eval_tokens or add text")]
    CorpusTooSmall {
        /// `train` or `eval`.
        split: &'static str,
        /// Tokens available.
        have: u64,
        /// Tokens asked for.
        need: u64,
        /// The dataset description.
        source_desc: String,
    },
    /// An invalid capture request.
    #[error("invalid capture settings: {0}")]
    BadSpec(String),
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A requested hookpoint does not exist in the model.
    #[error(transparent)]
    Hookpoint(#[from] HookpointError),
    /// The forward pass failed.
    #[error("forward pass: {0}")]
    Candle(#[from] candle_core::Error),
    /// A NaN or infinity in the activations.
    #[error(transparent)]
    NonFinite(#[from] NumericError),
    /// `--finalize` found shards that no task has captured yet.
    #[error("capture units {missing:?} ({split} shards of {hookpoint}) are not captured yet; run `saepipe capture <pipeline> --shard I` for each (or plain `saepipe capture`), then finalize again")]
    MissingShards {
        /// `train` or `eval`.
        split: &'static str,
        /// One hookpoint lacking them.
        hookpoint: String,
        /// Their capture unit indices.
        missing: Vec<usize>,
    },
    /// A capture unit index beyond the last shard.
    #[error(
        "capture unit {index} does not exist: this pipeline has {count} (see `saepipe units`)"
    )]
    NoSuchUnit {
        /// The index asked for.
        index: usize,
        /// Units there are.
        count: usize,
    },
}

/// Which shards a capture computes (module doc: capture units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// Every shard, then the manifests (plain `saepipe capture`).
    All,
    /// Only these capture units; no manifest is written.
    Units(Range<usize>),
    /// Compute nothing; write the manifests when every shard is there, else name the
    /// missing units.
    Finalize,
    /// Only the split-local shards `shards` of `split` (the other split is not touched),
    /// then a manifest per hookpoint listing only them: an ordinary activation set of
    /// part of the split (the streamed run's chunks, and its held-out split).
    Chunk {
        /// The split.
        split: Split,
        /// Split-local shard indices.
        shards: Range<usize>,
    },
}

/// How many capture units each split has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitCounts {
    /// Shards of the training split (units `0..train`).
    pub train: usize,
    /// Shards of the held-out split (units `train..train + eval`).
    pub eval: usize,
}

impl CaptureError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::io(path, source).into()
    }
}

/// Everything a capture needs besides the model and tokenizer.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    /// `data/<run>/activations`.
    pub out_dir: PathBuf,
    /// Model source as written in the pipeline (hub repo, `local:<dir>`, `gguf:<file>`).
    pub model_repo: String,
    /// Model revision (commit sha for hub repos).
    pub model_revision: String,
    /// Hookpoints to capture, all from the same forward passes.
    pub hookpoints: Vec<Hookpoint>,
    /// The text.
    pub source: TextSource,
    /// Windows.
    pub pack: PackSpec,
    /// The seeded document split.
    pub split: DocSplit,
    /// Training tokens to keep (exact).
    pub n_tokens: u64,
    /// Held-out tokens to keep (exact; 0 = no eval set).
    pub n_eval_tokens: u64,
    /// Windows per forward pass.
    pub batch_size: usize,
    /// Windows per shard.
    pub shard_windows: usize,
    /// Stored value type.
    pub dtype: ActDtype,
    /// Parquet writer settings.
    pub writer: WriterSettings,
    /// Skip positions holding BOS/EOS/pad/special tokens.
    pub exclude_special_tokens: bool,
    /// Overwrite outputs of a different config.
    pub force: bool,
}

/// What the hash of one hookpoint's capture covers.
#[derive(Serialize)]
struct HashInput<'a> {
    model_repo: &'a str,
    model_revision: &'a str,
    hookpoint: String,
    d_model: usize,
    tokenizer_sha256: &'a str,
    source: &'a TextSource,
    pack: &'a PackSpec,
    seed: u64,
    eval_fraction: f64,
    n_tokens: u64,
    n_eval_tokens: u64,
    batch_size: usize,
    shard_windows: usize,
    dtype: ActDtype,
    writer: &'a WriterSettings,
    excluded_token_ids: &'a [u32],
    /// The model's compute dtype when it is not f32 (a bf16 model computes other
    /// activations); absent for f32 so the hashes of f32 captures are unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    model_dtype: Option<String>,
}

/// The result of one activation set.
#[derive(Debug, Clone)]
pub struct SetSummary {
    /// Hookpoint.
    pub hookpoint: Hookpoint,
    /// Split.
    pub split: Split,
    /// The set's folder.
    pub dir: PathBuf,
    /// Rows written.
    pub n_tokens: u64,
    /// Bytes on disk (shards).
    pub bytes: u64,
    /// It was already complete; nothing was done.
    pub skipped: bool,
}

struct SetState {
    hp: Hookpoint,
    dir: PathBuf,
    meta: ActMeta,
    done: bool,
    /// Shards found on disk from an interrupted run of the same config: index → (rows, bytes).
    existing: BTreeMap<usize, (u64, u64)>,
    shards: Vec<ShardInfo>,
    bytes: u64,
}

/// Capture every hookpoint of `spec` from `model`, resuming whatever a previous run of
/// the same config left, and return one summary per activation set.
pub fn capture(
    model: &dyn HookedModel,
    tokenizer: Arc<Tokenizer>,
    spec: &CaptureSpec,
    reporter: &dyn Reporter,
) -> Result<Vec<SetSummary>, CaptureError> {
    capture_select(model, tokenizer, spec, &Select::All, reporter)
}

/// The exclusion list and special ids of a capture.
fn exclusions(
    model: &dyn HookedModel,
    tokenizer: &Tokenizer,
    spec: &CaptureSpec,
) -> (Vec<u32>, SpecialIds) {
    let info = model.info();
    let special = SpecialIds {
        bos: info.bos_token_id,
        eos: info.eos_token_ids.first().copied(),
        pad: info.pad_token_id,
    };
    let excluded = if spec.exclude_special_tokens {
        special_token_ids(tokenizer, special, &info.eos_token_ids)
    } else {
        Vec::new()
    };
    (excluded, special)
}

/// Count the capture units of `spec` by packing its windows (tokenising only; no forward
/// pass).
pub fn count_units(
    model: &dyn HookedModel,
    tokenizer: Arc<Tokenizer>,
    spec: &CaptureSpec,
) -> Result<UnitCounts, CaptureError> {
    let [train, eval] = shard_rows(model, tokenizer, spec)?;
    Ok(UnitCounts {
        train: train.len(),
        eval: eval.len(),
    })
}

/// The rows (kept tokens) of every shard of the training and held-out splits, by packing
/// the windows (tokenising only; no forward pass).
pub fn shard_rows(
    model: &dyn HookedModel,
    tokenizer: Arc<Tokenizer>,
    spec: &CaptureSpec,
) -> Result<[Vec<u64>; 2], CaptureError> {
    let (excluded, special) = exclusions(model, &tokenizer, spec);
    let mut n: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for (i, (split, budget)) in [
        (Split::Train, spec.n_tokens),
        (Split::Eval, spec.n_eval_tokens),
    ]
    .into_iter()
    .enumerate()
    {
        if budget == 0 {
            continue;
        }
        let mut stream = WindowStream::new(
            &spec.source,
            tokenizer.clone(),
            &spec.pack,
            spec.split,
            split,
            special,
        )?;
        let mut remaining = budget;
        while remaining > 0 {
            let plan = plan_shard(&mut stream, spec, split, budget, &excluded, &mut remaining)?;
            n[i].push(plan.iter().map(|(_, k)| k.len() as u64).sum());
        }
    }
    Ok(n)
}

/// Like [`capture`], computing only the shards `select` names (module doc).
pub fn capture_select(
    model: &dyn HookedModel,
    tokenizer: Arc<Tokenizer>,
    spec: &CaptureSpec,
    select: &Select,
    reporter: &dyn Reporter,
) -> Result<Vec<SetSummary>, CaptureError> {
    if spec.hookpoints.is_empty() {
        return Err(CaptureError::BadSpec(
            "no hookpoints to capture; set capture.hookpoints".into(),
        ));
    }
    if spec.batch_size == 0 || spec.shard_windows == 0 || spec.n_tokens == 0 {
        return Err(CaptureError::BadSpec(
            "batch_size, shard_windows and n_tokens must be positive".into(),
        ));
    }
    for hp in &spec.hookpoints {
        model.check_hookpoint(*hp)?;
    }
    let d_model = model.info().d_model;
    let (excluded, special) = exclusions(model, &tokenizer, spec);
    let units_mode = matches!(select, Select::Units(_));
    if units_mode && spec.force {
        return Err(CaptureError::BadSpec(
            "--force with --shard would let one task clear the shards of the others; run `saepipe capture --force` once, or delete the activations folder, then the shard tasks".into(),
        ));
    }
    // Capture units before the current split (the held-out split's come after the
    // training split's); `None` until the training split has been counted.
    let mut offset = Some(0usize);
    let mut n_units = 0usize;
    let tok_sha = tokenizer_sha256(&tokenizer);
    let packing = serde_json::to_string(&spec.pack).unwrap_or_default();
    let model_dtype = match model.dtype() {
        DType::F32 => None,
        other => Some(other.as_str().to_string()),
    };

    let mut hookpoints = spec.hookpoints.clone();
    hookpoints.sort();
    hookpoints.dedup();

    let mut out = Vec::new();
    for (split, budget) in [
        (Split::Train, spec.n_tokens),
        (Split::Eval, spec.n_eval_tokens),
    ] {
        if budget == 0 {
            continue;
        }
        if matches!(select, Select::Chunk { split: s, .. } if *s != split) {
            continue;
        }
        // The split-local shards to compute, and whether to stream the whole split.
        let pick = match select {
            Select::All => Pick {
                compute: None,
                manifest: true,
                offset: offset.unwrap_or(0),
                partial: false,
            },
            Select::Finalize => Pick {
                compute: Some(0..0),
                manifest: true,
                offset: offset.unwrap_or(0),
                partial: false,
            },
            Select::Units(r) => {
                let Some(off) = offset else { break };
                Pick {
                    compute: Some(r.start.saturating_sub(off)..r.end.saturating_sub(off)),
                    manifest: false,
                    offset: off,
                    partial: false,
                }
            }
            Select::Chunk { shards, .. } => Pick {
                compute: Some(shards.clone()),
                manifest: true,
                offset: 0,
                partial: true,
            },
        };
        if let (Select::Units(r), Some(c)) = (select, &pick.compute) {
            if c.is_empty() && r.end <= pick.offset {
                // Nothing of this split (or after it) is asked for.
                break;
            }
        }
        let mut sets = Vec::new();
        for &hp in &hookpoints {
            let hash_input = HashInput {
                model_repo: &spec.model_repo,
                model_revision: &spec.model_revision,
                hookpoint: hp.to_string(),
                d_model,
                tokenizer_sha256: &tok_sha,
                source: &spec.source,
                pack: &spec.pack,
                seed: spec.split.seed,
                eval_fraction: spec.split.eval_fraction,
                n_tokens: spec.n_tokens,
                n_eval_tokens: spec.n_eval_tokens,
                batch_size: spec.batch_size,
                shard_windows: spec.shard_windows,
                dtype: spec.dtype,
                writer: &spec.writer,
                excluded_token_ids: &excluded,
                model_dtype: model_dtype.clone(),
            };
            let json = serde_json::to_vec(&hash_input).unwrap_or_default();
            let config_hash = hex::encode(&Sha256::digest(&json)[..8]);
            let meta = ActMeta {
                saepipe_version: env!("CARGO_PKG_VERSION").to_string(),
                model_repo: spec.model_repo.clone(),
                model_revision: spec.model_revision.clone(),
                hookpoint: hp.to_string(),
                d_model,
                dtype: spec.dtype,
                context_len: spec.pack.context_len,
                tokenizer_sha256: tok_sha.clone(),
                dataset: spec.source.describe(),
                config_hash,
                split: split.name().to_string(),
                exclude_special_tokens: spec.exclude_special_tokens,
                excluded_token_ids: excluded.clone(),
                packing: packing.clone(),
            };
            let dir = set_dir(&spec.out_dir, hp, split);
            sets.push(prepare_set(
                hp,
                dir,
                meta,
                spec.force,
                matches!(select, Select::All | Select::Chunk { .. }),
            )?);
        }
        let todo = sets.iter().filter(|s| !s.done).count() as u64;
        let mut count = None;
        if todo > 0 && *select == Select::All {
            let bytes = budget * bytes_per_token(d_model, spec.dtype) * todo;
            reporter.message(&format!(
                "capture {}: {budget} tokens × {todo} hookpoint(s) of d_model {d_model} ({}) → about {} on disk under {}",
                split.name(),
                spec.dtype.name(),
                human_bytes(bytes),
                spec.out_dir.display()
            ));
        }
        // Shard tasks and --finalize always stream the split: they need its shard count.
        if todo > 0 || *select != Select::All {
            count = run_split(
                model, &tokenizer, spec, split, budget, &excluded, special, &mut sets, &pick,
                reporter,
            )?;
        }
        offset = match (offset, count) {
            (Some(o), Some(c)) => {
                n_units = o + c;
                Some(o + c)
            }
            _ => None,
        };
        for s in sets {
            out.push(SetSummary {
                hookpoint: s.hp,
                split,
                n_tokens: budget,
                bytes: s.bytes,
                skipped: s.done,
                dir: s.dir,
            });
        }
    }
    if let (Select::Units(r), Some(_)) = (select, offset) {
        if r.end > n_units {
            return Err(CaptureError::NoSuchUnit {
                index: r.end - 1,
                count: n_units,
            });
        }
    }
    Ok(out)
}

/// What [`run_split`] computes of its split.
struct Pick {
    /// Split-local shards to compute (`None`: all).
    compute: Option<Range<usize>>,
    /// Write the manifests (every shard must then be there).
    manifest: bool,
    /// Capture units before this split (for messages).
    offset: usize,
    /// Stop after the last shard of `compute` and write manifests listing only its shards
    /// ([`Select::Chunk`]).
    partial: bool,
}

/// The windows of the next shard of a split and the positions each keeps (budget exact).
fn plan_shard(
    stream: &mut WindowStream,
    spec: &CaptureSpec,
    split: Split,
    budget: u64,
    excluded: &[u32],
    remaining: &mut u64,
) -> Result<Vec<(Window, Vec<usize>)>, CaptureError> {
    let mut plan: Vec<(Window, Vec<usize>)> = Vec::with_capacity(spec.shard_windows);
    while plan.len() < spec.shard_windows && *remaining > 0 {
        let w = match stream.next() {
            Some(w) => w?,
            None => {
                return Err(CaptureError::CorpusTooSmall {
                    split: split.name(),
                    have: budget - *remaining,
                    need: budget,
                    source_desc: spec.source.describe(),
                })
            }
        };
        let mut kept = kept_positions(&w, excluded);
        kept.truncate((*remaining).min(kept.len() as u64) as usize);
        *remaining -= kept.len() as u64;
        plan.push((w, kept));
    }
    Ok(plan)
}

/// Look at what a set folder holds: finished (same hash), partial (same hash: resume),
/// or another config's output (refuse unless `force`).
/// `clean` deletes stray `*.tmp` files; a shard task must not (they may be another task's
/// shard in flight).
fn prepare_set(
    hp: Hookpoint,
    dir: PathBuf,
    meta: ActMeta,
    force: bool,
    clean: bool,
) -> Result<SetState, CaptureError> {
    std::fs::create_dir_all(&dir).map_err(|e| CaptureError::io(&dir, e))?;
    let mut state = SetState {
        hp,
        dir: dir.clone(),
        meta,
        done: false,
        existing: BTreeMap::new(),
        shards: Vec::new(),
        bytes: 0,
    };
    let manifest = match Manifest::read(&dir) {
        Ok(m) => m,
        Err(e) if force => {
            tracing::warn!("{e}; overwriting (--force)");
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(m) = manifest {
        if m.meta.config_hash == state.meta.config_hash {
            // Finished, unless a shard it lists is missing or damaged (`--force` also decodes
            // every shard): those are captured again, the others kept (the resume path below).
            let damaged = crate::store::verify::damaged_shards(&dir, &m, force);
            if damaged.is_empty() {
                state.done = true;
                state.bytes = m.shards.iter().map(|s| s.bytes).sum();
                return Ok(state);
            }
            for (path, why) in &damaged {
                tracing::warn!(
                    "{}: {why}; the manifest lists it, so it is captured again",
                    path.display()
                );
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(CaptureError::io(path, e))
                    }
                    _ => {}
                }
            }
            // The set is unfinished until the new manifest is written.
            let mpath = dir.join(MANIFEST);
            std::fs::remove_file(&mpath).map_err(|e| CaptureError::io(&mpath, e))?;
        } else if !force {
            return Err(StoreError::ConfigChanged {
                path: dir.join(MANIFEST),
                found: m.meta.config_hash,
                expected: state.meta.config_hash.clone(),
            }
            .into());
        } else {
            clear_set(&dir)?;
            return Ok(state);
        }
    }
    for (i, path) in list_parts_with(&dir, clean)? {
        match reader::read_shard_meta(&path) {
            Ok((meta, rows)) if meta.config_hash == state.meta.config_hash => {
                let bytes = crate::store::remote::shard_len(&path)
                    .map_err(|e| CaptureError::io(&path, e))?;
                state.existing.insert(i, (rows, bytes));
            }
            Ok((meta, _)) if !force => {
                return Err(StoreError::ConfigChanged {
                    path,
                    found: meta.config_hash,
                    expected: state.meta.config_hash.clone(),
                }
                .into())
            }
            Ok(_) => {
                clear_set(&dir)?;
                state.existing.clear();
                break;
            }
            Err(e) => {
                tracing::warn!("{e}; it will be captured again");
                remove_part(&path)?;
            }
        }
    }
    Ok(state)
}

/// `part-NNNNN.parquet` files of `dir` with their index, sorted; stray `*.tmp` files of
/// an interrupted run are deleted.
pub(crate) fn list_parts(dir: &Path) -> Result<Vec<(usize, PathBuf)>, CaptureError> {
    list_parts_with(dir, true)
}

/// [`list_parts`], deleting stray `*.tmp` files only when `clean`.
fn list_parts_with(dir: &Path, clean: bool) -> Result<Vec<(usize, PathBuf)>, CaptureError> {
    let mut parts = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| CaptureError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| CaptureError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with("part-") && name.ends_with(".tmp") {
            if !clean {
                continue;
            }
            std::fs::remove_file(&path).map_err(|e| CaptureError::io(&path, e))?;
            continue;
        }
        if let Some(num) = name
            .strip_prefix("part-")
            .and_then(|s| s.strip_suffix(".parquet"))
        {
            if let Ok(i) = num.parse::<usize>() {
                parts.push((i, path));
            }
        }
    }
    // With `run.data_dir = "s3://…"`, shards other machines captured are on the object
    // store only; the readers stream them (store::remote).
    for (name, _) in crate::store::remote::remote_files(dir) {
        if let Some(i) = name
            .strip_prefix("part-")
            .and_then(|s| s.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            if !parts.iter().any(|(j, _)| *j == i) {
                parts.push((i, dir.join(&name)));
            }
        }
    }
    parts.sort();
    Ok(parts)
}

/// Delete a shard; one that is only on the object store (see [`list_parts`]) is left to
/// be overwritten by its recapture.
fn remove_part(p: &Path) -> Result<(), CaptureError> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CaptureError::io(p, e)),
        _ => Ok(()),
    }
}

/// Delete a set's shards and manifest (not its sub-folders).
fn clear_set(dir: &Path) -> Result<(), CaptureError> {
    for (_, p) in list_parts(dir)? {
        remove_part(&p)?;
    }
    let m = dir.join(MANIFEST);
    if m.exists() {
        std::fs::remove_file(&m).map_err(|e| CaptureError::io(&m, e))?;
    }
    Ok(())
}

/// Positions of `w` that are captured: real (not padding) and not excluded.
fn kept_positions(w: &Window, excluded: &[u32]) -> Vec<usize> {
    (0..w.n_real)
        .filter(|&p| excluded.binary_search(&w.ids[p]).is_err())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run_split(
    model: &dyn HookedModel,
    tokenizer: &Arc<Tokenizer>,
    spec: &CaptureSpec,
    split: Split,
    budget: u64,
    excluded: &[u32],
    special: SpecialIds,
    sets: &mut [SetState],
    pick: &Pick,
    reporter: &dyn Reporter,
) -> Result<Option<usize>, CaptureError> {
    let _span = tracing::info_span!("capture", split = split.name()).entered();
    let started = std::time::Instant::now();
    let mut stream = WindowStream::new(
        &spec.source,
        tokenizer.clone(),
        &spec.pack,
        spec.split,
        split,
        special,
    )?;
    let progress = reporter.start(&format!("capture {}", split.name()), Some(budget));
    let ctx = spec.pack.context_len;
    let mut remaining = budget;
    let mut n_windows = 0u64;
    let mut computed = 0u64;
    let mut shard = 0usize;
    let mut missing = Vec::new();
    while remaining > 0 {
        // A shard task stops after its last shard unless the split must be counted.
        if let Some(c) = &pick.compute {
            if !pick.manifest && shard >= c.end && !c.is_empty() {
                progress.finish();
                return Ok(None);
            }
            if pick.partial && shard >= c.end {
                break;
            }
        }
        // 1. The shard's windows and the positions each keeps (budget exact).
        let plan = plan_shard(&mut stream, spec, split, budget, excluded, &mut remaining)?;
        let rows: u64 = plan.iter().map(|(_, k)| k.len() as u64).sum();
        let window_start = plan.first().map(|(w, _)| w.index).unwrap_or(n_windows);
        n_windows += plan.len() as u64;
        let file = shard_name(shard);

        // 2. Which sets still need this shard (a resumed run skips finished ones).
        let mut todo = Vec::new();
        for (si, s) in sets.iter_mut().enumerate() {
            if s.done {
                continue;
            }
            match s.existing.get(&shard) {
                Some(&(r, bytes)) if r == rows => {
                    s.shards.push(ShardInfo {
                        file: file.clone(),
                        rows,
                        window_start,
                        window_end: n_windows,
                        bytes,
                    });
                    s.bytes += bytes;
                }
                _ => todo.push(si),
            }
        }
        let wanted_here = pick.compute.as_ref().is_none_or(|c| c.contains(&shard));
        if !wanted_here && !todo.is_empty() {
            // Another task's shard: leave it (and note it for --finalize).
            if !pick.partial {
                missing.push(pick.offset + shard);
            }
            todo.clear();
        }
        if todo.is_empty() {
            progress.advance(rows);
            shard += 1;
            continue;
        }

        // 3. One forward pass per batch for every set that needs it, stopping after the
        //    deepest block they need.
        let mut writers = Vec::new();
        for &si in &todo {
            let path = sets[si].dir.join(&file);
            writers.push(ShardWriter::create(&path, &sets[si].meta, &spec.writer)?);
        }
        let wanted: Vec<Hookpoint> = todo.iter().map(|&si| sets[si].hp).collect();
        let deepest = wanted.iter().map(|hp| hp.layer).max();
        for batch in plan.chunks(spec.batch_size) {
            let b = batch.len();
            let flat: Vec<u32> = batch
                .iter()
                .flat_map(|(w, _)| w.ids.iter().copied())
                .collect();
            let ids = Tensor::from_vec(flat, (b, ctx), model.device())?; // (b, ctx)
            let mut rec = Recorder::new(wanted.iter().copied());
            model.forward_hooked(&ids, &mut rec, deepest)?;
            for (wi, &si) in todo.iter().enumerate() {
                let hp = sets[si].hp;
                let act = rec.acts.get(&hp).ok_or_else(|| {
                    CaptureError::BadSpec(format!("the model did not report hookpoint {hp}"))
                })?;
                let (ab, at, ad) = act.dims3()?; // (b, ctx, d_model)
                if (ab, at, ad) != (b, ctx, model.info().d_model) {
                    return Err(CaptureError::BadSpec(format!(
                        "hookpoint {hp} has shape ({ab}, {at}, {ad}), expected ({b}, {ctx}, {})",
                        model.info().d_model
                    )));
                }
                let vals = act.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let rows = gather_rows(batch, &vals, ad);
                ensure_finite(&rows.act, &format!("activations of {hp}"), None)?;
                writers[wi].write(rows)?;
            }
            let kept: u64 = batch.iter().map(|(_, k)| k.len() as u64).sum();
            computed += kept;
            progress.advance(kept);
        }
        for (w, &si) in writers.into_iter().zip(&todo) {
            let bytes = w.finish()?;
            let s = &mut sets[si];
            s.shards.push(ShardInfo {
                file: file.clone(),
                rows,
                window_start,
                window_end: n_windows,
                bytes,
            });
            s.bytes += bytes;
        }
        shard += 1;
    }
    progress.finish();
    if !pick.manifest {
        return Ok(Some(shard));
    }
    if !missing.is_empty() {
        let hookpoint = sets
            .iter()
            .find(|s| !s.done)
            .map(|s| s.hp.to_string())
            .unwrap_or_default();
        return Err(CaptureError::MissingShards {
            split: split.name(),
            hookpoint,
            missing,
        });
    }

    // 4. Manifests last: the only completion marker.
    for s in sets.iter_mut().filter(|s| !s.done) {
        // Shards beyond the last one (a longer earlier run cannot share our hash, but be safe).
        for (i, p) in list_parts_with(&s.dir, pick.compute.is_none() || pick.partial)? {
            if i >= shard {
                remove_part(&p)?;
            }
        }
        let n_tokens = if pick.partial {
            s.shards.iter().map(|sh| sh.rows).sum()
        } else {
            budget
        };
        let m = Manifest {
            format: manifest::FORMAT.to_string(),
            meta: s.meta.clone(),
            n_tokens,
            n_windows,
            shard_windows: spec.shard_windows as u64,
            seed: spec.split.seed,
            eval_fraction: spec.split.eval_fraction,
            split_method: "document: sha256(seed_le || text) < eval_fraction * 2^64".into(),
            shards: std::mem::take(&mut s.shards),
        };
        m.write(&s.dir)?;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "captured {} {} tokens ({computed} computed, {} resumed) over {n_windows} windows in {secs:.1}s ({:.0} tokens/s)",
        budget,
        split.name(),
        budget - computed,
        computed as f64 / secs.max(1e-9)
    );
    Ok(Some(shard))
}

/// Rows of the kept positions of a batch, given its activations `(b, ctx, d)` flattened.
fn gather_rows(batch: &[(Window, Vec<usize>)], vals: &[f32], d: usize) -> Rows {
    let n: usize = batch.iter().map(|(_, k)| k.len()).sum();
    let mut rows = Rows {
        seq: Vec::with_capacity(n),
        pos: Vec::with_capacity(n),
        token_id: Vec::with_capacity(n),
        act: Vec::with_capacity(n * d),
    };
    for (bi, (w, kept)) in batch.iter().enumerate() {
        let ctx = w.ids.len();
        for &p in kept {
            rows.seq.push(w.index);
            rows.pos.push(p as u32);
            rows.token_id.push(w.ids[p]);
            let off = (bi * ctx + p) * d;
            rows.act.extend_from_slice(&vals[off..off + d]);
        }
    }
    rows
}
