//! `saepipe trace` takes every source its help lists (issue 17 item 8): a hub repo
//! `org/name@<sha>` is read from the hub cache without any request, and a sharded index
//! whose `weight_map` points outside the model folder is refused by trace and capture
//! with the same error.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A hub cache holding `org/tiny` at commit [`SHA`] as a download leaves it (the standard
/// layout: a snapshot folder, a ref, and the `.no_exist` marker for the sharded index the
/// repo does not have), with a tiny GPT-NeoX.
fn cached_repo(cache: &Path) {
    let repo = cache.join("models--org--tiny");
    let snap = repo.join("snapshots").join(SHA);
    common::tiny_gpt_neox(&snap, 3);
    std::fs::write(snap.join("tokenizer_config.json"), "{}").unwrap();
    let no_exist = repo.join(".no_exist").join(SHA);
    std::fs::create_dir_all(&no_exist).unwrap();
    std::fs::write(no_exist.join("model.safetensors.index.json"), "").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), SHA).unwrap();
}

fn trace(cache: &Path, model: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        // No network: the endpoint is a closed port, so any request fails.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME")
        .args(["trace", model, "--token-ids", "1,5,9,40"])
        .args(["--hookpoints", "blocks.1.hook_mlp_out"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_hub_repo_in_the_cache_is_traced_without_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    cached_repo(&cache);
    let src = format!("org/tiny@{SHA}");
    let out = tmp.path().join("hub.safetensors");
    let o = trace(&cache, &src, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same activations as the snapshot folder opened as local:<dir>.
    let snap = cache.join("models--org--tiny/snapshots").join(SHA);
    let local_out = tmp.path().join("local.safetensors");
    let o = trace(
        &cache,
        &format!("local:{}", snap.display()),
        &local_out,
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let a = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&local_out, &Device::Cpu).unwrap();
    assert_eq!(
        common::max_abs_diff(&a["blocks.1.hook_mlp_out"], &b["blocks.1.hook_mlp_out"]),
        0.0
    );
    // The file says which hub repo it traced.
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap_or_default();
    assert_eq!(md.get("model").map(String::as_str), Some(src.as_str()));

    // Offline (flag or HF_HUB_OFFLINE=1) from the cache; a tag through its ref.
    let o = trace(&cache, "org/tiny@main", &out, &["--offline"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A repo that is not cached, offline: names the cache and the fix.
    let o = trace(&cache, &format!("org/other@{SHA}"), &out, &["--offline"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("org/other") && e.contains("not in the hub cache"),
        "{e}"
    );
    // An unpinned repo: says how to pin it.
    let o = trace(&cache, "org/tiny", &out, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("org/tiny@<commit sha or tag>"), "{e}");
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
