//! Text sources: local files by path or glob, read lazily into documents.
//!
//! Implements `../shared/specs/pipeline.md` §5 ("Text: any local files"). Hub dataset
//! files arrive here as local paths after `hub.rs` resolved them.
//!
//! Decision: a `.txt` file holds one document per blank-line-separated paragraph
//! ([`TxtUnit::Paragraph`], the default), or one document per file ([`TxtUnit::File`]).
//! Paragraphs keep the corpus's natural document boundaries (pydoc topics, fortunes,
//! books) and give the seeded document split enough units to be fine-grained.
//! Decision: `.jsonl` lines and Parquet rows are one document each; a missing field in a
//! JSON line is an error (with its line number), a null Parquet value is skipped.
//! Decision: patterns expand in the order given; the files of one glob sort by path, so a
//! corpus is read in the same order on every machine.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};

use super::DataError;

/// How a `.txt` file is cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxtUnit {
    /// One document per blank-line-separated paragraph.
    #[default]
    Paragraph,
    /// One document per file.
    File,
}

/// The format of a text file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFormat {
    /// Plain UTF-8 text.
    Txt,
    /// One JSON object per line, the text in a named field.
    Jsonl,
    /// A Parquet file with a named string column.
    Parquet,
}

impl TextFormat {
    /// The format a path's extension names.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" | "md" => Some(TextFormat::Txt),
            "jsonl" | "ndjson" | "json" => Some(TextFormat::Jsonl),
            "parquet" | "pq" => Some(TextFormat::Parquet),
            _ => None,
        }
    }
}

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextSource {
    /// Files or glob patterns (`data/corpus/*.txt`), read in this order.
    pub paths: Vec<String>,
    /// Force a format instead of inferring it from each file's extension.
    pub format: Option<TextFormat>,
    /// JSON field / Parquet column holding the text (default `text`).
    pub text_field: String,
    /// How `.txt` files become documents.
    pub txt_unit: TxtUnit,
}

impl TextSource {
    /// Text from these paths/globs with the defaults (`text` field, paragraphs).
    pub fn new(paths: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            paths: paths.into_iter().map(Into::into).collect(),
            format: None,
            text_field: "text".into(),
            txt_unit: TxtUnit::Paragraph,
        }
    }

    /// A short human-readable description for metadata (`dataset source`).
    pub fn describe(&self) -> String {
        let mut s = self.paths.join(",");
        if let Some(f) = self.format {
            s.push_str(&format!(" format={f:?}"));
        }
        s.push_str(&format!(
            " field={} txt_unit={:?}",
            self.text_field, self.txt_unit
        ));
        s
    }
}

/// Expand the source's paths and globs into files, checking each has a known format.
pub fn expand_sources(src: &TextSource) -> Result<Vec<(PathBuf, TextFormat)>, DataError> {
    let mut out = Vec::new();
    for pattern in &src.paths {
        let mut files: Vec<PathBuf> = if pattern.contains(['*', '?', '[']) {
            glob::glob(pattern)
                .map_err(|e| DataError::BadGlob {
                    pattern: pattern.clone(),
                    msg: e.to_string(),
                })?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect()
        } else {
            let p = PathBuf::from(pattern);
            if p.is_file() {
                vec![p]
            } else {
                vec![]
            }
        };
        if files.is_empty() {
            return Err(DataError::NoMatch {
                pattern: pattern.clone(),
            });
        }
        files.sort();
        for f in files {
            let fmt = match src.format.or_else(|| TextFormat::from_path(&f)) {
                Some(fmt) => fmt,
                None => return Err(DataError::UnknownFormat { path: f }),
            };
            out.push((f, fmt));
        }
    }
    Ok(out)
}

/// One document: its index in corpus order and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Position in the corpus (0-based, counting every document of every file).
    pub index: u64,
    /// The text.
    pub text: String,
}

enum Open {
    Txt {
        path: PathBuf,
        lines: Lines,
        unit: TxtUnit,
    },
    Jsonl {
        path: PathBuf,
        lines: Lines,
    },
    Parquet {
        path: PathBuf,
        reader: ParquetRecordBatchReader,
        pending: VecDeque<String>,
    },
}

/// A lazy stream of documents over all files of a [`TextSource`].
pub struct DocStream {
    files: VecDeque<(PathBuf, TextFormat)>,
    field: String,
    unit: TxtUnit,
    open: Option<Open>,
    next_index: u64,
    failed: bool,
}

impl DocStream {
    /// Open a stream over `src` (expands globs now, opens files lazily).
    pub fn new(src: &TextSource) -> Result<Self, DataError> {
        Ok(Self {
            files: expand_sources(src)?.into(),
            field: src.text_field.clone(),
            unit: src.txt_unit,
            open: None,
            next_index: 0,
            failed: false,
        })
    }

    fn open_next(&mut self) -> Result<bool, DataError> {
        let Some((path, fmt)) = self.files.pop_front() else {
            return Ok(false);
        };
        let io = |source| DataError::Io {
            path: path.clone(),
            source,
        };
        self.open = Some(match fmt {
            TextFormat::Txt => Open::Txt {
                lines: Lines::new(File::open(&path).map_err(io)?),
                path,
                unit: self.unit,
            },
            TextFormat::Jsonl => Open::Jsonl {
                lines: Lines::new(File::open(&path).map_err(io)?),
                path,
            },
            TextFormat::Parquet => {
                let reader = open_parquet_text(&path, &self.field)?;
                Open::Parquet {
                    path,
                    reader,
                    pending: VecDeque::new(),
                }
            }
        });
        Ok(true)
    }

    /// The next document text of the open file, `None` when the file is done.
    fn next_in_open(&mut self) -> Result<Option<String>, DataError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(None);
        };
        match open {
            Open::Txt { path, lines, unit } => {
                let mut doc = String::new();
                while let Some(line) = lines.next_line(path)? {
                    if *unit == TxtUnit::Paragraph && line.trim().is_empty() {
                        if doc.trim().is_empty() {
                            doc.clear();
                            continue;
                        }
                        return Ok(Some(doc));
                    }
                    if !doc.is_empty() {
                        doc.push('\n');
                    }
                    doc.push_str(&line);
                }
                Ok((!doc.trim().is_empty()).then_some(doc))
            }
            Open::Jsonl { path, lines } => {
                while let Some(line) = lines.next_line(path)? {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let err = |msg: String| DataError::Jsonl {
                        path: path.clone(),
                        line: lines.line_no,
                        msg,
                    };
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| err(format!("not valid JSON: {e}")))?;
                    return match v.get(&self.field) {
                        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                        Some(serde_json::Value::Null) => continue,
                        Some(other) => Err(err(format!(
                            "field '{}' is not a string (found {}); set data.text_column",
                            self.field,
                            json_kind(other)
                        ))),
                        None => Err(err(format!(
                            "no field '{}' (fields: {}); set data.text_column to one of them",
                            self.field,
                            v.as_object()
                                .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                                .unwrap_or_else(|| "none: the line is not an object".into())
                        ))),
                    };
                }
                Ok(None)
            }
            Open::Parquet {
                path,
                reader,
                pending,
            } => loop {
                if let Some(s) = pending.pop_front() {
                    return Ok(Some(s));
                }
                let Some(batch) = reader.next() else {
                    return Ok(None);
                };
                let batch = batch.map_err(|e| DataError::Parquet {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
                let col = batch.column(0);
                let texts: Vec<Option<String>> = match col.data_type() {
                    DataType::Utf8 => col
                        .as_string::<i32>()
                        .iter()
                        .map(|s| s.map(str::to_owned))
                        .collect(),
                    DataType::LargeUtf8 => col
                        .as_string::<i64>()
                        .iter()
                        .map(|s| s.map(str::to_owned))
                        .collect(),
                    DataType::Utf8View => col
                        .as_string_view()
                        .iter()
                        .map(|s| s.map(str::to_owned))
                        .collect(),
                    other => {
                        return Err(DataError::Parquet {
                            path: path.clone(),
                            msg: format!("text column has type {other}, expected a string"),
                        })
                    }
                };
                pending.extend(texts.into_iter().flatten());
            },
        }
    }
}

/// The lines of a text file, without their `\n` / `\r\n`, counted (1-based) and
/// checked to be UTF-8 one by one, so an invalid byte is reported with its line and its
/// byte offset in the file ([`DataError::Utf8`]) instead of a bare I/O error.
struct Lines {
    reader: BufReader<File>,
    buf: Vec<u8>,
    /// Byte offset of the start of the next line.
    offset: u64,
    /// 1-based number of the line last returned (0 before the first).
    line_no: usize,
}

impl Lines {
    fn new(file: File) -> Self {
        Self {
            reader: BufReader::new(file),
            buf: Vec::new(),
            offset: 0,
            line_no: 0,
        }
    }

    /// The next line, `None` at the end of the file.
    fn next_line(&mut self, path: &Path) -> Result<Option<String>, DataError> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        let start = self.offset;
        self.offset += n as u64;
        self.line_no += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        match std::str::from_utf8(&self.buf) {
            Ok(s) => Ok(Some(s.to_owned())),
            Err(e) => Err(DataError::Utf8 {
                path: path.to_path_buf(),
                line: self.line_no,
                column: e.valid_up_to() + 1,
                offset: start + e.valid_up_to() as u64,
                byte: self.buf[e.valid_up_to()],
            }),
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Open `path` as Parquet reading only the string column `column`.
fn open_parquet_text(path: &Path, column: &str) -> Result<ParquetRecordBatchReader, DataError> {
    let pq = |msg: String| DataError::Parquet {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| pq(e.to_string()))?;
    let schema = builder.schema().clone();
    let is_text = |dt: &DataType| {
        matches!(
            dt,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        )
    };
    let idx = match schema.index_of(column) {
        Ok(i) if is_text(schema.field(i).data_type()) => i,
        _ => {
            return Err(DataError::NoColumn {
                path: path.to_path_buf(),
                column: column.to_string(),
                available: schema
                    .fields()
                    .iter()
                    .map(|f| format!("{}: {}", f.name(), f.data_type()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    // The root field index equals the leaf index only for flat schemas; use roots.
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| pq(e.to_string()))
}

impl Iterator for DocStream {
    type Item = Result<Doc, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            match self.next_in_open() {
                Ok(Some(text)) => {
                    let index = self.next_index;
                    self.next_index += 1;
                    return Some(Ok(Doc { index, text }));
                }
                Ok(None) => {
                    self.open = None;
                    match self.open_next() {
                        Ok(true) => continue,
                        Ok(false) => return None,
                        Err(e) => {
                            self.failed = true;
                            return Some(Err(e));
                        }
                    }
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    fn docs(src: &TextSource) -> Result<Vec<String>, DataError> {
        DocStream::new(src)?
            .map(|d| d.map(|d| d.text))
            .collect::<Result<_, _>>()
    }

    #[test]
    fn txt_paragraphs_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "one\ntwo\n\n\n  \nthree\n\nfour\n").unwrap();
        let mut src = TextSource::new([p.to_str().unwrap()]);
        assert_eq!(docs(&src).unwrap(), ["one\ntwo", "three", "four"]);
        src.txt_unit = TxtUnit::File;
        assert_eq!(docs(&src).unwrap().len(), 1);
    }

    #[test]
    fn jsonl_field_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut f = File::create(&p).unwrap();
        writeln!(f, r#"{{"text": "hello", "id": 1}}"#).unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"body": "x"}}"#).unwrap();
        let src = TextSource::new([p.to_str().unwrap()]);
        let err = docs(&src).unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl:3") && err.contains("no field 'text'"),
            "{err}"
        );
        let mut it = DocStream::new(&src).unwrap();
        assert_eq!(it.next().unwrap().unwrap().text, "hello");
    }

    #[test]
    fn invalid_utf8_names_line_and_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        // Line 1 is 7 bytes with its \r\n, line 2 is empty; the bad byte 0xe9 (latin-1 é) is
        // byte 6 of line 3, at offset 13.
        let p = dir.path().join("a.txt");
        std::fs::write(&p, b"caf\xc3\xa9\r\n\nnaif \xe9t\xe9\n").unwrap();
        let src = TextSource::new([p.to_str().unwrap()]);
        let err = docs(&src).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Utf8 {
                    line: 3,
                    column: 6,
                    offset: 13,
                    byte: 0xe9,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("a.txt:3") && msg.contains("byte offset 13"),
            "{msg}"
        );
        let j = dir.path().join("b.jsonl");
        std::fs::write(&j, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n").unwrap();
        let mut it = DocStream::new(&TextSource::new([j.to_str().unwrap()])).unwrap();
        assert_eq!(it.next().unwrap().unwrap().text, "ok");
        let msg = it.next().unwrap().unwrap_err().to_string();
        assert!(
            msg.contains("b.jsonl:2") && msg.contains("byte offset 25"),
            "{msg}"
        );
    }

    #[test]
    fn parquet_column_and_missing_column() {
        use arrow::array::{Int32Array, StringArray};
        use arrow::datatypes::{Field, Schema};
        use arrow::record_batch::RecordBatch;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("content", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int32Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("a b"), None, Some("c")])),
            ],
        )
        .unwrap();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(File::create(&p).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let mut src = TextSource::new([p.to_str().unwrap()]);
        let err = docs(&src).unwrap_err().to_string();
        assert!(
            err.contains("no text column 'text'") && err.contains("content"),
            "{err}"
        );
        src.text_field = "content".into();
        assert_eq!(docs(&src).unwrap(), ["a b", "c"]);
    }

    #[test]
    fn globs_sorted_and_no_match() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b", "a", "c"] {
            std::fs::write(dir.path().join(format!("{n}.txt")), n).unwrap();
        }
        let pat = format!("{}/*.txt", dir.path().display());
        assert_eq!(docs(&TextSource::new([pat])).unwrap(), ["a", "b", "c"]);
        let none = format!("{}/*.nothing", dir.path().display());
        assert!(matches!(
            DocStream::new(&TextSource::new([none])),
            Err(DataError::NoMatch { .. })
        ));
        std::fs::write(dir.path().join("x.bin"), "").unwrap();
        let bin = dir.path().join("x.bin").display().to_string();
        assert!(matches!(
            DocStream::new(&TextSource::new([bin])),
            Err(DataError::UnknownFormat { .. })
        ));
    }
}
