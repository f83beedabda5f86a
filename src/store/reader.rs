//! Reading activation sets: metadata checks and sequential batches. The seeded shuffle
//! that feeds training is in `shuffle.rs` (it reads shards through this file).
//!
//! Implements `../shared/specs/pipeline.md` §4 ("the reader checks them and names the
//! mismatch"; "peak memory of capture and training must not grow with the token budget").
//!
//! Decision: a set is only readable once its `manifest.json` exists (the completion
//! marker); every shard's footer metadata is checked against the manifest and the caller's
//! [`Expect`] before the first row is served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, FixedSizeListArray};
use arrow::datatypes::{DataType, Float16Type, Float32Type, UInt16Type, UInt32Type, UInt64Type};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::manifest::{Manifest, MANIFEST};
use super::schema::ActMeta;
use super::StoreError;

/// Read a shard's footer: its metadata and row count. Does not read any data page.
pub fn read_shard_meta(path: &Path) -> Result<(ActMeta, u64), StoreError> {
    let corrupt = |msg: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    let file = super::remote::open_shard(path).map_err(|e| StoreError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| corrupt(e.to_string()))?;
    let fmd = reader.metadata().file_metadata();
    let kv: HashMap<String, String> = fmd
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    if kv.get("saepipe_kind").map(String::as_str) != Some("activations") {
        return Err(corrupt(
            "no saepipe activation metadata in the footer".into(),
        ));
    }
    let meta = ActMeta::from_map(&kv)
        .map_err(|k| corrupt(format!("metadata key '{k}' is missing or malformed")))?;
    Ok((meta, fmd.num_rows().max(0) as u64))
}

/// What the consumer expects of an activation set; `None` fields are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    /// Hookpoint name.
    pub hookpoint: Option<String>,
    /// Activation width.
    pub d_model: Option<usize>,
    /// Model source.
    pub model_repo: Option<String>,
    /// Model revision.
    pub model_revision: Option<String>,
    /// `train` or `eval`.
    pub split: Option<String>,
}

impl Expect {
    /// Compare with `meta` of `path`; the error names the first key that differs.
    pub fn check(&self, path: &Path, meta: &ActMeta) -> Result<(), StoreError> {
        let mismatch = |key: &str, expected: String, found: String| StoreError::SchemaMismatch {
            path: path.to_path_buf(),
            key: key.into(),
            expected,
            found,
        };
        if let Some(h) = &self.hookpoint {
            if *h != meta.hookpoint {
                return Err(mismatch("hookpoint", h.clone(), meta.hookpoint.clone()));
            }
        }
        if let Some(d) = self.d_model {
            if d != meta.d_model {
                return Err(mismatch("d_model", d.to_string(), meta.d_model.to_string()));
            }
        }
        if let Some(r) = &self.model_repo {
            if *r != meta.model_repo {
                return Err(mismatch("model_repo", r.clone(), meta.model_repo.clone()));
            }
        }
        if let Some(r) = &self.model_revision {
            if *r != meta.model_revision {
                return Err(mismatch(
                    "model_revision",
                    r.clone(),
                    meta.model_revision.clone(),
                ));
            }
        }
        if let Some(s) = &self.split {
            if *s != meta.split {
                return Err(mismatch("split", s.clone(), meta.split.clone()));
            }
        }
        Ok(())
    }
}

/// A finished activation set (one hookpoint, one split), checked.
#[derive(Debug, Clone)]
pub struct ActivationSet {
    /// Its folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl ActivationSet {
    /// Open the set in `dir`, checking the manifest and every shard's footer against the
    /// manifest and `expect`.
    pub fn open(dir: &Path, expect: &Expect) -> Result<Self, StoreError> {
        let manifest = Manifest::read(dir)?.ok_or_else(|| StoreError::Io {
            path: dir.join(MANIFEST),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no manifest: the capture of this folder has not finished; run `saepipe capture` (it resumes)",
            ),
        })?;
        expect.check(&dir.join(MANIFEST), &manifest.meta)?;
        let mut total = 0;
        for (info, path) in manifest.shards.iter().zip(manifest.shard_paths(dir)) {
            let (meta, rows) = read_shard_meta(&path).map_err(|e| match e {
                StoreError::Io { path, source }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    StoreError::Corrupt {
                        path,
                        msg: "the manifest lists it, but it is missing".into(),
                    }
                }
                e => e,
            })?;
            if meta.config_hash != manifest.meta.config_hash {
                return Err(StoreError::SchemaMismatch {
                    path,
                    key: "config_hash".into(),
                    expected: manifest.meta.config_hash.clone(),
                    found: meta.config_hash,
                });
            }
            expect.check(&path, &meta)?;
            if rows != info.rows {
                return Err(StoreError::Corrupt {
                    path,
                    msg: format!("{rows} rows, the manifest says {}", info.rows),
                });
            }
            total += rows;
        }
        if total != manifest.n_tokens {
            return Err(StoreError::Corrupt {
                path: dir.join(MANIFEST),
                msg: format!(
                    "shards hold {total} rows, the manifest says {}",
                    manifest.n_tokens
                ),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Activation width.
    pub fn d_model(&self) -> usize {
        self.manifest.meta.d_model
    }

    /// Rows in the set.
    pub fn n_tokens(&self) -> u64 {
        self.manifest.n_tokens
    }

    /// Shard paths in order.
    pub fn shard_paths(&self) -> Vec<PathBuf> {
        self.manifest.shard_paths(&self.dir)
    }

    /// Read the set in order, in batches of at most `batch_rows` rows.
    pub fn batches(&self, batch_rows: usize) -> SeqReader {
        SeqReader::new(self.shard_paths(), self.d_model(), batch_rows)
    }
}

/// Rows as read from a shard, activations converted to f32.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActBatch {
    /// Window index per row.
    pub seq: Vec<u64>,
    /// Position per row.
    pub pos: Vec<u32>,
    /// Token id per row.
    pub token_id: Vec<u32>,
    /// `rows × d_model` activations, row-major.
    pub act: Vec<f32>,
}

/// Convert one Arrow record batch of the activation schema.
pub fn decode_batch(
    path: &Path,
    batch: &arrow::record_batch::RecordBatch,
    d: usize,
) -> Result<ActBatch, StoreError> {
    let bad = |msg: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        msg: msg.into(),
    };
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| bad(&format!("no column '{name}'")))
    };
    let seq = col("seq")?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| bad("seq is not UInt64"))?;
    let pos = col("pos")?
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| bad("pos is not UInt32"))?;
    let tok = col("token_id")?
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| bad("token_id is not UInt32"))?;
    let act: &FixedSizeListArray = col("act")?
        .as_fixed_size_list_opt()
        .ok_or_else(|| bad("act is not a FixedSizeList"))?;
    if act.value_length() as usize != d {
        return Err(bad(&format!(
            "act has width {}, expected {d}",
            act.value_length()
        )));
    }
    let mut values = Vec::with_capacity(act.len() * d);
    decode_act(path, act, d, &mut values)?;
    Ok(ActBatch {
        seq: seq.values().to_vec(),
        pos: pos.values().to_vec(),
        token_id: tok.values().to_vec(),
        act: values,
    })
}

/// Append the values of `act` (width `d`) to `out` as f32.
pub fn decode_act(
    path: &Path,
    act: &FixedSizeListArray,
    d: usize,
    out: &mut Vec<f32>,
) -> Result<(), StoreError> {
    let bad = |msg: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    if act.value_length() as usize != d {
        return Err(bad(format!(
            "act has width {}, expected {d}",
            act.value_length()
        )));
    }
    // A sliced list (row selection) starts at `offset` rows into its values.
    let values = act.values();
    let (lo, hi) = (act.offset() * d, (act.offset() + act.len()) * d);
    if values.len() < hi {
        return Err(bad("act values have the wrong length".into()));
    }
    match values.data_type() {
        DataType::Float32 => {
            out.extend_from_slice(&values.as_primitive::<Float32Type>().values()[lo..hi])
        }
        DataType::Float16 => out.extend(
            values.as_primitive::<Float16Type>().values()[lo..hi]
                .iter()
                .map(|v| v.to_f32()),
        ),
        // bfloat16 bits (schema.rs): the upper half of an f32.
        DataType::UInt16 => out.extend(
            values.as_primitive::<UInt16Type>().values()[lo..hi]
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32()),
        ),
        other => {
            return Err(bad(format!(
                "act values are {other}, expected Float32, Float16 or UInt16 (bfloat16 bits)"
            )))
        }
    }
    Ok(())
}

/// Sequential reader over shards.
///
/// Decision: every batch is checked for NaN and infinity as it is read, and the error
/// ([`StoreError::NonFiniteData`]) names the shard file, the row and the dimension. Capture
/// never writes such a value, so one in a shard is damage or foreign data; catching it here
/// keeps it from surfacing in training as a NaN loss with learning-rate advice.
pub struct SeqReader {
    paths: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, ParquetRecordBatchReader)>,
    /// Rows already served from the current shard.
    row_in_shard: u64,
    d: usize,
    batch_rows: usize,
}

impl SeqReader {
    /// Read `paths` in order (each an activation shard of width `d`).
    pub fn new(paths: Vec<PathBuf>, d: usize, batch_rows: usize) -> Self {
        Self {
            paths: paths.into_iter(),
            current: None,
            row_in_shard: 0,
            d,
            batch_rows: batch_rows.max(1),
        }
    }
}

/// [`StoreError::NonFiniteData`] for the first NaN/infinity of `b` (rows `first_row..` of
/// the shard `path`), if any.
fn check_finite(path: &Path, b: &ActBatch, d: usize, first_row: u64) -> Result<(), StoreError> {
    let Some(i) = b.act.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let r = i / d.max(1);
    Err(StoreError::NonFiniteData {
        path: path.to_path_buf(),
        row: first_row + r as u64,
        seq: b.seq.get(r).copied().unwrap_or_default(),
        pos: b.pos.get(r).copied().unwrap_or_default(),
        dim: i % d.max(1),
        value: b.act[i],
    })
}

impl Iterator for SeqReader {
    type Item = Result<ActBatch, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((path, reader)) = self.current.as_mut() {
                match reader.next() {
                    Some(Ok(b)) => {
                        let first = self.row_in_shard;
                        self.row_in_shard += b.num_rows() as u64;
                        let out = decode_batch(path, &b, self.d)
                            .and_then(|b| check_finite(path, &b, self.d, first).map(|()| b));
                        if out.is_err() {
                            self.current = None;
                            self.paths = Vec::new().into_iter();
                        }
                        return Some(out);
                    }
                    Some(Err(e)) => {
                        let path = path.clone();
                        self.current = None;
                        self.paths = Vec::new().into_iter();
                        return Some(Err(StoreError::Corrupt {
                            path,
                            msg: e.to_string(),
                        }));
                    }
                    None => self.current = None,
                }
            }
            let path = self.paths.next()?;
            let opened = super::remote::open_shard(&path)
                .map_err(|e| StoreError::io(&path, e))
                .and_then(|f| {
                    ParquetRecordBatchReaderBuilder::try_new(f)
                        .and_then(|b| b.with_batch_size(self.batch_rows).build())
                        .map_err(|e| StoreError::Corrupt {
                            path: path.clone(),
                            msg: e.to_string(),
                        })
                });
            match opened {
                Ok(r) => {
                    self.current = Some((path, r));
                    self.row_in_shard = 0;
                }
                Err(e) => {
                    self.paths = Vec::new().into_iter();
                    return Some(Err(e));
                }
            }
        }
    }
}
