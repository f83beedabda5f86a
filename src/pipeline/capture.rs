//! The `saepipe capture <pipeline.toml>` stage: resolve the model and dataset (hub.rs),
//! load the model (models), turn `[data]`/`[capture]` into a [`CaptureSpec`], capture.
//!
//! Implements `../shared/specs/pipeline.md` §1 (`saepipe capture`) and §4 (outputs under
//! `data/<run>/activations/`, the resolved config next to them).
//!
//! Decision: `model_revision` in the metadata is the hub commit for hub models; for
//! `local:`/`gguf:` sources, which have none, it is `sha256:` + a fingerprint of the model
//! files (names, sizes and their first and last 64 KiB), so that activations of two
//! different local checkpoints are never mixed by the reader.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::capture::{capture_select, count_units, CaptureSpec, Select, SetSummary, UnitCounts};
use crate::config::Pipeline;
use crate::data::{DocSplit, PackSpec, Packing, TextSource};
use crate::hub::{HubOptions, ResolvedModel};
use crate::models::ModelSource;
use crate::store::WriterSettings;
use crate::util::progress::Reporter;

/// The `activations` folder of a run.
pub fn activations_dir(pipeline: &Pipeline) -> std::path::PathBuf {
    pipeline.run_dir().join("activations")
}

/// A content fingerprint of local model files (see the module doc).
pub fn fingerprint_files(files: &[std::path::PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut files = files.to_vec();
    files.sort();
    for f in &files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("reading {}", f.display()))?;
        let len = file.metadata()?.len();
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; 65_536.min(len as usize)];
        file.read_exact(&mut buf)?;
        h.update(&buf);
        if len > 65_536 {
            file.seek(SeekFrom::End(-(buf.len() as i64)))?;
            file.read_exact(&mut buf)?;
            h.update(&buf);
        }
    }
    Ok(format!("sha256:{}", &hex::encode(h.finalize())[..16]))
}

fn revision_of(resolved: &ResolvedModel) -> Result<String> {
    if let Some(c) = resolved
        .commit
        .clone()
        .or_else(|| resolved.revision.clone())
    {
        return Ok(c);
    }
    fingerprint_files(&resolved.files)
}

/// The capture spec of a pipeline, with the dataset files already resolved.
pub fn spec_from_pipeline(
    pipeline: &Pipeline,
    model_revision: String,
    files: &[std::path::PathBuf],
    force: bool,
) -> CaptureSpec {
    let c = &pipeline.config;
    let d = &c.data;
    let mut source = TextSource::new(files.iter().map(|p| p.display().to_string()));
    source.text_field = d.text_column.clone();
    source.txt_unit = d.txt_unit;
    CaptureSpec {
        out_dir: activations_dir(pipeline),
        model_repo: c.model.source.clone(),
        model_revision,
        hookpoints: c.capture.hookpoints.clone(),
        source,
        pack: PackSpec {
            context_len: d.context_len,
            prepend_bos: d.prepend_bos,
            packing: if d.concat_docs {
                Packing::Concat
            } else {
                Packing::Truncate
            },
            separator: d.separator,
            shuffle_seed: d.shuffle_seed,
        },
        split: DocSplit {
            seed: d.split_seed,
            eval_fraction: d.eval_fraction,
        },
        n_tokens: d.n_tokens,
        n_eval_tokens: d.eval_tokens,
        batch_size: c.capture.batch_size,
        shard_windows: ((c.capture.shard_tokens / d.context_len.max(1) as u64).max(1)) as usize,
        dtype: c.capture.dtype,
        writer: WriterSettings {
            row_group_rows: c.capture.row_group_rows,
            compression: c.capture.compression,
            ..WriterSettings::default()
        },
        exclude_special_tokens: c.capture.exclude_special_tokens,
        force,
    }
}

/// Resolve the pipeline's `[model]` (hub cache, `local:` or `gguf:`) and load it on
/// `model.device` in `model.dtype`, random-initialised when `model.random_init`. Shared by
/// capture, the CE evaluation and the JSAE stage. The device is opened first, so a missing
/// GPU is reported before anything is downloaded.
pub fn load_pipeline_model(
    pipeline: &Pipeline,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<(ResolvedModel, crate::models::LoadedModel)> {
    let c = &pipeline.config;
    let device = c.model.device.open("model.device")?;
    let resolved = crate::hub::resolve_model(&pipeline.model_source(), opts, reporter)
        .with_context(|| format!("resolving model {}", c.model.source))?;
    let src = if resolved.kind == "gguf" {
        ModelSource::Gguf {
            file: resolved.path.clone(),
        }
    } else {
        ModelSource::Local {
            dir: resolved.path.clone(),
        }
    };
    let loaded = crate::models::load_source_with(
        &src,
        &device,
        c.model.dtype.candle(),
        c.model.random_init(),
    )
    .with_context(|| {
        format!(
            "loading model {} ({} on {})",
            c.model.source,
            c.model.dtype.name(),
            c.model.device
        )
    })?;
    Ok((resolved, loaded))
}

/// Run the capture stage of `pipeline`.
pub fn run_stage(
    pipeline: &Pipeline,
    opts: &HubOptions,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<Vec<SetSummary>> {
    run_select(pipeline, opts, force, &Select::All, reporter)
}

/// The lock file of capture unit `i` (held while a task computes that shard).
pub fn unit_lock_path(pipeline: &Pipeline, i: usize) -> std::path::PathBuf {
    pipeline
        .run_dir()
        .join(".locks")
        .join(format!("capture-{i:05}.lock"))
}

/// How many capture units (shards, every hookpoint at once) `pipeline` has: resolves and
/// loads the model for its tokenizer and special tokens, then packs the windows.
pub fn unit_counts(
    pipeline: &Pipeline,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<UnitCounts> {
    let c = &pipeline.config;
    if c.synthetic.is_some() {
        return Ok(UnitCounts { train: 0, eval: 0 });
    }
    let (resolved, loaded) = load_pipeline_model(pipeline, opts, reporter)?;
    let dataset = crate::hub::resolve_dataset(&c.data, opts, reporter)
        .context("resolving the dataset of [data]")?;
    let tokenizer = loaded.tokenizer.with_context(|| {
        format!(
            "{}: no tokenizer found (tokenizer.json next to the weights)",
            resolved.path.display()
        )
    })?;
    let spec = spec_from_pipeline(pipeline, revision_of(&resolved)?, &dataset.files, false);
    count_units(loaded.model.as_ref(), Arc::new(tokenizer), &spec)
        .context("counting the capture shards")
}

/// What a capture needs, loaded once: the model, its tokenizer and the capture spec.
pub struct Prepared {
    /// The loaded model.
    pub loaded: crate::models::LoadedModel,
    /// Its tokenizer.
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// The capture spec, dataset files resolved.
    pub spec: CaptureSpec,
}

/// Resolve and load the model and dataset of `pipeline` and build its capture spec.
pub fn prepare(
    pipeline: &Pipeline,
    opts: &HubOptions,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<Prepared> {
    let c = &pipeline.config;
    let (resolved, mut loaded) = load_pipeline_model(pipeline, opts, reporter)?;
    let dataset = crate::hub::resolve_dataset(&c.data, opts, reporter)
        .context("resolving the dataset of [data]")?;
    let tokenizer = loaded.tokenizer.take().with_context(|| {
        format!(
            "{}: no tokenizer found (tokenizer.json next to the weights)",
            resolved.path.display()
        )
    })?;
    let spec = spec_from_pipeline(pipeline, revision_of(&resolved)?, &dataset.files, force);
    Ok(Prepared {
        loaded,
        tokenizer: Arc::new(tokenizer),
        spec,
    })
}

/// The capture stage restricted to `select` (issue 15: `--shard I..J`, `--finalize`).
pub fn run_select(
    pipeline: &Pipeline,
    opts: &HubOptions,
    force: bool,
    select: &Select,
    reporter: &dyn Reporter,
) -> Result<Vec<SetSummary>> {
    let c = &pipeline.config;
    if c.synthetic.is_some() {
        reporter.message("capture: [synthetic] pipeline, nothing to capture");
        return Ok(Vec::new());
    }
    refuse_streamed(pipeline, "capture")?;
    let (resolved, loaded) = load_pipeline_model(pipeline, opts, reporter)?;
    let dataset = crate::hub::resolve_dataset(&c.data, opts, reporter)
        .context("resolving the dataset of [data]")?;
    let tokenizer = loaded.tokenizer.with_context(|| {
        format!(
            "{}: no tokenizer found (tokenizer.json next to the weights)",
            resolved.path.display()
        )
    })?;
    let revision = revision_of(&resolved)?;
    if *select == Select::All {
        // A keep-everything capture that cannot fit is refused before it starts.
        super::disk::check_capture_space(
            pipeline,
            &activations_dir(pipeline),
            loaded.model.info().d_model,
        )?;
    }
    let spec = spec_from_pipeline(pipeline, revision, &dataset.files, force);
    let hps: Vec<String> = spec.hookpoints.iter().map(|h| h.to_string()).collect();
    // One task per shard range: hold each shard's lock (waiting for a duplicate).
    let mut _locks = Vec::new();
    if let Select::Units(r) = select {
        for i in r.clone() {
            _locks.push(crate::util::lock::UnitLock::acquire(&unit_lock_path(
                pipeline, i,
            ))?);
        }
    }
    let sums = capture_select(
        loaded.model.as_ref(),
        Arc::new(tokenizer),
        &spec,
        select,
        reporter,
    )
    .with_context(|| {
        format!(
            "capturing {} from {}@{}",
            hps.join(", "),
            c.model.source,
            spec.model_revision
        )
    })?;
    write_resolved(pipeline, &pipeline.run_dir())?;
    Ok(sums)
}

/// A streamed pipeline (`capture.keep = false`) interleaves capture and training inside
/// `saepipe run`; the stages alone would capture everything or find nothing to train on.
pub fn refuse_streamed(pipeline: &Pipeline, stage: &str) -> Result<()> {
    if !pipeline.config.capture.keep {
        anyhow::bail!(
            "{}: capture.keep = false streams capture and training chunk by chunk inside `saepipe run`; run `saepipe run {}` (or set capture.keep = true to use `saepipe {stage}`)",
            pipeline.path.display(),
            pipeline.path.display()
        );
    }
    Ok(())
}

/// Write the resolved config into the run folder (one writer at a time).
pub(crate) fn write_resolved(pipeline: &Pipeline, run_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    // Shard tasks finish at the same time: one `*.tmp` writer at a time.
    let _lock = crate::util::lock::UnitLock::acquire(&run_dir.join(".locks").join("config.lock"))?;
    pipeline.write_resolved(run_dir)?;
    Ok(())
}
