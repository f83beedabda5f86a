//! Resolve model and dataset sources to local paths: hub repos through `hf-hub` (pinned
//! revisions, the standard cache, offline mode), `local:<dir>` and `gguf:<file>` checked
//! and passed through. Implements `../shared/specs/pipeline.md` §1 (`saepipe download`),
//! §2 and §5; STYLE.md §2.5 (download progress through [`crate::report`]).
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
//! when the repo has an index, else `model.safetensors`; `.bin`-only repos are refused
//! (we load safetensors only). `tokenizer_config.json` is fetched when the repo has it.
//! Decision: hub errors are told apart by the hub's `X-Error-Code` header
//! (`RevisionNotFound`, `EntryNotFound`, `RepoNotFound`, `GatedRepo`).

pub mod cache;
mod manifest;

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};

pub use cache::{default_cache_dir, CachedRepo, RepoKind};
pub use manifest::{download, read_manifest, DownloadManifest, MANIFEST_FILE};

use crate::config::{DataConfig, ModelSource};
use crate::report::{Progress, Reporter};

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
    /// The repo has no safetensors weights.
    #[error("model repo {repo} at revision {revision} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; saepipe loads safetensors weights only")]
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
    /// A sharded-weights index that cannot be used.
    #[error("{path}: bad sharded-weights index: {message}")]
    BadIndex { path: PathBuf, message: String },
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
    /// `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = default_cache_dir();
        let token = env("HF_TOKEN").or_else(|| hf_hub::Cache::new(cache_dir.clone()).token());
        Self {
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string()),
            cache_dir,
            token,
            offline: env("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && v.to_lowercase() != "false"),
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
                    None if opts.offline => return Err(f.not_cached(WEIGHTS_FILE)),
                    None => {
                        return Err(HubError::NoWeights {
                            repo: repo.clone(),
                            revision: revision.clone(),
                        })
                    }
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

fn resolve_local_dir(dir: &Path) -> Result<ResolvedModel, HubError> {
    let err = |message: String| HubError::LocalModel {
        dir: dir.to_path_buf(),
        message,
    };
    if !dir.is_dir() {
        return Err(err("no such folder (give a folder in Hugging Face layout: config.json, tokenizer.json, model.safetensors or a sharded index)".into()));
    }
    let mut files = Vec::new();
    for name in [CONFIG_FILE, TOKENIZER_FILE] {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(err(format!("{name} is missing")));
        }
        files.push(p);
    }
    let tc = dir.join(TOKENIZER_CONFIG_FILE);
    if tc.is_file() {
        files.push(tc);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        for s in shard_names(&index)? {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(err(format!(
                    "shard {s} listed in {WEIGHTS_INDEX_FILE} is missing"
                )));
            }
            files.push(p);
        }
        files.insert(2, index);
    } else if dir.join(WEIGHTS_FILE).is_file() {
        files.push(dir.join(WEIGHTS_FILE));
    } else {
        return Err(err(format!(
            "neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} is there"
        )));
    }
    Ok(ResolvedModel {
        kind: "local".into(),
        path: dir.to_path_buf(),
        repo: None,
        revision: None,
        commit: None,
        files,
    })
}

/// The shard file names a `model.safetensors.index.json` lists, sorted, deduplicated.
pub fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |message: String| HubError::BadIndex {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|source| HubError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut names = std::collections::BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
        let ok = !f.is_empty()
            && !f.starts_with('/')
            && !f.split(['/', '\\']).any(|c| c == ".." || c.is_empty());
        if !ok {
            return Err(bad(format!(
                "shard name '{f}' is not a plain relative file name"
            )));
        }
        names.insert(f.to_string());
    }
    if names.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(names.into_iter().collect())
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

fn resolve_local_data(data: &DataConfig) -> Result<ResolvedDataset, HubError> {
    let mut files = std::collections::BTreeSet::new();
    for pat in &data.files {
        let paths = glob::glob(pat).map_err(|e| HubError::LocalData {
            message: format!("'{pat}' is not a valid glob: {e}"),
        })?;
        let mut n = 0;
        for p in paths.flatten() {
            if p.is_file() {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                if !["txt", "jsonl", "parquet"].contains(&ext) {
                    return Err(HubError::LocalData {
                        message: format!(
                            "{}: text is read from .txt, .jsonl or .parquet files",
                            p.display()
                        ),
                    });
                }
                files.insert(p);
                n += 1;
            }
        }
        if n == 0 {
            return Err(HubError::LocalData {
                message: format!(
                    "'{pat}' matches no file (paths are relative to the working directory {})",
                    std::env::current_dir()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default()
                ),
            });
        }
    }
    Ok(ResolvedDataset {
        repo: None,
        revision: None,
        commit: None,
        files: files.into_iter().collect(),
        text_column: data.text_column.clone(),
    })
}

/// Fetches files of one repo at one revision: cache first, then (unless offline) the hub.
struct Fetcher<'a> {
    opts: &'a HubOptions,
    kind: RepoKind,
    repo: &'a str,
    revision: &'a str,
    cached: CachedRepo,
    api: Option<Api>,
    reporter: &'a dyn Reporter,
}

impl<'a> Fetcher<'a> {
    fn new(
        opts: &'a HubOptions,
        kind: RepoKind,
        repo: &'a str,
        revision: &'a str,
        reporter: &'a dyn Reporter,
    ) -> Result<Self, HubError> {
        let api = if opts.offline {
            None
        } else {
            Some(opts.api()?)
        };
        Ok(Self {
            opts,
            kind,
            repo,
            revision,
            cached: CachedRepo::new(&opts.cache_dir, kind, repo),
            api,
            reporter,
        })
    }

    fn api_repo(&self, api: &Api) -> hf_hub::api::sync::ApiRepo {
        api.repo(hf_hub::Repo::with_revision(
            self.repo.to_string(),
            self.kind.hf(),
            self.revision.to_string(),
        ))
    }

    fn not_cached(&self, file: &str) -> HubError {
        HubError::NotCached {
            kind: self.kind,
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
            cache: self.opts.cache_dir.clone(),
        }
    }

    /// A required file.
    fn get(&self, file: &str) -> Result<PathBuf, HubError> {
        match self.fetch(file)? {
            Some(p) => Ok(p),
            None if self.api.is_none() => Err(self.not_cached(file)),
            None => Err(HubError::FileNotFound {
                kind: self.kind,
                repo: self.repo.to_string(),
                revision: self.revision.to_string(),
                file: file.to_string(),
            }),
        }
    }

    /// A file the repo may lack: `None` when the hub says it is not there (online) or
    /// the cache lacks it (offline).
    fn get_optional(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        self.fetch(file)
    }

    fn fetch(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        if let Some(p) = self.cached.file(self.revision, file) {
            tracing::debug!(
                repo = self.repo,
                revision = self.revision,
                file,
                "cache hit"
            );
            return Ok(Some(p));
        }
        if self.cached.known_missing(self.revision, file) {
            return Ok(None);
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        tracing::info!(
            repo = self.repo,
            revision = self.revision,
            file,
            "downloading"
        );
        let progress = HubProgress {
            reporter: self.reporter,
            bar: None,
        };
        match self.api_repo(api).download_with_progress(file, progress) {
            Ok(p) => Ok(Some(p)),
            Err(e) => match self.classify(file, e) {
                Err(HubError::FileNotFound { .. }) => Ok(None),
                Err(e) => Err(e),
                Ok(never) => match never {},
            },
        }
    }

    /// Every file of the repo at the revision (hub API listing, or the cached snapshot
    /// when offline).
    fn list(&self) -> Result<Vec<String>, HubError> {
        let Some(api) = &self.api else {
            return Ok(self.cached.list(self.revision));
        };
        let info =
            self.api_repo(api)
                .info()
                .map_err(|e| match self.classify("(repo listing)", e) {
                    Err(e) => e,
                    Ok(never) => match never {},
                })?;
        let mut names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        names.sort();
        Ok(names)
    }

    /// Turn an hf-hub error into ours, reading the hub's `X-Error-Code`.
    fn classify(&self, file: &str, e: ApiError) -> Result<std::convert::Infallible, HubError> {
        let (repo, revision) = (self.repo.to_string(), self.revision.to_string());
        if let ApiError::RequestError(boxed) = &e {
            if let ureq::Error::Status(status, resp) = boxed.as_ref() {
                let code = resp.header("x-error-code").unwrap_or("").to_string();
                return Err(match (*status, code.as_str()) {
                    (404, "RevisionNotFound") => HubError::RevisionNotFound {
                        kind: self.kind,
                        repo,
                        revision,
                        file: file.to_string(),
                    },
                    (404, "EntryNotFound") => {
                        // Remember the absence (the 404 names the commit), so that a second
                        // run asks nothing.
                        if let Some(commit) = resp.header("x-repo-commit") {
                            self.cached.mark_missing(commit, file);
                            let _ = write_ref(&self.cached, self.revision, commit);
                        }
                        HubError::FileNotFound {
                            kind: self.kind,
                            repo,
                            revision,
                            file: file.to_string(),
                        }
                    }
                    (401 | 403 | 404, _) if code != "EntryNotFound" => HubError::RepoNotFound {
                        kind: self.kind,
                        repo,
                        status: *status,
                        code: if code.is_empty() {
                            String::new()
                        } else {
                            format!(" {code}")
                        },
                    },
                    _ => HubError::Download {
                        kind: self.kind,
                        repo,
                        revision,
                        file: file.to_string(),
                        endpoint: self.opts.endpoint.clone(),
                        message: format!("HTTP {status} {code}"),
                    },
                });
            }
        }
        Err(HubError::Download {
            kind: self.kind,
            repo,
            revision,
            file: file.to_string(),
            endpoint: self.opts.endpoint.clone(),
            message: e.to_string(),
        })
    }
}

/// Record that `revision` is `commit` (hf-hub does this only after a download).
fn write_ref(cached: &CachedRepo, revision: &str, commit: &str) -> std::io::Result<()> {
    if cache::is_commit(revision) {
        return Ok(());
    }
    let p = cached.dir.join("refs").join(revision);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(p, commit)
}

/// hf-hub's progress callbacks → one [`Reporter`] task per file.
struct HubProgress<'a> {
    reporter: &'a dyn Reporter,
    bar: Option<Box<dyn Progress>>,
}

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls init again before resuming a partial file; keep one bar.
        match &self.bar {
            Some(bar) => bar.set_position(0),
            None => self.bar = Some(self.reporter.start(filename, Some(size as u64))),
        }
    }
    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.advance(size as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
