//! `metrics.parquet` and `pareto.parquet`: one row per (trained SAE, evaluation set).
//!
//! Implements `pipeline.md` §4. Each finished sweep point leaves a `metrics.json` beside its
//! SAE (the resumable record); this module gathers them into long-format Parquet tables that
//! pandas, polars, R and DuckDB read directly. Units are documented in README.md.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::eval::pareto;
use crate::eval::power::PowerValues;
use crate::util::fs as fsutil;

/// One trained SAE evaluated on one evaluation set. Field names are the column names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    /// Run name (`[run] name`).
    pub run: String,
    /// Sweep point id (stable hash of its overrides).
    pub point_id: String,
    /// Model source (hub repo, `local:` or `gguf:`).
    pub model: String,
    /// Pinned model revision (or `local`).
    pub revision: String,
    /// Hookpoint, `blocks.L.hook_site`.
    pub hookpoint: String,
    /// SAE architecture (`topk`, `relu_l1`, `gated`, …).
    pub arch: String,
    /// Number of latents.
    pub d_sae: u64,
    /// `d_sae / d_in`.
    pub expansion: f64,
    /// Name of the sparsity parameter (`k`, `l1_coefficient`, …).
    pub sparsity_param: String,
    /// Its value.
    pub sparsity_value: f64,
    /// Training seed.
    pub seed: u64,
    /// Optimiser (`adam`, `pam_sgd`).
    pub optimizer: String,
    /// Tokens seen in training.
    pub train_tokens: u64,
    /// Held-out tokens evaluated.
    pub eval_tokens: u64,
    /// Pooled R² = 1 − SSE/SST (unitless); null when the evaluation set has no variance
    /// ([`crate::eval::VARIANCE_FLOOR`]).
    pub r2: Option<f64>,
    /// Fraction of variance unexplained = SSE/SST; null with `r2`.
    pub fvu: Option<f64>,
    /// SSE / tokens (squared activation units per token).
    pub mse: f64,
    /// Mean active latents per token.
    pub l0: f64,
    /// Mean Σ|f| per token.
    pub l1: f64,
    /// Share of latents that never fired on the evaluation tokens.
    pub dead_frac: f64,
    /// Share of latents firing on more than 10% of evaluation tokens.
    pub dense_frac: f64,
    /// Next-token cross-entropy of the clean model (nats), when measured.
    pub ce_clean: Option<f64>,
    /// CE with the SAE spliced in (nats).
    pub ce_spliced: Option<f64>,
    /// `ce_spliced − ce_clean` (nats).
    pub ce_delta: Option<f64>,
    /// CE with the hookpoint zero-ablated (nats).
    pub ce_zero_abl: Option<f64>,
    /// `(ce_zero_abl − ce_spliced) / (ce_zero_abl − ce_clean)`.
    pub ce_loss_score: Option<f64>,
    /// Share of latents firing with both signs (sae_variants.md §6.7 census).
    pub bipolar_frac: Option<f64>,
    /// Share of the reconstruction energy (Σ f² with unit decoder rows) carried by the
    /// bipolar latents.
    #[serde(default)]
    pub bipolar_var_share: Option<f64>,
    /// JSAE: share of Jacobian entries above 0.01.
    pub jacobian_sparsity: Option<f64>,
    /// JSAE: share of the k² Jacobian entries per token with |J| above 0.005.
    #[serde(default)]
    pub jacobian_frac_0_005: Option<f64>,
    /// JSAE: share of the k² Jacobian entries per token with |J| above 0.015.
    #[serde(default)]
    pub jacobian_frac_0_015: Option<f64>,
    /// JSAE: share of the k² Jacobian entries per token with |J| above 0.02.
    #[serde(default)]
    pub jacobian_frac_0_02: Option<f64>,
    /// JSAE: share of the k² Jacobian entries per token with |J| above 0.1.
    #[serde(default)]
    pub jacobian_frac_0_1: Option<f64>,
    /// JSAE: share of the k² Jacobian entries per token with |J| above 1.
    #[serde(default)]
    pub jacobian_frac_1: Option<f64>,
    /// JSAE: mean |J| over the k² entries per token (SAE-latent units).
    #[serde(default)]
    pub jacobian_mean_abs: Option<f64>,
    /// JSAE: share of the k² entries per token with |J_t| / RMS(J_t) above 0.1.
    #[serde(default)]
    pub jacobian_rms_frac_0_1: Option<f64>,
    /// JSAE: share of the k² entries per token with |J_t| / RMS(J_t) above 1.
    #[serde(default)]
    pub jacobian_rms_frac_1: Option<f64>,
    /// JSAE: the Jacobian coefficient λ the pair was trained with (0: plain TopK pair).
    #[serde(default)]
    pub jsae_lambda: Option<f64>,
    /// Synthetic sources: mean max cosine similarity to the true dictionary.
    pub feature_recovery: Option<f64>,
    /// Regions (clusters) of a piecewise-constant / piecewise-affine baseline (`kmeans`,
    /// `kmeans_pca`, `local_pca`, `kflats`: the `n_clusters` of its export); null for SAEs.
    #[serde(default)]
    pub n_regions: Option<u64>,
    /// Wall seconds spent training.
    pub train_seconds: f64,
    /// Training throughput (tokens/s).
    pub train_tokens_per_s: f64,
    /// Folder of the exported SAE.
    pub sae_path: String,
    /// Power-diagram diagnostics (`pd_*` columns; TopK and AbsTopK rows, null otherwise).
    #[serde(flatten, default)]
    pub power: crate::eval::power::PowerValues,
}

impl MetricsRow {
    /// The series a row belongs to on the plot and in the frontier: the arch, with the
    /// optimiser appended when it is not Adam (`topk+pam_sgd`), so that PAM-SGD and Adam
    /// runs of one variant get separate frontiers.
    pub fn series(&self) -> String {
        if self.optimizer.is_empty() || self.optimizer == "adam" {
            self.arch.clone()
        } else {
            format!("{}+{}", self.arch, self.optimizer)
        }
    }
}

/// Errors writing or reading result tables.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("building the results table: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

fn schema() -> Schema {
    use DataType::{Boolean, Float64, UInt64, Utf8};
    let f = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
    let mut fields = vec![
        f("run", Utf8, false),
        f("point_id", Utf8, false),
        f("model", Utf8, false),
        f("revision", Utf8, false),
        f("hookpoint", Utf8, false),
        f("arch", Utf8, false),
        f("d_sae", UInt64, false),
        f("expansion", Float64, false),
        f("sparsity_param", Utf8, false),
        f("sparsity_value", Float64, false),
        f("seed", UInt64, false),
        f("optimizer", Utf8, false),
        f("train_tokens", UInt64, false),
        f("eval_tokens", UInt64, false),
        f("r2", Float64, true),
        f("fvu", Float64, true),
        f("mse", Float64, false),
        f("l0", Float64, false),
        f("l1", Float64, false),
        f("dead_frac", Float64, false),
        f("dense_frac", Float64, false),
        f("ce_clean", Float64, true),
        f("ce_spliced", Float64, true),
        f("ce_delta", Float64, true),
        f("ce_zero_abl", Float64, true),
        f("ce_loss_score", Float64, true),
        f("bipolar_frac", Float64, true),
        f("bipolar_var_share", Float64, true),
        f("jacobian_sparsity", Float64, true),
        f("jacobian_frac_0_005", Float64, true),
        f("jacobian_frac_0_015", Float64, true),
        f("jacobian_frac_0_02", Float64, true),
        f("jacobian_frac_0_1", Float64, true),
        f("jacobian_frac_1", Float64, true),
        f("jacobian_mean_abs", Float64, true),
        f("jacobian_rms_frac_0_1", Float64, true),
        f("jacobian_rms_frac_1", Float64, true),
        f("jsae_lambda", Float64, true),
        f("feature_recovery", Float64, true),
        f("n_regions", UInt64, true),
        f("train_seconds", Float64, false),
        f("train_tokens_per_s", Float64, false),
        f("sae_path", Utf8, false),
        f("is_pareto", Boolean, false),
    ];
    fields.extend(PowerValues::NAMES.iter().map(|n| f(n, Float64, true)));
    Schema::new(fields)
}

/// Build the Arrow batch for `rows`; `is_pareto[i]` marks frontier membership.
pub fn to_batch(rows: &[MetricsRow], is_pareto: &[bool]) -> Result<RecordBatch, ResultsError> {
    fn s(rows: &[MetricsRow], f: impl Fn(&MetricsRow) -> &str) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    }
    fn u(rows: &[MetricsRow], f: impl Fn(&MetricsRow) -> u64) -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(f)))
    }
    fn x(rows: &[MetricsRow], f: impl Fn(&MetricsRow) -> f64) -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
    }
    fn o(rows: &[MetricsRow], f: impl Fn(&MetricsRow) -> Option<f64>) -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Float64Array>())
    }
    let mut columns: Vec<ArrayRef> = vec![
        s(rows, |r| &r.run),
        s(rows, |r| &r.point_id),
        s(rows, |r| &r.model),
        s(rows, |r| &r.revision),
        s(rows, |r| &r.hookpoint),
        s(rows, |r| &r.arch),
        u(rows, |r| r.d_sae),
        x(rows, |r| r.expansion),
        s(rows, |r| &r.sparsity_param),
        x(rows, |r| r.sparsity_value),
        u(rows, |r| r.seed),
        s(rows, |r| &r.optimizer),
        u(rows, |r| r.train_tokens),
        u(rows, |r| r.eval_tokens),
        o(rows, |r| r.r2),
        o(rows, |r| r.fvu),
        x(rows, |r| r.mse),
        x(rows, |r| r.l0),
        x(rows, |r| r.l1),
        x(rows, |r| r.dead_frac),
        x(rows, |r| r.dense_frac),
        o(rows, |r| r.ce_clean),
        o(rows, |r| r.ce_spliced),
        o(rows, |r| r.ce_delta),
        o(rows, |r| r.ce_zero_abl),
        o(rows, |r| r.ce_loss_score),
        o(rows, |r| r.bipolar_frac),
        o(rows, |r| r.bipolar_var_share),
        o(rows, |r| r.jacobian_sparsity),
        o(rows, |r| r.jacobian_frac_0_005),
        o(rows, |r| r.jacobian_frac_0_015),
        o(rows, |r| r.jacobian_frac_0_02),
        o(rows, |r| r.jacobian_frac_0_1),
        o(rows, |r| r.jacobian_frac_1),
        o(rows, |r| r.jacobian_mean_abs),
        o(rows, |r| r.jacobian_rms_frac_0_1),
        o(rows, |r| r.jacobian_rms_frac_1),
        o(rows, |r| r.jsae_lambda),
        o(rows, |r| r.feature_recovery),
        Arc::new(rows.iter().map(|r| r.n_regions).collect::<UInt64Array>()),
        x(rows, |r| r.train_seconds),
        x(rows, |r| r.train_tokens_per_s),
        s(rows, |r| &r.sae_path),
        Arc::new(BooleanArray::from(is_pareto.to_vec())),
    ];
    for i in 0..PowerValues::NAMES.len() {
        columns.push(o(rows, |r| r.power.values()[i]));
    }
    Ok(RecordBatch::try_new(Arc::new(schema()), columns)?)
}

/// Which rows lie on the (L0, R²) frontier of their (model, hookpoint, series) group
/// (series = arch, plus the optimiser when it is not Adam: [`MetricsRow::series`]).
pub fn pareto_mask(rows: &[MetricsRow]) -> Vec<bool> {
    let mut mask = vec![false; rows.len()];
    let series: Vec<String> = rows.iter().map(MetricsRow::series).collect();
    let mut groups: Vec<(&str, &str, &str)> = rows
        .iter()
        .zip(&series)
        .map(|(r, s)| (r.model.as_str(), r.hookpoint.as_str(), s.as_str()))
        .collect();
    groups.sort();
    groups.dedup();
    for g in groups {
        let idx: Vec<usize> = (0..rows.len())
            .filter(|&i| {
                (
                    rows[i].model.as_str(),
                    rows[i].hookpoint.as_str(),
                    series[i].as_str(),
                ) == g
            })
            .collect();
        // Rows without an R² (no variance to explain) are on no frontier.
        let idx: Vec<usize> = idx.into_iter().filter(|&i| rows[i].r2.is_some()).collect();
        let pts: Vec<(f64, f64)> = idx
            .iter()
            .map(|&i| (rows[i].l0, rows[i].r2.unwrap_or(f64::NAN)))
            .collect();
        for j in pareto::frontier((pareto::L0, pareto::R2), &pts) {
            mask[idx[j]] = true;
        }
    }
    mask
}

/// Write `rows` to `path` as Parquet, atomically.
pub fn write_parquet(
    path: &Path,
    rows: &[MetricsRow],
    is_pareto: &[bool],
) -> Result<(), ResultsError> {
    let batch = to_batch(rows, is_pareto)?;
    let p = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ResultsError::Io {
            path: p.clone(),
            source,
        })?;
    }
    let tmp = fsutil::tmp_path(path);
    let file = File::create(&tmp).map_err(|source| ResultsError::Io {
        path: p.clone(),
        source,
    })?;
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let parquet_err = |source| ResultsError::Parquet {
        path: p.clone(),
        source,
    };
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(parquet_err)?;
    w.write(&batch).map_err(parquet_err)?;
    w.close().map_err(parquet_err)?;
    fsutil::commit_tmp(path).map_err(|source| ResultsError::Io {
        path: p.clone(),
        source,
    })
}

/// Write `metrics.parquet` (every row, with `is_pareto`) and `pareto.parquet` (the
/// frontier rows only) into `dir`.
pub fn write_results(dir: &Path, rows: &[MetricsRow]) -> Result<(), ResultsError> {
    let mask = pareto_mask(rows);
    write_parquet(&dir.join("metrics.parquet"), rows, &mask)?;
    let front: Vec<MetricsRow> = rows
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(r, _)| r.clone())
        .collect();
    write_parquet(
        &dir.join("pareto.parquet"),
        &front,
        &vec![true; front.len()],
    )
}

#[cfg(test)]
pub(crate) fn example_row(arch: &str, l0: f64, r2: f64) -> MetricsRow {
    MetricsRow {
        run: "t".into(),
        point_id: format!("{arch}-{l0}"),
        model: "m".into(),
        revision: "r".into(),
        hookpoint: "blocks.1.hook_mlp_out".into(),
        arch: arch.into(),
        d_sae: 64,
        expansion: 2.0,
        sparsity_param: "k".into(),
        sparsity_value: l0,
        seed: 0,
        optimizer: "adam".into(),
        train_tokens: 1000,
        eval_tokens: 100,
        r2: Some(r2),
        fvu: Some(1.0 - r2),
        mse: 0.1,
        l0,
        l1: l0,
        dead_frac: 0.0,
        dense_frac: 0.0,
        ce_clean: Some(3.0),
        ce_spliced: None,
        ce_delta: None,
        ce_zero_abl: None,
        ce_loss_score: None,
        bipolar_frac: None,
        bipolar_var_share: None,
        jacobian_sparsity: None,
        jacobian_frac_0_005: None,
        jacobian_frac_0_015: None,
        jacobian_frac_0_02: None,
        jacobian_frac_0_1: None,
        jacobian_frac_1: None,
        jacobian_mean_abs: None,
        jacobian_rms_frac_0_1: None,
        jacobian_rms_frac_1: None,
        jsae_lambda: None,
        feature_recovery: None,
        n_regions: None,
        train_seconds: 1.0,
        train_tokens_per_s: 1000.0,
        sae_path: "saes/x".into(),
        power: PowerValues::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn writes_both_tables_with_pareto_flags() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            example_row("topk", 8.0, 0.5),
            example_row("topk", 16.0, 0.4),
            example_row("topk", 32.0, 0.8),
            example_row("gated", 16.0, 0.3),
        ];
        write_results(dir.path(), &rows).unwrap();
        let read = |name: &str| {
            let f = File::open(dir.path().join(name)).unwrap();
            let r = ParquetRecordBatchReaderBuilder::try_new(f)
                .unwrap()
                .build()
                .unwrap();
            r.map(|b| b.unwrap()).collect::<Vec<_>>()
        };
        let all = read("metrics.parquet");
        assert_eq!(all[0].num_rows(), 4);
        assert_eq!(all[0].schema().field(14).name(), "r2");
        let front = read("pareto.parquet");
        // topk: (8, .5) and (32, .8) on the frontier; (16, .4) dominated; gated alone.
        assert_eq!(front[0].num_rows(), 3);
        assert_eq!(pareto_mask(&rows), vec![true, false, true, true]);
    }

    #[test]
    fn an_undefined_r2_is_null_and_on_no_frontier() {
        let dir = tempfile::tempdir().unwrap();
        let mut flat = example_row("topk", 4.0, 0.0);
        flat.r2 = None;
        flat.fvu = None;
        let rows = vec![flat, example_row("topk", 16.0, 0.4)];
        assert_eq!(pareto_mask(&rows), vec![false, true]);
        write_results(dir.path(), &rows).unwrap();
        let f = File::open(dir.path().join("metrics.parquet")).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let r2 = b.column_by_name("r2").unwrap();
        assert!(r2.is_null(0) && !r2.is_null(1));
        assert!(b.column_by_name("fvu").unwrap().is_null(0));
    }

    #[test]
    fn pam_sgd_rows_get_their_own_frontier() {
        let mut pam = example_row("topk", 16.0, 0.1);
        pam.optimizer = "pam_sgd".into();
        assert_eq!(pam.series(), "topk+pam_sgd");
        let rows = vec![example_row("topk", 8.0, 0.5), pam];
        // dominated by the Adam row, but alone in its own series
        assert_eq!(pareto_mask(&rows), vec![true, true]);
    }
}
