//! The activation table: Arrow schema and Parquet key-value metadata.
//!
//! Implements `../shared/specs/pipeline.md` §4 ("Activations") and STYLE.md §2.7: one row
//! per captured token, `seq: UInt64, pos: UInt32, token_id: UInt32,
//! act: FixedSizeList<Float32 | Float16 | UInt16 (bfloat16 bits), d_model>`, with the
//! metadata a reader checks.
//!
//! Decision: Arrow and Parquet have no bfloat16 type, so bf16 activations are stored as
//! their raw bit patterns in `UInt16` items (`FixedSizeList<UInt16, d_model>`), marked by
//! the file metadata `dtype = "bfloat16"` and by the item field's own metadata
//! `saepipe.dtype = "bfloat16"`. pyarrow and DuckDB read that as-is (an integer list);
//! `(bits as u32) << 16` reinterpreted as f32 is the value. A fixed-size binary column
//! would have hidden the row structure from both; an extension type would need a
//! registration that neither reader does by default.
//!
//! Decision: metadata keys are flat strings (`hookpoint`, `d_model`, …) so that pyarrow's
//! `schema.metadata` and DuckDB's `parquet_kv_metadata()` show them directly; everything
//! that is not a plain string (lists, the packing policy) is JSON.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

/// Value type of the stored activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActDtype {
    /// IEEE f32, bit-exact copy of the forward pass.
    #[default]
    F32,
    /// IEEE f16 (round to nearest even); half the disk.
    F16,
    /// bfloat16 (round to nearest even), stored as its bits in `UInt16` items since Arrow
    /// has no bf16; half the disk, f32's range.
    Bf16,
}

/// Field metadata key that marks the `UInt16` items of a bf16 `act` column.
pub const DTYPE_FIELD_KEY: &str = "saepipe.dtype";

impl ActDtype {
    /// `float32` / `float16`, as stored in metadata.
    pub fn name(self) -> &'static str {
        match self {
            ActDtype::F32 => "float32",
            ActDtype::F16 => "float16",
            ActDtype::Bf16 => "bfloat16",
        }
    }
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            ActDtype::F32 => 4,
            ActDtype::F16 | ActDtype::Bf16 => 2,
        }
    }
    /// The Arrow type of one value (bf16: its bits as `UInt16`).
    pub fn arrow(self) -> DataType {
        match self {
            ActDtype::F32 => DataType::Float32,
            ActDtype::F16 => DataType::Float16,
            ActDtype::Bf16 => DataType::UInt16,
        }
    }
    /// The item field of the `act` list (bf16 items carry [`DTYPE_FIELD_KEY`]).
    pub fn item_field(self) -> Field {
        let f = Field::new(ITEM, self.arrow(), false);
        match self {
            ActDtype::Bf16 => f.with_metadata(HashMap::from([(
                DTYPE_FIELD_KEY.to_string(),
                self.name().to_string(),
            )])),
            _ => f,
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" => Some(ActDtype::F32),
            "float16" => Some(ActDtype::F16),
            "bfloat16" => Some(ActDtype::Bf16),
            _ => None,
        }
    }
}

/// Name of the one-value field inside `act` (Arrow's conventional list item name).
pub const ITEM: &str = "item";

/// The metadata every activation shard carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActMeta {
    /// saepipe version that wrote the file.
    pub saepipe_version: String,
    /// Model source (hub repo, `local:<dir>`, `gguf:<file>`).
    pub model_repo: String,
    /// Model revision (commit sha for hub repos; a content hash or `local` otherwise).
    pub model_revision: String,
    /// Hookpoint name (`blocks.3.hook_mlp_out`).
    pub hookpoint: String,
    /// Width of `act`.
    pub d_model: usize,
    /// Stored value type.
    pub dtype: ActDtype,
    /// Tokens per window.
    pub context_len: usize,
    /// SHA-256 of the tokenizer's canonical JSON.
    pub tokenizer_sha256: String,
    /// Where the text came from.
    pub dataset: String,
    /// Hash of everything that determines this hookpoint's capture.
    pub config_hash: String,
    /// `train` or `eval`.
    pub split: String,
    /// Whether special-token positions are excluded.
    pub exclude_special_tokens: bool,
    /// The token ids whose positions were not captured.
    pub excluded_token_ids: Vec<u32>,
    /// Packing policy (JSON of `data::PackSpec`).
    pub packing: String,
}

const KEYS: [&str; 14] = [
    "saepipe_version",
    "model_repo",
    "model_revision",
    "hookpoint",
    "d_model",
    "dtype",
    "context_len",
    "tokenizer_sha256",
    "dataset",
    "config_hash",
    "split",
    "exclude_special_tokens",
    "excluded_token_ids",
    "packing",
];

impl ActMeta {
    /// As Arrow schema metadata (written to the Parquet footer's key-value metadata).
    pub fn to_map(&self) -> HashMap<String, String> {
        let vals = [
            self.saepipe_version.clone(),
            self.model_repo.clone(),
            self.model_revision.clone(),
            self.hookpoint.clone(),
            self.d_model.to_string(),
            self.dtype.name().to_string(),
            self.context_len.to_string(),
            self.tokenizer_sha256.clone(),
            self.dataset.clone(),
            self.config_hash.clone(),
            self.split.clone(),
            self.exclude_special_tokens.to_string(),
            serde_json::to_string(&self.excluded_token_ids).unwrap_or_default(),
            self.packing.clone(),
        ];
        let mut m: HashMap<String, String> = KEYS.iter().map(|k| k.to_string()).zip(vals).collect();
        m.insert("saepipe_kind".into(), "activations".into());
        m
    }

    /// Read back from key-value metadata; `Err(key)` names the first missing or malformed key.
    pub fn from_map(m: &HashMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| k.to_string());
        let num = |k: &str| get(k)?.parse::<usize>().map_err(|_| k.to_string());
        Ok(Self {
            saepipe_version: get("saepipe_version")?,
            model_repo: get("model_repo")?,
            model_revision: get("model_revision")?,
            hookpoint: get("hookpoint")?,
            d_model: num("d_model")?,
            dtype: ActDtype::parse(&get("dtype")?).ok_or("dtype")?,
            context_len: num("context_len")?,
            tokenizer_sha256: get("tokenizer_sha256")?,
            dataset: get("dataset")?,
            config_hash: get("config_hash")?,
            split: get("split")?,
            exclude_special_tokens: get("exclude_special_tokens")?
                .parse()
                .map_err(|_| "exclude_special_tokens")?,
            excluded_token_ids: serde_json::from_str(&get("excluded_token_ids")?)
                .map_err(|_| "excluded_token_ids")?,
            packing: get("packing")?,
        })
    }
}

/// The Arrow schema of an activation shard, with `meta` attached.
pub fn act_schema(d_model: usize, dtype: ActDtype, meta: Option<&ActMeta>) -> SchemaRef {
    let fields = vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new("pos", DataType::UInt32, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new(
            "act",
            DataType::FixedSizeList(Arc::new(dtype.item_field()), d_model as i32),
            false,
        ),
    ];
    let schema = Schema::new(fields);
    Arc::new(match meta {
        Some(m) => schema.with_metadata(m.to_map()),
        None => schema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn meta() -> ActMeta {
        ActMeta {
            saepipe_version: "0.1.0".into(),
            model_repo: "local:/m".into(),
            model_revision: "abc".into(),
            hookpoint: "blocks.1.hook_mlp_out".into(),
            d_model: 8,
            dtype: ActDtype::F16,
            context_len: 16,
            tokenizer_sha256: "t".into(),
            dataset: "c.txt".into(),
            config_hash: "h".into(),
            split: "train".into(),
            exclude_special_tokens: true,
            excluded_token_ids: vec![0, 1, 2],
            packing: "{}".into(),
        }
    }

    #[test]
    fn metadata_roundtrip_and_missing_key() {
        let m = meta();
        let mut map = m.to_map();
        assert_eq!(ActMeta::from_map(&map).unwrap(), m);
        map.remove("d_model");
        assert_eq!(ActMeta::from_map(&map).unwrap_err(), "d_model");
    }

    #[test]
    fn schema_shape() {
        let s = act_schema(8, ActDtype::F32, Some(&meta()));
        assert_eq!(s.fields().len(), 4);
        assert_eq!(s.metadata()["hookpoint"], "blocks.1.hook_mlp_out");
        match s.field(3).data_type() {
            DataType::FixedSizeList(f, 8) => assert_eq!(f.data_type(), &DataType::Float32),
            other => panic!("{other}"),
        }
        let s = act_schema(8, ActDtype::Bf16, None);
        match s.field(3).data_type() {
            DataType::FixedSizeList(f, 8) => {
                assert_eq!(f.data_type(), &DataType::UInt16);
                assert_eq!(f.metadata()[DTYPE_FIELD_KEY], "bfloat16");
            }
            other => panic!("{other}"),
        }
        let mut m = meta();
        m.dtype = ActDtype::Bf16;
        assert_eq!(
            ActMeta::from_map(&m.to_map()).unwrap().dtype,
            ActDtype::Bf16
        );
    }
}
