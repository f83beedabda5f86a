//! Pipeline files (`pipelines/*.toml`): schema, `--set` overrides, validation that reports
//! every problem at once, the resolved config with its hash, and sweep expansion.
//!
//! Implements `../shared/specs/pipeline.md` §2 and STYLE.md §2.6.
//!
//! - [`load`] reads a file, applies `--set key=value` overrides ([`overrides`]), checks
//!   every key ([`parse`], [`validate`]) and every sweep point, and returns a [`Pipeline`].
//! - [`Pipeline::resolved_toml`] is the canonical TOML after overrides and defaults;
//!   [`Pipeline::hash`] its sha256; [`Pipeline::write_resolved`] writes both atomically.
//! - [`Pipeline::points`] are the grid points of `[sweep]` with stable ids ([`sweep`]).
//!
//! Decision: `run.offline` is left out of the hash (it changes where files come from,
//! not what they are), so `--offline` never invalidates finished stages.
//! Decision: the run folder is `<run.data_dir>/<run.name>` (pipeline.md §4); the short
//! hash goes into manifests and Parquet metadata, not into the folder name.

mod arch;
pub mod overrides;
pub mod parse;
mod schema;
pub mod sweep;
mod trainer;
mod validate;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use arch::ArchConfig;
pub use parse::Problem;
pub use schema::*;
pub use sweep::Point;

/// File name of the resolved config in a run folder.
pub const RESOLVED_FILE: &str = "config.resolved.toml";
/// File name of the resolved config's hash in a run folder.
pub const HASH_FILE: &str = "config.hash";

/// Why a pipeline file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the pipeline file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    /// The file (with overrides) has problems; all of them are listed.
    #[error("{path}: {} problem{} in the pipeline file:\n{}", problems.len(), if problems.len() == 1 { "" } else { "s" }, problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    /// The resolved config could not be written.
    #[error("{path}: cannot write the resolved config: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A sweep point id that the pipeline does not have.
    #[error("{path}: no sweep point '{id}'; the points are: {known}")]
    UnknownPoint {
        path: PathBuf,
        id: String,
        known: String,
    },
}

/// A loaded, validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The config after overrides and defaults.
    pub config: PipelineConfig,
    resolved: String,
    hash: String,
    points: Vec<Point>,
}

/// Read `path`, apply `overrides` (`key=value`, as given to `--set`), validate, and
/// expand the sweep. Every problem is reported in one [`ConfigError::Invalid`].
pub fn load(path: impl AsRef<Path>, overrides: &[String]) -> Result<Pipeline, ConfigError> {
    let path = path.as_ref().to_path_buf();
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    from_str(&text, &path, overrides)
}

/// [`load`] from text already read; `path` is used in messages.
pub fn from_str(text: &str, path: &Path, overrides: &[String]) -> Result<Pipeline, ConfigError> {
    let mut raw: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut probs = parse::Problems::default();
    for arg in overrides {
        match overrides::parse_set(arg) {
            Ok(a) => {
                if let Err(e) = overrides::assign(&mut raw, &a.path, a.value.clone()) {
                    probs.add(a.key(), format!("--set {arg}: {e}"));
                }
            }
            Err(e) => probs.add(format!("--set {arg}"), e),
        }
    }
    let config = validate::check(raw, &mut probs);
    let invalid = |probs: parse::Problems| {
        // File order of the sections; `--set` problems first. Stable within a section.
        let mut problems = probs.0;
        problems.sort_by_key(|p| validate::section_rank(&p.key));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        }
    };
    let Some(config) = config.filter(|_| probs.is_empty()) else {
        return Err(invalid(probs));
    };
    let points = sweep::expand(&config, &mut probs);
    if !probs.is_empty() {
        return Err(invalid(probs));
    }
    let (resolved, hash) = canonical(&config);
    Ok(Pipeline {
        path: path.to_path_buf(),
        config,
        resolved,
        hash,
        points,
    })
}

/// The canonical TOML of `config` and its sha256 (hex).
///
/// Decision: the hash is the identity of what is computed, not of where it is kept:
/// `run.offline`, `run.data_dir` and `run.name` are left out, so `./data`, `data/`, an
/// absolute path or a moved or renamed run folder still recognise their finished stages.
pub(crate) fn canonical(config: &PipelineConfig) -> (String, String) {
    let resolved =
        toml::to_string(config).expect("invariant: a PipelineConfig always serializes to TOML");
    let mut for_hash = config.clone();
    for_hash.run.offline = false;
    for_hash.run.data_dir = PathBuf::new();
    for_hash.run.name = String::new();
    let hashed =
        toml::to_string(&for_hash).expect("invariant: a PipelineConfig always serializes to TOML");
    (resolved, sha256_hex(hashed.as_bytes()))
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Pipeline {
    /// The canonical TOML after overrides and defaults (what `config.resolved.toml` holds).
    pub fn resolved_toml(&self) -> &str {
        &self.resolved
    }

    /// sha256 (hex) of the resolved config; recorded in manifests and Parquet metadata.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The first 8 hex digits of [`Pipeline::hash`].
    pub fn short_hash(&self) -> &str {
        &self.hash[..8]
    }

    /// The run's output folder: `<run.data_dir>/<run.name>`; when `run.data_dir` is an
    /// `s3://bucket/prefix` URL, the run's local staging folder
    /// ([`crate::store::remote::staging_dir`]), which [`Pipeline::attach_remote`] keeps in
    /// step with the bucket.
    pub fn run_dir(&self) -> PathBuf {
        let run = &self.config.run;
        match self.remote_url() {
            Some((bucket, prefix)) => {
                crate::store::remote::staging_dir(&bucket, &prefix, &run.name)
            }
            None => run.data_dir.join(&run.name),
        }
    }

    /// `Some((bucket, prefix))` when `run.data_dir` is an `s3://` URL (validated at load).
    pub fn remote_url(&self) -> Option<(String, String)> {
        let d = self.config.run.data_dir.to_string_lossy();
        crate::store::remote::parse_url(&d).ok().flatten()
    }

    /// Connect the run folder to its object store when `run.data_dir` is `s3://…`
    /// (downloads the small files the staging folder lacks; see `store::remote`); a no-op
    /// for a local `run.data_dir`.
    pub fn attach_remote(
        &self,
        reporter: &dyn crate::util::progress::Reporter,
    ) -> Result<(), crate::store::remote::RemoteError> {
        let d = self.config.run.data_dir.to_string_lossy();
        crate::store::remote::attach(&d, &self.config.run.name, &self.run_dir(), reporter)?;
        Ok(())
    }

    /// The parsed model source.
    pub fn model_source(&self) -> crate::models::ModelSource {
        validate::model_source(&self.config.model)
            .expect("invariant: load() validated model.source")
    }

    /// Write `config.resolved.toml` and `config.hash` into `dir`, each atomically.
    pub fn write_resolved(&self, dir: &Path) -> Result<(), ConfigError> {
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            crate::util::fs::atomic_write(&p, text.as_bytes())
                .map_err(|source| ConfigError::Write { path: p, source })
        };
        let header = format!(
            "# Resolved from {} (overrides and defaults applied); sha256 {}\n",
            self.path.display(),
            self.hash
        );
        write(RESOLVED_FILE, &format!("{header}{}", self.resolved))?;
        write(HASH_FILE, &format!("{}\n", self.hash))
    }

    /// The grid points of `[sweep]` (one point, the file itself, when there is no sweep).
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// The point with id `id`.
    pub fn point(&self, id: &str) -> Result<&Point, ConfigError> {
        self.points
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| ConfigError::UnknownPoint {
                path: self.path.clone(),
                id: id.to_string(),
                known: self
                    .points
                    .iter()
                    .map(|p| p.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Check the hookpoints against a loaded model: layer in range and site available.
    /// Call right after the model is resolved, before any forward pass.
    pub fn check_hookpoints(
        &self,
        info: &crate::models::ModelInfo,
        sites: &[crate::models::Site],
    ) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for (i, hp) in self.config.capture.hookpoints.iter().enumerate() {
            let err = if hp.layer >= info.n_layers {
                Some(crate::models::HookpointError::LayerOutOfRange {
                    hookpoint: hp.to_string(),
                    layer: hp.layer,
                    n_layers: info.n_layers,
                })
            } else if !sites.contains(&hp.site) {
                Some(crate::models::HookpointError::SiteUnavailable {
                    hookpoint: hp.to_string(),
                    site: hp.site.to_string(),
                    model_type: info.model_type.clone(),
                    available: sites
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            } else {
                None
            };
            if let Some(e) = err {
                problems.push(Problem {
                    key: format!("capture.hookpoints[{i}]"),
                    message: e.to_string(),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: self.path.clone(),
                problems,
            })
        }
    }
}
