//! Training checkpoints and the training log.
//!
//! A checkpoint is one safetensors file, written atomically (`*.tmp` then rename):
//! - `param.<name>` (every parameter and state buffer), `adam_m.<name>`, `adam_v.<name>`
//!   (trainable ones), `tokens_since_fired` (I64), `log.<column>` (F64);
//! - PAM-SGD runs also: `pam_anchor.<name>` (F32, encoder anchors) and the decoder
//!   statistics `pam.G`, `pam.C`, `pam.sz`, `pam.sx`, `pam.n` (F64);
//! - `__metadata__["saepipe"]`: JSON [`CheckpointMeta`] (step, tokens, RNG state, data
//!   position, input scale, variant and configs).
//!
//! Everything the next step depends on is in it, so stopping and resuming gives the same
//! weights bit for bit as an uninterrupted run.
//!
//! `train_log.parquet`: one row per logged step: `step`, `tokens` (UInt64), `loss`, each loss
//! term, `l0`, `dead_frac`, `lr` (Float64); written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::util::fs as fsutil;

/// Checkpoint format tag.
pub const FORMAT: &str = "saepipe-checkpoint-1";

/// Scalar state of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`FORMAT`].
    pub format: String,
    /// Variant kind.
    pub arch_kind: String,
    /// The full architecture config (JSON of `ArchConfig`).
    pub arch: serde_json::Value,
    /// The training config (JSON of `TrainConfig`).
    pub train: serde_json::Value,
    /// Input width.
    pub d_in: usize,
    /// Dictionary width.
    pub d_sae: usize,
    /// Steps completed.
    pub step: u64,
    /// Tokens consumed.
    pub tokens: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// RNG state as four decimal strings (JSON numbers lose u64 precision).
    pub rng: [String; 4],
    /// Row position of the activation source.
    pub data_position: u64,
    /// Input scale `c`.
    pub scale: f32,
    /// Log column names.
    pub log_columns: Vec<String>,
}

/// In-memory training log, column-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainLog {
    /// Column names (`step`, `tokens` first).
    pub columns: Vec<String>,
    /// One vector per column.
    pub data: Vec<Vec<f64>>,
}

impl TrainLog {
    /// Append a row; the first row fixes the columns.
    pub fn push(&mut self, row: &[(String, f64)]) {
        if self.columns.is_empty() {
            self.columns = row.iter().map(|r| r.0.clone()).collect();
            self.data = vec![Vec::new(); row.len()];
        }
        for (c, col) in self.columns.iter().zip(self.data.iter_mut()) {
            col.push(
                row.iter()
                    .find(|r| &r.0 == c)
                    .map(|r| r.1)
                    .unwrap_or(f64::NAN),
            );
        }
    }
    /// Rows.
    pub fn len(&self) -> usize {
        self.data.first().map_or(0, |c| c.len())
    }
    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Column by name.
    pub fn column(&self, name: &str) -> Option<&[f64]> {
        self.columns
            .iter()
            .position(|c| c == name)
            .map(|i| &self.data[i][..])
    }

    /// Write `train_log.parquet` atomically.
    pub fn write_parquet(&self, path: &Path) -> Result<(), TrainError> {
        if self.columns.is_empty() {
            // Nothing logged yet (checkpoint before the first log row): an empty table
            // with the two key columns, not an error.
            let empty = TrainLog {
                columns: vec!["step".into(), "tokens".into()],
                data: vec![Vec::new(), Vec::new()],
            };
            return empty.write_parquet(path);
        }
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| {
                let t = if c == "step" || c == "tokens" {
                    DataType::UInt64
                } else {
                    DataType::Float64
                };
                Field::new(c, t, false)
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter()
            .zip(&self.data)
            .map(|(c, v)| -> ArrayRef {
                if c == "step" || c == "tokens" {
                    Arc::new(UInt64Array::from(
                        v.iter().map(|&x| x as u64).collect::<Vec<_>>(),
                    ))
                } else {
                    Arc::new(Float64Array::from(v.clone()))
                }
            })
            .collect();
        let err = |msg: String| TrainError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(msg),
        };
        let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| err(e.to_string()))?;
        fsutil::atomic_write_with(path, |w| {
            let mut wr = parquet::arrow::ArrowWriter::try_new(w, schema, None)
                .map_err(std::io::Error::other)?;
            wr.write(&batch).map_err(std::io::Error::other)?;
            wr.close().map_err(std::io::Error::other)?;
            Ok(())
        })
        .map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Everything a checkpoint holds, by name.
pub struct CheckpointData {
    /// Scalars.
    pub meta: CheckpointMeta,
    /// `param.*`, `adam_m.*`, `adam_v.*` tensors.
    pub tensors: HashMap<String, Vec<f32>>,
    /// F64 tensors other than the log (PAM-SGD statistics).
    pub tensors64: HashMap<String, Vec<f64>>,
    /// Firing counters.
    pub tokens_since_fired: Vec<u64>,
    /// The log so far.
    pub log: TrainLog,
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write a checkpoint atomically.
pub fn save(
    path: &Path,
    meta: &CheckpointMeta,
    tensors: &[(String, &[f32])],
    tensors64: &[(String, &[f64])],
    tsf: &[u64],
    log: &TrainLog,
) -> Result<(), TrainError> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in tensors {
        owned.push((name.clone(), Dtype::F32, vec![v.len()], bytes_f32(v)));
    }
    for (name, v) in tensors64 {
        owned.push((
            name.clone(),
            Dtype::F64,
            vec![v.len()],
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    owned.push((
        "tokens_since_fired".into(),
        Dtype::I64,
        vec![tsf.len()],
        tsf.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
    ));
    for (c, v) in log.columns.iter().zip(&log.data) {
        owned.push((
            format!("log.{c}"),
            Dtype::F64,
            vec![v.len()],
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let cerr = |msg: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut views = Vec::new();
    for (n, dt, shape, b) in &owned {
        views.push((
            n.clone(),
            TensorView::new(*dt, shape.clone(), b).map_err(|e| cerr(e.to_string()))?,
        ));
    }
    let mut md = HashMap::new();
    md.insert(
        "saepipe".to_string(),
        serde_json::to_string(meta).map_err(|e| cerr(e.to_string()))?,
    );
    let bytes = safetensors::serialize(views, Some(md)).map_err(|e| cerr(e.to_string()))?;
    fsutil::atomic_write(path, &bytes).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<CheckpointData, TrainError> {
    let cerr = |msg: String| TrainError::Checkpoint {
        path: PathBuf::from(path),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| cerr(format!("not a safetensors checkpoint: {e}")))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| cerr(e.to_string()))?;
    let meta_s = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("saepipe"))
        .ok_or_else(|| cerr("no saepipe metadata: not a saepipe training checkpoint".into()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(meta_s).map_err(|e| cerr(format!("bad metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(cerr(format!("format {} is not {FORMAT}", meta.format)));
    }
    let mut tensors = HashMap::new();
    let mut tensors64 = HashMap::new();
    let mut tsf = Vec::new();
    let mut log = TrainLog {
        columns: meta.log_columns.clone(),
        data: vec![Vec::new(); meta.log_columns.len()],
    };
    for (name, t) in st.tensors() {
        let data = t.data();
        if name == "tokens_since_fired" {
            tsf = data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("invariant: chunks of 8")) as u64)
                .collect();
        } else if let Some(c) = name.strip_prefix("log.") {
            if let Some(i) = log.columns.iter().position(|x| x == c) {
                log.data[i] = data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("invariant: chunks of 8")))
                    .collect();
            }
        } else if t.dtype() == Dtype::F64 {
            tensors64.insert(
                name,
                data.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("invariant: chunks of 8")))
                    .collect(),
            );
        } else {
            if t.dtype() != Dtype::F32 {
                return Err(cerr(format!(
                    "tensor {name} is {:?}, expected F32",
                    t.dtype()
                )));
            }
            tensors.insert(
                name,
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("invariant: chunks of 4")))
                    .collect(),
            );
        }
    }
    Ok(CheckpointData {
        meta,
        tensors,
        tensors64,
        tokens_since_fired: tsf,
        log,
    })
}
