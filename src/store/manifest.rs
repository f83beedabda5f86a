//! `manifest.json` of an activation set: the only completion marker of a capture.
//!
//! Implements `../shared/specs/pipeline.md` §1/§4 (stage manifests, written last) for
//! `data/<run>/activations/<hookpoint>/` (train) and `…/<hookpoint>/eval/` (held out).
//!
//! Decision: the manifest holds no timestamps or host names, so that a resumed capture
//! and an uninterrupted one produce identical bytes, manifest included.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schema::ActMeta;
use super::StoreError;

/// Manifest format tag.
pub const FORMAT: &str = "saepipe.activations.v1";
/// File name of the manifest inside an activation set folder.
pub const MANIFEST: &str = "manifest.json";

/// One finished shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the set folder (`part-00000.parquet`).
    pub file: String,
    /// Rows (captured tokens) in the shard.
    pub rows: u64,
    /// First window index (the `seq` of its first row's window).
    pub window_start: u64,
    /// One past the last window index.
    pub window_end: u64,
    /// File size in bytes.
    pub bytes: u64,
}

/// The manifest of one activation set (one hookpoint, one split).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The metadata every shard carries.
    pub meta: ActMeta,
    /// Total rows over all shards: exactly the token budget of this split.
    pub n_tokens: u64,
    /// Windows consumed (including windows that contributed no row).
    pub n_windows: u64,
    /// Windows per shard (shard i holds windows `[i·W, (i+1)·W)`).
    pub shard_windows: u64,
    /// Seed of the document split.
    pub seed: u64,
    /// Share of documents held out for evaluation.
    pub eval_fraction: f64,
    /// How the split was made.
    pub split_method: String,
    /// The shards, in order.
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    /// Read `dir/manifest.json`; `Ok(None)` if there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>, StoreError> {
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| StoreError::BadManifest {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(StoreError::BadManifest {
                path,
                msg: format!("format '{}' is not {FORMAT}", m.format),
            });
        }
        Ok(Some(m))
    }

    /// Write `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let path = dir.join(MANIFEST);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| StoreError::BadManifest {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        json.push(b'\n');
        crate::util::fs::atomic_write(&path, &json).map_err(|e| StoreError::io(&path, e))
    }

    /// Paths of the shards in order.
    pub fn shard_paths(&self, dir: &Path) -> Vec<PathBuf> {
        self.shards.iter().map(|s| dir.join(&s.file)).collect()
    }
}

/// `part-00042.parquet`.
pub fn shard_name(i: usize) -> String {
    format!("part-{i:05}.parquet")
}
