//! Text datasets for capture: local files (and hub dataset files once `hub.rs` resolved
//! them to local paths) → documents → token windows.
//!
//! Implements `../shared/specs/pipeline.md` §2 and §5 ("Text: any local files") and the
//! tokenisation/packing rows of `ecosystem.md` §1.4.
//!
//! - [`source`]: which files, in which format, and how a file becomes documents.
//! - [`pack`]: tokenisation, packing into fixed context windows, the held-out split.
//!
//! Everything is a lazy iterator: the corpus's tokens are never held in memory at once.

pub mod config;
pub mod pack;
pub mod source;

pub use config::DataConfig;
pub use pack::{
    special_token_ids, tokenizer_sha256, DocSplit, PackSpec, Packing, Separator, SpecialIds, Split,
    Window, WindowStream,
};
pub use source::{expand_sources, Doc, DocStream, TextFormat, TextSource, TxtUnit};

use std::path::PathBuf;

/// Why a dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A source pattern matched nothing.
    #[error("dataset source '{pattern}' matches no file; check the path (relative paths are relative to the working directory) or the glob")]
    NoMatch {
        /// The pattern as given.
        pattern: String,
    },
    /// A glob pattern is malformed.
    #[error("dataset source '{pattern}' is not a valid glob: {msg}")]
    BadGlob {
        /// The pattern as given.
        pattern: String,
        /// What the glob parser said.
        msg: String,
    },
    /// A file's extension names no format we read.
    #[error("{path}: unknown text format; text is read from .txt, .jsonl (or .json lines) and .parquet files: list only those in data.files (e.g. \"<dir>/*.jsonl\" instead of \"<dir>/*\")")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A JSON line is not valid JSON or lacks the text field.
    #[error("{path}:{line}: {msg}")]
    Jsonl {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A text file holds a byte sequence that is not UTF-8.
    #[error("{path}:{line}: invalid UTF-8 at byte offset {offset} (line {line}, byte {column} of the line: 0x{byte:02x}); text files must be UTF-8 — re-encode the file (e.g. `iconv -f latin1 -t utf-8`) or remove the bytes")]
    Utf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 1-based byte position of the bad byte in its line.
        column: usize,
        /// 0-based byte offset of the bad byte in the file.
        offset: u64,
        /// The first byte that is not valid UTF-8.
        byte: u8,
    },
    /// A Parquet file has no column of that name (or it is not a string column).
    #[error("{path}: no text column '{column}' (columns: {available}); set data.text_column to one of them")]
    NoColumn {
        /// The file.
        path: PathBuf,
        /// The requested column.
        column: String,
        /// The file's columns (with types).
        available: String,
    },
    /// A Parquet file could not be read.
    #[error("{path}: not a readable Parquet file: {msg}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The reader's message.
        msg: String,
    },
    /// The tokenizer failed on a document.
    #[error("tokenizer failed on document {doc}: {msg}")]
    Tokenizer {
        /// Document index.
        doc: u64,
        /// The tokenizer's message.
        msg: String,
    },
    /// The packing policy needs a token the tokenizer/model does not have.
    #[error(
        "packing needs a {what} token but the model and tokenizer define none; set data.{fix}"
    )]
    MissingSpecial {
        /// Which token (BOS, EOS).
        what: &'static str,
        /// The config key that avoids needing it.
        fix: &'static str,
    },
    /// The packing spec is invalid.
    #[error("invalid packing: {0}")]
    BadSpec(String),
}
