//! The train stage resumes inside a unit (issue 12), through the real binary on a generated
//! tiny Llama: `saepipe train` is SIGKILLed once the first unit checkpoints exist, then
//! re-run; it says which unit it resumes from which step, and every exported SAE, config
//! and training log is byte-identical to an uninterrupted run's. No checkpoint outlives its
//! finished unit.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

/// `saepipe <stage> pipelines/smoke.toml` on the fixture, outputs under `data_dir`: 8 units
/// (4 grid points × 2 hookpoints) of 128 steps each, a checkpoint after every step.
fn cmd(stage: &str, model: &Path, corpus: &Path, data_dir: &Path) -> Command {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let mut c = Command::new(BIN);
    c.args(["--progress", "off", stage])
        .arg(smoke)
        .arg("--set")
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", data_dir.display()))
        .args([
            "--set",
            "train.train_tokens=32768",
            "--set",
            "train.checkpoint_every=256",
        ]);
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "saepipe failed: {err}");
    err
}

/// Every file under `dir` with this name, sorted.
fn find(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            find(&p, name, out);
        } else if p.file_name().is_some_and(|f| f == name) {
            out.push(p);
        }
    }
    out.sort();
}

/// `(path relative to the run's saes/ folder, bytes)` of every unit output.
fn outputs(saes: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for name in ["sae_weights.safetensors", "cfg.json", "train_log.parquet"] {
        find(saes, name, &mut files);
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.strip_prefix(saes).unwrap().to_path_buf(), bytes)
        })
        .collect()
}

#[test]
fn killed_train_stage_resumes_mid_unit_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 5, false);
    let corpus = common::write_corpus(tmp.path(), 1500, 21);
    // Uninterrupted reference.
    let a = tmp.path().join("a");
    ok(cmd("capture", &model, &corpus, &a));
    ok(cmd("train", &model, &corpus, &a));
    let reference = outputs(&a.join("smoke").join("saes"));
    assert_eq!(reference.len(), 24, "8 units × 3 files");
    // Killed once the first checkpoints exist (a fast machine may finish first: retry).
    let mut killed = None;
    for attempt in 0..3 {
        let b = tmp.path().join(format!("b{attempt}"));
        ok(cmd("capture", &model, &corpus, &b));
        let saes = b.join("smoke").join("saes");
        let mut child = cmd("train", &model, &corpus, &b)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            let mut ck = Vec::new();
            find(&saes, "checkpoint.safetensors", &mut ck);
            if !ck.is_empty() || child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "no checkpoint appeared"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().ok();
        child.wait().unwrap();
        let mut done = Vec::new();
        find(&saes, "train_done.json", &mut done);
        let mut ck = Vec::new();
        find(&saes, "checkpoint.safetensors", &mut ck);
        if done.len() < 8 && !ck.is_empty() {
            killed = Some(b);
            break;
        }
    }
    let b = killed.expect("the train stage finished before it could be killed, three times");
    let log = ok(cmd("train", &model, &corpus, &b));
    assert!(
        log.contains("train: resuming") && log.contains("from step"),
        "the re-run does not say it resumed: {log}"
    );
    let saes = b.join("smoke").join("saes");
    let resumed = outputs(&saes);
    assert_eq!(
        resumed.iter().map(|r| &r.0).collect::<Vec<_>>(),
        reference.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    for ((path, got), (_, want)) in resumed.iter().zip(&reference) {
        assert!(
            got == want,
            "{} differs from the uninterrupted run's",
            path.display()
        );
    }
    let mut left = Vec::new();
    find(&saes, "checkpoint.safetensors", &mut left);
    assert!(left.is_empty(), "checkpoints outlive their units: {left:?}");
}
