//! Parity of our forward passes with transformers (golden files) and with
//! candle-transformers' SmolLM3 (a second, independent implementation).
//!
//! Golden files live in `tests/fixtures/golden/<name>/` (written by the `gen.py` beside
//! them): the tiny checkpoint (`config.json`, `model.safetensors`) and `acts.safetensors`
//! with `input_ids` I64 `[batch, seq]`, every `blocks.{L}.hook_{site}` F32
//! `[batch, seq, d]` and `logits`. Tolerance per tensor: max |ours − ref| ≤ 1e-4 · max |ref|.
//! A failure names the first hookpoint, in forward order, that diverges.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use saepipe::models::{load_dir, load_gguf, HookedModel, Hookpoint, Recorder};

const REL_TOL: f32 = 1e-4;

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

fn load_acts(path: &Path) -> HashMap<String, Tensor> {
    assert!(
        path.is_file(),
        "{} is missing: golden fixtures come from tests/fixtures/golden/*/gen.py (make fixtures)",
        path.display()
    );
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Max |a|.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Run `model` on the golden `input_ids`, recording every hookpoint in `acts`, and compare
/// in forward order; then the logits. Panics naming the first divergence.
fn compare(model: &dyn HookedModel, acts: &HashMap<String, Tensor>, what: &str) {
    let ids = acts["input_ids"].to_dtype(DType::U32).unwrap();
    let mut hps: Vec<Hookpoint> = acts
        .keys()
        .filter(|k| k.starts_with("blocks."))
        .map(|k| k.parse().unwrap_or_else(|e| panic!("golden key {k}: {e}")))
        .collect();
    assert!(!hps.is_empty(), "{what}: golden file has no hookpoints");
    hps.sort(); // (layer, site): forward order
    let mut rec = Recorder::new(hps.iter().copied());
    let logits = model
        .forward_hooked(&ids, &mut rec, None)
        .unwrap_or_else(|e| panic!("{what}: forward failed: {e}"))
        .expect("full forward returns logits");
    let mut failures = Vec::new();
    let mut check = |name: String, ours: &Tensor, want: &Tensor| {
        assert_eq!(ours.dims(), want.dims(), "{what}: {name} shape");
        let scale = max_abs(want);
        let err = common::max_abs_diff(ours, want);
        if err.is_nan() || err > REL_TOL * scale {
            failures.push(format!(
                "{name}: max|ours - ref| = {err:.3e} > {:.3e} (1e-4 · max|ref| = 1e-4 · {scale:.3e})",
                REL_TOL * scale
            ));
        }
    };
    for hp in &hps {
        check(hp.to_string(), &rec.acts[hp], &acts[&hp.to_string()]);
    }
    check("logits".into(), &logits, &acts["logits"]);
    assert!(
        failures.is_empty(),
        "{what}: first divergence (forward order) at {}\n{} tensor(s) diverge in all:\n  {}",
        failures[0],
        failures.len(),
        failures.join("\n  ")
    );
}

fn golden_safetensors(name: &str) {
    let dir = golden_dir(name);
    let acts = load_acts(&dir.join("acts.safetensors"));
    let loaded = load_dir(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    compare(loaded.model.as_ref(), &acts, name);
}

#[test]
fn tiny_gpt_neox_matches_transformers() {
    golden_safetensors("tiny_gpt_neox");
}

#[test]
fn tiny_gpt_neox_sequential_matches_transformers() {
    golden_safetensors("tiny_gpt_neox_seq");
}

#[test]
fn tiny_llama_matches_transformers() {
    golden_safetensors("tiny_llama");
}

#[test]
fn tiny_smollm3_matches_transformers() {
    golden_safetensors("tiny_smollm3");
}

/// Last-position logits of candle-transformers' SmolLM3 on the checkpoint in `dir`.
fn candle_smollm3_last_logits(dir: &Path, ids: &Tensor) -> Tensor {
    use candle_transformers::models::smol::smollm3::{Config, ModelForCausalLM};
    let cfg: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // SAFETY: test-owned file, not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let mut m = ModelForCausalLM::new(&cfg, vb).unwrap();
    m.forward(ids, 0).unwrap() // (b, 1, vocab)
}

fn smollm3_cross_check(dir: &Path, ids: &Tensor) {
    let ours = load_dir(dir, &Device::Cpu).unwrap();
    let logits = ours
        .model
        .forward_hooked(ids, &mut saepipe::models::NoHooks, None)
        .unwrap()
        .unwrap();
    let l = ids.dim(1).unwrap();
    let ours_last = logits.narrow(1, l - 1, 1).unwrap();
    let theirs = candle_smollm3_last_logits(dir, ids);
    let err = common::max_abs_diff(&ours_last, &theirs);
    let scale = max_abs(&theirs);
    assert!(
        err <= REL_TOL * scale,
        "{}: last-position logits differ from candle-transformers smollm3: max diff {err:.3e}, max|ref| {scale:.3e}",
        dir.display()
    );
}

#[test]
fn smollm3_logits_match_candle_transformers_on_golden_checkpoint() {
    let dir = golden_dir("tiny_smollm3");
    let acts = load_acts(&dir.join("acts.safetensors"));
    let ids = acts["input_ids"].to_dtype(DType::U32).unwrap();
    smollm3_cross_check(&dir, &ids);
}

#[test]
fn smollm3_logits_match_candle_transformers_on_generated_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = common::TinyModel::llama(11, true);
    // candle-transformers reads the NoPE pattern from an explicit list or the interval; give
    // the list transformers would derive (interval 4: layer 3 is NoPE).
    m.config["no_rope_layers"] = serde_json::json!([1, 1, 1, 0]);
    m.write(tmp.path());
    let ids = Tensor::new(
        &[
            [5u32, 9, 17, 3, 60, 2, 100, 7],
            [1, 44, 45, 46, 47, 48, 49, 50],
        ],
        &Device::Cpu,
    )
    .unwrap();
    smollm3_cross_check(tmp.path(), &ids);
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch_smollm2.sh (make fixtures-gguf)",
        gguf.display()
    );
    let dir = golden_dir("smollm2_gguf");
    let acts = load_acts(&dir.join("acts.safetensors"));
    let loaded = load_gguf(&gguf, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    // 1. Our tokenizer, rebuilt from the GGUF metadata, gives the golden ids.
    let prompt =
        std::fs::read_to_string(dir.join("prompt.txt")).expect("prompt.txt beside the golden acts");
    let tok = loaded.tokenizer.as_ref().expect("GGUF tokenizer");
    let ours: Vec<u32> = tok
        .encode(prompt.as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let golden = acts["input_ids"].to_dtype(DType::U32).unwrap();
    let golden_row: Vec<u32> = golden.get(0).unwrap().to_vec1().unwrap();
    assert_eq!(
        ours, golden_row,
        "tokenizer rebuilt from the GGUF disagrees with transformers on prompt.txt"
    );
    // 2. Activations and logits.
    compare(loaded.model.as_ref(), &acts, "smollm2_gguf");
}
