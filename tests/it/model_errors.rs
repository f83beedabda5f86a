//! Bad input to model loading and tracing: every case returns an error (never a panic)
//! whose message names the file or tensor at fault and the fix.

use crate::common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::TinyModel;
use saepipe::models::{
    load_dir, load_gguf, HookedModel, Hookpoint, Hooks, ModelError, ModelInfo, Site,
};

fn err_of(r: Result<saepipe::models::LoadedModel, ModelError>) -> String {
    match r {
        Ok(m) => panic!("expected an error, loaded {m:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message does not mention '{p}':\n{msg}");
    }
}

#[test]
fn missing_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::gpt_neox(0, true).write(tmp.path());
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(
        &msg,
        &[
            &dir.join("config.json").display().to_string(),
            "not found",
            "Hugging Face layout",
        ],
    );
}

#[test]
fn malformed_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::llama(0, false).write(tmp.path());
    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"llama\", \"hidden_size\": ",
    )
    .unwrap();
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(&msg, &["config.json", "malformed", "fix the file"]);
}

#[test]
fn config_field_of_the_wrong_type() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = TinyModel::llama(0, false);
    m.config["hidden_size"] = serde_json::json!("wide");
    let dir = m.write(tmp.path());
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(&msg, &["config.json", "malformed", "hidden_size"]);
}

#[test]
fn unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = TinyModel::llama(0, false);
    m.config["model_type"] = serde_json::json!("mamba");
    let dir = m.write(tmp.path());
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(
        &msg,
        &["config.json", "'mamba'", "gpt_neox, llama, smollm3"],
    );
}

#[test]
fn missing_weights_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::llama(0, false).write(tmp.path());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(&msg, &["model.safetensors", "save_pretrained"]);
}

#[test]
fn missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = TinyModel::gpt_neox(0, true);
    m.tensors
        .remove("gpt_neox.layers.1.mlp.dense_4h_to_h.weight");
    let dir = m.write(tmp.path());
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(
        &msg,
        &[
            "model.safetensors",
            "'gpt_neox.layers.1.mlp.dense_4h_to_h.weight'",
            "missing",
            "config.json",
        ],
    );
}

#[test]
fn untied_llama_without_lm_head() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = TinyModel::llama(0, false);
    m.config["tie_word_embeddings"] = serde_json::json!(false);
    let dir = m.write(tmp.path());
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(&msg, &["'lm_head.weight'", "missing"]);
}

#[test]
fn wrong_shaped_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = TinyModel::llama(0, true);
    m.tensors.insert(
        "model.layers.2.self_attn.k_proj.weight".into(),
        Tensor::zeros((64, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = m.write(tmp.path());
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(
        &msg,
        &[
            "model.safetensors",
            "'model.layers.2.self_attn.k_proj.weight'",
            "[64, 64]",
            "expected [32, 64]",
            "config.json",
        ],
    );
}

#[test]
fn unsupported_config_values_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = TinyModel::llama(0, false);
    m.config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    let dir = m.write(tmp.path());
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(
        &msg,
        &["config.json", "rope_scaling", "llama3", "not supported"],
    );

    let mut m = TinyModel::gpt_neox(0, true);
    m.config["hidden_act"] = serde_json::json!("mish");
    let dir = m.write(&tmp.path().join("neox"));
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(&msg, &["hidden_act", "mish", "supported activations"]);
}

#[test]
fn hookpoint_layer_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_llama(tmp.path(), 0, false);
    let loaded = load_dir(&dir, &Device::Cpu).unwrap();
    let hp: Hookpoint = "blocks.9.hook_mlp_out".parse().unwrap();
    let msg = loaded.check_hookpoints(&[hp]).unwrap_err().to_string();
    assert_mentions(
        &msg,
        &[
            &dir.display().to_string(),
            "blocks.9.hook_mlp_out",
            "4 layers",
            "0..=3",
        ],
    );
    // In range passes.
    loaded
        .check_hookpoints(&["blocks.3.hook_resid_post".parse().unwrap()])
        .unwrap();
}

/// A model that exposes only the residual stream, to exercise the site check.
struct ResidOnly(ModelInfo);

impl HookedModel for ResidOnly {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn sites(&self) -> &'static [Site] {
        &[Site::ResidPre, Site::ResidPost]
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
    fn forward_hooked(
        &self,
        _: &Tensor,
        _: &mut dyn Hooks,
        _: Option<usize>,
    ) -> candle_core::Result<Option<Tensor>> {
        candle_core::bail!("not used")
    }
}

#[test]
fn hookpoint_site_unavailable() {
    let m = ResidOnly(ModelInfo {
        model_type: "resid_only".into(),
        n_layers: 2,
        d_model: 4,
        vocab_size: 8,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    });
    let msg = m
        .check_hookpoint("blocks.1.hook_mlp_out".parse().unwrap())
        .unwrap_err()
        .to_string();
    assert_mentions(
        &msg,
        &[
            "blocks.1.hook_mlp_out",
            "mlp_out",
            "resid_only",
            "use one of: resid_pre, resid_post",
        ],
    );
}

fn write_gguf(path: &Path, arch: &str) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String(arch.to_string());
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
}

#[test]
fn gguf_of_unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mamba.gguf");
    write_gguf(&path, "mamba");
    let msg = err_of(load_gguf(&path, &Device::Cpu));
    assert_mentions(
        &msg,
        &[
            &path.display().to_string(),
            "'mamba'",
            "llama",
            "local:<dir>",
        ],
    );
}

#[test]
fn gguf_missing_metadata_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bare.gguf");
    write_gguf(&path, "llama");
    let msg = err_of(load_gguf(&path, &Device::Cpu));
    assert_mentions(
        &msg,
        &[
            &path.display().to_string(),
            "llama.attention.head_count",
            "missing",
        ],
    );
}

#[test]
fn not_a_gguf_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("junk.gguf");
    std::fs::write(&path, b"this is not a gguf file at all").unwrap();
    let msg = err_of(load_gguf(&path, &Device::Cpu));
    assert_mentions(
        &msg,
        &[
            &path.display().to_string(),
            "not a GGUF file",
            "starts with \"this\"",
            "check the path",
        ],
    );
    assert!(!msg.contains("truncated"), "{msg}");
    let msg = err_of(load_gguf(&tmp.path().join("absent.gguf"), &Device::Cpu));
    assert_mentions(&msg, &["absent.gguf", "not found"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::llama(0, false).write(tmp.path());
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_of(load_dir(&dir, &Device::Cpu));
    assert_mentions(&msg, &["model.safetensors", "download it again"]);
}

#[test]
fn bad_forward_inputs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_gpt_neox(tmp.path(), 0);
    let m = load_dir(&dir, &Device::Cpu).unwrap().model;
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let e = m
        .forward_hooked(&ids, &mut saepipe::models::NoHooks, Some(3))
        .unwrap_err();
    assert!(e.to_string().contains("3 layers"), "{e}");
    let bad = Tensor::new(&[[1u32, 500]], &Device::Cpu).unwrap();
    let e = m
        .forward_hooked(&bad, &mut saepipe::models::NoHooks, None)
        .unwrap_err();
    assert!(e.to_string().contains("token id 500"), "{e}");
}
