//! `[data]` of a pipeline file: which text, how it becomes token windows, how many tokens.
//! Owned here, beside the code that reads it; `crate::config` re-exports it.

use serde::{Deserialize, Serialize};

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// Hub dataset repo id `"org/name"`. Absent: `files` are local paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Pinned revision of the dataset repo (commit sha or tag). Required with `repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Text files: with `repo`, file names or globs inside the repo (globs list the repo
    /// through the hub API); without, local paths or globs relative to the working
    /// directory. Extensions `.txt` (documents per `txt_unit`), `.jsonl`, `.parquet`.
    /// Required, non-empty.
    pub files: Vec<String>,
    /// Column (jsonl key / Parquet column) holding the text. Default `"text"`.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Tokens per sequence (window), BOS included. Required.
    pub context_len: usize,
    /// Training budget: tokens to capture for training. Required.
    pub n_tokens: u64,
    /// Held-out budget: tokens captured separately for evaluation. Default 0.
    #[serde(default)]
    pub eval_tokens: u64,
    /// Put the tokenizer's BOS token at the start of every window. Default true.
    #[serde(default = "yes")]
    pub prepend_bos: bool,
    /// Concatenate documents (each followed by `separator`) and cut the stream into
    /// windows; false: one window per document, truncated to `context_len`, shorter ones
    /// right-padded with the padding never captured. Default true.
    #[serde(default = "yes")]
    pub concat_docs: bool,
    /// Token after each document when concatenating: `"eos"`, `"bos"` or `"none"`.
    /// Default `"eos"`.
    #[serde(default)]
    pub separator: super::Separator,
    /// How a `.txt` file becomes documents: `"paragraph"` (blank-line separated, the
    /// default) or `"file"`.
    #[serde(default)]
    pub txt_unit: super::TxtUnit,
    /// Expected share of documents held out for evaluation (the `eval_tokens` come from
    /// them), chosen by a seeded hash of each document's text; in [0, 1). Default 0.1.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Seed of the held-out split hash. Default 0.
    #[serde(default)]
    pub split_seed: u64,
    /// Seed for shuffling documents before windowing. Absent: file order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle_seed: Option<u64>,
}

fn default_eval_fraction() -> f64 {
    0.1
}

fn default_text_column() -> String {
    "text".to_string()
}

fn yes() -> bool {
    true
}
