//! `saepipe trace` end to end: the real binary on generated tiny models.

use crate::common;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use saepipe::models::{load_dir, Hookpoint, Recorder};

fn saepipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_saepipe"))
}

#[test]
fn trace_writes_named_hookpoints_logits_and_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_gpt_neox(&tmp.path().join("m"), 3);
    let out = tmp.path().join("acts.safetensors");
    let st = saepipe()
        .args(["trace", &format!("local:{}", dir.display())])
        .args(["--token-ids", "1,5,9,40,2"])
        .args([
            "--hookpoints",
            "blocks.2.hook_mlp_out,blocks.0.hook_resid_mid",
        ])
        .arg("--logits")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mut keys: Vec<_> = t.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "blocks.0.hook_resid_mid",
            "blocks.2.hook_mlp_out",
            "logits",
            "token_ids"
        ]
    );
    assert_eq!(t["blocks.2.hook_mlp_out"].dims(), &[5, 64]);
    assert_eq!(t["blocks.2.hook_mlp_out"].dtype(), DType::F32);
    assert_eq!(t["logits"].dims(), &[5, common::TINY_VOCAB]);
    assert_eq!(t["token_ids"].dtype(), DType::U32);
    assert_eq!(t["token_ids"].to_vec1::<u32>().unwrap(), [1, 5, 9, 40, 2]);
    // The values are the library's forward pass.
    let m = load_dir(&dir, &Device::Cpu).unwrap().model;
    let hp: Hookpoint = "blocks.2.hook_mlp_out".parse().unwrap();
    let mut rec = Recorder::new([hp]);
    let ids = Tensor::new(&[[1u32, 5, 9, 40, 2]], &Device::Cpu).unwrap();
    m.forward_hooked(&ids, &mut rec, None).unwrap();
    let want = rec.acts[&hp].squeeze(0).unwrap();
    assert_eq!(
        common::max_abs_diff(&want, &t["blocks.2.hook_mlp_out"]),
        0.0
    );
    assert!(!out.with_extension("safetensors.tmp").exists());
}

#[test]
fn trace_tokenises_text_with_the_model_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_llama(&tmp.path().join("m"), 3, true);
    let out = tmp.path().join("t.safetensors");
    let st = saepipe()
        .args(["trace", &format!("local:{}", dir.display())])
        .args(["--text", "the water was hot , the day was long ."])
        .args(["--hookpoints", "blocks.1.hook_resid_post"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let ids = t["token_ids"].to_vec1::<u32>().unwrap();
    assert_eq!(ids.len(), 10);
    assert!(
        ids.iter().all(|&i| i != 0),
        "words fell back to [UNK]: {ids:?}"
    );
    assert_eq!(t["blocks.1.hook_resid_post"].dims(), &[10, 64]);
    assert!(!t.contains_key("logits"));
}

#[test]
fn trace_errors_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_gpt_neox(&tmp.path().join("m"), 3);
    let src = format!("local:{}", dir.display());
    let out = tmp.path().join("x.safetensors");
    let run = |extra: &[&str]| {
        let o = saepipe()
            .args(["trace", &src])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&[
        "--token-ids",
        "1,2",
        "--hookpoints",
        "blocks.7.hook_mlp_out",
    ]);
    assert!(
        e.contains("blocks.7.hook_mlp_out") && e.contains("0..=2"),
        "{e}"
    );
    let e = run(&["--token-ids", "1,999", "--logits"]);
    assert!(e.contains("999") && e.contains("vocabulary"), "{e}");
    let e = run(&["--token-ids", "1,2", "--hookpoints", "blocks.1.mlp_out"]);
    assert!(e.contains("blocks.<layer>.hook_<site>"), "{e}");
    let e = run(&["--token-ids", "1,2"]);
    assert!(e.contains("nothing to trace"), "{e}");
    assert!(!out.exists());
    let o = saepipe()
        .args([
            "trace",
            "EleutherAI/pythia-70m",
            "--token-ids",
            "1",
            "--logits",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    // Hub repos are traced from the cache or downloaded (tests/it/trace_sources.rs); an
    // unpinned one is refused, saying how to pin it.
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("EleutherAI/pythia-70m@<commit sha or tag>"),
        "{e}"
    );
}
