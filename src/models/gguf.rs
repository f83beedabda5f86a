//! Llama-family GGUF files: weights dequantised (to f32, then the model dtype, one tensor
//! at a time, so a bf16 model never holds an f32 copy) under Hugging Face names, the
//! config read from GGUF metadata, and the tokenizer rebuilt from GGUF metadata.
//!
//! Implements `../shared/specs/pipeline.md` §5 (`gguf:<file>`). References: llama.cpp's
//! `convert_hf_to_gguf.py` (tensor names, `LlamaModel.permute`), transformers'
//! `integrations/ggml.py` + `integrations/gguf/` (`reverse_permute_weights`, the
//! byte-level tokenizer builder `byte_level_tokenizer`, `add_gguf_special_tokens`).
//!
//! The q/k trap: llama.cpp stores `attn_q`/`attn_k` rows permuted for its interleaved RoPE
//! (`w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`). Our forward uses the Hugging Face
//! rotate-half layout, so we apply the inverse, `reshape(n_head, hd/2, 2, in).swapaxes(1, 2)`,
//! with `n_head = head_count` for q and `head_count_kv` for k, exactly as transformers does.
//!
//! Decision: the tokenizer follows transformers' GGUF builder (GPT-2 byte-level BPE, control
//! tokens special, user-defined tokens added), and additionally honours llama.cpp's
//! `tokenizer.ggml.pre`: `smollm` splits digits individually before the GPT-2 regex (as
//! SmolLM's own tokenizer.json does), the llama-3 family uses its split regex. For SmolLM2
//! the digit split changes nothing (its vocabulary has no multi-digit merges).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::ModelError;
use super::llama::{Llama, LlamaConfig};
use super::weights::Weights;

/// GGUF architectures this loader understands.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The llama-3 pre-tokenizer split (transformers' `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The 4 bytes every GGUF file starts with.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Read a GGUF's header and metadata (no tensor data).
///
/// Decision: the magic is checked here before candle parses anything, so a file that is
/// not a GGUF at all (random bytes, a safetensors file, an HTML error page saved as
/// `.gguf`) is called that ([`ModelError::GgufMagic`]), and "truncated"
/// ([`ModelError::GgufRead`]) is kept for a real GGUF header that cannot be read to its end.
pub fn read_content(path: &Path) -> Result<Content, ModelError> {
    let mut file = File::open(path).map_err(ModelError::io(path))?;
    let mut head = [0u8; 8];
    let n = read_up_to(&mut file, &mut head).map_err(ModelError::io(path))?;
    let truncated = |detail: String| ModelError::GgufRead {
        path: path.to_path_buf(),
        detail,
    };
    if n < 4 && GGUF_MAGIC.starts_with(&head[..n]) {
        return Err(truncated(format!(
            "the file is {n} bytes long, shorter than the GGUF header"
        )));
    }
    if &head[..4] != GGUF_MAGIC {
        return Err(ModelError::GgufMagic {
            path: path.to_path_buf(),
            found: escape_bytes(&head[..n.min(4)]),
        });
    }
    if n < 8 {
        return Err(truncated(format!(
            "the file is {n} bytes long, shorter than the GGUF header"
        )));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(1..=3).contains(&version) {
        return Err(ModelError::GgufMetadata {
            path: path.to_path_buf(),
            key: "version".into(),
            problem: format!("is {version}; saepipe reads GGUF versions 1 to 3"),
        });
    }
    let mut reader = BufReader::new(File::open(path).map_err(ModelError::io(path))?);
    Content::read(&mut reader).map_err(|e| truncated(e.to_string()))
}

/// Read into `buf` until it is full or the file ends; the number of bytes read.
fn read_up_to(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `bytes` as a quoted string, printable ASCII kept and the rest as `\xNN`.
fn escape_bytes(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for &b in bytes {
        if b.is_ascii_graphic() || b == b' ' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s.push('"');
    s
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn err(&self, key: &str, problem: &str) -> ModelError {
        ModelError::GgufMetadata {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            problem: problem.to_string(),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => return Err(self.err(key, "is not a non-negative integer")),
        };
        Ok(Some(n))
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_u64(key)?
            .map(|n| n as usize)
            .ok_or_else(|| self.err(key, "is missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.err(key, "is not a float")),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "is not a string")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "is not a bool")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        let Some(Value::Array(vs)) = self.md.get(key) else {
            return Err(self.err(key, "is missing or not an array"));
        };
        vs.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.err(key, "has a non-string element")),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let Value::Array(vs) = v else {
            return Err(self.err(key, "is not an array"));
        };
        vs.iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                Value::U16(x) => Ok(*x as i64),
                Value::I16(x) => Ok(*x as i64),
                _ => Err(self.err(key, "has a non-integer element")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// The `general.architecture` of a GGUF, checked to be one we support.
pub fn check_architecture(path: &Path, content: &Content) -> Result<(), ModelError> {
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let arch = meta
        .opt_str("general.architecture")?
        .ok_or_else(|| meta.err("general.architecture", "is missing"))?;
    if SUPPORTED_ARCHITECTURES.contains(&arch) {
        Ok(())
    } else {
        Err(ModelError::GgufArchitecture {
            path: path.to_path_buf(),
            arch: arch.to_string(),
        })
    }
}

/// The Hugging Face config equivalent to a llama GGUF's metadata.
pub fn llama_config(path: &Path, content: &Content) -> Result<LlamaConfig, ModelError> {
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let n_heads = meta.usize("llama.attention.head_count")?;
    let d = meta.usize("llama.embedding_length")?;
    let vocab = match content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims().first().copied().unwrap_or(0),
        None => {
            return Err(ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: "token_embd.weight".into(),
                model_type: "llama (GGUF)".into(),
            })
        }
    };
    if let Some(kind) = meta.opt_str("llama.rope.scaling.type")? {
        if kind != "none" {
            return Err(ModelError::UnsupportedConfig {
                path: path.to_path_buf(),
                key: "llama.rope.scaling.type".into(),
                value: kind.into(),
                fix: "only unscaled RoPE is implemented".into(),
            });
        }
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::UnsupportedConfig {
            path: path.to_path_buf(),
            key: "rope_freqs.weight".into(),
            value: "present".into(),
            fix: "llama-3.1-style RoPE frequency scaling is not implemented".into(),
        });
    }
    let head_dim = meta
        .opt_u64("llama.attention.key_length")?
        .map(|n| n as usize);
    let rope_dim = meta
        .opt_u64("llama.rope.dimension_count")?
        .map(|n| n as usize);
    let hd = head_dim.unwrap_or(d / n_heads.max(1));
    if let Some(r) = rope_dim {
        if r != hd {
            return Err(ModelError::UnsupportedConfig {
                path: path.to_path_buf(),
                key: "llama.rope.dimension_count".into(),
                value: r.to_string(),
                fix: format!("partial RoPE in llama GGUFs is not implemented (head_dim is {hd})"),
            });
        }
    }
    Ok(LlamaConfig {
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size: d,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads: n_heads,
        num_key_value_heads: meta
            .opt_u64("llama.attention.head_count_kv")?
            .map(|n| n as usize),
        head_dim,
        hidden_act: "silu".into(),
        rms_norm_eps: meta
            .opt_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| meta.err("llama.attention.layer_norm_rms_epsilon", "is missing"))?,
        rope_theta: Some(meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0)),
        rope_parameters: None,
        rope_scaling: None,
        tie_word_embeddings: Some(!content.tensor_infos.contains_key("output.weight")),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        max_position_embeddings: meta.opt_u64("llama.context_length")?.map(|n| n as usize),
        no_rope_layers: None,
        no_rope_layer_interval: None,
        use_sliding_window: None,
        bos_token_id: meta
            .opt_u64("tokenizer.ggml.bos_token_id")?
            .map(|n| n as u32),
        eos_token_id: meta
            .opt_u64("tokenizer.ggml.eos_token_id")?
            .map(|n| super::nn::OneOrMany::One(n as u32)),
        pad_token_id: meta
            .opt_u64("tokenizer.ggml.padding_token_id")?
            .map(|n| n as u32),
    })
}

/// The Hugging Face name of a llama.cpp tensor, or `None` for tensors we do not use.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo llama.cpp's q/k row permutation: rows viewed as `(n_head, hd/2, 2)` are swapped
/// to `(n_head, 2, hd/2)` (transformers' `reverse_permute_weights`). Works for weights
/// `(out, in)` and biases `(out,)`.
fn unpermute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let half = out / n_head / 2;
    let mut shape = vec![n_head, half, 2];
    shape.extend_from_slice(&dims[1..]);
    t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Load a llama-family GGUF: every tensor dequantised to f32 under its Hugging Face name
/// (q/k un-permuted), the model built by [`Llama::new`], the tokenizer rebuilt from the
/// metadata.
pub fn load_llama(path: &Path, device: &Device) -> Result<(Llama, Tokenizer), ModelError> {
    load_llama_with(path, device, DType::F32, None)
}

/// [`load_llama`] with the weights dequantised into `dtype` (each tensor goes through f32,
/// as transformers dequantises, then is rounded to `dtype` and moved to `device` before the
/// next is read), and every weight randomly re-initialised (σ = 0.02) when `random_init` is
/// `Some(seed)`.
pub fn load_llama_with(
    path: &Path,
    device: &Device,
    dtype: DType,
    random_init: Option<u64>,
) -> Result<(Llama, Tokenizer), ModelError> {
    let content = read_content(path)?;
    check_architecture(path, &content)?;
    let cfg = llama_config(path, &content)?;
    let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
    let mut reader = BufReader::new(File::open(path).map_err(ModelError::io(path))?);
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            tracing::warn!("{}: ignoring unknown GGUF tensor '{name}'", path.display());
            continue;
        };
        let read_err = |e: candle_core::Error| ModelError::GgufRead {
            path: path.to_path_buf(),
            detail: format!("tensor '{name}': {e}"),
        };
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(read_err)?;
        let t = if hf.contains("self_attn.q_proj") {
            unpermute(&t, nh).map_err(read_err)?
        } else if hf.contains("self_attn.k_proj") {
            unpermute(&t, nkv).map_err(read_err)?
        } else {
            t
        };
        let t = t
            .to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(read_err)?;
        tensors.insert(hf, t);
    }
    let mut weights =
        Weights::from_tensors(path, "llama (GGUF)", tensors, device).with_dtype(dtype);
    if let Some(seed) = random_init {
        weights.randomize(seed, 0.02);
    }
    let model = Llama::new(&cfg, &weights)?;
    let tokenizer = tokenizer_from_content(path, &content)?;
    Ok((model, tokenizer))
}

/// GPT-2's byte -> printable-char map (`bytes_to_unicode`).
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| Some((b as u8, char::from_u32(c)?)))
        .collect()
}

/// Rebuild the tokenizer a GGUF describes (`tokenizer.ggml.model = "gpt2"`: byte-level BPE).
pub fn tokenizer_from_content(path: &Path, content: &Content) -> Result<Tokenizer, ModelError> {
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let tok_err = |detail: String| ModelError::Tokenizer {
        path: path.to_path_buf(),
        detail,
    };
    let model = meta.opt_str("tokenizer.ggml.model")?.unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(tok_err(format!(
            "tokenizer.ggml.model is '{model}'; only byte-level BPE ('gpt2') vocabularies are \
             supported — pass --token-ids, or use the model's tokenizer.json with local:<dir>"
        )));
    }
    // 1. Vocabulary, spelled in the byte alphabet (tokens outside it are re-spelled, as
    //    transformers' byte_level_tokenizer does).
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.values().copied().collect();
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| spelling[&b]).collect()
        };
        vocab.insert(spelled, i as u32);
    }
    // 2. Merges ("a b" per entry).
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    tok_err(format!(
                        "merge '{m}' is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err(format!("invalid BPE vocabulary/merges: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    // 3. Pre-tokenizer by llama.cpp's `tokenizer.ggml.pre`.
    let byte_level = ByteLevel::default()
        .add_prefix_space(false)
        .trim_offsets(true);
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tok: PreTokenizerWrapper = match pre {
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            byte_level.use_regex(true).into(),
        ])
        .into(),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(format!("pre-tokenizer regex: {e}")))?;
            Sequence::new(vec![split.into(), byte_level.use_regex(false).into()]).into()
        }
        other => {
            if !matches!(other, "default" | "gpt2" | "gpt-2") {
                tracing::warn!(
                    "{}: tokenizer.ggml.pre = '{other}' is not known to saepipe; using GPT-2's \
                     byte-level split (as transformers does)",
                    path.display()
                );
            }
            byte_level.use_regex(true).into()
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tok));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // 4. Special (control) and user-defined tokens stay whole.
    let types = meta.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == 3 && in_alphabet(t))
        .map(|(t, _)| AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| tok_err(format!("special tokens: {e}")))?;
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == 4)
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    tokenizer
        .add_tokens(user)
        .map_err(|e| tok_err(format!("user-defined tokens: {e}")))?;
    // 5. BOS/EOS added when the file says so (SmolLM2 adds neither).
    let bos = meta.opt_u64("tokenizer.ggml.bos_token_id")?;
    let eos = meta.opt_u64("tokenizer.ggml.eos_token_id")?;
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let special = |id: Option<u64>, what: &str| -> Result<(String, u32), ModelError> {
        let id = id.ok_or_else(|| {
            tok_err(format!(
                "add_{what}_token is set but {what}_token_id is missing"
            ))
        })?;
        let t = tokens
            .get(id as usize)
            .ok_or_else(|| tok_err(format!("{what}_token_id {id} is outside the vocabulary")))?;
        Ok((t.to_string(), id as u32))
    };
    if add_bos || add_eos {
        let mut single = Vec::new();
        let mut specials = Vec::new();
        if add_bos {
            let (t, id) = special(bos, "bos")?;
            single.push(t.clone());
            specials.push((t, id));
        }
        single.push("$A".to_string());
        if add_eos {
            let (t, id) = special(eos, "eos")?;
            single.push(t.clone());
            specials.push((t, id));
        }
        let post = TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| tok_err(format!("post-processor: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| tok_err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(post));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_cpp_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        // llama.cpp: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(w.shape)
        let (nh, hd, inp) = (3, 4, 5);
        let w =
            Tensor::arange(0f32, (nh * hd * inp) as f32, &Device::Cpu)?.reshape((nh * hd, inp))?;
        let permuted = w
            .reshape((nh, 2, hd / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((nh * hd, inp))?;
        assert_ne!(permuted.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        let back = unpermute(&permuted, nh)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let m = bytes_to_unicode();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&b' '], 'Ġ');
        assert_eq!(m[&b'\n'], 'Ċ');
        assert_eq!(m[&b'a'], 'a');
    }
}
