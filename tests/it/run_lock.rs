//! Two processes never work on one run folder at once (issue 17 item 1): while another
//! process holds the run folder's lock, `saepipe capture`, `train`, `evaluate`, `download`
//! and `run` refuse at once, name the holder, and touch nothing; once it is released the
//! same command works.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use saepipe::util::lock::RunLock;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn saepipe(stage: &str, model: &Path, corpus: &Path, data_dir: &Path) -> Output {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    Command::new(BIN)
        .args(["--progress", "off", stage])
        .arg(smoke)
        .arg("--set")
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", data_dir.display()))
        .output()
        .unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_locked_run_folder_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 3, false);
    let corpus = common::write_corpus(tmp.path(), 1500, 9);
    let data = tmp.path().join("data");
    let run = data.join("smoke");
    let lock = RunLock::acquire(&run).unwrap();
    let before = files(&run);
    for stage in ["download", "capture", "train", "evaluate", "run"] {
        let out = saepipe(stage, &model, &corpus, &data);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stage} ran on a locked folder");
        assert!(
            err.contains("in use by another saepipe process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{stage}: {err}"
        );
        assert_eq!(files(&run), before, "{stage} touched the locked folder");
    }
    drop(lock);
    let out = saepipe("run", &model, &corpus, &data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
