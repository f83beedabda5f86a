//! Reading activation sets: metadata checks, sequential batches, and the seeded
//! shuffle ("mixing") buffer that feeds training.
//!
//! Implements `../shared/specs/pipeline.md` §4 ("the reader checks them and names the
//! mismatch"; "peak memory of capture and training must not grow with the token budget")
//! and the SAELens mixing buffer of `ecosystem.md` §1.3: fill a buffer of `capacity` rows,
//! shuffle it, serve the first half, refill, repeat.
//!
//! Decision: a set is only readable once its `manifest.json` exists (the completion
//! marker); every shard's footer metadata is checked against the manifest and the caller's
//! [`Expect`] before the first row is served.
//! Decision: exact resume replays the stream: [`ShuffleReader::state`] records how many
//! batches were served and [`ShuffleReader::resume`] re-reads and discards that many. The
//! data read is the same, the RNG draws are the same, so batch n+1 is identical; the cost
//! is I/O only, and memory stays bounded by the buffer.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, FixedSizeListArray};
use arrow::datatypes::{DataType, Float16Type, Float32Type, UInt32Type, UInt64Type};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::manifest::{Manifest, MANIFEST};
use super::schema::ActMeta;
use super::StoreError;

/// Read a shard's footer: its metadata and row count. Does not read any data page.
pub fn read_shard_meta(path: &Path) -> Result<(ActMeta, u64), StoreError> {
    let corrupt = |msg: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
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
    let values = act.values();
    if values.len() != act.len() * d {
        return Err(bad("act values have the wrong length"));
    }
    let act: Vec<f32> = match values.data_type() {
        DataType::Float32 => values.as_primitive::<Float32Type>().values().to_vec(),
        DataType::Float16 => values
            .as_primitive::<Float16Type>()
            .values()
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        other => {
            return Err(bad(&format!(
                "act values are {other}, expected Float32 or Float16"
            )))
        }
    };
    Ok(ActBatch {
        seq: seq.values().to_vec(),
        pos: pos.values().to_vec(),
        token_id: tok.values().to_vec(),
        act,
    })
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
            let opened = File::open(&path)
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

/// Settings of the shuffle buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShuffleConfig {
    /// Rows per served batch.
    pub batch_size: usize,
    /// Rows the mixing buffer holds (memory: `capacity × d_model × 4` bytes, plus half).
    pub capacity: usize,
    /// RNG seed.
    pub seed: u64,
    /// Start again from the first shard (a new shuffle) when the set is exhausted.
    pub repeat: bool,
}

/// Where a [`ShuffleReader`] stands, for exact checkpoint resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderState {
    /// Batches served so far.
    pub batches: u64,
    /// Rows served so far.
    pub rows: u64,
    /// Completed passes over the set (with `repeat`).
    pub epoch: u64,
}

/// Shuffled f32 batches `[batch_size, d_model]` from an activation set, seeded,
/// memory bounded by the buffer capacity.
pub struct ShuffleReader {
    set: ActivationSet,
    cfg: ShuffleConfig,
    source: SeqReader,
    source_done: bool,
    rng: rand::rngs::StdRng,
    d: usize,
    /// Rows waiting to be shuffled (row-major).
    buffer: Vec<f32>,
    /// Shuffled rows ready to serve, served from the front.
    ready: Vec<f32>,
    ready_at: usize,
    batches: u64,
    rows: u64,
    epoch: u64,
}

impl ShuffleReader {
    /// A reader over `set`.
    pub fn new(set: ActivationSet, cfg: ShuffleConfig) -> Result<Self, StoreError> {
        if cfg.batch_size == 0 || cfg.capacity < 2 {
            return Err(StoreError::BadSpec(
                "shuffle batch_size must be ≥ 1 and capacity ≥ 2".into(),
            ));
        }
        let d = set.d_model();
        let source = set.batches(4096);
        Ok(Self {
            rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
            set,
            cfg,
            source,
            source_done: false,
            d,
            buffer: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            batches: 0,
            rows: 0,
            epoch: 0,
        })
    }

    /// Activation width.
    pub fn d_model(&self) -> usize {
        self.d
    }

    /// Where the reader stands.
    pub fn state(&self) -> ReaderState {
        ReaderState {
            batches: self.batches,
            rows: self.rows,
            epoch: self.epoch,
        }
    }

    /// A reader over `set` positioned exactly where `state` was taken (same config).
    pub fn resume(
        set: ActivationSet,
        cfg: ShuffleConfig,
        state: ReaderState,
    ) -> Result<Self, StoreError> {
        let mut r = Self::new(set, cfg)?;
        if r.skip_rows(state.rows)? < state.rows {
            return Err(StoreError::BadSpec(format!(
                "cannot resume at row {}: the set ends after {} rows",
                state.rows, r.rows
            )));
        }
        r.batches = state.batches;
        Ok(r)
    }

    fn shuffle_rows(&mut self, rows: &mut [f32]) {
        let d = self.d;
        let n = rows.len() / d;
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut self.rng);
        let src = rows.to_vec();
        for (dst, &s) in perm.iter().enumerate() {
            rows[dst * d..(dst + 1) * d].copy_from_slice(&src[s * d..(s + 1) * d]);
        }
    }

    /// Fill the buffer to capacity (or until the set ends).
    fn fill(&mut self) -> Result<(), StoreError> {
        let want = self.cfg.capacity * self.d;
        while self.buffer.len() < want && !self.source_done {
            match self.source.next() {
                Some(b) => self.buffer.extend_from_slice(&b?.act),
                None if self.cfg.repeat && self.set.n_tokens() > 0 => {
                    self.epoch += 1;
                    self.source = self.set.batches(4096);
                }
                None => self.source_done = true,
            }
        }
        Ok(())
    }

    /// Append up to `n` shuffled rows (row-major) to `out`; returns how many, 0 only when
    /// the set is exhausted (never with `repeat`). The sequence of rows does not depend on
    /// how it is cut into calls.
    pub fn take_rows(&mut self, n: usize, out: &mut Vec<f32>) -> Result<usize, StoreError> {
        let d = self.d;
        let want = n * d;
        let start = out.len();
        while out.len() - start < want {
            if self.ready_at < self.ready.len() {
                let take = (want - (out.len() - start)).min(self.ready.len() - self.ready_at);
                out.extend_from_slice(&self.ready[self.ready_at..self.ready_at + take]);
                self.ready_at += take;
                continue;
            }
            // Refill and shuffle; serve the first half, keep the second for mixing
            // (everything once the source is done).
            self.fill()?;
            if self.buffer.is_empty() {
                break;
            }
            let mut buf = std::mem::take(&mut self.buffer);
            self.shuffle_rows(&mut buf);
            let rows = buf.len() / d;
            let serve = if self.source_done {
                rows
            } else {
                rows.div_ceil(2)
            };
            self.buffer = buf.split_off(serve * d);
            self.ready = buf;
            self.ready_at = 0;
        }
        let got = (out.len() - start) / d;
        self.rows += got as u64;
        Ok(got)
    }

    /// The next batch `[batch_size × d_model]` row-major, `None` when the set is exhausted
    /// (never with `repeat`). The last batch of a finite set may be shorter.
    pub fn next_batch(&mut self) -> Result<Option<Vec<f32>>, StoreError> {
        let mut out = Vec::with_capacity(self.cfg.batch_size * self.d);
        if self.take_rows(self.cfg.batch_size, &mut out)? == 0 {
            return Ok(None);
        }
        self.batches += 1;
        Ok(Some(out))
    }

    /// Skip `n` rows (replaying the shuffle, in bounded chunks).
    pub fn skip_rows(&mut self, mut n: u64) -> Result<u64, StoreError> {
        let mut scratch = Vec::new();
        let mut skipped = 0;
        while n > 0 {
            scratch.clear();
            let got = self.take_rows(n.min(4096) as usize, &mut scratch)? as u64;
            if got == 0 {
                break;
            }
            n -= got;
            skipped += got;
        }
        Ok(skipped)
    }
}

/// The capture stage's Parquet reader as the trainer's [`crate::store::ActivationSource`]:
/// shuffled rows, position = rows served, `seek` replays the same shuffle.
pub struct ParquetSource {
    set: ActivationSet,
    cfg: ShuffleConfig,
    reader: ShuffleReader,
}

impl ParquetSource {
    /// A source over `set`, shuffled with `capacity` and `seed` (`batch_size`/`repeat` of
    /// `cfg` are ignored: the trainer asks for its own row counts and wraps by `seek(0)`).
    pub fn new(set: ActivationSet, cfg: ShuffleConfig) -> Result<Self, StoreError> {
        let cfg = ShuffleConfig {
            repeat: false,
            ..cfg
        };
        let reader = ShuffleReader::new(set.clone(), cfg)?;
        Ok(Self { set, cfg, reader })
    }
}

impl crate::store::ActivationSource for ParquetSource {
    fn d_in(&self) -> usize {
        self.set.d_model()
    }
    fn len_rows(&self) -> Option<u64> {
        Some(self.set.n_tokens())
    }
    fn next_batch(
        &mut self,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<usize, crate::store::DataError> {
        self.reader
            .take_rows(rows, out)
            .map_err(|e| crate::store::DataError::Read(e.to_string()))
    }
    fn position(&self) -> u64 {
        self.reader.rows
    }
    fn seek(&mut self, pos: u64) -> Result<(), crate::store::DataError> {
        let len = self.set.n_tokens();
        if pos > len {
            return Err(crate::store::DataError::Seek { pos, len });
        }
        let err = |e: StoreError| crate::store::DataError::Read(e.to_string());
        self.reader = ShuffleReader::new(self.set.clone(), self.cfg).map_err(err)?;
        self.reader.skip_rows(pos).map_err(err)?;
        Ok(())
    }
}
