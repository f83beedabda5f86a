//! Tokenisation and packing of documents into fixed context windows, and the seeded
//! held-out split.
//!
//! Implements the tokenisation/packing row of `ecosystem.md` §1.4 (SAELens
//! `concat_and_batch_sequences`, sparsify `chunk_and_tokenize`) for
//! `../shared/specs/pipeline.md` §2.
//!
//! Packing policies ([`PackSpec`]):
//! - [`Packing::Concat`] (default): documents are tokenised without special tokens and
//!   concatenated, each followed by the [`Separator`] token (default EOS); the stream is
//!   cut into windows of `context_len` tokens, each starting with BOS when `prepend_bos`
//!   (so `context_len - 1` text tokens per window). The partial window at the end of the
//!   corpus is dropped (sparsify's rule).
//! - [`Packing::Truncate`]: one document per window, `[BOS] + doc` truncated to
//!   `context_len`; shorter windows are right-padded (pad id, else EOS, else 0) and the
//!   padded positions are never captured. Right padding leaves every real position's
//!   activation unchanged under causal attention.
//!
//! Decision: the held-out split is by **document**, by a seeded hash of the document's
//! text: `sha256(seed_le ‖ text)` read as a u64, eval iff `< eval_fraction · 2⁶⁴`. Train and
//! eval windows are then packed from disjoint document streams, so no token of an eval
//! window is a training token, and duplicated documents always land on the same side.
//! Decision: windows are produced in corpus order unless `shuffle_seed` is set; then
//! documents pass through a seeded buffer of [`DOC_SHUFFLE_BUFFER`] documents (a bounded,
//! streaming shuffle, not a global permutation). The training reader shuffles rows
//! again (`capture::reader`).

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::source::{Doc, DocStream, TextSource};
use super::DataError;

/// The separator placed after every document when concatenating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Separator {
    /// The EOS token (sparsify, and what most pre-training pipelines do).
    #[default]
    Eos,
    /// The BOS token (SAELens's default `sequence_separator_token`).
    Bos,
    /// Nothing: documents run into each other.
    None,
}

/// How documents become windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Concatenate documents with separators and cut into full windows.
    #[default]
    Concat,
    /// One document per window, truncated, right-padded; padding is never captured.
    Truncate,
}

/// The packing policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackSpec {
    /// Tokens per window (the model's context for capture).
    pub context_len: usize,
    /// Start every window with BOS.
    pub prepend_bos: bool,
    /// Concatenate or one document per window.
    pub packing: Packing,
    /// Separator after each document ([`Packing::Concat`] only).
    pub separator: Separator,
    /// Shuffle documents through a seeded buffer of [`DOC_SHUFFLE_BUFFER`] documents
    /// before packing; `None` keeps corpus order.
    #[serde(default)]
    pub shuffle_seed: Option<u64>,
}

/// Documents held by the seeded document shuffle (bounded, so streaming stays streaming).
pub const DOC_SHUFFLE_BUFFER: usize = 1024;

impl PackSpec {
    /// Windows of `context_len` tokens with the defaults (BOS first, EOS-separated concat).
    pub fn new(context_len: usize) -> Self {
        Self {
            context_len,
            prepend_bos: true,
            packing: Packing::Concat,
            separator: Separator::Eos,
            shuffle_seed: None,
        }
    }
}

/// Which side of the held-out split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training windows.
    Train,
    /// Held-out evaluation windows.
    Eval,
}

impl Split {
    /// `train` or `eval`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// The seeded document split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DocSplit {
    /// Seed of the hash.
    pub seed: u64,
    /// Expected share of documents held out for evaluation, in [0, 1).
    pub eval_fraction: f64,
}

impl DocSplit {
    /// The side `text` falls on.
    pub fn split_of(&self, text: &str) -> Split {
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(text.as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        let x = u64::from_le_bytes(first) as f64 / 18_446_744_073_709_551_616.0;
        if x < self.eval_fraction {
            Split::Eval
        } else {
            Split::Train
        }
    }
}

/// The special tokens packing may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpecialIds {
    /// BOS.
    pub bos: Option<u32>,
    /// EOS (the first, if the model lists several).
    pub eos: Option<u32>,
    /// PAD.
    pub pad: Option<u32>,
}

/// One context window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Index of the window in its split's stream (0-based): the `seq` column.
    pub index: u64,
    /// `context_len` token ids.
    pub ids: Vec<u32>,
    /// Positions `0..n_real` are text; the rest is padding ([`Packing::Truncate`]).
    pub n_real: usize,
}

/// A lazy stream of windows for one side of the split.
pub struct WindowStream {
    docs: DocStream,
    tokenizer: Arc<Tokenizer>,
    spec: PackSpec,
    split: DocSplit,
    side: Split,
    bos: Option<u32>,
    sep: Option<u32>,
    pad: u32,
    buf: VecDeque<u32>,
    next_index: u64,
    failed: bool,
    shuffle: Option<(rand::rngs::StdRng, Vec<Doc>)>,
    docs_done: bool,
}

impl WindowStream {
    /// Windows of `side` over `src`, tokenised with `tokenizer`.
    pub fn new(
        src: &TextSource,
        tokenizer: Arc<Tokenizer>,
        spec: &PackSpec,
        split: DocSplit,
        side: Split,
        special: SpecialIds,
    ) -> Result<Self, DataError> {
        let body = spec.context_len.saturating_sub(spec.prepend_bos as usize);
        if body == 0 {
            return Err(DataError::BadSpec(format!(
                "context_len {} leaves no room for text (prepend_bos = {})",
                spec.context_len, spec.prepend_bos
            )));
        }
        if !(0.0..1.0).contains(&split.eval_fraction) {
            return Err(DataError::BadSpec(format!(
                "eval_fraction {} must be in [0, 1)",
                split.eval_fraction
            )));
        }
        let bos = if spec.prepend_bos {
            Some(special.bos.ok_or(DataError::MissingSpecial {
                what: "BOS",
                fix: "prepend_bos = false",
            })?)
        } else {
            None
        };
        let sep = match (spec.packing, spec.separator) {
            (Packing::Truncate, _) | (_, Separator::None) => None,
            (Packing::Concat, Separator::Eos) => {
                Some(special.eos.ok_or(DataError::MissingSpecial {
                    what: "EOS",
                    fix: "separator = \"none\" (or \"bos\")",
                })?)
            }
            (Packing::Concat, Separator::Bos) => {
                Some(special.bos.ok_or(DataError::MissingSpecial {
                    what: "BOS",
                    fix: "separator = \"none\" (or \"eos\")",
                })?)
            }
        };
        Ok(Self {
            docs: DocStream::new(src)?,
            tokenizer,
            spec: spec.clone(),
            split,
            side,
            bos,
            sep,
            pad: special.pad.or(special.eos).unwrap_or(0),
            buf: VecDeque::new(),
            next_index: 0,
            failed: false,
            shuffle: spec.shuffle_seed.map(|s| {
                (
                    <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(s),
                    Vec::new(),
                )
            }),
            docs_done: false,
        })
    }

    /// The next document of this side of the split, through the shuffle buffer if any.
    fn next_side_doc(&mut self) -> Option<Result<Doc, DataError>> {
        loop {
            let want_more = match &self.shuffle {
                Some((_, buf)) => !self.docs_done && buf.len() < DOC_SHUFFLE_BUFFER,
                None => true,
            };
            if want_more {
                match self.docs.next() {
                    Some(Err(e)) => return Some(Err(e)),
                    Some(Ok(doc)) => {
                        if self.split.split_of(&doc.text) != self.side {
                            continue;
                        }
                        match self.shuffle.as_mut() {
                            Some((_, buf)) => {
                                buf.push(doc);
                                continue;
                            }
                            None => return Some(Ok(doc)),
                        }
                    }
                    None => {
                        self.docs_done = true;
                        // Without a shuffle buffer the stream simply ends here.
                        self.shuffle.as_ref()?;
                    }
                }
            }
            let (rng, buf) = self.shuffle.as_mut()?;
            if buf.is_empty() {
                return None;
            }
            let i = rand::Rng::random_range(rng, 0..buf.len());
            return Some(Ok(buf.swap_remove(i)));
        }
    }

    fn next_doc_tokens(&mut self) -> Option<Result<Vec<u32>, DataError>> {
        let Doc { index, text } = match self.next_side_doc()? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(
            self.tokenizer
                .encode_fast(text.as_str(), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer {
                    doc: index,
                    msg: e.to_string(),
                }),
        )
    }

    fn make_window(&mut self, body: Vec<u32>) -> Window {
        let mut ids = Vec::with_capacity(self.spec.context_len);
        ids.extend(self.bos);
        ids.extend(body);
        let n_real = ids.len();
        ids.resize(self.spec.context_len, self.pad);
        let index = self.next_index;
        self.next_index += 1;
        Window { index, ids, n_real }
    }
}

impl Iterator for WindowStream {
    type Item = Result<Window, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let body = self.spec.context_len - self.bos.is_some() as usize;
        loop {
            if self.spec.packing == Packing::Concat && self.buf.len() >= body {
                let chunk: Vec<u32> = self.buf.drain(..body).collect();
                return Some(Ok(self.make_window(chunk)));
            }
            match self.next_doc_tokens()? {
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Ok(toks) if toks.is_empty() => continue,
                Ok(mut toks) => match self.spec.packing {
                    Packing::Concat => {
                        self.buf.extend(toks);
                        self.buf.extend(self.sep);
                    }
                    Packing::Truncate => {
                        toks.truncate(body);
                        return Some(Ok(self.make_window(toks)));
                    }
                },
            }
        }
    }
}

/// Token ids excluded from capture by the special-token policy: the model's BOS, EOS and
/// PAD plus every token the tokenizer marks `special`, sorted and deduplicated.
pub fn special_token_ids(tokenizer: &Tokenizer, special: SpecialIds, eos_all: &[u32]) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    ids.extend(special.bos);
    ids.extend(special.eos);
    ids.extend(special.pad);
    ids.extend_from_slice(eos_all);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// SHA-256 (hex) of the tokenizer's canonical JSON: what the capture metadata records so
/// a reader can tell that two captures used the same tokenisation.
pub fn tokenizer_sha256(tokenizer: &Tokenizer) -> String {
    match tokenizer.to_string(false) {
        Ok(s) => hex::encode(Sha256::digest(s.as_bytes())),
        Err(_) => "unserialisable".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;

    /// Words "w0".."w99" → 3..103; 0 = <pad>, 1 = <s>, 2 = </s>.
    fn tok() -> Arc<Tokenizer> {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        vocab.insert("<unk>".into(), 103);
        for (i, t) in ["<pad>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), i as u32);
        }
        for i in 0..100u32 {
            vocab.insert(format!("w{i}"), i + 3);
        }
        let wl = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut t = Tokenizer::new(wl);
        t.with_pre_tokenizer(Some(WhitespaceSplit));
        t.add_special_tokens([
            tokenizers::AddedToken::from("<pad>", true),
            tokenizers::AddedToken::from("<s>", true),
            tokenizers::AddedToken::from("</s>", true),
        ])
        .unwrap();
        Arc::new(t)
    }

    const SP: SpecialIds = SpecialIds {
        bos: Some(1),
        eos: Some(2),
        pad: Some(0),
    };

    fn corpus(dir: &std::path::Path, docs: &[&str]) -> TextSource {
        let p = dir.join("c.txt");
        std::fs::write(&p, docs.join("\n\n")).unwrap();
        TextSource::new([p.to_str().unwrap()])
    }

    fn all(src: &TextSource, spec: &PackSpec, split: DocSplit, side: Split) -> Vec<Window> {
        WindowStream::new(src, tok(), spec, split, side, SP)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    const NOSPLIT: DocSplit = DocSplit {
        seed: 0,
        eval_fraction: 0.0,
    };

    #[test]
    fn concat_with_bos_and_eos() {
        let d = tempfile::tempdir().unwrap();
        let src = corpus(d.path(), &["w0 w1 w2", "w3 w4", "w5 w6 w7 w8"]);
        let w = all(&src, &PackSpec::new(4), NOSPLIT, Split::Train);
        // stream: 3 4 5 2 6 7 2 8 9 10 11 2  → bodies of 3
        assert_eq!(w.len(), 4);
        assert_eq!(w[0].ids, [1, 3, 4, 5]);
        assert_eq!(w[1].ids, [1, 2, 6, 7]);
        assert_eq!(w[3].ids, [1, 10, 11, 2]);
        assert!(w.iter().all(|w| w.n_real == 4));
        assert_eq!(w.iter().map(|w| w.index).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    #[test]
    fn truncate_pads_and_marks_real() {
        let d = tempfile::tempdir().unwrap();
        let src = corpus(d.path(), &["w0 w1 w2 w3 w4 w5", "w6"]);
        let mut spec = PackSpec::new(4);
        spec.packing = Packing::Truncate;
        let w = all(&src, &spec, NOSPLIT, Split::Train);
        assert_eq!(w[0].ids, [1, 3, 4, 5]);
        assert_eq!((w[1].ids.clone(), w[1].n_real), (vec![1, 9, 0, 0], 2));
    }

    #[test]
    fn split_is_disjoint_and_seeded() {
        let d = tempfile::tempdir().unwrap();
        let docs: Vec<String> = (0..200)
            .map(|i| format!("w{} w{}", i % 100, i / 2))
            .collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let src = corpus(d.path(), &refs);
        let mut spec = PackSpec::new(1);
        spec.prepend_bos = false;
        spec.packing = Packing::Truncate;
        let sp = DocSplit {
            seed: 7,
            eval_fraction: 0.25,
        };
        // One-token windows of each doc's first token are enough to count documents.
        let tr = all(&src, &spec, sp, Split::Train).len();
        let ev = all(&src, &spec, sp, Split::Eval).len();
        assert_eq!(tr + ev, 200);
        assert!((20..80).contains(&ev), "eval docs {ev}");
        let on = |t: &str, s| sp.split_of(t) == s;
        assert!(refs
            .iter()
            .all(|t| on(t, Split::Train) != on(t, Split::Eval)));
        let other = DocSplit { seed: 8, ..sp };
        assert!(refs.iter().any(|t| sp.split_of(t) != other.split_of(t)));
    }

    #[test]
    fn seeded_doc_shuffle_is_a_deterministic_permutation() {
        let d = tempfile::tempdir().unwrap();
        let docs: Vec<String> = (0..3000)
            .map(|i| format!("w{} w{}", i % 100, (i / 100) % 100))
            .collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let src = corpus(d.path(), &refs);
        let mut spec = PackSpec::new(2);
        spec.prepend_bos = false;
        spec.packing = Packing::Truncate;
        let plain = all(&src, &spec, NOSPLIT, Split::Train);
        spec.shuffle_seed = Some(4);
        let a = all(&src, &spec, NOSPLIT, Split::Train);
        assert_eq!(a, all(&src, &spec, NOSPLIT, Split::Train));
        let ids = |w: &[Window]| {
            let mut v: Vec<Vec<u32>> = w.iter().map(|w| w.ids.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&a), ids(&plain));
        assert_ne!(a, plain);
        spec.shuffle_seed = Some(5);
        assert_ne!(a, all(&src, &spec, NOSPLIT, Split::Train));
    }

    #[test]
    fn missing_bos_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let src = corpus(d.path(), &["w0"]);
        let sp = SpecialIds { bos: None, ..SP };
        let err = WindowStream::new(&src, tok(), &PackSpec::new(4), NOSPLIT, Split::Train, sp)
            .err()
            .unwrap();
        assert!(err.to_string().contains("prepend_bos = false"), "{err}");
    }

    #[test]
    fn special_ids_and_hash() {
        let t = tok();
        assert_eq!(special_token_ids(&t, SP, &[2]), [0, 1, 2]);
        assert_eq!(tokenizer_sha256(&t), tokenizer_sha256(&tok()));
    }
}
