//! Checking that the shards a manifest lists are the shards on disk (issue 17 item 6): a
//! finished set whose manifest lists a missing, truncated or damaged shard is not "already
//! captured"; capture finds the damaged shards here and captures them again.
//!
//! Decision: the cheap check (every run of capture) compares each listed shard's size with
//! the manifest and reads its footer (row count, config hash); the deep check (`--force`)
//! also decodes every data page, which finds damage that keeps the size and the footer.

use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::manifest::{Manifest, ShardInfo};
use super::reader::read_shard_meta;

/// Why the shard `info` of a set with config hash `hash` in `dir` is not what the manifest
/// says; `None` when it is (as far as the check goes).
pub fn shard_problem(dir: &Path, info: &ShardInfo, hash: &str, deep: bool) -> Option<String> {
    let path = dir.join(&info.file);
    let len = match super::remote::shard_len(&path) {
        Ok(n) => n,
        Err(e) => return Some(format!("cannot be read ({e})")),
    };
    if len != info.bytes {
        return Some(format!(
            "is {len} bytes, but the manifest lists {} bytes",
            info.bytes
        ));
    }
    match read_shard_meta(&path) {
        Err(e) => return Some(format!("has no readable footer ({e})")),
        Ok((meta, rows)) if rows != info.rows || meta.config_hash != hash => {
            return Some(format!(
                "holds {rows} rows of config {}, but the manifest lists {} rows of config {hash}",
                meta.config_hash, info.rows
            ))
        }
        Ok(_) => {}
    }
    if deep {
        let reader = super::remote::open_shard(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                ParquetRecordBatchReaderBuilder::try_new(f)
                    .and_then(|b| b.build())
                    .map_err(|e| e.to_string())
            });
        let mut rows = 0u64;
        match reader {
            Err(e) => return Some(format!("cannot be decoded ({e})")),
            Ok(r) => {
                for batch in r {
                    match batch {
                        Ok(b) => rows += b.num_rows() as u64,
                        Err(e) => return Some(format!("cannot be decoded ({e})")),
                    }
                }
            }
        }
        if rows != info.rows {
            return Some(format!(
                "decodes to {rows} rows, but the manifest lists {}",
                info.rows
            ));
        }
    }
    None
}

/// The listed shards of `m` (the manifest of `dir`) that are not what it says, each with
/// the reason; `deep` also decodes every page.
pub fn damaged_shards(dir: &Path, m: &Manifest, deep: bool) -> Vec<(PathBuf, String)> {
    m.shards
        .iter()
        .filter_map(|s| {
            shard_problem(dir, s, &m.meta.config_hash, deep).map(|why| (dir.join(&s.file), why))
        })
        .collect()
}
