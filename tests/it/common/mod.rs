//! Shared builders for integration tests: tiny random-weight models in the exact Hugging
//! Face layout, a matching tokenizer and a small corpus (STYLE.md §2.9.2).
//!
//! Every model is written the way `save_pretrained` would (config.json with hub key
//! names + model.safetensors with HF tensor names), so tests exercise the real loaders.
//! Builders are deterministic in `seed`. To make broken checkpoints, build a
//! [`TinyModel`], edit `config` / `tensors`, then [`TinyModel::write`].
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Vocabulary size of every tiny model (and of [`tiny_tokenizer`]).
pub const TINY_VOCAB: usize = 128;
/// BOS id of the tiny models and tokenizer.
pub const TINY_BOS: u32 = 1;
/// EOS id of the tiny models and tokenizer.
pub const TINY_EOS: u32 = 2;

/// A model about to be written: its config.json and its named tensors.
pub struct TinyModel {
    /// config.json content.
    pub config: serde_json::Value,
    /// Tensors by HF name (f32).
    pub tensors: BTreeMap<String, Tensor>,
}

struct Init {
    rng: rand::rngs::StdRng,
}

impl Init {
    fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
    /// N(mean, std) tensor of `shape`.
    fn normal(&mut self, shape: &[usize], mean: f32, std: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let dist = Normal::new(mean, std).expect("invariant: std > 0");
        let v: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("invariant: shape matches length")
    }
}

impl TinyModel {
    /// A 3-layer GPT-NeoX (Pythia layout): d=64, 4 heads of 16, rotary_pct 0.25 (4 dims),
    /// parallel residual unless `parallel` is false.
    pub fn gpt_neox(seed: u64, parallel: bool) -> Self {
        let (d, h, ff, layers, v) = (64usize, 4usize, 128usize, 3usize, TINY_VOCAB);
        let config = serde_json::json!({
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": v,
            "hidden_size": d,
            "num_hidden_layers": layers,
            "num_attention_heads": h,
            "intermediate_size": ff,
            "hidden_act": "gelu",
            "rotary_pct": 0.25,
            "rotary_emb_base": 10000,
            "max_position_embeddings": 256,
            "layer_norm_eps": 1e-5,
            "use_parallel_residual": parallel,
            "tie_word_embeddings": false,
            "bos_token_id": TINY_BOS,
            "eos_token_id": TINY_EOS,
            "torch_dtype": "float32"
        });
        let mut i = Init::new(seed);
        let mut t = BTreeMap::new();
        t.insert(
            "gpt_neox.embed_in.weight".into(),
            i.normal(&[v, d], 0.0, 1.0),
        );
        for l in 0..layers {
            let p = format!("gpt_neox.layers.{l}");
            for ln in ["input_layernorm", "post_attention_layernorm"] {
                t.insert(format!("{p}.{ln}.weight"), i.normal(&[d], 1.0, 0.1));
                t.insert(format!("{p}.{ln}.bias"), i.normal(&[d], 0.0, 0.1));
            }
            for (name, o, inp) in [
                ("attention.query_key_value", 3 * d, d),
                ("attention.dense", d, d),
                ("mlp.dense_h_to_4h", ff, d),
                ("mlp.dense_4h_to_h", d, ff),
            ] {
                t.insert(
                    format!("{p}.{name}.weight"),
                    i.normal(&[o, inp], 0.0, 1.0 / (inp as f32).sqrt()),
                );
                t.insert(format!("{p}.{name}.bias"), i.normal(&[o], 0.0, 0.05));
            }
        }
        t.insert(
            "gpt_neox.final_layer_norm.weight".into(),
            i.normal(&[d], 1.0, 0.1),
        );
        t.insert(
            "gpt_neox.final_layer_norm.bias".into(),
            i.normal(&[d], 0.0, 0.1),
        );
        t.insert(
            "embed_out.weight".into(),
            i.normal(&[v, d], 0.0, 1.0 / (d as f32).sqrt()),
        );
        Self { config, tensors: t }
    }

    /// A 4-layer Llama (`smollm3 = false`, SmolLM2-like: GQA 4/2 heads, tied embeddings)
    /// or SmolLM3 (`smollm3 = true`: same shape, `no_rope_layer_interval = 4` so layer 3 is
    /// NoPE).
    pub fn llama(seed: u64, smollm3: bool) -> Self {
        let (d, h, kv, ff, layers, v) = (64usize, 4usize, 2usize, 96usize, 4usize, TINY_VOCAB);
        let hd = d / h;
        let mut config = serde_json::json!({
            "architectures": [if smollm3 { "SmolLM3ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if smollm3 { "smollm3" } else { "llama" },
            "vocab_size": v,
            "hidden_size": d,
            "intermediate_size": ff,
            "num_hidden_layers": layers,
            "num_attention_heads": h,
            "num_key_value_heads": kv,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": null,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": TINY_BOS,
            "eos_token_id": TINY_EOS,
            "torch_dtype": "float32"
        });
        if smollm3 {
            config["no_rope_layer_interval"] = serde_json::json!(4);
            config["use_sliding_window"] = serde_json::json!(false);
        }
        let mut i = Init::new(seed);
        let mut t = BTreeMap::new();
        t.insert(
            "model.embed_tokens.weight".into(),
            i.normal(&[v, d], 0.0, 1.0),
        );
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            t.insert(
                format!("{p}.input_layernorm.weight"),
                i.normal(&[d], 1.0, 0.1),
            );
            t.insert(
                format!("{p}.post_attention_layernorm.weight"),
                i.normal(&[d], 1.0, 0.1),
            );
            for (name, o, inp) in [
                ("self_attn.q_proj", h * hd, d),
                ("self_attn.k_proj", kv * hd, d),
                ("self_attn.v_proj", kv * hd, d),
                ("self_attn.o_proj", d, h * hd),
                ("mlp.gate_proj", ff, d),
                ("mlp.up_proj", ff, d),
                ("mlp.down_proj", d, ff),
            ] {
                t.insert(
                    format!("{p}.{name}.weight"),
                    i.normal(&[o, inp], 0.0, 1.0 / (inp as f32).sqrt()),
                );
            }
        }
        t.insert("model.norm.weight".into(), i.normal(&[d], 1.0, 0.1));
        Self { config, tensors: t }
    }

    /// Write config.json and model.safetensors (f32) into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> PathBuf {
        self.write_as(dir, DType::F32)
    }

    /// Like [`TinyModel::write`], storing the tensors as `dtype` (f32, f16 or bf16).
    pub fn write_as(&self, dir: &Path, dtype: DType) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create model dir");
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config).expect("invariant: JSON value"),
        )
        .expect("write config.json");
        let tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).expect("cast")))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
            .expect("write model.safetensors");
        dir.to_path_buf()
    }
}

/// Write a tiny GPT-NeoX (parallel residual) with [`tiny_tokenizer`] into `dir`.
pub fn tiny_gpt_neox(dir: &Path, seed: u64) -> PathBuf {
    TinyModel::gpt_neox(seed, true).write(dir);
    tiny_tokenizer(dir);
    dir.to_path_buf()
}

/// Write a tiny Llama (or SmolLM3 with `smollm3`) with [`tiny_tokenizer`] into `dir`.
pub fn tiny_llama(dir: &Path, seed: u64, smollm3: bool) -> PathBuf {
    TinyModel::llama(seed, smollm3).write(dir);
    tiny_tokenizer(dir);
    dir.to_path_buf()
}

/// The words of the tiny vocabulary: ids 0..3 are `[UNK]`, `<s>`, `</s>`; the rest are
/// lower-case English words and `.`/`,`, [`TINY_VOCAB`] entries in all.
pub fn tiny_words() -> Vec<String> {
    let base = "the of and to a in is it you that he was for on are with as his they be at one \
        have this from or had by hot word but what some we can out other were all there when up \
        use your how said an each she which do their time if will way about many then them write \
        would like so these her long make thing see him two has look more day could go come did \
        number sound no most people my over know water than call first who may down side been now \
        find any new work part take get place made live where after back little only round man \
        year came show every good me give our under name very through just form";
    let mut words: Vec<String> = vec![
        "[UNK]".into(),
        "<s>".into(),
        "</s>".into(),
        ".".into(),
        ",".into(),
    ];
    for w in base.split_whitespace() {
        if words.len() == TINY_VOCAB {
            break;
        }
        if !words.iter().any(|x| x == w) {
            words.push(w.to_string());
        }
    }
    let mut k = 0;
    while words.len() < TINY_VOCAB {
        words.push(format!("w{k}"));
        k += 1;
    }
    words
}

/// Write a WordLevel `tokenizer.json` over [`tiny_words`] (whitespace + punctuation split,
/// `[UNK]` for unknown words, `<s>`/`</s>` special) into `dir`; returns its path.
pub fn tiny_tokenizer(dir: &Path) -> PathBuf {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::{AddedToken, Tokenizer};
    let vocab: HashMap<String, u32> = tiny_words()
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .expect("invariant: [UNK] is in the vocabulary");
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.add_special_tokens([
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ])
    .expect("add special tokens");
    std::fs::create_dir_all(dir).expect("create dir");
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).expect("write tokenizer.json");
    path
}

/// A few hundred deterministic sentences over [`tiny_words`] (in-vocabulary text).
pub fn tiny_corpus() -> Vec<String> {
    let words = tiny_words();
    let content = &words[5..];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..300)
        .map(|_| {
            use rand::Rng;
            let n = rng.random_range(5..15);
            let mut s: Vec<&str> = (0..n)
                .map(|_| content[rng.random_range(0..content.len())].as_str())
                .collect();
            s.push(".");
            s.join(" ")
        })
        .collect()
}

/// Max |a - b| over two tensors of equal shape, as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of equal shape")
}

/// Write `corpus.txt` into `dir`: `n` paragraphs of 4–15 in-vocabulary words and a full
/// stop, deterministic in `seed`.
pub fn write_corpus(dir: &Path, n: usize, seed: u64) -> PathBuf {
    use rand::Rng;
    let words = tiny_words();
    let content = &words[5..];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let docs: Vec<String> = (0..n)
        .map(|_| {
            let k = rng.random_range(4..16);
            let mut s: Vec<&str> = (0..k)
                .map(|_| content[rng.random_range(0..content.len())].as_str())
                .collect();
            s.push(".");
            s.join(" ")
        })
        .collect();
    let p = dir.join("corpus.txt");
    std::fs::write(&p, docs.join("\n\n")).expect("writing the test corpus");
    p
}
