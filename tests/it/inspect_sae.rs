//! `saepipe inspect` on what training and evaluation write (issue 17 item 8): an SAE
//! folder shows its cfg.json (architecture, widths, hookpoint, hyperparameters), each
//! tensor's name, shape and dtype, and the metrics row once the unit is evaluated; a
//! unit's metrics.json alone shows the row.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.1.hook_resid_mid";

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn inspect(p: &Path) -> String {
    ok(Command::new(BIN).arg("inspect").arg(p).output().unwrap())
}

fn has_all(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "inspect output lacks '{n}':\n{text}");
    }
}

/// The SAE folders of hookpoint [`HP`] under `saes/`, sorted.
fn units(saes: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(saes)
        .unwrap()
        .map(|e| e.unwrap().path().join(HP))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

#[test]
fn inspect_shows_an_sae_folder_and_its_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = common::tiny_llama(&root.join("model"), 3, false);
    let corpus = common::write_corpus(root, 1500, 5);
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    ok(Command::new(BIN)
        .args(["-q", "--progress", "off", "run"])
        .arg(&smoke)
        .arg("--set")
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", root.join("data").display()))
        .output()
        .unwrap());
    let units = units(&root.join("data/smoke/saes"));
    assert!(!units.is_empty());
    let dir = &units[0];
    let text = inspect(dir);
    // smoke.toml: TopK, expansion 2 on d_model 64, k from the sweep (2 or 4).
    has_all(
        &text,
        &[
            "SAE folder",
            "architecture: topk",
            "d_in: 64  d_sae: 128",
            &format!("hookpoint: {HP}"),
            "apply_b_dec_to_input = ",
            "W_enc: [64, 128] F32",
            "W_dec: [128, 64] F32",
            "b_dec: [64] F32",
            "b_enc: [128] F32",
            "training: finished",
            "metrics (metrics.json):",
            "r2 = ",
            "l0 = ",
            "dead_frac = ",
            &format!("hookpoint = {HP}"),
        ],
    );
    assert!(
        text.contains("k = 2") || text.contains("k = 4"),
        "the TopK k is a key hyperparameter:\n{text}"
    );
    // metrics.json on its own.
    let m = inspect(&dir.join("metrics.json"));
    has_all(
        &m,
        &["metrics of one evaluated SAE", "r2 = ", "arch = topk"],
    );
    // Before evaluation: the folder is still shown, and says so.
    std::fs::remove_file(dir.join("metrics.json")).unwrap();
    let text = inspect(dir);
    has_all(&text, &["architecture: topk", "not evaluated yet"]);
    // A truncated weights file is named, with a fix.
    let w = dir.join("sae_weights.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let o = Command::new(BIN).arg("inspect").arg(dir).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("sae_weights.safetensors") && e.contains("truncated"),
        "{e}"
    );
}
