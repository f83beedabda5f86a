//! Streaming with bounded disk (issue 14 item 1) through the real binary on a generated
//! tiny Llama: `saepipe run` with `capture.keep = false` captures a chunk, trains every SAE
//! on it, deletes it and captures the next.
//! - an uninterrupted streamed run ends with its chunks deleted, the held-out split kept,
//!   a marker per chunk, and the activations folder never above the budget (polled here
//!   and recorded by the run in `stream.json`);
//! - SIGKILLed during the capture of chunk 2, during the training of chunk 1 and right
//!   after a chunk marker, then re-run: every `sae_weights.safetensors` byte-identical to
//!   the uninterrupted streamed run's;
//! - a budget that holds the whole split in one chunk trains exactly as keep-everything
//!   mode (same weights, byte for byte);
//! - a budget too small, or a missing one, is refused naming `capture.disk_budget_bytes`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
/// Held-out split (3 shards × 2 hookpoints) plus three 512-token shards of 2 hookpoints.
const BUDGET: u64 = 2_400_000;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    corpus: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 5, false);
    let corpus = common::write_corpus(tmp.path(), 3000, 21);
    Fixture {
        root: tmp.path().to_path_buf(),
        _tmp: tmp,
        model,
        corpus,
    }
}

/// `saepipe run pipelines/smoke.toml` into `data_dir`: 8 units (4 points × 2 hookpoints)
/// of 32 steps, 512-token shards, a checkpoint every other step, plus `extra` settings.
fn cmd(f: &Fixture, data_dir: &Path, extra: &[&str]) -> Command {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let mut c = Command::new(BIN);
    c.args(["--progress", "off", "run"])
        .arg(smoke)
        .args(["--offline", "--set"])
        .arg(format!("model.source=local:{}", f.model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", f.corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", data_dir.display()));
    for s in [
        "data.n_tokens=8192",
        "capture.shard_tokens=512",
        "train.checkpoint_every=512",
        "eval.ce_sequences=2",
    ]
    .iter()
    .chain(extra)
    {
        c.args(["--set", s]);
    }
    c
}

fn streamed(budget: u64) -> Vec<String> {
    vec![
        "capture.keep=false".into(),
        format!("capture.disk_budget_bytes={budget}"),
    ]
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "saepipe failed: {err}");
    err
}

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

/// `(path under saes/, bytes)` of every exported SAE.
fn weights(run: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let saes = run.join("saes");
    let mut files = Vec::new();
    find(&saes, "sae_weights.safetensors", &mut files);
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p.strip_prefix(&saes).unwrap().to_path_buf(), b)
        })
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn stream_json(run: &Path) -> serde_json::Value {
    let p = run.join("activations/stream.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Spawn `c`, SIGKILL it as soon as `trigger` holds; false if it finished first.
fn kill_when(mut c: Command, trigger: &dyn Fn() -> bool) -> bool {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if trigger() {
            child.kill().ok();
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "the run hangs");
        std::thread::yield_now();
    }
}

fn chunk(run: &Path, c: usize) -> PathBuf {
    run.join("activations").join(format!("chunk-{c:05}"))
}

fn manifests(dir: &Path) -> usize {
    let mut m = Vec::new();
    find(dir, "manifest.json", &mut m);
    m.len()
}

fn has_tmp(dir: &Path) -> bool {
    fn walk(d: &Path) -> bool {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    p.to_string_lossy().ends_with(".tmp")
                }
            })
    }
    walk(dir)
}

#[test]
fn streamed_run_stays_in_budget_and_resumes_bit_identically() {
    let f = fixture();
    let args = streamed(BUDGET);
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();

    // Uninterrupted streamed reference, the folder's size polled meanwhile.
    let a = f.root.join("a");
    let acts = a.join("smoke").join("activations");
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let poll = {
        let (stop, peak, acts) = (stop.clone(), peak.clone(), acts.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(dir_bytes(&acts), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let log = ok(cmd(&f, &a, &extra));
    stop.store(true, Ordering::Relaxed);
    poll.join().unwrap();
    let run_a = a.join("smoke");
    let reference = weights(&run_a);
    assert_eq!(reference.len(), 8, "8 units: {log}");
    let rec = stream_json(&run_a);
    let n_chunks = rec["chunks"].as_array().unwrap().len();
    assert!(
        n_chunks >= 4,
        "the budget should make several chunks: {rec}"
    );
    let high = rec["high_water_bytes"].as_u64().unwrap();
    assert!(
        high > 0 && high <= BUDGET,
        "recorded high water {high} > {BUDGET}"
    );
    let polled = peak.load(Ordering::Relaxed);
    assert!(
        polled <= BUDGET,
        "polled activations size {polled} > {BUDGET}"
    );
    assert!(high * 2 > BUDGET, "the chunks use the budget: {high}");
    // Chunks deleted, markers written, held-out split kept, metrics written.
    for c in 0..n_chunks {
        assert!(!chunk(&run_a, c).exists(), "chunk {c} left on disk");
        assert!(
            acts.join(format!("chunk-{c:05}.done")).is_file(),
            "no marker for chunk {c}"
        );
    }
    for hp in ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_mid"] {
        assert!(acts.join(hp).join("eval").join("manifest.json").is_file());
        assert!(!acts.join(hp).join("manifest.json").exists());
    }
    assert!(run_a.join("results").join("metrics.parquet").is_file());
    let mut ck = Vec::new();
    find(&run_a.join("saes"), "checkpoint.safetensors", &mut ck);
    assert!(ck.is_empty(), "checkpoints outlive their units: {ck:?}");

    // Killed at three points, then resumed.
    type Trigger = Box<dyn Fn(&Path) -> bool>;
    type Check = Box<dyn Fn(&Path) -> bool>;
    let cases: Vec<(&str, Trigger, Check)> = vec![
        (
            "during the capture of chunk 2",
            Box::new(|r: &Path| has_tmp(&chunk(r, 2))),
            Box::new(|r: &Path| chunk(r, 2).exists() && manifests(&chunk(r, 2)) < 2),
        ),
        (
            "during the training of chunk 1",
            Box::new(|r: &Path| {
                let mut m = Vec::new();
                find(&chunk(r, 1), "manifest.json", &mut m);
                if m.len() < 2 {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
                true
            }),
            Box::new(|r: &Path| {
                manifests(&chunk(r, 1)) == 2 && !r.join("activations/chunk-00001.done").exists()
            }),
        ),
        (
            "right after the marker of chunk 0",
            Box::new(|r: &Path| r.join("activations/chunk-00000.done").exists()),
            Box::new(|r: &Path| !r.join("activations/chunk-00001.done").exists()),
        ),
    ];
    for (what, trigger, check) in &cases {
        let mut hit = None;
        for attempt in 0..4 {
            let b = f
                .root
                .join(format!("b-{}-{attempt}", what.replace(' ', "-")));
            let run_b = b.join("smoke");
            if kill_when(cmd(&f, &b, &extra), &|| trigger(&run_b)) && check(&run_b) {
                hit = Some(b);
                break;
            }
        }
        let b = hit.unwrap_or_else(|| panic!("could not kill the run {what}, four times"));
        let log = ok(cmd(&f, &b, &extra));
        let run_b = b.join("smoke");
        let got = weights(&run_b);
        assert_eq!(
            got.iter().map(|g| &g.0).collect::<Vec<_>>(),
            reference.iter().map(|r| &r.0).collect::<Vec<_>>(),
            "killed {what}"
        );
        for ((path, g), (_, r)) in got.iter().zip(&reference) {
            assert!(
                g == r,
                "killed {what}: {} differs from the uninterrupted streamed run's\n{log}",
                path.display()
            );
        }
        let high = stream_json(&run_b)["high_water_bytes"].as_u64().unwrap();
        assert!(
            high <= BUDGET,
            "killed {what}: high water {high} > {BUDGET}"
        );
        for c in 0..n_chunks {
            assert!(!chunk(&run_b, c).exists(), "killed {what}: chunk {c} left");
        }
    }
}

#[test]
fn one_chunk_streamed_equals_keep_everything() {
    let f = fixture();
    let keep = f.root.join("keep");
    ok(cmd(&f, &keep, &[]));
    let big = f.root.join("big");
    let args = streamed(1 << 40);
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(cmd(&f, &big, &extra));
    assert_eq!(
        stream_json(&big.join("smoke"))["chunks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (k, s) = (weights(&keep.join("smoke")), weights(&big.join("smoke")));
    assert_eq!(k.len(), 8);
    assert_eq!(
        k.iter().map(|x| &x.0).collect::<Vec<_>>(),
        s.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    for ((p, a), (_, b)) in k.iter().zip(&s) {
        assert!(
            a == b,
            "{} differs between keep and one-chunk streaming",
            p.display()
        );
    }
}

#[test]
fn bad_budgets_are_refused_naming_the_key() {
    let f = fixture();
    let d = f.root.join("bad");
    for (sets, want) in [
        (vec!["capture.keep=false".to_string()], "is required"),
        (streamed(1000), "cannot hold"),
        // Above the load-time floor, below the minimum at d_model 64.
        (streamed(700_000), "too small"),
    ] {
        let extra: Vec<&str> = sets.iter().map(String::as_str).collect();
        let out = cmd(&f, &d, &extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sets:?} accepted");
        assert!(
            err.contains("capture.disk_budget_bytes") && err.contains(want),
            "{sets:?}: {err}"
        );
        assert!(
            !d.join("smoke")
                .join("activations")
                .join("chunk-00000")
                .exists(),
            "{sets:?}: captured before refusing"
        );
    }
    let out = cmd(&f, &d, &["capture.disk_budget_bytes=100000000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("capture.keep = false too"));
}
