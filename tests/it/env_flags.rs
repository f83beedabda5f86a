//! `HF_HUB_OFFLINE` is read as the hub reads it (issue 17 item 2): `1`/`0`, `true`/`false`,
//! `yes`/`no`, `on`/`off` in any case, by every command, and never reported as a bad value
//! of a `--offline` flag the user did not pass.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

/// `saepipe download` of `pipelines/smoke.toml` with `model.source` and outputs under `tmp`;
/// the hub endpoint is a closed local port and the hub cache an empty folder.
fn download(tmp: &Path, source: &str, offline: &str) -> Output {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let corpus = common::write_corpus(tmp, 50, 1);
    Command::new(BIN)
        .args(["--progress", "off", "download"])
        .arg(&smoke)
        .arg("--set")
        .arg(format!("model.source={source}"))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", tmp.join("runs").display()))
        .env("HF_HUB_OFFLINE", offline)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", tmp.join("cache"))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn every_hub_spelling_of_hf_hub_offline_is_accepted() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/tiny_llama");
    for v in ["1", "TRUE", "yes", "On", "0", "false", "No", "off"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = download(tmp.path(), &format!("local:{}", tiny.display()), v);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "HF_HUB_OFFLINE={v}: {err}");
        assert!(!err.contains("--offline"), "HF_HUB_OFFLINE={v}: {err}");
    }
}

#[test]
fn hf_hub_offline_is_honoured_and_its_opposite_goes_online() {
    for (v, offline) in [("1", true), ("yes", true), ("0", false), ("off", false)] {
        let tmp = tempfile::tempdir().unwrap();
        let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
        let corpus = common::write_corpus(tmp.path(), 50, 1);
        let out = Command::new(BIN)
            .args(["--progress", "off", "download"])
            .arg(&smoke)
            .args([
                "--set",
                "model.source=\"org/model\"",
                "--set",
                "model.revision=\"0123456789abcdef0123456789abcdef01234567\"",
            ])
            .arg("--set")
            .arg(format!("data.files=[\"{}\"]", corpus.display()))
            .arg("--set")
            .arg(format!(
                "run.data_dir={}",
                tmp.path().join("runs").display()
            ))
            .env("HF_HUB_OFFLINE", v)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_CACHE", tmp.path().join("cache"))
            .env_remove("HF_TOKEN")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "HF_HUB_OFFLINE={v}: nothing to download from"
        );
        assert_eq!(
            err.contains("not in the hub cache"),
            offline,
            "HF_HUB_OFFLINE={v} should be {}: {err}",
            if offline { "offline" } else { "online" }
        );
    }
}
