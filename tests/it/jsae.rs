//! Jacobian SAEs (issue 7, jsae_pamsgd.md §1) on tiny generated models: the extracted MLP
//! reproduces the model's `mlp_out`; the k×k Jacobian block equals finite differences taken
//! through the real model's MLP (GELU GPT-NeoX and SwiGLU Llama); a trained JSAE pair has a
//! sparser Jacobian than the plain pair at equal k; `saepipe run` with `[jsae]` (and with
//! `model.random_init`) writes the JSAE rows into metrics.parquet.

use crate::common;

use std::process::Command;

use arrow::array::{Array, Float64Array, StringArray};
use candle_core::{DType, Device, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{Rng as _, SeedableRng};
use saepipe::jsae::{JacAt, JsaePair, PairConfig};
use saepipe::models::{load_dir, load_dir_with, HookedModel, Hookpoint, Hooks, Recorder, Site};
use saepipe::sae::Sae;
use saepipe::train::{BDecInit, Optimizer, TrainConfig, Trainer};

const LAYER: usize = 1;

/// Token ids `(b, s)` avoiding the special ids 0..3.
fn ids(b: usize, s: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<u32> = (0..b * s)
        .map(|_| rng.random_range(3..common::TINY_VOCAB as u32))
        .collect();
    Tensor::from_vec(v, (b, s), &Device::Cpu).unwrap()
}

/// `mlp_in` and `mlp_out` of block [`LAYER`], `[b·s, d]` each.
fn record(model: &dyn HookedModel, ids: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let (hi, ho) = (
        Hookpoint::new(LAYER, Site::MlpIn),
        Hookpoint::new(LAYER, Site::MlpOut),
    );
    let mut rec = Recorder::new([hi, ho]);
    model.forward_hooked(ids, &mut rec, Some(LAYER)).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (flat(&rec.acts[&hi]), flat(&rec.acts[&ho]))
}

/// Replaces `mlp_in` of block [`LAYER`] with `x` and records the `mlp_out` the real MLP
/// computes from it.
struct Swap {
    x: Tensor,
    out: Option<Tensor>,
}

impl Hooks for Swap {
    fn wants(&self, hp: Hookpoint) -> bool {
        hp.layer == LAYER && matches!(hp.site, Site::MlpIn | Site::MlpOut)
    }
    fn visit(&mut self, hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if hp.site == Site::MlpIn {
            Ok(Some(self.x.clone()))
        } else {
            self.out = Some(x.clone());
            Ok(None)
        }
    }
}

fn mlp_out_of(model: &dyn HookedModel, ids: &Tensor, x: &[f32]) -> Vec<f32> {
    let (b, s) = ids.dims2().unwrap();
    let d = x.len() / (b * s);
    let mut h = Swap {
        x: Tensor::from_vec(x.to_vec(), (b, s, d), &Device::Cpu).unwrap(),
        out: None,
    };
    model.forward_hooked(ids, &mut h, Some(LAYER)).unwrap();
    h.out
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A JSAE pair (λ warms up over the first 5% of `steps`) on the training engine, with its
/// input scales and `b_dec` from `(x, y)`.
fn pair_trainer(
    (k, d_sae, lambda, jac_at): (usize, usize, f32, JacAt),
    steps: u64,
    batch: usize,
    mlp: saepipe::models::MlpWeights,
    x: &[f32],
    y: &[f32],
) -> Trainer {
    let pair = JsaePair::new(
        PairConfig {
            k,
            d_sae,
            lambda,
            jac_at,
            lr: 2e-3,
            seed: 3,
        },
        mlp,
    )
    .unwrap();
    let cfg = TrainConfig {
        batch_tokens: batch,
        total_tokens: steps * batch as u64,
        lr_warmup_steps: 2,
        lr_decay_frac: 0.2,
        sparsity_warmup_frac: 0.05,
        grad_clip: Some(1.0),
        b_dec_init: BDecInit::Mean,
        optimizer: Optimizer::Adam,
        ..TrainConfig::default()
    };
    Trainer::with_model(cfg, Box::new(pair), &[x, y]).unwrap()
}

fn the_pair(t: &mut Trainer) -> &mut JsaePair {
    t.model_as_mut::<JsaePair>().unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The k×k block of (input decoder → MLP → output encoder) equals central differences
/// through the real model's MLP, for GELU (GPT-NeoX) and SwiGLU (Llama) blocks, at both
/// points `jac_at` allows. At the reconstruction (the paper's `e_y∘f∘d_x`, issue 17 item
/// 12) the MLP runs on `x̂` and the output latents are TopK of the output SAE on `f(x̂)`,
/// not those of the true output (which differ on some token, so the check has teeth).
#[test]
fn jacobian_block_matches_finite_differences_through_the_real_mlp() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in [
        (
            "gpt_neox",
            common::tiny_gpt_neox(&tmp.path().join("neox"), 5),
        ),
        (
            "llama",
            common::tiny_llama(&tmp.path().join("llama"), 5, false),
        ),
    ] {
        let loaded = load_dir(&dir, &Device::Cpu).unwrap();
        let model = loaded.model.as_ref();
        let ids = ids(2, 8, 11);
        let (x, y) = record(model, &ids);
        let mlp = model.mlp_weights(LAYER).unwrap();
        let (d, n) = (mlp.d, x.len() / mlp.d);
        // The extracted MLP reproduces the model's mlp_out.
        let mut hid = Vec::new();
        let mut yy = vec![0.0; d];
        for t in 0..n {
            mlp.forward_token(&x[t * d..(t + 1) * d], &mut hid, &mut yy);
            for (a, b) in yy.iter().zip(&y[t * d..(t + 1) * d]) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{name}: MLP {a} vs model {b}"
                );
            }
        }
        for jac_at in [JacAt::TrueInput, JacAt::Reconstruction] {
            let name = format!("{name} {jac_at:?}");
            let k = 4;
            let mut trainer = pair_trainer((k, 32, 0.5, jac_at), 10, n, mlp.clone(), &x, &y);
            for _ in 0..3 {
                trainer.step_on(&[&x, &y], n).unwrap();
            }
            let pair = the_pair(&mut trainer);
            let blocks = pair.blocks(&x, &y, n).unwrap();
            // The point the Jacobian is taken at, and the MLP output there.
            let base = if jac_at == JacAt::TrueInput {
                x.clone()
            } else {
                let mut rx = Vec::new();
                pair.reconstruct(0, &x, n, &mut rx).unwrap();
                rx
            };
            let y_base = mlp_out_of(model, &ids, &base);
            let (cx, cy) = (pair.scale_x as f64, pair.scale_y as f64);
            let m = pair.config().d_sae;
            let w_dec = &pair.sae_x.params()[2].data;
            let (w_enc, b_enc, b_dec) = (
                &pair.sae_y.params()[0].data,
                &pair.sae_y.params()[1].data,
                &pair.sae_y.params()[3].data,
            );
            // Output pre-activation of latent j on raw y: W_enc[j]·(c_y y − b_dec) + b_enc[j].
            let pre = |yr: &[f32], j: usize| -> f64 {
                let ys: Vec<f32> = yr
                    .iter()
                    .zip(b_dec)
                    .map(|(v, b)| (*v as f64 * cy) as f32 - b)
                    .collect();
                dot(&w_enc[j * d..(j + 1) * d], &ys) + b_enc[j] as f64
            };
            // TopK (positive part) of the output SAE on raw y.
            let topk = |yr: &[f32]| -> Vec<u32> {
                let p: Vec<f64> = (0..m).map(|j| pre(yr, j)).collect();
                let mut order: Vec<usize> = (0..m).collect();
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                let mut set: Vec<u32> = order[..k]
                    .iter()
                    .filter(|&&j| p[j] > 0.0)
                    .map(|&j| j as u32)
                    .collect();
                set.sort();
                set
            };
            let mut differs = 0;
            for (t, (_, ay, _)) in blocks.iter().enumerate() {
                let mut got = ay.clone();
                got.sort();
                let want = topk(&y_base[t * d..(t + 1) * d]);
                assert_eq!(
                    got, want,
                    "{name}: token {t}: output latents are not TopK of encode(MLP at the Jacobian's point)"
                );
                differs += usize::from(want != topk(&y[t * d..(t + 1) * d]));
            }
            if jac_at == JacAt::Reconstruction {
                assert!(
                    differs > 0,
                    "{name}: the latents of f(x̂) equal those of y on every token; the test cannot tell them apart"
                );
            }
            let eps = 1e-2f64;
            let (mut worst, mut biggest, mut checked) = (0.0f64, 0.0f64, 0);
            for t in [0usize, 3, 9, 14] {
                let (ax, ay, jb) = &blocks[t];
                assert!(
                    !ax.is_empty() && !ay.is_empty(),
                    "{name}: token {t} has no active latents"
                );
                for (a, &i) in ax.iter().enumerate() {
                    let dir_i = &w_dec[i as usize * d..(i as usize + 1) * d];
                    let shifted = |sign: f64| -> Vec<f32> {
                        let mut xs = base.clone();
                        for (v, w) in xs[t * d..(t + 1) * d].iter_mut().zip(dir_i) {
                            *v += (sign * eps * *w as f64 / cx) as f32;
                        }
                        mlp_out_of(model, &ids, &xs)
                    };
                    let (yp, ym) = (shifted(1.0), shifted(-1.0));
                    for (b, &j) in ay.iter().enumerate() {
                        let fd = (pre(&yp[t * d..(t + 1) * d], j as usize)
                            - pre(&ym[t * d..(t + 1) * d], j as usize))
                            / (2.0 * eps);
                        let an = jb[b * ax.len() + a] as f64;
                        worst = worst.max((fd - an).abs());
                        biggest = biggest.max(an.abs());
                        checked += 1;
                    }
                }
            }
            assert!(checked >= 16, "{name}: only {checked} entries checked");
            assert!(
                biggest > 1e-2,
                "{name}: trivial Jacobian (max |J| {biggest})"
            );
            assert!(
                worst < 1e-2 * (1.0 + biggest),
                "{name}: max |J − FD| = {worst} (max |J| {biggest})"
            );
        }
    }
}

/// At equal k, the JSAE pair's Jacobian is sparser than the plain (λ = 0) pair's on held-out
/// tokens of a tiny SwiGLU model, at a modest cost in reconstruction.
#[test]
fn jsae_pair_is_sparser_than_the_plain_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_llama(tmp.path(), 9, false);
    let loaded = load_dir(&dir, &Device::Cpu).unwrap();
    let (x, y) = record(loaded.model.as_ref(), &ids(48, 32, 1));
    let (xe, ye) = record(loaded.model.as_ref(), &ids(8, 32, 2));
    let mlp = loaded.model.mlp_weights(LAYER).unwrap();
    let d = mlp.d;
    let (n, batch, steps) = (x.len() / d, 256, 120u64);
    let mut out = Vec::new();
    for lambda in [0.0f32, 2.0] {
        let mut trainer = pair_trainer(
            (8, 128, lambda, JacAt::TrueInput),
            steps,
            batch,
            mlp.clone(),
            &x,
            &y,
        );
        for s in 0..steps as usize {
            let lo = (s * batch) % (n - batch);
            trainer
                .step_on(
                    &[&x[lo * d..(lo + batch) * d], &y[lo * d..(lo + batch) * d]],
                    batch,
                )
                .unwrap();
        }
        let pair = the_pair(&mut trainer);
        let mut acc = pair.new_eval();
        pair.evaluate(&xe, &ye, xe.len() / d, &mut acc).unwrap();
        out.push(acc);
    }
    let (plain, jsae) = (&out[0], &out[1]);
    eprintln!(
        "plain: mean|J| {:.4} >0.01 {:.3} >0.1 {:.3} R² {:.3}/{:.3}; jsae: mean|J| {:.4} >0.01 {:.3} >0.1 {:.3} R² {:.3}/{:.3}",
        plain.jac.mean_abs(),
        plain.jac.frac_above(0.01),
        plain.jac.frac_above(0.1),
        plain.recon_x.r2(),
        plain.recon_y.r2(),
        jsae.jac.mean_abs(),
        jsae.jac.frac_above(0.01),
        jsae.jac.frac_above(0.1),
        jsae.recon_x.r2(),
        jsae.recon_y.r2()
    );
    assert!(jsae.jac.mean_abs() < 0.7 * plain.jac.mean_abs());
    assert!(jsae.jac.frac_above(0.1) < plain.jac.frac_above(0.1));
    assert!(jsae.recon_x.r2() > 0.5 && jsae.recon_y.r2() > 0.3);
    assert!(plain.recon_x.r2() > 0.5 && plain.recon_y.r2() > 0.3);
}

/// `model.random_init` re-initialises every weight: different activations, norm gains 1.
#[test]
fn random_init_replaces_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_llama(tmp.path(), 4, false);
    let ids = ids(1, 8, 5);
    let a = load_dir(&dir, &Device::Cpu).unwrap();
    let r1 = load_dir_with(&dir, &Device::Cpu, DType::F32, Some(1)).unwrap();
    let r1b = load_dir_with(&dir, &Device::Cpu, DType::F32, Some(1)).unwrap();
    let r2 = load_dir_with(&dir, &Device::Cpu, DType::F32, Some(2)).unwrap();
    let (xa, _) = record(a.model.as_ref(), &ids);
    let (x1, _) = record(r1.model.as_ref(), &ids);
    let (x1b, _) = record(r1b.model.as_ref(), &ids);
    let (x2, _) = record(r2.model.as_ref(), &ids);
    assert_eq!(x1, x1b, "same seed, same model");
    assert_ne!(x1, x2, "different seeds differ");
    assert_ne!(xa, x1, "random init differs from the checkpoint");
    // The post-attention norm gain is 1, so mlp_in rows have RMS ≈ 1.
    let d = 64;
    for r in x1.chunks(d) {
        let rms = (dot(r, r) / d as f64).sqrt();
        assert!((rms - 1.0).abs() < 1e-2, "rms {rms}");
    }
}

fn column<'a, T: 'static>(b: &'a arrow::record_batch::RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

/// A tiny Llama, a corpus and a `[jsae]` pipeline file under `root`; runs go to
/// `root/runs`. `n_tokens` training tokens; `extra_train` is appended to `[train]`.
fn jsae_fixture(root: &std::path::Path, n_tokens: usize, extra_train: &str) -> std::path::PathBuf {
    let model = common::tiny_llama(&root.join("model"), 2, false);
    let corpus = root.join("corpus.txt");
    let words = common::tiny_words();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let docs: Vec<String> = (0..600)
        .map(|_| {
            let k = rng.random_range(4..16);
            (0..k)
                .map(|_| words[rng.random_range(5..words.len())].as_str())
                .collect::<Vec<_>>()
                .join(" ")
                + " ."
        })
        .collect();
    std::fs::write(&corpus, docs.join("\n\n")).unwrap();
    let pipeline = root.join("jsae.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"
[run]
name = "jsae-tiny"
data_dir = "{data}"

[model]
source = "local:{model}"

[data]
files = ["{corpus}"]
context_len = 32
n_tokens = {n_tokens}
eval_tokens = 512

[capture]
hookpoints = ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]
batch_size = 4

[train]
batch_tokens = 256
lr_warmup_steps = 1
init_tokens = 512
{extra_train}

[sae]
expansion_factor = 2
arch = {{ kind = "topk", k = 4 }}

[eval]
ce_sequences = 2

[jsae]
layer = 1
k = 4
expansion_factor = 2
lambda = 1.0
"#,
            data = root.join("runs").display(),
            model = model.display(),
            corpus = corpus.display()
        ),
    )
    .unwrap();
    pipeline
}

/// An exported SAELens folder as plain arrays: `W_enc [d, m]`, `b_enc [m]`, `W_dec [m, d]`,
/// `b_dec [d]`, `k`, `apply_b_dec_to_input`.
struct Exported {
    d: usize,
    m: usize,
    k: usize,
    w_enc: Vec<f64>,
    b_enc: Vec<f64>,
    w_dec: Vec<f64>,
    b_dec: Vec<f64>,
    sub_b_dec: bool,
}

fn f32s(st: &safetensors::SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
        .collect()
}

impl Exported {
    fn load(dir: &std::path::Path) -> Self {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], "topk");
        assert_eq!(cfg["normalize_activations"], "none");
        let bytes = std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        Self {
            d: cfg["d_in"].as_u64().unwrap() as usize,
            m: cfg["d_sae"].as_u64().unwrap() as usize,
            k: cfg["k"].as_u64().unwrap() as usize,
            w_enc: f32s(&st, "W_enc"),
            b_enc: f32s(&st, "b_enc"),
            w_dec: f32s(&st, "W_dec"),
            b_dec: f32s(&st, "b_dec"),
            sub_b_dec: cfg["apply_b_dec_to_input"].as_bool().unwrap(),
        }
    }

    /// Pre-activations of raw `x` (SAELens: `(x − b_dec) W_enc + b_enc`).
    fn pre(&self, x: &[f64]) -> Vec<f64> {
        let m = self.m;
        let mut out = self.b_enc.clone();
        for (i, (&xv, &b)) in x.iter().zip(&self.b_dec).enumerate().take(self.d) {
            let xi = xv - if self.sub_b_dec { b } else { 0.0 };
            for (o, w) in out.iter_mut().zip(&self.w_enc[i * m..(i + 1) * m]) {
                *o += xi * w;
            }
        }
        out
    }

    /// The active latents: the `k` largest pre-activations that are positive.
    fn active(&self, x: &[f64]) -> Vec<usize> {
        let pre = self.pre(x);
        let mut order: Vec<usize> = (0..self.m).collect();
        order.sort_by(|&a, &b| pre[b].total_cmp(&pre[a]).then(a.cmp(&b)));
        order.truncate(self.k);
        order.retain(|&j| pre[j] > 0.0);
        order
    }
}

/// SwiGLU block `layer` of a tiny Llama in f64, read from its safetensors file:
/// `down(silu(gate x) ⊙ up x)`.
struct Swiglu {
    d: usize,
    h: usize,
    gate: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
}

impl Swiglu {
    fn load(model_dir: &std::path::Path, layer: usize) -> Self {
        let bytes = std::fs::read(model_dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let p = format!("model.layers.{layer}.mlp");
        let gate = f32s(&st, &format!("{p}.gate_proj.weight"));
        let down = f32s(&st, &format!("{p}.down_proj.weight"));
        let d = st.tensor(&format!("{p}.down_proj.weight")).unwrap().shape()[0];
        Self {
            d,
            h: gate.len() / d,
            gate,
            up: f32s(&st, &format!("{p}.up_proj.weight")),
            down,
        }
    }

    fn forward(&self, x: &[f64]) -> Vec<f64> {
        let (d, h) = (self.d, self.h);
        let row = |w: &[f64], c: usize| -> f64 { (0..d).map(|i| w[c * d + i] * x[i]).sum() };
        let a: Vec<f64> = (0..h)
            .map(|c| {
                let g = row(&self.gate, c);
                g / (1.0 + (-g).exp()) * row(&self.up, c)
            })
            .collect();
        (0..d)
            .map(|j| (0..h).map(|c| self.down[j * h + c] * a[c]).sum())
            .collect()
    }
}

/// Rows of an activation set, in capture order, as f64.
fn rows_of(dir: &std::path::Path) -> Vec<Vec<f64>> {
    let set = saepipe::store::reader::ActivationSet::open(
        dir,
        &saepipe::store::reader::Expect::default(),
    )
    .unwrap();
    let d = set.d_model();
    let mut out = Vec::new();
    for b in set.batches(4096) {
        let b = b.unwrap();
        out.extend(
            b.act
                .chunks(d)
                .map(|r| r.iter().map(|&v| v as f64).collect::<Vec<_>>()),
        );
    }
    out
}

/// The Jacobian columns of the `jsae` pair, recomputed from nothing but the two exported
/// SAELens folders, the held-out activations and the model's MLP weights (issue 17 item
/// 11): per held-out token, `A_x` / `A_y` = TopK of the exported encoders on the true
/// `mlp_in` / `mlp_out`, and `J[j, i] = ∂ pre_y_j(f(x + ε W_dec[i])) / ∂ε` by central
/// differences through an f64 SwiGLU. Returns `(mean |J|, share > 0.01, share > 0.1,
/// mean‖x‖ / mean‖y‖)` over the `k²` entries per token.
fn jacobian_from_exports(run: &std::path::Path, model_dir: &std::path::Path) -> [f64; 4] {
    let sx = Exported::load(&run.join("jsae/jsae/blocks.1.hook_mlp_in"));
    let sy = Exported::load(&run.join("jsae/jsae/blocks.1.hook_mlp_out"));
    assert_eq!(sx.k, sy.k);
    let mlp = Swiglu::load(model_dir, LAYER);
    let acts = run.join("activations");
    let xs = rows_of(&acts.join("blocks.1.hook_mlp_in/eval"));
    let ys = rows_of(&acts.join("blocks.1.hook_mlp_out/eval"));
    assert_eq!(xs.len(), ys.len());
    let (d, k) = (sx.d, sx.k);
    let eps = 1e-3;
    let (mut sum, mut above_001, mut above_01) = (0.0f64, 0u64, 0u64);
    let (mut nx, mut ny) = (0.0f64, 0.0f64);
    for (x, y) in xs.iter().zip(&ys) {
        nx += x.iter().map(|v| v * v).sum::<f64>().sqrt();
        ny += y.iter().map(|v| v * v).sum::<f64>().sqrt();
        let (ax, ay) = (sx.active(x), sy.active(y));
        for &i in &ax {
            let dir_i = &sx.w_dec[i * d..(i + 1) * d];
            let at = |s: f64| -> Vec<f64> {
                let xp: Vec<f64> = x.iter().zip(dir_i).map(|(a, w)| a + s * w).collect();
                sy.pre(&mlp.forward(&xp))
            };
            let (p, m) = (at(eps), at(-eps));
            for &j in &ay {
                let v = ((p[j] - m[j]) / (2.0 * eps)).abs();
                sum += v;
                above_001 += u64::from(v > 0.01);
                above_01 += u64::from(v > 0.1);
            }
        }
    }
    let denom = (xs.len() * k * k) as f64;
    [
        sum / denom,
        above_001 as f64 / denom,
        above_01 as f64 / denom,
        nx / ny,
    ]
}

/// `saepipe run` on a small `[jsae]` pipeline (tiny Llama), then its random-init control:
/// both write JSAE and plain-pair rows with Jacobian columns into metrics.parquet.
#[test]
fn jsae_pipeline_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = jsae_fixture(tmp.path(), 2048, "");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_saepipe"))
            .args(["--progress", "off", "run"])
            .arg(&pipeline)
            .arg("--offline")
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "saepipe run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[]);
    run(&[
        "--set",
        "model.random_init=true",
        "--set",
        "run.name=jsae-tiny-random",
    ]);
    for name in ["jsae-tiny", "jsae-tiny-random"] {
        let path = tmp
            .path()
            .join("runs")
            .join(name)
            .join("results/metrics.parquet");
        let f = std::fs::File::open(&path).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let arch = column::<StringArray>(&b, "arch");
        let hp = column::<StringArray>(&b, "hookpoint");
        let jac = column::<Float64Array>(&b, "jacobian_sparsity");
        let mean = column::<Float64Array>(&b, "jacobian_mean_abs");
        let rms1 = column::<Float64Array>(&b, "jacobian_rms_frac_1");
        let raw005 = column::<Float64Array>(&b, "jacobian_frac_0_005");
        let ce = column::<Float64Array>(&b, "ce_spliced");
        let r2 = column::<Float64Array>(&b, "r2");
        let mut seen = Vec::new();
        for i in 0..b.num_rows() {
            let a = arch.value(i);
            if a == "jsae" || a == "topk_pair" {
                assert!(
                    !jac.is_null(i) && (0.0..=1.0).contains(&jac.value(i)),
                    "{name} {a}"
                );
                assert!(mean.value(i) > 0.0 && mean.value(i).is_finite());
                // Some entries exceed their token's RMS, never all of them (Σ a² / n = rms²).
                assert!(rms1.value(i) > 0.0 && rms1.value(i) < 1.0, "{name} {a}");
                assert!(
                    raw005.value(i) >= jac.value(i),
                    "{name} {a}: τ 0.005 ≥ τ 0.01"
                );
                assert!(ce.value(i).is_finite());
                assert!(
                    r2.value(i) > 0.0,
                    "{name} {a} {}: R² {}",
                    hp.value(i),
                    r2.value(i)
                );
                seen.push(format!("{a} {}", hp.value(i)));
            } else {
                assert!(jac.is_null(i), "plain SAE rows have no Jacobian");
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "jsae blocks.1.hook_mlp_in",
                "jsae blocks.1.hook_mlp_out",
                "topk_pair blocks.1.hook_mlp_in",
                "topk_pair blocks.1.hook_mlp_out"
            ],
            "{name}"
        );
        if name == "jsae-tiny" {
            // The reported Jacobian columns are those of the exported folders (the random-init
            // control's MLP is not the file's, so it is checked on the real model only).
            let row = (0..b.num_rows())
                .find(|&i| arch.value(i) == "jsae")
                .expect("a jsae row");
            let model_dir = tmp.path().join("model");
            let [mean_e, f001_e, f01_e, ratio] =
                jacobian_from_exports(&tmp.path().join("runs").join(name), &model_dir);
            let f01 = column::<Float64Array>(&b, "jacobian_frac_0_1");
            eprintln!(
                "from the exports: mean|J| {mean_e:.5} >0.01 {f001_e:.4} >0.1 {f01_e:.4}; row: {:.5} {:.4} {:.4}; ‖x‖/‖y‖ {ratio:.3}",
                mean.value(row),
                jac.value(row),
                f01.value(row)
            );
            // The scale ratio c_y/c_x ≈ ‖x‖/‖y‖ is far from 1 here, so figures in the scaled
            // units would miss these tolerances by that factor.
            assert!(
                (ratio - 1.0).abs() > 0.2,
                "the fixture no longer tells the units apart (‖x‖/‖y‖ = {ratio})"
            );
            assert!(
                (mean.value(row) - mean_e).abs() < 0.02 * mean_e,
                "jacobian_mean_abs {} vs {mean_e} recomputed from the exported folders",
                mean.value(row)
            );
            assert!(
                (jac.value(row) - f001_e).abs() < 0.01,
                "jacobian_sparsity {} vs {f001_e} from the exports",
                jac.value(row)
            );
            assert!(
                (f01.value(row) - f01_e).abs() < 0.01,
                "jacobian_frac_0_1 {} vs {f01_e} from the exports",
                f01.value(row)
            );
        }
        let jdir = tmp.path().join("runs").join(name).join("jsae/jsae");
        assert!(jdir.join("jsae_done.json").is_file());
        // The exports' metadata is the run's (data.context_len = 32, BOS, special tokens
        // excluded by default).
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(jdir.join("blocks.1.hook_mlp_out/cfg.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["metadata"]["context_size"], 32);
        assert_eq!(meta["metadata"]["prepend_bos"], true);
        assert_eq!(meta["metadata"]["exclude_special_tokens"], true);
        assert_eq!(meta["metadata"]["hook_name"], "blocks.1.hook_mlp_out");
        assert!(jdir.join("blocks.1.hook_mlp_in/cfg.json").is_file());
        assert!(jdir
            .join("blocks.1.hook_mlp_out/sae_weights.safetensors")
            .is_file());
    }
    // A second run finds everything done and changes nothing.
    let done = tmp.path().join("runs/jsae-tiny/jsae/jsae/jsae_done.json");
    let before = std::fs::read_to_string(&done).unwrap();
    run(&[]);
    assert_eq!(before, std::fs::read_to_string(&done).unwrap());
}

/// A JSAE stage killed (SIGKILL) mid-training resumes from its pair checkpoints and ends
/// with the same weights, bit for bit, as an uninterrupted run; the checkpoint is removed
/// once the pair is done.
#[test]
fn killed_jsae_stage_resumes_bit_identically() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    // 256 steps of 256 tokens (16 passes over 4096), a checkpoint after every step.
    let pipeline = jsae_fixture(
        tmp.path(),
        4096,
        "checkpoint_every = 256\ntrain_tokens = 65_536",
    );
    let bin = env!("CARGO_BIN_EXE_saepipe");
    let cmd = |name: &str| {
        let mut c = Command::new(bin);
        c.args(["--progress", "off", "run"]).arg(&pipeline).args([
            "--offline",
            "--set",
            &format!("run.name={name}"),
        ]);
        c
    };
    let ok = |c: &mut Command| {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "saepipe run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&mut cmd("a"));
    let weights = |name: &str| -> Vec<Vec<u8>> {
        ["jsae", "topk_pair"]
            .iter()
            .flat_map(|v| {
                ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"].map(|hp| {
                    std::fs::read(
                        tmp.path()
                            .join("runs")
                            .join(name)
                            .join("jsae")
                            .join(v)
                            .join(hp)
                            .join("sae_weights.safetensors"),
                    )
                    .unwrap()
                })
            })
            .collect()
    };
    let a = weights("a");
    // Run b until the pairs' first checkpoints exist, then kill it. A loaded machine can let
    // the run finish first; then try again under a fresh name.
    let mut killed = None;
    for attempt in 0..3 {
        let name = format!("b{attempt}");
        let dir = tmp.path().join("runs").join(&name).join("jsae");
        let mut child = cmd(&name)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let ckpt = dir.join("jsae").join("checkpoint.safetensors");
        while !ckpt.exists() && child.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "no checkpoint appeared"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().ok();
        child.wait().unwrap();
        if !dir.join("jsae/jsae_done.json").exists() && ckpt.exists() {
            killed = Some(name);
            break;
        }
    }
    let name = killed.expect("the run finished before it could be killed, three times");
    let dir = tmp.path().join("runs").join(&name).join("jsae");
    let out = cmd(&name).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("jsae: resuming") && log.contains("pair(s) from their checkpoints"),
        "no resume: {log}"
    );
    assert!(
        weights(&name) == a,
        "resumed weights differ from the uninterrupted run's"
    );
    for v in ["jsae", "topk_pair"] {
        assert!(dir.join(v).join("jsae_done.json").is_file());
    }
    assert!(
        !dir.join("jsae").join("checkpoint.safetensors").exists()
            && !dir
                .join("topk_pair")
                .join("checkpoint.safetensors")
                .exists(),
        "the checkpoint outlives the finished pairs"
    );
}
