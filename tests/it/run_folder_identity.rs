//! Finished work is recognised by what was computed, not by where the run folder is
//! (issue 17 item 3): after `saepipe run`, the same pipeline with `run.data_dir` spelled
//! `./data`, `data/`, as an absolute path, or after the folder was moved, trains nothing
//! again; and `saepipe evaluate` with nothing trained fails, says what to run, and leaves
//! existing results alone.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn saepipe(cwd: &Path, stage: &str, model: &Path, corpus: &Path, data_dir: &str) -> Output {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    Command::new(BIN)
        .current_dir(cwd)
        .args(["--progress", "off", stage])
        .arg(smoke)
        .arg("--set")
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={data_dir}"))
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "saepipe failed: {err}");
    err
}

#[test]
fn a_run_folder_spelled_or_placed_differently_is_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = common::tiny_llama(&root.join("model"), 3, false);
    let corpus = common::write_corpus(root, 1500, 5);
    ok(saepipe(root, "run", &model, &corpus, "data"));
    let metrics = root.join("data/smoke/results/metrics.parquet");
    let before = std::fs::read(&metrics).unwrap();
    let abs = root.join("data").display().to_string();
    for spelling in ["./data", "data/", abs.as_str()] {
        let err = ok(saepipe(root, "train", &model, &corpus, spelling));
        assert!(
            err.contains("already trained"),
            "run.data_dir = {spelling} retrained: {err}"
        );
        ok(saepipe(root, "evaluate", &model, &corpus, spelling));
        assert_eq!(
            std::fs::read(&metrics).unwrap(),
            before,
            "run.data_dir = {spelling} changed the results"
        );
    }
    std::fs::rename(root.join("data"), root.join("moved")).unwrap();
    let err = ok(saepipe(root, "train", &model, &corpus, "moved"));
    assert!(
        err.contains("already trained"),
        "a moved run retrained: {err}"
    );
}

#[test]
fn evaluate_with_nothing_trained_is_an_error_that_keeps_results() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = common::tiny_llama(&root.join("model"), 3, false);
    let corpus = common::write_corpus(root, 200, 5);
    let results = root.join("empty/smoke/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("metrics.parquet"), b"an earlier table").unwrap();
    let out = saepipe(root, "evaluate", &model, &corpus, "empty");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "evaluate succeeded with nothing trained"
    );
    assert!(
        err.contains("nothing to evaluate") && err.contains("saepipe train"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(results.join("metrics.parquet")).unwrap(),
        b"an earlier table"
    );
    assert!(!results.join("pareto.parquet").exists());
}
