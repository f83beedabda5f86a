//! The seeded shuffle that feeds training: chunks of rows drawn in a random order from
//! every shard of the set at once, mixed in a buffer sized in bytes.
//!
//! Implements the SAELens mixing buffer of `ecosystem.md` §1.3 (fill a buffer of
//! `capacity` rows, shuffle it, serve the first half, refill, repeat) and issue 14 item 2:
//! a buffer that mixes many contexts at paper scale.
//!
//! Decision: rows are stored window by window (all positions of a context are adjacent),
//! so a buffer filled by reading the shards in order holds only `capacity / context_len`
//! contexts, however it is shuffled: at d_model 2048 and a 128 MiB buffer that was 16
//! contexts, and a batch of 4096 tokens came from at most ~16 windows. Instead the set is
//! cut into chunks of `chunk_rows` consecutive rows (inside one row group of one shard),
//! the chunks of all shards are put in a seeded random order, and the buffer is filled
//! chunk by chunk in that order: it then holds `capacity / chunk_rows` fragments of that
//! many different windows from all over the set. With the defaults (2 GiB, 16-row chunks)
//! at d_model 2048 that is 16,384 fragments; a 4096-token batch then has about
//! `(R/c)·(1 − e^{−B·c/R})` ≈ 3,620 distinct windows, where a perfect shuffle of 200M
//! tokens in 1024-token windows gives ≈ 4,050 (R buffer rows, c chunk rows, B batch rows);
//! `tests/it/shuffle_quality.rs` measures this ratio on a scaled-down set.
//! Decision: a chunk is read by random access (row group + row selection, only the `act`
//! column, the offset index skips the other pages), so every row is read once per pass.
//! `chunk_rows = 0` reads the shards in order (the previous behaviour; tests use it).
//! Decision: the buffer is one allocation of `capacity` rows of f32: the served half is
//! served in place and the kept half moved to the front before the refill, and the
//! shuffle swaps rows in place (the previous reader held up to 2.5 copies).
//! Decision: exact resume replays the stream: [`ShuffleReader::state`] records how many
//! rows were served and [`ShuffleReader::resume`] re-reads and discards that many. The
//! chunk order and the row shuffle are pure functions of the seed (and the pass), so the
//! replay reaches the same state; the cost is I/O only.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::PageIndexPolicy;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::reader::{decode_act, ActivationSet, SeqReader};
use super::StoreError;

/// Default bytes of the training mixing buffer (`train.shuffle_buffer_bytes`).
pub const DEFAULT_BUFFER_BYTES: u64 = 2 << 30;
/// Default rows per chunk (`train.shuffle_chunk_tokens`).
pub const DEFAULT_CHUNK_ROWS: usize = 16;

/// Settings of the shuffle buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShuffleConfig {
    /// Rows per served batch.
    pub batch_size: usize,
    /// Rows the mixing buffer holds (memory: `capacity × d_model × 4` bytes).
    pub capacity: usize,
    /// Consecutive rows per randomly placed chunk; 0 reads the shards in order.
    pub chunk_rows: usize,
    /// RNG seed.
    pub seed: u64,
    /// Start again (a new chunk order and shuffle) when the set is exhausted.
    pub repeat: bool,
}

impl ShuffleConfig {
    /// The training configuration: a buffer of `buffer_bytes` of f32 rows of width `d`
    /// (at least two batches), chunks of `chunk_rows` rows.
    pub fn for_training(
        batch_size: usize,
        buffer_bytes: u64,
        chunk_rows: usize,
        d: usize,
        seed: u64,
    ) -> Self {
        let rows = (buffer_bytes / (4 * d.max(1)) as u64).min(usize::MAX as u64 / 2) as usize;
        Self {
            batch_size,
            capacity: rows.max(batch_size * 2).max(2),
            chunk_rows,
            seed,
            repeat: false,
        }
    }
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

/// One chunk: `rows` rows from `offset` of row group `row_group` of shard `shard`.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    shard: u32,
    row_group: u32,
    offset: u32,
    rows: u32,
}

/// The footers of a set's shards and its chunk table, shared by every reader of the set.
#[derive(Debug)]
pub struct ChunkIndex {
    paths: Vec<PathBuf>,
    metas: Vec<ArrowReaderMetadata>,
    chunks: Vec<Chunk>,
    chunk_rows: usize,
}

impl ChunkIndex {
    /// Read every shard's footer (and offset index) of `set` and cut it into chunks.
    pub fn new(set: &ActivationSet, chunk_rows: usize) -> Result<Self, StoreError> {
        let paths = set.shard_paths();
        let mut metas = Vec::with_capacity(paths.len());
        let mut chunks = Vec::new();
        let c = chunk_rows.max(1);
        for (s, path) in paths.iter().enumerate() {
            let corrupt = |e: parquet::errors::ParquetError| StoreError::Corrupt {
                path: path.clone(),
                msg: e.to_string(),
            };
            let file = super::remote::open_shard(path).map_err(|e| StoreError::io(path, e))?;
            let opts =
                ArrowReaderOptions::new().with_offset_index_policy(PageIndexPolicy::Optional);
            let meta = ArrowReaderMetadata::load(&file, opts).map_err(corrupt)?;
            if chunk_rows > 0 {
                for (g, rg) in meta.metadata().row_groups().iter().enumerate() {
                    let n = rg.num_rows().max(0) as usize;
                    let mut off = 0;
                    while off < n {
                        let rows = c.min(n - off);
                        chunks.push(Chunk {
                            shard: s as u32,
                            row_group: g as u32,
                            offset: off as u32,
                            rows: rows as u32,
                        });
                        off += rows;
                    }
                }
            }
            metas.push(meta);
        }
        Ok(Self {
            paths,
            metas,
            chunks,
            chunk_rows,
        })
    }

    /// Chunks in the set.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// No chunks.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Append the f32 rows of chunk `i` to `out`.
    fn read(&self, i: usize, d: usize, out: &mut Vec<f32>) -> Result<(), StoreError> {
        let c = self.chunks[i];
        let path = &self.paths[c.shard as usize];
        let corrupt = |e: parquet::errors::ParquetError| StoreError::Corrupt {
            path: path.clone(),
            msg: e.to_string(),
        };
        let meta = &self.metas[c.shard as usize];
        let act = meta
            .schema()
            .index_of("act")
            .map_err(|_| StoreError::Corrupt {
                path: path.clone(),
                msg: "no column 'act'".into(),
            })?;
        let file = super::remote::open_shard(path).map_err(|e| StoreError::io(path, e))?;
        let mask = ProjectionMask::roots(meta.parquet_schema(), [act]);
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone())
            .with_row_groups(vec![c.row_group as usize])
            .with_projection(mask)
            .with_row_selection(RowSelection::from(vec![
                RowSelector::skip(c.offset as usize),
                RowSelector::select(c.rows as usize),
            ]))
            .with_batch_size(c.rows as usize)
            .build()
            .map_err(corrupt)?;
        let mut got = 0;
        let start = out.len();
        for b in reader {
            let b = b.map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let col = b.column(0);
            let list = col
                .as_fixed_size_list_opt()
                .ok_or_else(|| StoreError::Corrupt {
                    path: path.clone(),
                    msg: "act is not a FixedSizeList".into(),
                })?;
            got += list.len();
            decode_act(path, list, d, out)?;
        }
        // Capture never writes a NaN or infinity: one here is damage or foreign data, named
        // with its shard and row (as the sequential reader does), not left to surface in
        // training as a NaN loss with learning-rate advice.
        if let Some(i) = out[start..].iter().position(|v| !v.is_finite()) {
            let r = (i / d.max(1)) as u64;
            let first_row: u64 = meta.metadata().row_groups()[..c.row_group as usize]
                .iter()
                .map(|g| g.num_rows() as u64)
                .sum();
            let row = first_row + c.offset as u64 + r;
            let (seq, pos) = self.seq_pos(c.shard as usize, row).unwrap_or_default();
            return Err(StoreError::NonFiniteData {
                path: path.clone(),
                row,
                seq,
                pos,
                dim: i % d.max(1),
                value: out[start + i],
            });
        }
        if got != c.rows as usize {
            return Err(StoreError::Corrupt {
                path: path.clone(),
                msg: format!(
                    "row group {} gave {got} rows at offset {}, expected {}",
                    c.row_group, c.offset, c.rows
                ),
            });
        }
        Ok(())
    }
}

impl ChunkIndex {
    /// The `seq` and `pos` columns of row `row` of shard `shard` (for error messages).
    fn seq_pos(&self, shard: usize, row: u64) -> Option<(u64, u32)> {
        let meta = &self.metas[shard];
        let file = super::remote::open_shard(&self.paths[shard]).ok()?;
        let schema = meta.schema();
        let cols = [schema.index_of("seq").ok()?, schema.index_of("pos").ok()?];
        let mask = ProjectionMask::roots(meta.parquet_schema(), cols);
        let mut reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone())
            .with_projection(mask)
            .with_row_selection(RowSelection::from(vec![
                RowSelector::skip(row as usize),
                RowSelector::select(1),
            ]))
            .build()
            .ok()?;
        let b = reader.next()?.ok()?;
        let seq = b
            .column_by_name("seq")?
            .as_primitive_opt::<arrow::datatypes::UInt64Type>()?
            .value(0);
        let pos = b
            .column_by_name("pos")?
            .as_primitive_opt::<arrow::datatypes::UInt32Type>()?
            .value(0);
        Some((seq, pos))
    }
}

/// Where the rows that fill the buffer come from.
enum Feed {
    /// The shards in order (`chunk_rows = 0`).
    Sequential(SeqReader),
    /// Chunks in `order`, the next one at `next`.
    Chunks { order: Vec<u32>, next: usize },
}

/// Shuffled f32 batches `[batch_size, d_model]` from an activation set, seeded,
/// memory bounded by the buffer capacity.
pub struct ShuffleReader {
    set: ActivationSet,
    index: Arc<ChunkIndex>,
    cfg: ShuffleConfig,
    feed: Feed,
    source_done: bool,
    rng: rand::rngs::StdRng,
    d: usize,
    /// The buffer (row-major): rows `[served, serve_end)` are shuffled and ready to serve,
    /// rows from `serve_end` on wait for the next shuffle.
    buf: Vec<f32>,
    serve_end: usize,
    served: usize,
    batches: u64,
    rows: u64,
    epoch: u64,
}

/// The chunk order of pass `epoch`: a pure function of the seed and the pass.
fn chunk_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ 0x9e37_79b9_7f4a_7c15 ^ epoch.wrapping_mul(0xbf58_476d_1ce4_e5b9),
    );
    order.shuffle(&mut rng);
    order
}

impl ShuffleReader {
    /// A reader over `set` (reads every shard's footer).
    pub fn new(set: ActivationSet, cfg: ShuffleConfig) -> Result<Self, StoreError> {
        let index = Arc::new(ChunkIndex::new(&set, cfg.chunk_rows)?);
        Self::with_index(set, index, cfg)
    }

    /// A reader over `set` with its already-read `index` (of the same `chunk_rows`).
    pub fn with_index(
        set: ActivationSet,
        index: Arc<ChunkIndex>,
        cfg: ShuffleConfig,
    ) -> Result<Self, StoreError> {
        if cfg.batch_size == 0 || cfg.capacity < 2 {
            return Err(StoreError::BadSpec(
                "shuffle batch_size must be ≥ 1 and capacity ≥ 2".into(),
            ));
        }
        if index.chunk_rows != cfg.chunk_rows {
            return Err(StoreError::BadSpec(format!(
                "chunk index of {} rows used with chunk_rows = {}",
                index.chunk_rows, cfg.chunk_rows
            )));
        }
        let d = set.d_model();
        let feed = Self::feed(&set, &index, &cfg, 0);
        Ok(Self {
            rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
            set,
            index,
            cfg,
            feed,
            source_done: false,
            d,
            buf: Vec::new(),
            serve_end: 0,
            served: 0,
            batches: 0,
            rows: 0,
            epoch: 0,
        })
    }

    fn feed(set: &ActivationSet, index: &ChunkIndex, cfg: &ShuffleConfig, epoch: u64) -> Feed {
        if cfg.chunk_rows == 0 {
            // Reads no more than the buffer holds (a 4096-row read into a smaller buffer
            // would mix more than `capacity` rows).
            Feed::Sequential(set.batches(cfg.capacity.clamp(1, 4096)))
        } else {
            Feed::Chunks {
                order: chunk_order(index.len(), cfg.seed, epoch),
                next: 0,
            }
        }
    }

    /// The shared chunk index (to build more readers of the same set without re-reading
    /// the footers).
    pub fn index(&self) -> Arc<ChunkIndex> {
        self.index.clone()
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

    /// Rows served so far.
    pub fn rows_served(&self) -> u64 {
        self.rows
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

    /// Fisher–Yates over the rows of `buf[from..]`, in place.
    fn shuffle_from(&mut self, from: usize) {
        let d = self.d;
        let rows = &mut self.buf[from * d..];
        let n = rows.len() / d;
        for i in (1..n).rev() {
            let j = self.rng.random_range(0..=i);
            if i != j {
                let (lo, hi) = rows.split_at_mut(i * d);
                lo[j * d..(j + 1) * d].swap_with_slice(&mut hi[..d]);
            }
        }
    }

    /// Fill the buffer to capacity (or until the set ends).
    fn fill(&mut self) -> Result<(), StoreError> {
        let d = self.d;
        let want = self.cfg.capacity * d;
        if self.buf.capacity() < want + self.cfg.chunk_rows * d {
            self.buf
                .reserve_exact(want + self.cfg.chunk_rows * d - self.buf.len());
        }
        while self.buf.len() < want && !self.source_done {
            let more = match &mut self.feed {
                Feed::Sequential(src) => match src.next() {
                    Some(b) => {
                        self.buf.extend_from_slice(&b?.act);
                        true
                    }
                    None => false,
                },
                Feed::Chunks { order, next } => match order.get(*next) {
                    Some(&i) => {
                        *next += 1;
                        self.index.read(i as usize, d, &mut self.buf)?;
                        true
                    }
                    None => false,
                },
            };
            if !more {
                if self.cfg.repeat && self.set.n_tokens() > 0 {
                    self.epoch += 1;
                    self.feed = Self::feed(&self.set, &self.index, &self.cfg, self.epoch);
                } else {
                    self.source_done = true;
                }
            }
        }
        Ok(())
    }

    /// Append up to `n` shuffled rows (row-major) to `out`; returns how many, 0 only when
    /// the set is exhausted (never with `repeat`). The sequence of rows does not depend on
    /// how it is cut into calls.
    pub fn take_rows(&mut self, n: usize, out: &mut Vec<f32>) -> Result<usize, StoreError> {
        let d = self.d;
        let mut got = 0;
        while got < n {
            if self.served < self.serve_end {
                let take = (n - got).min(self.serve_end - self.served);
                out.extend_from_slice(&self.buf[self.served * d..(self.served + take) * d]);
                self.served += take;
                got += take;
                continue;
            }
            // Drop the served rows, refill, shuffle; serve the first half, keep the second
            // for mixing (everything once the source is done).
            self.buf.drain(..self.serve_end * d);
            self.served = 0;
            self.serve_end = 0;
            self.fill()?;
            if self.buf.is_empty() {
                break;
            }
            self.shuffle_from(0);
            let rows = self.buf.len() / d;
            self.serve_end = if self.source_done {
                rows
            } else {
                rows.div_ceil(2)
            };
        }
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
    /// A source over `set`, shuffled with `capacity`, `chunk_rows` and `seed` (`batch_size`
    /// and `repeat` of `cfg` are ignored: the trainer asks for its own row counts and wraps
    /// by `seek(0)`).
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
        // Free the old buffer before the new one fills.
        let index = self.reader.index();
        self.reader =
            ShuffleReader::with_index(self.set.clone(), index.clone(), self.cfg).map_err(err)?;
        self.reader.skip_rows(pos).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_order_is_a_seeded_permutation() {
        let a = chunk_order(100, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<u32>>());
        assert_eq!(a, chunk_order(100, 1, 0));
        assert_ne!(a, chunk_order(100, 2, 0));
        assert_ne!(a, chunk_order(100, 1, 1));
    }

    #[test]
    fn training_capacity_is_bytes_over_row_bytes() {
        let c = ShuffleConfig::for_training(4096, 2 << 30, 16, 2048, 0);
        assert_eq!(c.capacity, 262_144);
        assert_eq!(ShuffleConfig::for_training(64, 100, 16, 8, 0).capacity, 128);
    }
}
