//! Every SAE and trainer setting is checked when the pipeline file is loaded (issue 17
//! item 7): a negative penalty coefficient, `k = 0`, `k` above an explicit `d_sae`, and the
//! same mistakes in one point of a `[sweep]`, make `saepipe run` fail at once, naming the
//! key (and the grid point), before anything is captured.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

/// `pipelines/smoke.toml` with its `[sae]` and `[sweep]` replaced by `sae_and_sweep`.
fn pipeline(dir: &Path, name: &str, sae_and_sweep: &str) -> PathBuf {
    let smoke =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml"))
            .unwrap();
    let head = &smoke[..smoke.find("[sae]").unwrap()];
    let tail = &smoke[smoke.find("[eval]").unwrap()..smoke.find("[sweep]").unwrap()];
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(&f, format!("{head}{sae_and_sweep}\n{tail}")).unwrap();
    f
}

/// `saepipe run` on `file`; asserts that it fails before any run folder exists, and returns
/// its stderr.
fn run_fails(root: &Path, model: &Path, corpus: &Path, file: &Path) -> String {
    let out = Command::new(BIN)
        .current_dir(root)
        .args(["--progress", "off", "run"])
        .arg(file)
        .arg("--set")
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{}: run succeeded", file.display());
    assert!(
        !root.join("data/smoke").exists(),
        "{}: something was written before the config was refused: {err}",
        file.display()
    );
    err
}

#[test]
fn bad_sae_settings_fail_at_load_naming_the_key_and_the_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = common::tiny_llama(&root.join("model"), 3, false);
    let corpus = common::write_corpus(root, 100, 5);
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "gated_negative_l1",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"gated\", l1_coefficient = -1.0 }",
            &["sae.arch.l1_coefficient", "-1"],
        ),
        (
            "relu_negative_l1",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"relu_l1\", l1_coefficient = -0.5 }",
            &["sae.arch.l1_coefficient", "-0.5"],
        ),
        (
            "jumprelu_negative_l0",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"jumprelu\", l0_coefficient = -2.0 }",
            &["sae.arch.l0_coefficient", "-2"],
        ),
        (
            "sa_gsae_negative_l1",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"sa_gsae\", l1_coefficient = -1.0 }",
            &["sae.arch.l1_coefficient"],
        ),
        (
            "topk_k0",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"topk\", k = 0 }",
            &["sae.arch.k", "at least 1"],
        ),
        (
            "batchtopk_k_above_d_sae",
            "[sae]\nd_sae = 16\narch = { kind = \"batchtopk\", k = 32 }",
            &["sae.arch.k", "32 is more than sae.d_sae = 16"],
        ),
        (
            "kmeans_pca_rank0",
            "[sae]\nd_sae = 16\narch = { kind = \"kmeans_pca\", rank = 0 }",
            &["sae.arch.rank"],
        ),
        (
            "sweep_point_k0",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"topk\", k = 4 }\n[sweep]\n\"sae.arch.k\" = [4, 0]",
            &["sae.arch.k", "sweep point sae.arch.k=0"],
        ),
        (
            "sweep_point_k_above_d_sae",
            "[sae]\nd_sae = 128\narch = { kind = \"topk\", k = 8 }\n[sweep]\n\"sae.d_sae\" = [128, 4]",
            &["sae.arch.k", "8 is more than sae.d_sae = 4", "sae.d_sae=4"],
        ),
        (
            "sweep_point_negative_l1",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"gated\", l1_coefficient = 1.0 }\n[sweep]\n\"sae.arch.l1_coefficient\" = [1.0, -3.0]",
            &["sae.arch.l1_coefficient", "sae.arch.l1_coefficient=-3"],
        ),
        (
            "trainer_negative_lr",
            "[sae]\nexpansion_factor = 2\narch = { kind = \"topk\", k = 4 }\n[sweep]\n\"train.optimizer.lr\" = [1e-3, -1e-3]",
            &["train.optimizer.lr", "train.optimizer.lr=-0.001"],
        ),
    ];
    for (name, sae, want) in cases {
        let file = pipeline(root, name, sae);
        let err = run_fails(root, &model, &corpus, &file);
        for w in *want {
            assert!(err.contains(w), "{name}: no '{w}' in: {err}");
        }
    }
}
