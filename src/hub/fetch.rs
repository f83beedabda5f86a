//! Fetching one repo's files at one revision: the cache first, then (unless offline)
//! hf-hub's sync API, with hub errors told apart by `X-Error-Code` and progress sent to a
//! [`Reporter`]. Part of [`super`].

use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiError};

use super::cache::{self, CachedRepo, RepoKind};
use super::{HubError, HubOptions};
use crate::util::progress::{Progress, Reporter};

/// Fetches files of one repo at one revision: cache first, then (unless offline) the hub.
pub(super) struct Fetcher<'a> {
    opts: &'a HubOptions,
    kind: RepoKind,
    repo: &'a str,
    revision: &'a str,
    pub(super) cached: CachedRepo,
    api: Option<Api>,
    reporter: &'a dyn Reporter,
}

impl<'a> Fetcher<'a> {
    pub(super) fn new(
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

    pub(super) fn not_cached(&self, file: &str) -> HubError {
        HubError::NotCached {
            kind: self.kind,
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
            cache: self.opts.cache_dir.clone(),
        }
    }

    /// A required file.
    pub(super) fn get(&self, file: &str) -> Result<PathBuf, HubError> {
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
    pub(super) fn get_optional(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
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
    pub(super) fn list(&self) -> Result<Vec<String>, HubError> {
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
