//! Exported SAELens `cfg.json` metadata says what the run did (issue 17 item 10): BOS
//! handling, special-token policy, context size, separator and packing, dataset, model,
//! revision, hookpoint and activation dtype all follow the pipeline's settings, for two
//! runs whose settings differ in every one of them (before, `prepend_bos` was always true
//! and `exclude_special_tokens` always false).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

struct Settings {
    name: &'static str,
    context_len: usize,
    prepend_bos: bool,
    exclude_special_tokens: bool,
    concat_docs: bool,
    separator: &'static str,
    dtype: &'static str,
    hookpoint: &'static str,
}

fn pipeline(root: &Path, model: &Path, corpus: &Path, s: &Settings) -> PathBuf {
    let p = root.join(format!("{}.toml", s.name));
    std::fs::write(
        &p,
        format!(
            r#"
[run]
name = "{name}"
data_dir = "{data}"

[model]
source = "local:{model}"

[data]
files = ["{corpus}"]
context_len = {ctx}
n_tokens = 1024
eval_tokens = 256
prepend_bos = {bos}
concat_docs = {concat}
separator = "{sep}"

[capture]
hookpoints = ["{hp}"]
batch_size = 4
dtype = "{dtype}"
exclude_special_tokens = {excl}

[train]
batch_tokens = 256
lr_warmup_steps = 1
init_tokens = 256

[sae]
expansion_factor = 2
arch = {{ kind = "topk", k = 4 }}

[eval]
ce_sequences = 0
"#,
            name = s.name,
            data = root.join("runs").display(),
            model = model.display(),
            corpus = corpus.display(),
            ctx = s.context_len,
            bos = s.prepend_bos,
            concat = s.concat_docs,
            sep = s.separator,
            hp = s.hookpoint,
            dtype = s.dtype,
            excl = s.exclude_special_tokens,
        ),
    )
    .unwrap();
    p
}

fn cfg_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            cfg_files(&p, out);
        } else if p.file_name().is_some_and(|n| n == "cfg.json") {
            out.push(p);
        }
    }
}

#[test]
fn exported_cfg_metadata_follows_the_run_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 3, false);
    let corpus = common::write_corpus(tmp.path(), 800, 4);
    let runs = [
        Settings {
            name: "plain",
            context_len: 24,
            prepend_bos: false,
            exclude_special_tokens: false,
            concat_docs: true,
            separator: "bos",
            dtype: "f16",
            hookpoint: "blocks.1.hook_resid_post",
        },
        Settings {
            name: "special",
            context_len: 16,
            prepend_bos: true,
            exclude_special_tokens: true,
            concat_docs: false,
            separator: "eos",
            dtype: "f32",
            hookpoint: "blocks.0.hook_mlp_out",
        },
    ];
    for s in &runs {
        let file = pipeline(tmp.path(), &model, &corpus, s);
        for stage in ["capture", "train"] {
            let out = Command::new(BIN)
                .args(["--progress", "off", stage])
                .arg(&file)
                .arg("--offline")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} {stage}: {}",
                s.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut cfgs = Vec::new();
        cfg_files(
            &tmp.path().join("runs").join(s.name).join("saes"),
            &mut cfgs,
        );
        assert_eq!(cfgs.len(), 1, "{}: {cfgs:?}", s.name);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfgs[0]).unwrap()).unwrap();
        let m = &cfg["metadata"];
        let ctx = format!("{}: {m:#}", s.name);
        assert_eq!(m["prepend_bos"], s.prepend_bos, "{ctx}");
        assert_eq!(
            m["exclude_special_tokens"], s.exclude_special_tokens,
            "{ctx}"
        );
        let excluded = m["saepipe_excluded_token_ids"].as_array().unwrap();
        if s.exclude_special_tokens {
            // BOS and EOS of the tiny tokenizer, at least.
            for id in [common::TINY_BOS, common::TINY_EOS] {
                assert!(excluded.contains(&id.into()), "{ctx}");
            }
        } else {
            assert!(excluded.is_empty(), "{ctx}");
        }
        assert_eq!(m["context_size"], s.context_len, "{ctx}");
        assert_eq!(m["hook_name"], s.hookpoint, "{ctx}");
        assert_eq!(
            m["model_name"],
            format!("local:{}", model.display()),
            "{ctx}"
        );
        assert_eq!(m["disable_concat_sequences"], !s.concat_docs, "{ctx}");
        if s.concat_docs {
            assert_eq!(m["sequence_separator_token"], s.separator, "{ctx}");
        } else {
            assert!(m["sequence_separator_token"].is_null(), "{ctx}");
        }
        let dtype = if s.dtype == "f16" {
            "float16"
        } else {
            "float32"
        };
        assert_eq!(m["saepipe_activation_dtype"], dtype, "{ctx}");
        // The weights themselves are always f32.
        assert_eq!(cfg["dtype"], "float32", "{ctx}");
        assert!(
            m["dataset_path"]
                .as_str()
                .unwrap()
                .contains(&corpus.display().to_string()),
            "{ctx}"
        );
        let rev = m["saepipe_model_revision"].as_str().unwrap();
        assert!(rev.starts_with("sha256:"), "{ctx}");
    }
}
