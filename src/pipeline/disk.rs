//! The capture's disk arithmetic (issue 14 item 4) and its check: `saepipe run` /
//! `capture` refuse a keep-everything capture that cannot fit on the data_dir filesystem;
//! `saepipe plan` ([`super::plan`]) prints the same figures.
//!
//! Decision: windows are `⌈tokens / (context_len − BOS)⌉`, a lower bound: every excluded
//! separator (short documents) adds a position and possibly a window; the bytes depend
//! only on the token budgets, which are exact.
//! Decision: a shard's bytes are `rows × (d_model × dtype bytes + 16)` (the `act` values
//! plus `seq`, `pos`, `token_id`, [`bytes_per_token`]) plus [`SHARD_OVERHEAD`] for the
//! Parquet footer, page headers and list levels; compression (off by default) only
//! shrinks it.
//! Decision: the free-space figure is `statvfs`'s `f_bavail × f_frsize` (`fs2`) of the
//! nearest existing folder above the activations folder. `SAEPIPE_TEST_FREE_BYTES`
//! replaces it (a test hook for machines where the tests cannot mount a small tmpfs).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{Pipeline, PipelineConfig};
use crate::data::Split;
use crate::store::{bytes_per_token, human_bytes, set_dir};

/// Parquet overhead of one shard beyond its rows (footer, metadata, page headers, levels).
pub const SHARD_OVERHEAD: u64 = 64 << 10;

/// Overrides the free bytes of the data_dir filesystem (test hook).
pub const FREE_BYTES_ENV: &str = "SAEPIPE_TEST_FREE_BYTES";

/// The arithmetic of one (hookpoint, split) activation set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetPlan {
    /// Rows (tokens kept).
    pub tokens: u64,
    /// Windows (lower bound, module doc).
    pub windows: u64,
    /// Shards (from the windows).
    pub shards: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// Positions a window keeps at most (BOS excluded when it is prepended and excluded).
fn kept_per_window(c: &PipelineConfig) -> u64 {
    let bos = (c.data.prepend_bos && c.capture.exclude_special_tokens) as u64;
    (c.data.context_len as u64).saturating_sub(bos).max(1)
}

/// Windows per shard (what the capture stage uses).
pub fn shard_windows(c: &PipelineConfig) -> u64 {
    (c.capture.shard_tokens / c.data.context_len.max(1) as u64).max(1)
}

/// The plan of one activation set of `tokens` rows of width `d`.
pub fn set_plan(c: &PipelineConfig, d: usize, tokens: u64) -> SetPlan {
    if tokens == 0 {
        return SetPlan {
            tokens,
            windows: 0,
            shards: 0,
            bytes: 0,
        };
    }
    let windows = tokens.div_ceil(kept_per_window(c));
    let shards = windows.div_ceil(shard_windows(c));
    SetPlan {
        tokens,
        windows,
        shards,
        bytes: tokens * bytes_per_token(d, c.capture.dtype) + shards * SHARD_OVERHEAD,
    }
}

/// Rows of each shard of a set of `tokens` rows, as the plan estimates them: full shards of
/// `windows per shard × rows per window` and a last partial one (an upper bound per shard,
/// like the windows: excluded separators shorten a window). What `saepipe plan` hands to
/// the streamed chunk plan ([`super::stream::stream_plan`]) in place of the measured rows.
pub fn planned_shard_rows(c: &PipelineConfig, tokens: u64) -> Vec<u64> {
    let per = shard_windows(c) * kept_per_window(c);
    let full = tokens / per;
    let mut rows = vec![per; full as usize];
    if !tokens.is_multiple_of(per) {
        rows.push(tokens % per);
    }
    rows
}

/// Bytes every hookpoint's training and held-out sets take with `capture.keep = true`.
pub fn capture_bytes(c: &PipelineConfig, d: usize) -> u64 {
    let n_hp = c.capture.hookpoints.len() as u64;
    n_hp * (set_plan(c, d, c.data.n_tokens).bytes + set_plan(c, d, c.data.eval_tokens).bytes)
}

/// The least disk a streamed capture (`capture.keep = false`, `capture.disk_budget_bytes`)
/// can run in: the held-out split of every hookpoint plus two training shards of each.
pub fn streamed_min_bytes(c: &PipelineConfig, d: usize) -> u64 {
    let n_hp = c.capture.hookpoints.len() as u64;
    let shard_rows = (shard_windows(c) * kept_per_window(c)).min(c.data.n_tokens);
    n_hp * (set_plan(c, d, c.data.eval_tokens).bytes
        + 2 * (shard_rows * bytes_per_token(d, c.capture.dtype) + SHARD_OVERHEAD))
}

/// Free bytes for unprivileged writers on the filesystem holding `path` (or its nearest
/// existing parent); [`FREE_BYTES_ENV`] overrides it.
pub fn free_bytes(path: &Path) -> Result<u64> {
    if let Ok(v) = std::env::var(FREE_BYTES_ENV) {
        return v
            .trim()
            .parse()
            .with_context(|| format!("{FREE_BYTES_ENV}={v} is not a byte count"));
    }
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            p = PathBuf::from(".");
            break;
        }
    }
    if p.as_os_str().is_empty() {
        p = PathBuf::from(".");
    }
    fs2::available_space(&p).with_context(|| format!("reading the free space of {}", p.display()))
}

/// Bytes of the part files already in the pipeline's activation sets (a resumed capture
/// needs only the rest).
fn existing_bytes(pipeline: &Pipeline, acts: &Path) -> u64 {
    let mut total = 0;
    for &hp in &pipeline.config.capture.hookpoints {
        for split in [Split::Train, Split::Eval] {
            let Ok(rd) = std::fs::read_dir(set_dir(acts, hp, split)) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("part-") && name.ends_with(".parquet") {
                    total += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
    }
    total
}

/// Refuse a keep-everything capture whose missing shards cannot fit on the data_dir
/// filesystem, naming the shortfall and the settings that fix it. `acts` is the
/// pipeline's activations folder.
pub fn check_capture_space(pipeline: &Pipeline, acts: &Path, d_model: usize) -> Result<()> {
    let c = &pipeline.config;
    let need = capture_bytes(c, d_model).saturating_sub(existing_bytes(pipeline, acts));
    if need == 0 {
        return Ok(());
    }
    let free = free_bytes(acts)?;
    if need <= free {
        return Ok(());
    }
    bail!(
        "{}: the capture needs about {} more on the filesystem of {} but only {} is free (short by {}); \
         stream instead with `--set capture.keep=false --set capture.disk_budget_bytes={}` (at least {}), \
         lower data.n_tokens or use capture.dtype = \"f16\", or put the run on a larger filesystem with `--set run.data_dir=<dir>`",
        pipeline.path.display(),
        human_bytes(need),
        acts.display(),
        human_bytes(free),
        human_bytes(need - free),
        streamed_min_bytes(c, d_model).max(free.saturating_sub(free / 10)),
        human_bytes(streamed_min_bytes(c, d_model)),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn shard_bytes_are_rows_times_width_plus_overhead() {
        let text = std::fs::read_to_string("pipelines/smoke.toml").unwrap();
        let p = crate::config::from_str(&text, std::path::Path::new("smoke.toml"), &[]).unwrap();
        let c = &p.config;
        let s = super::set_plan(c, 64, 4096);
        // context 32 with BOS excluded: 31 rows per window.
        assert_eq!(s.windows, 4096u64.div_ceil(31));
        assert_eq!(
            s.bytes,
            4096 * (64 * 4 + 16) + s.shards * super::SHARD_OVERHEAD
        );
        // One shard holds the whole budget: streaming saves nothing; small shards do.
        assert!(super::streamed_min_bytes(c, 64) >= super::capture_bytes(c, 64));
        let small = ["capture.shard_tokens=512".to_string()];
        let p = crate::config::from_str(&text, std::path::Path::new("smoke.toml"), &small).unwrap();
        assert!(super::streamed_min_bytes(&p.config, 64) < super::capture_bytes(&p.config, 64));
        // 512-token shards of 32-token windows: 16 windows of 31 rows = 496 rows a shard.
        let rows = super::planned_shard_rows(&p.config, 4096);
        assert_eq!(rows.len() as u64, 4096u64.div_ceil(496));
        assert_eq!(rows.iter().sum::<u64>(), 4096);
        assert!(rows[..rows.len() - 1].iter().all(|&r| r == 496));
    }
}
