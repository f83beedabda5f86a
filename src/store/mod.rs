//! The activation store: Parquet shards of captured activations and their manifest, the
//! readers that stream them back (sequential and shuffled), and [`ActivationSource`], the
//! interface through which the trainer draws rows.
//!
//! Layout: `<out>/<hookpoint>/part-NNNNN.parquet + manifest.json` for the training split
//! and `<out>/<hookpoint>/eval/…` for the held-out split (`pipeline.md` §4).

pub mod manifest;
pub mod reader;
pub mod remote;
pub mod schema;
pub mod shuffle;
pub mod source;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

use crate::data::Split;
use crate::models::Hookpoint;
use crate::util::error::NumericError;
pub use manifest::{shard_name, Manifest, ShardInfo, MANIFEST};
pub use schema::{ActDtype, ActMeta};
pub use source::{ActivationSource, DataError, InMemorySource};
pub use writer::{ActCompression, Rows, ShardWriter, WriterSettings};

/// Why reading or writing an activation set failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Parquet/Arrow error on `path`.
    #[error("{path}: {msg}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The library's message.
        msg: String,
    },
    /// A manifest that cannot be read.
    #[error("{path}: unreadable manifest ({msg}); run `saepipe capture <pipeline.toml> --force`: it rebuilds this set, keeping the shards that are intact")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Existing output was made with a different config.
    #[error("{path} was captured with config hash {found}, but this config hashes to {expected}; refusing to mix outputs: re-run with --force to overwrite it, or change run.name")]
    ConfigChanged {
        /// The file or folder holding the other capture.
        path: PathBuf,
        /// Its config hash.
        found: String,
        /// Ours.
        expected: String,
    },
    /// A shard's metadata disagrees with what the reader expects.
    #[error(
        "{path}: {key} is {found}, expected {expected}; this shard belongs to another capture"
    )]
    SchemaMismatch {
        /// The shard.
        path: PathBuf,
        /// The metadata key (hookpoint, d_model, model_revision, …).
        key: String,
        /// What the caller expects.
        expected: String,
        /// What the file says.
        found: String,
    },
    /// A file that is not an activation shard, or is damaged.
    #[error("{path}: not a readable activation shard ({msg}); it may be truncated or corrupt: run `saepipe capture <pipeline.toml> --force`, which checks every shard of the set (decoding each) and captures a damaged one again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A NaN or infinity stored in a shard (capture never writes one: the file is damaged
    /// or was not written by this capture).
    #[error("{path}: row {row} (window {seq}, position {pos}), dimension {dim} holds {value}; activation data must be finite, so this is a problem of the data, not of training — capture it again: delete the folder {} and run `saepipe capture` (it re-captures only what is missing)", path.parent().unwrap_or(Path::new(".")).display())]
    NonFiniteData {
        /// The shard.
        path: PathBuf,
        /// 0-based row in the shard.
        row: u64,
        /// The row's window index (`seq` column).
        seq: u64,
        /// The row's position in its window (`pos` column).
        pos: u32,
        /// 0-based dimension of the value.
        dim: usize,
        /// The value (NaN or ±inf).
        value: f32,
    },
    /// An invalid capture request.
    #[error("invalid capture settings: {0}")]
    BadSpec(String),
    /// A NaN or infinity in the activations.
    #[error(transparent)]
    NonFinite(#[from] NumericError),
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn parquet(path: &Path, e: impl std::fmt::Display) -> Self {
        StoreError::Parquet {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }
}

/// The folder of one activation set.
pub fn set_dir(out_dir: &Path, hp: Hookpoint, split: Split) -> PathBuf {
    let d = out_dir.join(hp.to_string());
    match split {
        Split::Train => d,
        Split::Eval => d.join("eval"),
    }
}

/// Rough bytes per captured token on disk for `d_model` and `dtype` (no compression).
pub fn bytes_per_token(d_model: usize, dtype: ActDtype) -> u64 {
    (d_model * dtype.size() + 16) as u64
}

/// Human-readable byte count.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}
