//! Resolve model and dataset sources to local paths: hub repos through `hf-hub` (pinned
//! revisions, the standard cache, offline mode), `local:<dir>` and `gguf:<file>` checked
//! and passed through. Implements `../shared/specs/pipeline.md` §1 (`saepipe download`),
//! §2 and §5; STYLE.md §2.5 (download progress through [`crate::util::progress`]).
//!
//! The protocol is hf-hub 0.4.3's (sync, ureq): for each file a `GET
//! {endpoint}/{repo}/resolve/{revision}/{file}` with `Range: bytes=0-0` (redirects not
//! followed) that must answer `X-Repo-Commit`, `ETag` or `X-Linked-Etag` and
//! `Content-Range: bytes 0-0/<size>` (after an absolute redirect, from the target), then
//! a ranged GET of the body into `blobs/<etag>.part`, renamed to `blobs/<etag>` and
//! linked from `snapshots/<commit>/<file>`. Dataset globs are listed with `GET
//! {endpoint}/api/datasets/{repo}/revision/{revision}` (`siblings[].rfilename`).
//!
//! Decision: a file already in the cache for the pinned revision is used without any
//! request, so a second `download` makes no network traffic at all.
//! Decision: the weights are `model.safetensors.index.json` plus every shard it lists
//! when the repo has an index, else `model.safetensors`; a revision with neither (Pythia's
//! `stepN` branches) gets `pytorch_model.bin.index.json` and its shards, else
//! `pytorch_model.bin`, chosen from the hub's file list of the revision, and loaded by
//! `models::pickle` (tensors only, no pickled code is run). `tokenizer_config.json` is
//! fetched when the repo has it.
//! Decision: hub errors are told apart by the hub's `X-Error-Code` header
//! (`RevisionNotFound`, `EntryNotFound`, `RepoNotFound`, `GatedRepo`).

pub mod cache;
mod fetch;
mod local;

use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder};

use fetch::Fetcher;
pub use local::shard_names;
use local::{resolve_local_data, resolve_local_dir};

pub use cache::{default_cache_dir, CachedRepo, RepoKind};

use crate::data::DataConfig;
use crate::models::ModelSource;
use crate::util::progress::Reporter;

/// Files of a Hugging Face model folder that the loaders need.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer (tokenizers' JSON format).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Optional: special-token settings (BOS/EOS names, `add_bos_token`).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Unsharded weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

const FIX_OFFLINE: &str =
    "run `saepipe download <pipeline.toml>` with network access, or drop --offline";

/// Why a source could not be resolved. Every message names the repo, revision and file,
/// and the fix.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A hub model source without a revision.
    #[error("model repo {repo} has no pinned revision; write it as {repo}@<commit sha or tag> (or set model.revision in the pipeline file)")]
    Unpinned {
        /// `org/name`.
        repo: String,
    },
    /// Offline, and a needed file is not in the cache.
    #[error("offline: {kind} repo {repo} at revision {revision}: {file} is not in the hub cache {cache}; {FIX_OFFLINE}", cache = cache.display())]
    NotCached {
        kind: RepoKind,
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },
    /// The hub says the revision does not exist.
    #[error("revision '{revision}' does not exist in {kind} repo {repo} (hub answered 404 RevisionNotFound for {file}); check the pinned revision (a commit sha or tag of {repo})")]
    RevisionNotFound {
        kind: RepoKind,
        repo: String,
        revision: String,
        file: String,
    },
    /// The hub says the repo does not exist or needs access.
    #[error("{kind} repo {repo} was not found or needs access (HTTP {status}{code}); check the repo id, or set HF_TOKEN for gated/private repos")]
    RepoNotFound {
        kind: RepoKind,
        repo: String,
        status: u16,
        code: String,
    },
    /// The file is not in the repo at that revision.
    #[error("{kind} repo {repo} at revision {revision} has no file {file}")]
    FileNotFound {
        kind: RepoKind,
        repo: String,
        revision: String,
        file: String,
    },
    /// The repo has neither safetensors nor PyTorch weights.
    #[error("model repo {repo} at revision {revision} has none of {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE}, pytorch_model.bin, pytorch_model.bin.index.json; saepipe loads safetensors or PyTorch zip checkpoints")]
    NoWeights { repo: String, revision: String },
    /// Any other download failure (network, HTTP status, bad headers).
    #[error("downloading {file} from {kind} repo {repo} at revision {revision} (endpoint {endpoint}): {message}")]
    Download {
        kind: RepoKind,
        repo: String,
        revision: String,
        file: String,
        endpoint: String,
        message: String,
    },
    /// Files of one model came from different snapshots (the revision moved meanwhile).
    #[error("model repo {repo} at revision {revision}: files came from different commits ({a} and {b}); pin a commit sha")]
    MixedSnapshots {
        repo: String,
        revision: String,
        a: String,
        b: String,
    },
    /// A sharded-weights index that cannot be used (the loader's error, shared).
    #[error(transparent)]
    BadIndex(#[from] crate::models::IndexError),
    /// A `local:` folder that is missing or incomplete.
    #[error("model source local:{dir}: {message}", dir = dir.display())]
    LocalModel { dir: PathBuf, message: String },
    /// A `gguf:` file that is missing.
    #[error("model source gguf:{file}: {message}", file = file.display())]
    GgufModel { file: PathBuf, message: String },
    /// A local data path or glob that matches nothing usable.
    #[error("data.files: {message}")]
    LocalData { message: String },
    /// A hub dataset glob that matches no file.
    #[error("dataset repo {repo} at revision {revision}: '{pattern}' matches no file (the repo has: {available})")]
    NoMatch {
        repo: String,
        revision: String,
        pattern: String,
        available: String,
    },
    /// Reading or writing a local file failed.
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The hub client could not be built.
    #[error("cannot set up the hub client: {0}")]
    Client(String),
}

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Hub URL, default `https://huggingface.co` (env `HF_ENDPOINT`).
    pub endpoint: String,
    /// Cache root (see [`default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Access token for gated/private repos (env `HF_TOKEN`, else the cache's token file).
    pub token: Option<String>,
    /// Cache only; never touch the network.
    pub offline: bool,
}

impl HubOptions {
    /// Options from the environment: `HF_ENDPOINT`, `HF_HUB_CACHE`/`HF_HOME`, `HF_TOKEN`,
    /// `HF_HUB_OFFLINE` (`1`/`true`/`yes`/`on` in any case, as the hub reads it).
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = default_cache_dir();
        let token = env("HF_TOKEN").or_else(|| hf_hub::Cache::new(cache_dir.clone()).token());
        Self {
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string()),
            cache_dir,
            token,
            offline: crate::util::env::flag("HF_HUB_OFFLINE"),
        }
    }

    fn api(&self) -> Result<Api, HubError> {
        ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.trim_end_matches('/').to_string())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| HubError::Client(e.to_string()))
    }
}

/// A model resolved to local paths.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedModel {
    /// `hub`, `local` or `gguf`.
    pub kind: String,
    /// The folder in Hugging Face layout (hub snapshot or local dir), or the GGUF file:
    /// what `models::load_dir` / `models::load_gguf` take.
    pub path: PathBuf,
    /// Hub repo id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Pinned revision as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The commit it resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Every file resolved (config, tokenizer, weights/shards), absolute or as given.
    pub files: Vec<PathBuf>,
}

/// Dataset files resolved to local paths.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedDataset {
    /// Hub dataset repo id (absent for local files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Pinned revision as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The commit it resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The text files, in a stable (sorted) order.
    pub files: Vec<PathBuf>,
    /// Column holding the text (jsonl/parquet).
    pub text_column: String,
}

/// Resolve a model source to local paths, downloading hub files unless offline.
pub fn resolve_model(
    source: &ModelSource,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<ResolvedModel, HubError> {
    match source {
        ModelSource::Local { dir } => resolve_local_dir(dir),
        ModelSource::Gguf { file } => {
            if !file.is_file() {
                return Err(HubError::GgufModel {
                    file: file.clone(),
                    message: "no such file (give the path of a .gguf file, relative to the working directory)".into(),
                });
            }
            Ok(ResolvedModel {
                kind: "gguf".into(),
                path: file.clone(),
                repo: None,
                revision: None,
                commit: None,
                files: vec![file.clone()],
            })
        }
        ModelSource::Hub { repo, revision } => {
            let Some(revision) = revision else {
                return Err(HubError::Unpinned { repo: repo.clone() });
            };
            let f = Fetcher::new(opts, RepoKind::Model, repo, revision, reporter)?;
            let mut files = vec![f.get(CONFIG_FILE)?, f.get(TOKENIZER_FILE)?];
            if let Some(p) = f.get_optional(TOKENIZER_CONFIG_FILE)? {
                files.push(p);
            }
            match f.get_optional(WEIGHTS_INDEX_FILE)? {
                Some(index) => {
                    let shards = shard_names(&index)?;
                    files.push(index);
                    for s in shards {
                        files.push(f.get(&s)?);
                    }
                }
                None => match f.get_optional(WEIGHTS_FILE)? {
                    Some(p) => files.push(p),
                    None => files.extend(pytorch_weights(&f, opts, repo, revision)?),
                },
            }
            // All files must sit in one snapshot folder so that the loader sees one model.
            let commit = f.cached.commit(revision);
            let dir = f.cached.snapshot(revision).unwrap_or_default();
            if let Some(stray) = files.iter().find(|p| !p.starts_with(&dir)) {
                return Err(HubError::MixedSnapshots {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    a: dir.display().to_string(),
                    b: stray.display().to_string(),
                });
            }
            Ok(ResolvedModel {
                kind: "hub".into(),
                path: dir,
                repo: Some(repo.clone()),
                revision: Some(revision.clone()),
                commit,
                files,
            })
        }
    }
}

/// The PyTorch weights of a repo without safetensors (Pythia's `stepN` branches): what the
/// hub's file list for the revision (the cached snapshot when offline) has, the index and
/// its shards first, else `pytorch_model.bin`. They are loaded by `models::pickle`, which
/// never runs pickled code.
fn pytorch_weights(
    f: &Fetcher,
    opts: &HubOptions,
    repo: &str,
    revision: &str,
) -> Result<Vec<PathBuf>, HubError> {
    use crate::models::pickle::{PT_WEIGHTS_FILE, PT_WEIGHTS_INDEX_FILE};
    // The cache answers without a request when an earlier download fetched them.
    let cached = [PT_WEIGHTS_INDEX_FILE, PT_WEIGHTS_FILE]
        .into_iter()
        .find(|n| f.cached.file(revision, n).is_some());
    let pick = match cached {
        Some(n) => Some(n),
        None if opts.offline => return Err(f.not_cached(WEIGHTS_FILE)),
        None => {
            let listing = f.list()?;
            [PT_WEIGHTS_INDEX_FILE, PT_WEIGHTS_FILE]
                .into_iter()
                .find(|n| listing.iter().any(|l| l == n))
        }
    };
    match pick {
        Some(PT_WEIGHTS_INDEX_FILE) => {
            let index = f.get(PT_WEIGHTS_INDEX_FILE)?;
            let mut files = Vec::new();
            for s in shard_names(&index)? {
                files.push(f.get(&s)?);
            }
            files.insert(0, index);
            Ok(files)
        }
        Some(n) => Ok(vec![f.get(n)?]),
        None => Err(HubError::NoWeights {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }),
    }
}

/// Resolve the dataset of `[data]`: local paths/globs, or hub dataset files.
pub fn resolve_dataset(
    data: &DataConfig,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<ResolvedDataset, HubError> {
    let Some(repo) = &data.repo else {
        return resolve_local_data(data);
    };
    let revision = data.revision.clone().unwrap_or_default();
    let f = Fetcher::new(opts, RepoKind::Dataset, repo, &revision, reporter)?;
    let is_glob = |p: &str| p.contains(['*', '?', '[']);
    let mut names = std::collections::BTreeSet::new();
    if data.files.iter().any(|p| is_glob(p)) {
        let listing = f.list()?;
        for pat in &data.files {
            if !is_glob(pat) {
                names.insert(pat.clone());
                continue;
            }
            let matched = match_names(pat, &listing);
            if matched.is_empty() {
                if opts.offline {
                    return Err(f.not_cached(pat));
                }
                return Err(HubError::NoMatch {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    pattern: pat.clone(),
                    available: preview(&listing),
                });
            }
            names.extend(matched);
        }
    } else {
        names.extend(data.files.iter().cloned());
    }
    let mut files = Vec::new();
    for n in &names {
        files.push(f.get(n)?);
    }
    let commit = f.cached.commit(&revision);
    Ok(ResolvedDataset {
        repo: Some(repo.clone()),
        revision: Some(revision),
        commit,
        files,
        text_column: data.text_column.clone(),
    })
}

fn preview(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(20)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 20 {
        s.push_str(&format!(", ... ({} files)", names.len()));
    }
    if s.is_empty() {
        s.push_str("no files");
    }
    s
}

fn match_names(pattern: &str, names: &[String]) -> Vec<String> {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    match glob::Pattern::new(pattern) {
        Ok(p) => names
            .iter()
            .filter(|n| p.matches_with(n, opts))
            .cloned()
            .collect(),
        Err(_) => Vec::new(),
    }
}
