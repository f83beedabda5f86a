//! Model sources of `saepipe trace` and `capture` (issue 17 item 8): a sharded index whose
//! `weight_map` points outside the model folder is refused by trace and capture with the
//! same error.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A model folder whose sharded index sends every tensor to `../outside/model.safetensors`
/// (a complete, valid checkpoint outside the folder).
fn escaping_index(root: &Path) -> std::path::PathBuf {
    let outside = common::tiny_llama(&root.join("outside"), 3, false);
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(outside.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(outside.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = meta
        .tensors()
        .keys()
        .map(|k| (k.clone(), "../outside/model.safetensors".into()))
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn an_index_entry_outside_the_model_folder_is_refused_by_trace_and_capture_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = escaping_index(tmp.path());
    let want = format!(
        "{}: bad sharded-weights index: shard name '../outside/model.safetensors'",
        dir.join("model.safetensors.index.json").display()
    );
    let out = tmp.path().join("t.safetensors");
    let o = Command::new(BIN)
        .args(["trace", &format!("local:{}", dir.display())])
        .args(["--token-ids", "1,2", "--logits", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "trace followed the entry: {e}");
    assert!(e.contains(&want), "{e}");
    assert!(!out.exists());

    let corpus = common::write_corpus(tmp.path(), 50, 1);
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let o = Command::new(BIN)
        .arg("capture")
        .arg(smoke)
        .arg("--set")
        .arg(format!("model.source=local:{}", dir.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!(
            "run.data_dir={}",
            tmp.path().join("data").display()
        ))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&want), "{e}");
    // The loader itself refuses it (every stage that opens weights goes through it).
    let err = saepipe::models::load_dir(&dir, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains(&want), "{err}");
}
