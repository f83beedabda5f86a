//! `local:<dir>` model folders, local data paths/globs, and sharded-weights indexes.
//! Part of [`super`].

use std::path::Path;

use super::{
    HubError, ResolvedDataset, ResolvedModel, CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
};
use crate::data::DataConfig;
use crate::models::pickle::{PT_WEIGHTS_FILE, PT_WEIGHTS_INDEX_FILE};

pub(super) fn resolve_local_dir(dir: &Path) -> Result<ResolvedModel, HubError> {
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
    } else if dir.join(PT_WEIGHTS_FILE).is_file() {
        files.push(dir.join(PT_WEIGHTS_FILE));
    } else if dir.join(PT_WEIGHTS_INDEX_FILE).is_file() {
        let index = dir.join(PT_WEIGHTS_INDEX_FILE);
        for s in shard_names(&index)? {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(err(format!(
                    "shard {s} listed in {PT_WEIGHTS_INDEX_FILE} is missing"
                )));
            }
            files.push(p);
        }
        files.insert(2, index);
    } else {
        return Err(err(format!(
            "none of {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE}, {PT_WEIGHTS_FILE}, {PT_WEIGHTS_INDEX_FILE} is there"
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

/// The shard file names a `model.safetensors.index.json` lists, sorted, deduplicated and
/// checked to stay inside the folder: the loader's own check
/// ([`crate::models::index_shard_names`]), so capture and trace refuse the same entries.
pub fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    Ok(crate::models::index_shard_names(index)?)
}

pub(super) fn resolve_local_data(data: &DataConfig) -> Result<ResolvedDataset, HubError> {
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
                            "{}: text is read from .txt, .jsonl or .parquet files; list only those in data.files (e.g. \"<dir>/*.jsonl\" instead of \"{pat}\")",
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
