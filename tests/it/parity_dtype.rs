//! bf16 and f16 forwards (`[model] dtype`) against the f32 transformers golden files, at
//! every hookpoint and the logits of the tiny fixtures, and the dtype plumbing around them
//! (hooks see the model dtype, logits are f32, an f32 replacement is spliced in losslessly).
//!
//! Tolerance per tensor: max |ours − golden| ≤ TOL · max |golden|, with TOL measured on
//! these fixtures and written down in README.md (Models: dtype and device): the worst
//! relative error seen, rounded up, with margin. The same measurement for transformers'
//! own bf16/f16 forward (`tests/fixtures/dtype_error.py`) gives errors of the same size,
//! so the bound says our half-precision forward is as close to f32 as transformers' is.
//! `cargo test --test parity_dtype -- --nocapture` prints the measured table.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use saepipe::models::{load_dir_with, Hookpoint, Hooks, Recorder, Site};

/// bf16 bound on max|ours − f32 golden| / max|golden|: 1.5× the worst error of
/// transformers' own bf16 forward on these fixtures (3.3e-2, tiny_smollm3 blocks.3 mlp_out;
/// ours: 3.4e-2). One bf16 rounding is ≤ 2⁻⁹ ≈ 0.2 % relative; a few layers compound it.
const BF16_TOL: f32 = 5e-2;
/// f16 bound: 1.5× transformers' worst f16 error (5.0e-3, same tensor; ours: 4.6e-3).
const F16_TOL: f32 = 7.5e-3;
/// bf16 bound for the 30-layer SmolLM2-135M GGUF (deeper: more roundings compound).
const GGUF_BF16_TOL: f32 = 1e-1;

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

fn load_acts(dir: &Path) -> HashMap<String, Tensor> {
    let path = dir.join("acts.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Relative error of every hookpoint (forward order) and the logits of the `dtype` forward
/// of golden fixture `name`.
fn rel_errors(name: &str, dtype: DType) -> Vec<(String, f32)> {
    let dir = golden_dir(name);
    let acts = load_acts(&dir);
    let loaded = load_dir_with(&dir, &Device::Cpu, dtype, None).unwrap();
    let model = loaded.model.as_ref();
    assert_eq!(model.dtype(), dtype);
    let ids = acts["input_ids"].to_dtype(DType::U32).unwrap();
    let mut hps: Vec<Hookpoint> = acts
        .keys()
        .filter(|k| k.starts_with("blocks."))
        .map(|k| k.parse().unwrap())
        .collect();
    hps.sort();
    let mut rec = Recorder::new(hps.iter().copied());
    let logits = model
        .forward_hooked(&ids, &mut rec, None)
        .unwrap()
        .expect("logits");
    assert_eq!(
        logits.dtype(),
        DType::F32,
        "{name}: logits come back in f32"
    );
    let mut out = Vec::new();
    for hp in &hps {
        let ours = &rec.acts[hp];
        assert_eq!(ours.dtype(), dtype, "{name}: {hp} is in the model dtype");
        let want = &acts[&hp.to_string()];
        let ours = ours.to_dtype(DType::F32).unwrap();
        out.push((
            hp.to_string(),
            common::max_abs_diff(&ours, want) / max_abs(want),
        ));
    }
    out.push((
        "logits".into(),
        common::max_abs_diff(&logits, &acts["logits"]) / max_abs(&acts["logits"]),
    ));
    out
}

fn check(name: &str, dtype: DType, tol: f32) {
    let errs = rel_errors(name, dtype);
    let worst = errs.iter().map(|e| e.1).fold(0f32, f32::max);
    let mean = errs.iter().map(|e| e.1).sum::<f32>() / errs.len() as f32;
    println!(
        "{name} {dtype:?}: worst {worst:.2e}, mean {mean:.2e} over {} tensors",
        errs.len()
    );
    let bad: Vec<String> = errs
        .iter()
        .filter(|(_, e)| !e.is_finite() || *e > tol)
        .map(|(n, e)| format!("{n}: {e:.3e}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{name} in {dtype:?}: max|ours − f32 golden| / max|golden| above {tol:.1e} at (forward order):\n  {}",
        bad.join("\n  ")
    );
    // Not a no-op: a half-precision forward differs from f32 somewhere.
    assert!(worst > 0.0, "{name} in {dtype:?} is bit-identical to f32");
}

#[test]
fn tiny_gpt_neox_bf16_and_f16_match_the_f32_golden() {
    check("tiny_gpt_neox", DType::BF16, BF16_TOL);
    check("tiny_gpt_neox", DType::F16, F16_TOL);
}

#[test]
fn tiny_gpt_neox_sequential_bf16_and_f16_match_the_f32_golden() {
    check("tiny_gpt_neox_seq", DType::BF16, BF16_TOL);
    check("tiny_gpt_neox_seq", DType::F16, F16_TOL);
}

#[test]
fn tiny_llama_bf16_and_f16_match_the_f32_golden() {
    check("tiny_llama", DType::BF16, BF16_TOL);
    check("tiny_llama", DType::F16, F16_TOL);
}

#[test]
fn tiny_smollm3_bf16_and_f16_match_the_f32_golden() {
    check("tiny_smollm3", DType::BF16, BF16_TOL);
    check("tiny_smollm3", DType::F16, F16_TOL);
}

/// Replaces one hookpoint with its own value widened to f32 (what an SAE splice hands
/// back) and records the logits' input.
struct WidenAt(Hookpoint);

impl Hooks for WidenAt {
    fn wants(&self, hp: Hookpoint) -> bool {
        hp == self.0
    }
    fn visit(&mut self, _hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.to_dtype(DType::F32)?))
    }
}

#[test]
fn an_f32_replacement_is_spliced_into_a_bf16_model_in_its_dtype() {
    let dir = golden_dir("tiny_llama");
    let acts = load_acts(&dir);
    let ids = acts["input_ids"].to_dtype(DType::U32).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let m = load_dir_with(&dir, &Device::Cpu, dtype, None)
            .unwrap()
            .model;
        let clean = m
            .forward_hooked(&ids, &mut saepipe::models::NoHooks, None)
            .unwrap()
            .unwrap();
        for site in [Site::ResidPre, Site::MlpIn, Site::MlpOut] {
            let mut h = WidenAt(Hookpoint::new(1, site));
            let spliced = m.forward_hooked(&ids, &mut h, None).unwrap().unwrap();
            // bf16/f16 -> f32 -> bf16/f16 is exact, so the logits are bit for bit the same.
            assert_eq!(
                common::max_abs_diff(&clean, &spliced),
                0.0,
                "{dtype:?} {site}"
            );
        }
    }
}

#[test]
fn random_init_honours_the_model_dtype_on_an_f16_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // An f16 checkpoint loaded as bf16 and as f32, random re-initialised: same shapes,
    // the requested dtype.
    let dir = tmp.path().join("m");
    common::TinyModel::gpt_neox(3, true).write_as(&dir, DType::F16);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let m = load_dir_with(&dir, &Device::Cpu, dtype, Some(7))
            .unwrap()
            .model;
        let mut rec = Recorder::new([Hookpoint::new(0, Site::MlpOut)]);
        m.forward_hooked(
            &Tensor::new(&[[1u32, 5, 9]], &Device::Cpu).unwrap(),
            &mut rec,
            Some(0),
        )
        .unwrap();
        let act = rec.acts.values().next().unwrap();
        assert_eq!(act.dtype(), dtype);
        let v: Vec<f32> = act
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn smollm2_gguf_dequantised_into_bf16_matches_the_f32_golden() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch_smollm2.sh (make fixtures-gguf)",
        gguf.display()
    );
    let acts = load_acts(&golden_dir("smollm2_gguf"));
    let ids = acts["input_ids"].to_dtype(DType::U32).unwrap();
    let m = saepipe::models::load_gguf_with(&gguf, &Device::Cpu, DType::BF16, None)
        .unwrap()
        .model;
    assert_eq!(m.dtype(), DType::BF16);
    let mut hps: Vec<Hookpoint> = acts
        .keys()
        .filter(|k| k.starts_with("blocks."))
        .map(|k| k.parse().unwrap())
        .collect();
    hps.sort();
    let mut rec = Recorder::new(hps.iter().copied());
    let logits = m.forward_hooked(&ids, &mut rec, None).unwrap().unwrap();
    let mut worst = 0f32;
    for hp in &hps {
        let want = &acts[&hp.to_string()];
        let ours = rec.acts[hp].to_dtype(DType::F32).unwrap();
        let e = common::max_abs_diff(&ours, want) / max_abs(want);
        println!("smollm2_gguf BF16 {hp}: {e:.2e}");
        worst = worst.max(e);
    }
    let e = common::max_abs_diff(&logits, &acts["logits"]) / max_abs(&acts["logits"]);
    println!("smollm2_gguf BF16 logits: {e:.2e}");
    assert!(worst.is_finite() && e.is_finite());
    assert!(worst <= GGUF_BF16_TOL, "worst hookpoint error {worst:.3e}");
    assert!(e <= GGUF_BF16_TOL, "logits error {e:.3e}");
    // The prediction survives: " Berlin" stays the argmax at the last position.
    let last = logits.get(0).unwrap().get(ids.dim(1).unwrap() - 1).unwrap();
    assert_eq!(last.argmax(0).unwrap().to_scalar::<u32>().unwrap(), 11452);
}
