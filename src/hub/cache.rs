//! The standard Hugging Face hub cache, read without the network.
//!
//! Layout (shared with Python's `huggingface_hub`): `<cache>/<models|datasets>--org--name/`
//! holding `blobs/<etag>`, `snapshots/<commit>/<file>` (symlinks into blobs) and
//! `refs/<revision>` (a file holding the commit a branch or tag pointed to).
//!
//! Decision: the cache root is `--cache-dir`, else `HF_HUB_CACHE`, else `HF_HOME/hub`,
//! else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, the order
//! `huggingface_hub` uses. hf-hub 0.4.3's own `Cache::from_env` ignores `HF_HUB_CACHE`
//! and panics without a home folder, so the root is computed here.
//! Decision: a revision that is a full commit sha is looked up in `snapshots/<sha>`
//! directly (Python writes no ref for it); anything else goes through `refs/<revision>`.

use std::path::{Path, PathBuf};

/// Which kind of hub repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoKind {
    /// A model repo.
    Model,
    /// A dataset repo.
    Dataset,
}

impl std::fmt::Display for RepoKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

impl RepoKind {
    /// The hf-hub type.
    pub fn hf(self) -> hf_hub::RepoType {
        match self {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        }
    }

    fn folder_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// The hub cache root from the environment (see the module doc for the order).
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE") {
        return p;
    }
    if let Some(home) = env("HF_HOME") {
        return home.join("hub");
    }
    let base = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("huggingface").join("hub")
}

/// Whether `rev` is a full 40-hex commit sha.
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One repo's folder in the cache.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    /// `<cache>/<kind>s--org--name`.
    pub dir: PathBuf,
}

impl CachedRepo {
    /// The cache folder of `repo` of `kind` under `root`.
    pub fn new(root: &Path, kind: RepoKind, repo: &str) -> Self {
        let name = format!("{}--{}", kind.folder_prefix(), repo.replace('/', "--"));
        Self {
            dir: root.join(name),
        }
    }

    /// The commit `revision` resolves to in the cache, if known.
    pub fn commit(&self, revision: &str) -> Option<String> {
        if is_commit(revision) && self.dir.join("snapshots").join(revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let c = text.trim();
        (!c.is_empty()).then(|| c.to_string())
    }

    /// The snapshot folder of `revision`, if the revision is known.
    pub fn snapshot(&self, revision: &str) -> Option<PathBuf> {
        self.commit(revision)
            .map(|c| self.dir.join("snapshots").join(c))
    }

    /// The cached path of `file` at `revision`, if present.
    pub fn file(&self, revision: &str, file: &str) -> Option<PathBuf> {
        let p = self.snapshot(revision)?.join(file);
        // `exists` follows the symlink: a dangling link (blob deleted) is a miss.
        p.exists().then_some(p)
    }

    /// Whether the hub already said that `file` is not in the repo at `revision` (an
    /// empty marker `.no_exist/<commit>/<file>`, as Python's `huggingface_hub` writes).
    pub fn known_missing(&self, revision: &str, file: &str) -> bool {
        let commit = if is_commit(revision) {
            Some(revision.to_string())
        } else {
            self.commit(revision)
        };
        commit.is_some_and(|c| self.dir.join(".no_exist").join(c).join(file).exists())
    }

    /// Remember that `file` is not in the repo at `commit` (best effort).
    pub fn mark_missing(&self, commit: &str, file: &str) {
        let p = self.dir.join(".no_exist").join(commit).join(file);
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(p, b"");
    }

    /// Every file in the snapshot of `revision`, relative, with `/` separators, sorted.
    pub fn list(&self, revision: &str) -> Vec<String> {
        let Some(root) = self.snapshot(revision) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        // `.no_exist` lives beside `snapshots`, so a walk of the snapshot never sees it.
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.exists() {
                    if let Ok(rel) = p.strip_prefix(&root) {
                        let parts: Vec<_> = rel
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy().into_owned())
                            .collect();
                        out.push(parts.join("/"));
                    }
                }
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_refs_and_commit_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = CachedRepo::new(tmp.path(), RepoKind::Model, "org/name");
        assert!(repo.dir.ends_with("models--org--name"));
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let snap = repo.dir.join("snapshots").join(sha);
        std::fs::create_dir_all(snap.join("sub")).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("sub/a.txt"), "a").unwrap();
        assert_eq!(
            repo.file(sha, "config.json"),
            Some(snap.join("config.json"))
        );
        assert_eq!(repo.file("v1", "config.json"), None);
        std::fs::create_dir_all(repo.dir.join("refs")).unwrap();
        std::fs::write(repo.dir.join("refs/v1"), sha).unwrap();
        assert_eq!(
            repo.file("v1", "config.json"),
            Some(snap.join("config.json"))
        );
        assert_eq!(repo.list("v1"), vec!["config.json", "sub/a.txt"]);
        assert_eq!(repo.file(sha, "missing.json"), None);
    }
}
