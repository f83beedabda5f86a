//! `saepipe inspect <path>`: schema, metadata and a summary of any file saepipe writes.
//!
//! Implements the `inspect` row of `../shared/specs/pipeline.md` §1. Dispatches on what
//! the path is: an activation set folder (`manifest.json`), an unfinished capture folder
//! (shards but no manifest), one activation shard, an SAE folder or a unit's `metrics.json`
//! ([`super::inspect_sae`]), or any other Parquet file (schema, metadata, rows).
//!
//! Decision: activation summaries stream every row once with f64 accumulators (per
//! dimension Σx and Σx²) and keep a seeded reservoir of at most 100 000 row norms for the
//! percentiles, so memory does not grow with the set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::{Rng, SeedableRng};

use crate::store::manifest::{Manifest, MANIFEST};
use crate::store::reader::{read_shard_meta, SeqReader};
use crate::store::StoreError;

/// Why a path could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Nothing we know how to read.
    #[error("{0}: not something saepipe writes (expected an activation folder with manifest.json, a part-*.parquet shard, an SAE folder with cfg.json and sae_weights.safetensors, a metrics.json or another .parquet file)")]
    Unknown(PathBuf),
    /// An SAE folder's file that cannot be read.
    #[error(transparent)]
    Sae(#[from] super::inspect_sae::SaeInspectError),
    /// Reading an activation set or shard failed.
    #[error(transparent)]
    Capture(#[from] StoreError),
    /// Reading a generic Parquet file failed.
    #[error("{path}: {msg}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The reader's message.
        msg: String,
    },
}

/// Inspect `path` and return the report text.
pub fn inspect(path: &Path) -> Result<String, InspectError> {
    if path.is_dir() {
        if path.join(MANIFEST).is_file() {
            return inspect_set(path);
        }
        if super::inspect_sae::is_sae_dir(path) {
            return Ok(super::inspect_sae::inspect_sae(path)?);
        }
        let parts = list_part_files(path);
        if !parts.is_empty() {
            let mut out = format!(
                "{}: unfinished capture (no {MANIFEST}); {} shard(s) present\n",
                path.display(),
                parts.len()
            );
            out.push_str(&summarise_shards(&parts)?);
            return Ok(out);
        }
        return Err(InspectError::Unknown(path.to_path_buf()));
    }
    if super::inspect_sae::is_metrics_file(path) {
        let m = super::inspect_sae::render_metrics(path)?;
        return Ok(format!(
            "{}: metrics of one evaluated SAE\n{m}",
            path.display()
        ));
    }
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if !path.is_file() || !is_parquet {
        return Err(InspectError::Unknown(path.to_path_buf()));
    }
    if read_shard_meta(path).is_ok() {
        let mut out = format!("{}: activation shard\n", path.display());
        out.push_str(&summarise_shards(&[path.to_path_buf()])?);
        return Ok(out);
    }
    generic_parquet(path)
}

fn list_part_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn inspect_set(dir: &Path) -> Result<String, InspectError> {
    let m = Manifest::read(dir)?.ok_or_else(|| InspectError::Unknown(dir.to_path_buf()))?;
    let mut out = String::new();
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let _ = writeln!(
        out,
        "{}: activation set ({} split), {} shard(s), {} rows, {} windows, {} on disk ({:.1} B/token)",
        dir.display(),
        m.meta.split,
        m.shards.len(),
        m.n_tokens,
        m.n_windows,
        crate::store::human_bytes(bytes),
        bytes as f64 / m.n_tokens.max(1) as f64
    );
    let _ = writeln!(
        out,
        "split: {} (seed {}, eval_fraction {})",
        m.split_method, m.seed, m.eval_fraction
    );
    if dir.join("eval").join(MANIFEST).is_file() {
        let _ = writeln!(out, "held-out set: {}", dir.join("eval").display());
    }
    let set = crate::store::reader::ActivationSet::open(dir, &Default::default())?;
    out.push_str(&summarise_shards(&set.shard_paths())?);
    Ok(out)
}

/// Schema + metadata of the first shard, then statistics over all of them.
fn summarise_shards(paths: &[PathBuf]) -> Result<String, InspectError> {
    let mut out = String::new();
    let first = &paths[0];
    let (meta, _) = read_shard_meta(first)?;
    let file = File::open(first).map_err(|e| StoreError::io(first, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| StoreError::Corrupt {
        path: first.clone(),
        msg: e.to_string(),
    })?;
    out.push_str("schema:\n");
    for f in b.schema().fields() {
        let _ = writeln!(out, "  {}: {}", f.name(), f.data_type());
    }
    out.push_str("metadata:\n");
    let sorted: BTreeMap<_, _> = b.schema().metadata().clone().into_iter().collect();
    for (k, v) in sorted.iter().filter(|(k, _)| k.as_str() != "ARROW:schema") {
        let _ = writeln!(out, "  {k} = {v}");
    }
    let stats = ActStats::collect(
        SeqReader::new(paths.to_vec(), meta.d_model, 8192),
        meta.d_model,
    )?;
    out.push_str(&stats.render());
    Ok(out)
}

/// Streaming per-dimension and per-row statistics of activations.
pub struct ActStats {
    /// Rows seen.
    pub rows: u64,
    /// Per-dimension Σx.
    pub sum: Vec<f64>,
    /// Per-dimension Σx².
    pub sumsq: Vec<f64>,
    /// Reservoir sample of row L2 norms.
    pub norms: Vec<f32>,
}

const RESERVOIR: usize = 100_000;

impl ActStats {
    /// Read every batch of `reader` (width `d`).
    pub fn collect(reader: SeqReader, d: usize) -> Result<Self, StoreError> {
        let mut s = ActStats {
            rows: 0,
            sum: vec![0.0; d],
            sumsq: vec![0.0; d],
            norms: Vec::new(),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for b in reader {
            let b = b?;
            for row in b.act.chunks_exact(d.max(1)) {
                let mut nsq = 0f64;
                for (j, &v) in row.iter().enumerate() {
                    let v = v as f64;
                    s.sum[j] += v;
                    s.sumsq[j] += v * v;
                    nsq += v * v;
                }
                let norm = nsq.sqrt() as f32;
                if s.norms.len() < RESERVOIR {
                    s.norms.push(norm);
                } else {
                    let k = rng.random_range(0..=s.rows);
                    if (k as usize) < RESERVOIR {
                        s.norms[k as usize] = norm;
                    }
                }
                s.rows += 1;
            }
        }
        Ok(s)
    }

    /// The report lines.
    pub fn render(&self) -> String {
        let n = self.rows.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std: Vec<f64> = self
            .sumsq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n - m * m).max(0.0).sqrt())
            .collect();
        let mmm = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                return "n/a".to_string();
            }
            format!(
                "min {:.4}  median {:.4}  max {:.4}",
                v[0],
                v[v.len() / 2],
                v[v.len() - 1]
            )
        };
        let mut out = String::new();
        let _ = writeln!(out, "rows: {}", self.rows);
        let _ = writeln!(out, "per-dimension mean: {}", mmm(&mean));
        let _ = writeln!(out, "per-dimension std:  {}", mmm(&std));
        let mut norms = self.norms.clone();
        norms.sort_by(f32::total_cmp);
        if !norms.is_empty() {
            let pct = |p: f64| norms[((norms.len() - 1) as f64 * p).round() as usize];
            let _ = writeln!(
                out,
                "row L2 norm: p0 {:.3}  p1 {:.3}  p5 {:.3}  p50 {:.3}  p95 {:.3}  p99 {:.3}  p100 {:.3}{}",
                pct(0.0),
                pct(0.01),
                pct(0.05),
                pct(0.5),
                pct(0.95),
                pct(0.99),
                pct(1.0),
                if self.rows as usize > norms.len() { " (sampled)" } else { "" }
            );
        }
        out
    }
}

fn generic_parquet(path: &Path) -> Result<String, InspectError> {
    let pq = |msg: String| InspectError::Parquet {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| pq(e.to_string()))?;
    let r = SerializedFileReader::new(file)
        .map_err(|e| pq(format!("not a readable Parquet file: {e}")))?;
    let md = r.metadata();
    let fmd = md.file_metadata();
    let mut out = format!(
        "{}: Parquet file, {} rows in {} row group(s), created by {}\nschema:\n",
        path.display(),
        fmd.num_rows(),
        md.num_row_groups(),
        fmd.created_by().unwrap_or("?")
    );
    for c in fmd.schema_descr().columns() {
        let _ = writeln!(out, "  {}: {}", c.path(), c.physical_type());
    }
    if let Some(kv) = fmd.key_value_metadata() {
        out.push_str("metadata:\n");
        for kv in kv.iter().filter(|kv| kv.key != "ARROW:schema") {
            let _ = writeln!(out, "  {} = {}", kv.key, kv.value.as_deref().unwrap_or(""));
        }
    }
    Ok(out)
}
