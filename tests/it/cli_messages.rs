//! Small message fixes of issue 17 item 8, through the real binary: a cause is printed
//! once, invalid UTF-8 in a text file is located, random bytes named `.gguf` are "not a
//! GGUF file" (and a cut-off GGUF is "truncated"), and no colour codes reach a stderr that
//! is not a terminal.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Exit code 1 (an error, not a panic) and the stderr text.
fn fails(o: &Output) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected a clean error: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn a_missing_file_names_its_os_error_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-pipeline.toml");
    for stage in ["run", "capture", "train", "evaluate", "download"] {
        let o = Command::new(BIN).arg(stage).arg(&missing).output().unwrap();
        let e = fails(&o);
        assert!(e.contains("no-such-pipeline.toml"), "{stage}: {e}");
        assert_eq!(
            e.matches("(os error 2)").count(),
            1,
            "{stage}: the cause must appear exactly once: {e}"
        );
    }
    // A data file that vanishes is named once too (capture through a glob-free path).
    let model = common::tiny_llama(&tmp.path().join("model"), 3, false);
    let o = Command::new(BIN)
        .args(capture_args(
            &model,
            &tmp.path().join("gone.jsonl"),
            &tmp.path().join("out"),
        ))
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(e.contains("gone.jsonl"), "{e}");
    assert!(e.matches("(os error 2)").count() <= 1, "{e}");
}

fn capture_args(model: &Path, corpus: &Path, data_dir: &Path) -> Vec<String> {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    [
        "-q".to_string(),
        "capture".into(),
        smoke.display().to_string(),
        "--set".into(),
        format!("model.source=local:{}", model.display()),
        "--set".into(),
        format!("data.files=[\"{}\"]", corpus.display()),
        "--set".into(),
        format!("run.data_dir={}", data_dir.display()),
        "--set".into(),
        "data.n_tokens=512".into(),
        "--set".into(),
        "data.eval_tokens=256".into(),
        "--set".into(),
        "eval.eval_tokens=256".into(),
    ]
    .into()
}

#[test]
fn invalid_utf8_in_a_text_file_names_file_line_and_byte_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 3, false);
    // jsonl: line 1 is 30 bytes with its newline; line 2 holds a latin-1 é (0xe9) at
    // byte 14 of the line, file offset 30 + 13 = 43.
    let j = tmp.path().join("latin1.jsonl");
    let mut bytes = b"{\"text\": \"the water was hot\"}\n".to_vec();
    assert_eq!(bytes.len(), 30);
    bytes.extend_from_slice(b"{\"text\": \"caf\xe9 of the day\"}\n");
    std::fs::write(&j, &bytes).unwrap();
    let o = Command::new(BIN)
        .args(capture_args(&model, &j, &tmp.path().join("out")))
        .output()
        .unwrap();
    let e = fails(&o);
    for needle in [
        "latin1.jsonl:2",
        "invalid UTF-8",
        "byte offset 43",
        "byte 14 of the line",
        "0xe9",
    ] {
        assert!(e.contains(needle), "stderr lacks '{needle}': {e}");
    }
    // txt: the same for paragraphs.
    let t = tmp.path().join("latin1.txt");
    std::fs::write(&t, b"the water was hot .\n\nthe caf\xe9 .\n").unwrap();
    let o = Command::new(BIN)
        .args(capture_args(&model, &t, &tmp.path().join("out2")))
        .output()
        .unwrap();
    let e = fails(&o);
    for needle in ["latin1.txt:3", "byte offset 28"] {
        assert!(e.contains(needle), "stderr lacks '{needle}': {e}");
    }
}

fn trace_gguf(path: &Path, out: &Path) -> Output {
    Command::new(BIN)
        .arg("trace")
        .arg(format!("gguf:{}", path.display()))
        .args(["--token-ids", "1,2", "--logits", "--out"])
        .arg(out)
        .output()
        .unwrap()
}

/// A small but real GGUF header (llama architecture, one tensor).
fn write_gguf(path: &Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let name = gguf_file::Value::String("a tiny model with a long enough name".into());
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch), ("general.name", &name)],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
}

#[test]
fn random_bytes_are_not_a_gguf_and_a_cut_gguf_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.safetensors");
    // Seeded random bytes.
    let junk = tmp.path().join("junk.gguf");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    assert_ne!(&bytes[..4], b"GGUF");
    std::fs::write(&junk, &bytes).unwrap();
    let e = fails(&trace_gguf(&junk, &out));
    assert!(
        e.contains("junk.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );
    assert!(
        !e.contains("truncated"),
        "random bytes are not a truncated GGUF: {e}"
    );
    // A real GGUF header cut short.
    let cut = tmp.path().join("cut.gguf");
    write_gguf(&cut);
    let full = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &full[..40]).unwrap();
    let e = fails(&trace_gguf(&cut, &out));
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    assert!(!e.contains("not a GGUF file"), "{e}");
    assert!(!out.exists());
}

#[test]
fn no_colour_codes_on_a_stderr_that_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_gpt_neox(&tmp.path().join("m"), 3);
    let out: PathBuf = tmp.path().join("acts.safetensors");
    // Output captured by the test is a pipe; NO_COLOR unset so only the TTY check decides.
    let o = Command::new(BIN)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .arg("trace")
        .arg(format!("local:{}", dir.display()))
        .args([
            "--token-ids",
            "1,5,9",
            "--hookpoints",
            "blocks.1.hook_mlp_out",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("INFO") && e.contains("traced"),
        "a log line is expected: {e}"
    );
    assert!(!e.contains('\x1b'), "escape codes in piped stderr: {e:?}");
    // Errors too.
    let o = Command::new(BIN)
        .env_remove("NO_COLOR")
        .arg("-v")
        .arg("run")
        .arg(tmp.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!stderr(&o).contains('\x1b'), "{:?}", stderr(&o));
}
