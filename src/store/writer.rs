//! One activation shard: rows → `part-NNNNN.parquet.tmp` → close → rename.
//!
//! Implements STYLE.md §2.7: explicit `WriterProperties`, row groups bounded by rows and
//! by bytes (so memory does not grow with the shard), the shard only appears under its
//! final name once complete.
//!
//! Decision: compression defaults to none. Activations are dense floats and compress by a
//! few percent only (measured with `saepipe bench capture`), while zstd costs throughput.
//! Decision: dictionary encoding and statistics are off for `act` (useless on floats and
//! costly); the small integer columns keep page statistics so readers can prune by `seq`.
//! Decision: `created_by` is pinned to `saepipe <version>` so that a shard's bytes depend
//! only on its rows and metadata, which makes resume verifiable bit for bit.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, FixedSizeListArray, Float16Array, Float32Array, UInt16Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use half::f16;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use super::schema::{act_schema, ActDtype, ActMeta, ITEM};
use super::StoreError;
use crate::util::fs::tmp_path;

/// Parquet compression of activation shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActCompression {
    /// No compression (default: floats barely compress).
    #[default]
    None,
    /// Snappy.
    Snappy,
    /// Zstandard level 1.
    Zstd,
}

/// Writer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterSettings {
    /// Most rows per row group.
    pub row_group_rows: usize,
    /// Most (estimated, encoded) bytes per row group.
    pub row_group_bytes: usize,
    /// Compression codec.
    pub compression: ActCompression,
}

impl Default for WriterSettings {
    fn default() -> Self {
        Self {
            row_group_rows: 65_536,
            row_group_bytes: 64 << 20,
            compression: ActCompression::None,
        }
    }
}

impl WriterSettings {
    /// The explicit Parquet writer properties for activation shards.
    pub fn properties(&self, kv: Vec<KeyValue>) -> WriterProperties {
        let codec = match self.compression {
            ActCompression::None => Compression::UNCOMPRESSED,
            ActCompression::Snappy => Compression::SNAPPY,
            ActCompression::Zstd => {
                Compression::ZSTD(ZstdLevel::try_new(1).expect("invariant: 1 is a valid level"))
            }
        };
        let act = ColumnPath::new(vec!["act".into(), "list".into(), ITEM.into()]);
        WriterProperties::builder()
            .set_writer_version(WriterVersion::PARQUET_1_0)
            .set_created_by(format!("saepipe {}", env!("CARGO_PKG_VERSION")))
            .set_compression(codec)
            .set_max_row_group_row_count(Some(self.row_group_rows.max(1)))
            .set_max_row_group_bytes(Some(self.row_group_bytes.max(1)))
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_column_statistics_enabled(act, EnabledStatistics::None)
            .set_key_value_metadata(Some(kv))
            .build()
    }
}

/// Rows of one batch for one hookpoint, column by column.
#[derive(Debug, Default, Clone)]
pub struct Rows {
    /// Window index per row.
    pub seq: Vec<u64>,
    /// Position in the window per row.
    pub pos: Vec<u32>,
    /// Token id per row.
    pub token_id: Vec<u32>,
    /// `rows × d_model` activations, row-major, f32.
    pub act: Vec<f32>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.seq.len()
    }
    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }
}

/// Build the record batch for `rows` under `schema`.
pub fn rows_to_batch(
    rows: Rows,
    d_model: usize,
    dtype: ActDtype,
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let values: ArrayRef = match dtype {
        ActDtype::F32 => Arc::new(Float32Array::from(rows.act)),
        ActDtype::F16 => Arc::new(Float16Array::from(
            rows.act
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect::<Vec<_>>(),
        )),
        ActDtype::Bf16 => Arc::new(UInt16Array::from(
            rows.act
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect::<Vec<_>>(),
        )),
    };
    let item = Arc::new(dtype.item_field());
    let act = FixedSizeListArray::try_new(item, d_model as i32, values, None)?;
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt64Array::from(rows.seq)),
            Arc::new(UInt32Array::from(rows.pos)),
            Arc::new(UInt32Array::from(rows.token_id)),
            Arc::new(act),
        ],
    )
}

/// A shard being written to `<path>.tmp`.
pub struct ShardWriter {
    path: PathBuf,
    writer: Option<ArrowWriter<File>>,
    schema: SchemaRef,
    d_model: usize,
    dtype: ActDtype,
    rows: u64,
    committed: bool,
}

impl ShardWriter {
    /// Start writing `path` (as `path.tmp`).
    pub fn create(
        path: &Path,
        meta: &ActMeta,
        settings: &WriterSettings,
    ) -> Result<Self, StoreError> {
        let tmp = tmp_path(path);
        let io = |e| StoreError::io(&tmp, e);
        let file = File::create(&tmp).map_err(io)?;
        // The metadata goes both into the footer's key-value list (DuckDB's
        // `parquet_kv_metadata`, our footer-only checks) and into the embedded Arrow schema
        // (pyarrow's `schema.metadata`); both are written in sorted key order, so a shard's
        // bytes are reproducible.
        let schema = act_schema(meta.d_model, meta.dtype, Some(meta));
        let kv: std::collections::BTreeMap<String, String> = meta.to_map().into_iter().collect();
        let kv = kv.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(settings.properties(kv)))
            .map_err(|e| StoreError::parquet(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Some(writer),
            schema,
            d_model: meta.d_model,
            dtype: meta.dtype,
            rows: 0,
            committed: false,
        })
    }

    /// Append rows (row groups are flushed by the writer's row and byte limits).
    pub fn write(&mut self, rows: Rows) -> Result<(), StoreError> {
        let tmp = tmp_path(&self.path);
        let n = rows.len() as u64;
        let batch = rows_to_batch(rows, self.d_model, self.dtype, &self.schema)
            .map_err(|e| StoreError::parquet(&tmp, e))?;
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| StoreError::parquet(&tmp, "writer already closed"))?;
        w.write(&batch).map_err(|e| StoreError::parquet(&tmp, e))?;
        self.rows += n;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Finish the footer, fsync and rename into place. Returns the file size in bytes.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        let tmp = tmp_path(&self.path);
        let w = self
            .writer
            .take()
            .ok_or_else(|| StoreError::parquet(&tmp, "writer already closed"))?;
        let file = w.into_inner().map_err(|e| StoreError::parquet(&tmp, e))?;
        file.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
        let bytes = file.metadata().map_err(|e| StoreError::io(&tmp, e))?.len();
        drop(file);
        fs::rename(&tmp, &self.path).map_err(|e| StoreError::io(&self.path, e))?;
        self.committed = true;
        Ok(bytes)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // An unfinished shard (error in write or finish, panic) leaves no file behind,
        // not even the .tmp.
        self.writer.take();
        if !self.committed {
            let _ = fs::remove_file(tmp_path(&self.path));
        }
    }
}
