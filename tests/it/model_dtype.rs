//! `[model] dtype` and `device` through the real binary (issue 13 items 1 and 6): a bf16
//! capture end to end, its activations close to the f32 capture's and not mistaken for
//! them, and a CUDA device that cannot be used refused before anything is downloaded or
//! captured, naming the key and both fixes.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use saepipe::store::reader::{ActivationSet, Expect};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.1.hook_mlp_out";

fn smoke() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml")
}

fn corpus(dir: &Path) -> PathBuf {
    let p = dir.join("corpus.txt");
    let mut text = String::new();
    for _ in 0..4 {
        text.push_str(&common::tiny_corpus().join("\n\n"));
        text.push_str("\n\n");
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn capture(model: &str, corpus: &Path, data_dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["-q", "capture"]).arg(smoke());
    let sets = [
        format!("model.source={model}"),
        format!("data.files=[\"{}\"]", corpus.display()),
        format!("run.data_dir={}", data_dir.display()),
        "data.n_tokens=1024".to_string(),
        "data.eval_tokens=1024".to_string(),
        "capture.shard_tokens=512".to_string(),
        format!("capture.hookpoints=[\"{HP}\"]"),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

/// All rows of the captured training set of `HP`, widened to f32.
fn rows(data_dir: &Path) -> Vec<f32> {
    let dir = data_dir.join("smoke/activations").join(HP);
    let set = ActivationSet::open(&dir, &Expect::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut out = Vec::new();
    for b in set.batches(4096) {
        out.extend_from_slice(&b.unwrap().act);
    }
    out
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn bf16_model_capture_runs_end_to_end_and_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 5, false);
    let src = format!("local:{}", model.display());
    let corpus = corpus(tmp.path());
    let (f32_dir, bf16_dir) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    ok(&capture(&src, &corpus, &f32_dir, &[]));
    ok(&capture(
        &src,
        &corpus,
        &bf16_dir,
        &["model.dtype=bf16", "capture.dtype=bf16"],
    ));
    let (a, b) = (rows(&f32_dir), rows(&bf16_dir));
    assert_eq!(a.len(), b.len(), "same tokens captured");
    assert!(!a.is_empty());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err.is_finite() && err > 0.0, "bf16 differs from f32: {err}");
    assert!(
        err <= 5e-2 * scale,
        "bf16 capture far from f32: {err} vs max {scale}"
    );
    // A bf16 model computes other activations: its shards are not taken for the f32 ones.
    let o = capture(&src, &corpus, &f32_dir, &["model.dtype=bf16"]);
    assert!(
        !o.status.success(),
        "an f32 set was reused for a bf16 model"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--force"), "{err}");
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn unusable_cuda_device_is_refused_before_any_download() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (data, cache) = (tmp.path().join("data"), tmp.path().join("hub"));
    // A hub source with a hub that refuses connections: reaching it would be a different
    // error, and would leave files in the cache.
    let run = |cmd: &str, device: &str| {
        let mut c = Command::new(BIN);
        c.args(["-q", cmd])
            .arg(smoke())
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HUB_OFFLINE");
        for s in [
            "model.source=EleutherAI/pythia-70m".to_string(),
            "model.revision=step143000".to_string(),
            format!("data.files=[\"{}\"]", corpus.display()),
            format!("run.data_dir={}", data.display()),
            format!("model.device={device}"),
        ] {
            c.args(["--set", &s]);
        }
        c.output().unwrap()
    };
    for (cmd, device, gpu) in [("run", "cuda", 0), ("capture", "cuda:7", 7)] {
        if candle_core::Device::new_cuda(gpu).is_ok() {
            continue; // a CUDA build on a machine with that GPU: nothing to refuse
        }
        let o = run(cmd, device);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("model.device"), "{cmd}: {err}");
        assert!(err.contains(&format!("\"{device}\"")), "{cmd}: {err}");
        assert!(err.contains(r#"model.device = "cpu""#), "{cmd}: {err}");
        if !cfg!(feature = "cuda") {
            assert!(err.contains("--features cuda"), "{cmd}: {err}");
        }
        assert!(!err.contains("127.0.0.1"), "{cmd} reached the hub: {err}");
        assert_eq!(files_under(&cache), Vec::<PathBuf>::new(), "{cmd}");
        assert!(
            files_under(&data)
                .iter()
                .all(|p| !p.to_string_lossy().contains("activations")),
            "{cmd} captured: {:?}",
            files_under(&data)
        );
    }
}
