//! Training checkpoints and the training log.
//!
//! A checkpoint is one safetensors file of named tensors plus one JSON object of scalars
//! (`__metadata__["saepipe"]`), written atomically (`*.tmp` then rename). The engine
//! ([`super::Trainer`]) decides the names; for a model of `S` SAEs:
//! - `sae{s}.param.<name>`: every parameter and state buffer of SAE `s` (F32);
//! - `sae{s}.tokens_since_fired` (U64), the firing counters;
//! - the optimiser's state under its own names (`sae{s}.adam_m.<name>`, `sae{s}.adam_v.<name>`;
//!   PAM-SGD adds `pam.anchor.<name>` and its F64 statistics `pam.G`, `pam.C`, …);
//! - `log.<column>` (F64), the training log so far.
//!
//! The JSON holds the step, tokens, RNG state, input scales, the model's and the training
//! configuration, and whatever the caller adds (a stage's own bookkeeping). Everything the
//! next step depends on is in the file, so stopping and resuming gives the same weights bit
//! for bit as an uninterrupted run. Single SAEs, lockstep groups and JSAE pairs all use
//! this one format.
//!
//! `train_log.parquet`: one row per logged step: `step`, `tokens` (UInt64), `loss`, each loss
//! term and diagnostic, `l0`, `dead_frac`, `lr` (Float64); written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use safetensors::tensor::{Dtype, TensorView};

use super::TrainError;
use crate::util::fs as fsutil;

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

/// Checkpoint format tag (in the JSON's `format`).
pub const FORMAT: &str = "saepipe-checkpoint-2";

/// A tensor to write, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// 64-bit floats.
    F64(&'a [f64]),
    /// Counters.
    U64(&'a [u64]),
}

/// A tensor read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// Counters.
    U64(Vec<u64>),
}

impl Tensor {
    /// Borrowed, for [`save`].
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Tensor::F32(v) => TensorRef::F32(v),
            Tensor::F64(v) => TensorRef::F64(v),
            Tensor::U64(v) => TensorRef::U64(v),
        }
    }
}

/// Everything a checkpoint holds.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// The scalars.
    pub meta: serde_json::Value,
    /// The tensors by name.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    fn err(&self, msg: String) -> TrainError {
        TrainError::Checkpoint {
            path: self.path.clone(),
            msg,
        }
    }

    /// The F32 tensor `name`, which must have `len` values.
    pub fn f32(&self, name: &str, len: usize) -> Result<&[f32], TrainError> {
        match self.tensors.get(name) {
            Some(Tensor::F32(v)) if v.len() == len => Ok(v),
            Some(Tensor::F32(v)) => Err(self.err(format!(
                "tensor {name} has {} values, expected {len}",
                v.len()
            ))),
            Some(_) => Err(self.err(format!("tensor {name} is not F32"))),
            None => Err(self.err(format!("missing tensor {name}"))),
        }
    }

    /// The F64 tensor `name`, which must have `len` values.
    pub fn f64(&self, name: &str, len: usize) -> Result<&[f64], TrainError> {
        match self.tensors.get(name) {
            Some(Tensor::F64(v)) if v.len() == len => Ok(v),
            Some(Tensor::F64(v)) => Err(self.err(format!(
                "tensor {name} has {} values, expected {len}",
                v.len()
            ))),
            Some(_) => Err(self.err(format!("tensor {name} is not F64"))),
            None => Err(self.err(format!("missing tensor {name}"))),
        }
    }

    /// The U64 tensor `name`, which must have `len` values.
    pub fn u64(&self, name: &str, len: usize) -> Result<&[u64], TrainError> {
        match self.tensors.get(name) {
            Some(Tensor::U64(v)) if v.len() == len => Ok(v),
            Some(Tensor::U64(v)) => Err(self.err(format!(
                "tensor {name} has {} values, expected {len}",
                v.len()
            ))),
            Some(_) => Err(self.err(format!("tensor {name} is not U64"))),
            None => Err(self.err(format!("missing tensor {name}"))),
        }
    }

    /// A scalar of the JSON, deserialised.
    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, TrainError> {
        let v = self
            .meta
            .get(key)
            .ok_or_else(|| self.err(format!("no `{key}` in its metadata")))?;
        serde_json::from_value(v.clone()).map_err(|e| self.err(format!("`{key}`: {e}")))
    }

    /// The training log stored in it.
    pub fn log(&self) -> Result<TrainLog, TrainError> {
        let columns: Vec<String> = self.get("log_columns")?;
        let mut data = Vec::with_capacity(columns.len());
        for c in &columns {
            match self.tensors.get(&format!("log.{c}")) {
                Some(Tensor::F64(v)) => data.push(v.clone()),
                _ => return Err(self.err(format!("missing log column {c}"))),
            }
        }
        Ok(TrainLog { columns, data })
    }
}

fn le_bytes<const N: usize, T: Copy>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Write a checkpoint atomically: `meta` (a JSON object; `format` and `log_columns` are
/// added), the tensors, and `log` as `log.<column>` tensors.
pub fn save(
    path: &Path,
    mut meta: serde_json::Value,
    tensors: &[(String, TensorRef)],
    log: &TrainLog,
) -> Result<(), TrainError> {
    let cerr = |msg: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let obj = meta
        .as_object_mut()
        .ok_or_else(|| cerr("metadata must be a JSON object".into()))?;
    obj.insert("format".into(), FORMAT.into());
    obj.insert("log_columns".into(), serde_json::json!(log.columns));
    let mut owned: Vec<(String, Dtype, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        owned.push(match t {
            TensorRef::F32(v) => (name.clone(), Dtype::F32, le_bytes(v, f32::to_le_bytes)),
            TensorRef::F64(v) => (name.clone(), Dtype::F64, le_bytes(v, f64::to_le_bytes)),
            TensorRef::U64(v) => (name.clone(), Dtype::U64, le_bytes(v, u64::to_le_bytes)),
        });
    }
    for (c, v) in log.columns.iter().zip(&log.data) {
        owned.push((
            format!("log.{c}"),
            Dtype::F64,
            le_bytes(v, f64::to_le_bytes),
        ));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (n, dt, b) in &owned {
        let len = b.len() * 8 / dt.bitsize();
        views.push((
            n.clone(),
            TensorView::new(*dt, vec![len], b).map_err(|e| cerr(e.to_string()))?,
        ));
    }
    let md = HashMap::from([(
        "saepipe".to_string(),
        serde_json::to_string(&meta).map_err(|e| cerr(e.to_string()))?,
    )]);
    let bytes = safetensors::serialize(views, Some(md)).map_err(|e| cerr(e.to_string()))?;
    fsutil::atomic_write(path, &bytes).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint, TrainError> {
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
    let meta: serde_json::Value =
        serde_json::from_str(meta_s).map_err(|e| cerr(format!("bad metadata: {e}")))?;
    let format = meta.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != FORMAT {
        return Err(cerr(format!(
            "format {format:?} is not {FORMAT}; it was written by another version of saepipe: delete it to start this unit again"
        )));
    }
    let mut tensors = HashMap::new();
    for (name, t) in st.tensors() {
        let data = t.data();
        let v = match t.dtype() {
            Dtype::F32 => Tensor::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("invariant: chunks of 4")))
                    .collect(),
            ),
            Dtype::F64 => Tensor::F64(
                data.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("invariant: chunks of 8")))
                    .collect(),
            ),
            Dtype::U64 => Tensor::U64(
                data.chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("invariant: chunks of 8")))
                    .collect(),
            ),
            other => {
                return Err(cerr(format!(
                    "tensor {name} has unsupported dtype {other:?}"
                )))
            }
        };
        tensors.insert(name, v);
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        meta,
        tensors,
    })
}
