//! A unit folder holding another unit's SAE is never evaluated under this unit's name
//! (issue 17 item 5): after a real run, a TopK unit's `cfg.json` and weights copied into a
//! Gated unit's folder (or the whole folder copied over it, or a Gated SAE of another L1
//! coefficient, which has the same shapes) make `saepipe evaluate` refuse, naming what the
//! folder holds and what the unit is, and leave `metrics.parquet` as it was; `saepipe train`
//! does not count such a folder as trained, and after it (the advice) evaluate works.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.0.hook_mlp_out";

fn pipeline(dir: &Path) -> PathBuf {
    let smoke =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml"))
            .unwrap();
    let text = format!(
        "{}[sweep]\n\"sae\" = [{{ arch = {{ kind = \"topk\", k = 4 }} }}, {{ arch = {{ kind = \"gated\", l1_coefficient = 1.0 }} }}, {{ arch = {{ kind = \"gated\", l1_coefficient = 2.0 }} }}]\n",
        &smoke[..smoke.find("[sweep]").unwrap()]
    );
    let f = dir.join("units.toml");
    std::fs::write(&f, text).unwrap();
    f
}

fn saepipe(root: &Path, file: &Path, stage: &str, model: &Path, corpus: &Path) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root)
        .args(["--progress", "off", stage])
        .arg(file);
    for s in [
        format!("model.source=local:{}", model.display()),
        format!("data.files=[\"{}\"]", corpus.display()),
        "data.n_tokens=1024".into(),
        "data.eval_tokens=256".into(),
        "eval.eval_tokens=256".into(),
        format!("capture.hookpoints=[\"{HP}\"]"),
    ] {
        cmd.arg("--set").arg(s);
    }
    cmd.output().unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{what} failed: {err}");
    err
}

/// The unit folder of the point whose id starts with `prefix` and contains `label`.
fn unit(saes: &Path, prefix: &str, label: &str) -> PathBuf {
    let mut found = Vec::new();
    for e in std::fs::read_dir(saes).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.contains(label) {
            found.push(name);
        }
    }
    assert_eq!(found.len(), 1, "{prefix}*{label}*: {found:?}");
    saes.join(&found[0]).join(HP)
}

fn copy(from: &Path, to: &Path, files: &[&str]) {
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn a_folder_holding_another_units_sae_is_refused_and_retrained() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = common::tiny_llama(&root.join("model"), 3, false);
    let corpus = common::write_corpus(root, 1500, 5);
    let file = pipeline(root);
    ok(&saepipe(root, &file, "run", &model, &corpus), "run");
    let saes = root.join("data/smoke/saes");
    let topk = unit(&saes, "topk", "");
    let gated1 = unit(&saes, "gated", "l1_coefficient1");
    let gated2 = unit(&saes, "gated", "l1_coefficient2");
    let metrics = root.join("data/smoke/results/metrics.parquet");
    let before = std::fs::read(&metrics).unwrap();
    let pristine = root.join("gated1");
    std::fs::create_dir_all(&pristine).unwrap();
    let sae_files = ["cfg.json", "sae_weights.safetensors"];
    let all_files = [
        "cfg.json",
        "sae_weights.safetensors",
        "train_done.json",
        "metrics.json",
    ];
    copy(&gated1, &pristine, &all_files);

    let refused = |what: &str, needles: &[&str]| {
        let o = saepipe(root, &file, "evaluate", &model, &corpus);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{what}: evaluate was not refused: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{what}: no '{n}' in: {err}");
        }
        assert_eq!(
            std::fs::read(&metrics).unwrap(),
            before,
            "{what}: metrics.parquet was replaced"
        );
    };
    // As the message spells it (relative to the working folder): `<point id>/<hookpoint>`.
    let gated_dir = gated1.strip_prefix(&saes).unwrap().display().to_string();

    // 1. TopK's cfg.json + weights in the Gated unit's folder (its own marker kept).
    copy(&topk, &gated1, &sae_files);
    refused(
        "topk files",
        &[
            &gated_dir,
            "a topk SAE",
            "a gated SAE",
            "not gated",
            "saepipe train",
        ],
    );
    // 2. The whole TopK folder, marker and metrics included.
    copy(&topk, &gated1, &all_files);
    refused(
        "topk folder",
        &[&gated_dir, "train_done.json names point topk"],
    );
    // 3. The Gated SAE of the other L1 coefficient: same variant, same shapes.
    copy(&pristine, &gated1, &all_files);
    copy(&gated2, &gated1, &sae_files);
    refused("gated λ=2 files", &[&gated_dir, "sha256"]);

    // The advice: train replaces the folder, then evaluate works again.
    let err = ok(&saepipe(root, &file, "train", &model, &corpus), "train");
    assert!(
        err.contains("does not hold the SAE of its unit") && err.contains("training it again"),
        "{err}"
    );
    assert!(!err.contains("already trained"), "{err}");
    assert_eq!(
        std::fs::read(gated1.join("sae_weights.safetensors")).unwrap(),
        std::fs::read(pristine.join("sae_weights.safetensors")).unwrap(),
        "retraining gives the unit's own weights back"
    );
    ok(
        &saepipe(root, &file, "evaluate", &model, &corpus),
        "evaluate",
    );
    let err = ok(
        &saepipe(root, &file, "train", &model, &corpus),
        "train again",
    );
    assert!(err.contains("already trained"), "{err}");
}
