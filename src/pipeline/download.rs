//! `saepipe download`: resolve the model and dataset of a pipeline and record what was
//! resolved where in `<run dir>/download/manifest.json` (pipeline.md §1, STYLE.md §2.7).
//!
//! The manifest is written atomically and last; later stages may read it to find the
//! files (or call [`crate::hub::resolve_model`] / [`crate::hub::resolve_dataset`] offline, which
//! gives the same paths from the cache).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Pipeline;
use crate::hub::{
    resolve_dataset, resolve_model, HubError, HubOptions, ResolvedDataset, ResolvedModel,
};
use crate::util::progress::Reporter;

/// Where the manifest lives inside a run folder.
pub const MANIFEST_FILE: &str = "download/manifest.json";

/// What `saepipe download` resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadManifest {
    /// saepipe version that wrote it.
    pub saepipe_version: String,
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// sha256 of the resolved pipeline config.
    pub config_hash: String,
    /// The hub cache root used.
    pub cache_dir: PathBuf,
    /// `model.source` as configured.
    pub model_source: String,
    /// The model's local paths.
    pub model: ResolvedModel,
    /// The dataset's local paths.
    pub dataset: ResolvedDataset,
}

/// Resolve (downloading unless offline) the model and dataset of `pipeline`, then write
/// `<run dir>/download/manifest.json`. Returns what was written.
pub fn download(
    pipeline: &Pipeline,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<DownloadManifest, HubError> {
    let cfg = &pipeline.config;
    let mut opts = opts.clone();
    opts.offline |= cfg.run.offline;
    let model = resolve_model(&pipeline.model_source(), &opts, reporter)?;
    reporter.message(&format!(
        "model {} -> {}",
        cfg.model.source,
        model.path.display()
    ));
    let dataset = resolve_dataset(&cfg.data, &opts, reporter)?;
    reporter.message(&format!("dataset: {} file(s)", dataset.files.len()));
    let manifest = DownloadManifest {
        saepipe_version: env!("CARGO_PKG_VERSION").to_string(),
        pipeline: pipeline.path.clone(),
        config_hash: pipeline.hash().to_string(),
        cache_dir: opts.cache_dir.clone(),
        model_source: cfg.model.source.clone(),
        model,
        dataset,
    };
    let path = pipeline.run_dir().join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).expect("invariant: the manifest is plain data");
    crate::util::fs::atomic_write(&path, &json).map_err(|source| HubError::Io {
        path: path.clone(),
        source,
    })?;
    tracing::info!(manifest = %path.display(), "download finished");
    Ok(manifest)
}

/// Read the manifest of the run folder `run_dir`.
pub fn read_manifest(run_dir: &Path) -> Result<DownloadManifest, HubError> {
    let path = run_dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| HubError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| HubError::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}
