//! The capture stage through the real binary on a generated tiny Llama:
//! - SIGKILL mid-run, re-run: output identical byte for byte to an uninterrupted run;
//! - a changed config is refused (naming the hash and `--force`), and `--force` works;
//! - captured activations equal `saepipe trace` on the same token ids.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.1.hook_resid_mid";

/// A corpus of `n` in-vocabulary sentences, one paragraph each.
fn corpus(dir: &Path, n: usize) -> PathBuf {
    common::write_corpus(dir, n, 11)
}

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    corpus: PathBuf,
    root: PathBuf,
}

fn fixture(sentences: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 5, false);
    let corpus = corpus(tmp.path(), sentences);
    let root = tmp.path().to_path_buf();
    Fixture {
        _tmp: tmp,
        model,
        corpus,
        root,
    }
}

fn args(f: &Fixture, data_dir: &Path, n_tokens: u64) -> Vec<String> {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    vec![
        "-q".into(),
        "capture".into(),
        smoke.display().to_string(),
        "--set".into(),
        format!("model.source=local:{}", f.model.display()),
        "--set".into(),
        format!("data.files=[\"{}\"]", f.corpus.display()),
        "--set".into(),
        format!("run.data_dir={}", data_dir.display()),
        "--set".into(),
        format!("data.n_tokens={n_tokens}"),
        "--set".into(),
        "data.eval_tokens=1024".into(),
        "--set".into(),
        "data.context_len=32".into(),
        "--set".into(),
        "capture.shard_tokens=256".into(),
        "--set".into(),
        format!("capture.hookpoints=[\"{HP}\", \"blocks.0.hook_mlp_out\"]"),
    ]
}

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "saepipe failed ({:?}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every file under `root`, relative path → bytes.
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                stack.push(e);
            } else {
                let rel = e.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read(&e).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn act_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("smoke").join("activations")
}

#[test]
fn sigkill_then_rerun_is_bit_identical() {
    let f = fixture(6000);
    let n_tokens = 40_000;
    let a = f.root.join("a");
    ok(&run(&args(&f, &a, n_tokens)));
    let files_a = tree(&act_dir(&a));
    assert!(
        files_a.len() > 50,
        "expected many small shards, got {}",
        files_a.len()
    );

    let b = f.root.join("b");
    let mut child = Command::new(BIN)
        .args(args(&f, &b, n_tokens))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill (SIGKILL) as soon as the third shard of the train set is in place.
    let target = act_dir(&b).join(HP).join("part-00002.parquet");
    let t0 = Instant::now();
    while !target.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no shard appeared");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("capture ended before it could be killed: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let manifest = act_dir(&b).join(HP).join("manifest.json");
    assert!(
        !manifest.exists(),
        "the kill came too late to test anything"
    );
    let before: Vec<_> = tree(&act_dir(&b)).into_iter().map(|(n, _)| n).collect();
    assert!(before.iter().all(|n| !n.ends_with("manifest.json")));

    ok(&run(&args(&f, &b, n_tokens)));
    let files_b = tree(&act_dir(&b));
    assert_eq!(
        files_a.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        files_b.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in files_a.iter().zip(&files_b) {
        assert!(x == y, "{name} differs after resume");
    }

    // A third run is a no-op that leaves everything as it is.
    ok(&run(&args(&f, &b, n_tokens)));
    assert!(tree(&act_dir(&b)) == files_b);
}

#[test]
fn changed_config_is_refused_unless_forced() {
    let f = fixture(1500);
    let d = f.root.join("d");
    ok(&run(&args(&f, &d, 4096)));
    let o = run(&args(&f, &d, 4000));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("config hash") && err.contains("--force"),
        "{err}"
    );
    let mut forced = args(&f, &d, 4000);
    forced.push("--force".into());
    ok(&run(&forced));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(act_dir(&d).join(HP).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["n_tokens"], 4000);
}

#[test]
fn captured_rows_equal_trace_of_the_same_window() {
    use saepipe::store::reader::{ActivationSet, Expect};
    let f = fixture(1500);
    let d = f.root.join("t");
    ok(&run(&args(&f, &d, 2048)));
    let set = ActivationSet::open(
        &act_dir(&d).join(HP),
        &Expect {
            hookpoint: Some(HP.into()),
            d_model: Some(64),
            ..Default::default()
        },
    )
    .unwrap();
    let rows: Vec<_> = set.batches(4096).map(|b| b.unwrap()).collect();
    // Rebuild windows 0 and 5 from their rows: the excluded positions are BOS (position 0)
    // and the EOS separators between documents (the tiny tokenizer has no other specials).
    for seq in [0u64, 5] {
        let mut ids = [common::TINY_EOS; 32];
        ids[0] = common::TINY_BOS;
        let mut acts = vec![None; 32];
        for b in &rows {
            for i in 0..b.seq.len() {
                if b.seq[i] == seq {
                    ids[b.pos[i] as usize] = b.token_id[i];
                    acts[b.pos[i] as usize] = Some(b.act[i * 64..(i + 1) * 64].to_vec());
                }
            }
        }
        assert!(acts[0].is_none(), "BOS position captured");
        assert!(acts[1..].iter().filter(|a| a.is_some()).count() >= 24);
        let out = f.root.join(format!("trace{seq}.safetensors"));
        let id_list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        ok(&run(&[
            "trace".into(),
            format!("local:{}", f.model.display()),
            "--token-ids".into(),
            id_list.join(","),
            "--hookpoints".into(),
            HP.into(),
            "--out".into(),
            out.display().to_string(),
        ]));
        let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
        let traced = t[HP].to_vec2::<f32>().unwrap(); // (32, 64)
        for (p, a) in acts.iter().enumerate() {
            if let Some(a) = a {
                for (j, (x, y)) in a.iter().zip(&traced[p]).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-6,
                        "window {seq} pos {p} dim {j}: {x} vs {y}"
                    );
                }
            }
        }
    }
}
