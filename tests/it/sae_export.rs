//! SAELens v6 export: the exported files reproduce the trained SAE on raw activations, load
//! back, and carry the folded scale and unit-norm decoder rows.
//!
//! With `SAEPIPE_INTEROP_DIR=<dir>` set, the test also writes, per variant,
//! `<dir>/<variant>/{cfg.json, sae_weights.safetensors, io.safetensors}` where `io` holds the
//! raw inputs `x`, our dense codes `feats` and reconstructions `recon`; the script
//! `tests/interop/check_saelens.py` loads them with SAELens and compares.

use saepipe::sae::export::{ExportMeta, LoadedSae};
use saepipe::sae::{ArchConfig, Workspace};
use saepipe::store::InMemorySource;
use saepipe::synthetic::{SyntheticConfig, SyntheticData};
use saepipe::train::{TrainConfig, Trainer};
use saepipe::util::progress::Silent;

const D: usize = 16;
const F: usize = 48;

fn write_io(path: &std::path::Path, x: &[f32], feats: &[f32], recon: &[f32], n: usize) {
    use safetensors::tensor::{Dtype, TensorView};
    let b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (bx, bf, br) = (b(x), b(feats), b(recon));
    let t = vec![
        (
            "x".to_string(),
            TensorView::new(Dtype::F32, vec![n, D], &bx).unwrap(),
        ),
        (
            "feats".to_string(),
            TensorView::new(Dtype::F32, vec![n, F], &bf).unwrap(),
        ),
        (
            "recon".to_string(),
            TensorView::new(Dtype::F32, vec![n, D], &br).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(t, None).unwrap()).unwrap();
}

#[test]
fn export_reproduces_the_trained_sae_on_raw_activations() {
    let interop = std::env::var_os("SAEPIPE_INTEROP_DIR").map(std::path::PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let synth = SyntheticData::new(SyntheticConfig {
        d: D,
        n_features: 32,
        mean_active: 2.0,
        noise: 0.01,
        bipolar: false,
        seed: 3,
    });
    // raw activations with an offset and a non-unit scale, so folding matters
    let raw: Vec<f32> = synth
        .sample(2048, 1)
        .iter()
        .enumerate()
        .map(|(i, v)| 7.0 * v + 0.5 * ((i % D) as f32 - 8.0))
        .collect();
    for arch in ArchConfig::examples() {
        let cfg = TrainConfig {
            batch_tokens: 128,
            total_tokens: 30 * 128,
            lr: Some(3e-3),
            lr_warmup_steps: 0,
            init_tokens: 512,
            dead_after_tokens: 256,
            checkpoint_every: 0,
            ..Default::default()
        };
        let mut src = InMemorySource::new(raw.clone(), D);
        let mut t = Trainer::new(cfg, &arch, F, &mut src).unwrap();
        t.run(&mut src, None, &Silent, None).unwrap();
        let dir = interop
            .as_ref()
            .map(|d| d.join(arch.kind()))
            .unwrap_or_else(|| tmp.path().join(arch.kind()));
        let meta = ExportMeta {
            model_name: "synthetic".into(),
            hook_name: "blocks.0.hook_resid_post".into(),
            context_size: 128,
            dataset_path: "synthetic".into(),
            ..ExportMeta::default()
        };
        t.export(&dir, &meta).unwrap();
        let cfg_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cfg.json")).unwrap()).unwrap();
        assert!(cfg_json["metadata"]["sae_lens_version"].as_str().unwrap() >= "6.0.0");
        assert_eq!(cfg_json["normalize_activations"], "none");
        assert_eq!(cfg_json["d_in"], D);
        assert_eq!(
            cfg_json["metadata"]["hook_name"],
            "blocks.0.hook_resid_post"
        );
        let loaded = LoadedSae::load(&dir).unwrap();
        // unit-norm decoder rows
        for r in loaded.t.w_dec.chunks(D) {
            let n: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                (n - 1.0).abs() < 1e-5,
                "{}: decoder row norm {n}",
                arch.kind()
            );
        }
        // same reconstruction on raw inputs as the training model on scaled inputs
        let n = 200;
        let x = &raw[..n * D];
        let xs: Vec<f32> = x.iter().map(|v| v * t.scale()).collect();
        let mut ws = Workspace::default();
        t.sae().encode(&xs, n, &mut ws).unwrap();
        let train_codes = ws.codes.clone();
        let mut rec_train = Vec::new();
        t.sae().decode(&train_codes, &mut rec_train, &mut ws);
        let mut ws2 = Workspace::default();
        loaded.encode(x, n, &mut ws2);
        let codes = ws2.codes.clone();
        let mut rec = Vec::new();
        loaded.decode(&codes, &mut rec, &mut ws2);
        assert_eq!(
            codes.idx,
            train_codes.idx,
            "{}: active sets differ",
            arch.kind()
        );
        for (a, b) in rec.iter().zip(&rec_train) {
            let b = b / t.scale();
            assert!(
                (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                "{}: {a} vs {b}",
                arch.kind()
            );
        }
        if interop.is_some() {
            write_io(&dir.join("io.safetensors"), x, &codes.to_dense(F), &rec, n);
        }
        // load errors are clear
        std::fs::write(tmp.path().join("bad_cfg.json"), "{}").unwrap();
    }
    let bad = tmp.path().join("missing");
    let e = LoadedSae::load(&bad).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}
