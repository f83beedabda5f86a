//! Bad input to the capture stage and the activation reader, through the real binary:
//! each fails with a clear error (exit 1, not a panic) and leaves no finished-looking
//! output. Also `saepipe inspect` on a good set.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.1.hook_resid_mid";

fn base_args(model: &Path, files: &str, data_dir: &Path, extra: &[&str]) -> Vec<String> {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let mut v: Vec<String> = vec![
        "-q".into(),
        "capture".into(),
        smoke.display().to_string(),
        "--set".into(),
        format!("model.source=local:{}", model.display()),
        "--set".into(),
        format!("data.files=[\"{files}\"]"),
        "--set".into(),
        format!("run.data_dir={}", data_dir.display()),
        "--set".into(),
        "data.n_tokens=2048".into(),
        "--set".into(),
        "data.eval_tokens=1024".into(),
        "--set".into(),
        "capture.shard_tokens=512".into(),
        "--set".into(),
        format!("capture.hookpoints=[\"{HP}\", \"blocks.0.hook_mlp_out\"]"),
    ];
    for e in extra {
        v.push("--set".into());
        v.push(e.to_string());
    }
    v
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 3, false);
    (tmp, model)
}

fn good_corpus(dir: &Path) -> PathBuf {
    let p = dir.join("corpus.txt");
    let mut text = String::new();
    for _ in 0..6 {
        text.push_str(&common::tiny_corpus().join("\n\n"));
        text.push_str("\n\n");
    }
    std::fs::write(&p, text).unwrap();
    p
}

/// Exit code 1 (an error, not a panic's 101) and stderr containing every `needles`.
fn fails_with(o: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean error, got {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}': {err}");
    }
    err
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd {
            let e = e.unwrap().path();
            if e.is_dir() {
                stack.push(e);
            } else {
                out.push(e);
            }
        }
    }
    out
}

fn no_manifest(root: &Path) {
    let done: Vec<_> = files_under(root)
        .into_iter()
        .filter(|p| p.ends_with("manifest.json") || p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        done.is_empty(),
        "finished-looking or temporary files left: {done:?}"
    );
}

#[test]
fn empty_corpus_is_a_clear_error() {
    let (tmp, model) = setup();
    let c = tmp.path().join("empty.txt");
    std::fs::write(&c, "\n\n  \n").unwrap();
    let out = tmp.path().join("out");
    let o = Command::new(BIN)
        .args(base_args(&model, &c.display().to_string(), &out, &[]))
        .output()
        .unwrap();
    fails_with(&o, &["yields only 0 train tokens", "data.n_tokens"]);
    no_manifest(&out);
}

#[test]
fn missing_text_field_or_column_names_the_alternatives() {
    let (tmp, model) = setup();
    let j = tmp.path().join("c.jsonl");
    std::fs::write(&j, "{\"body\": \"the of and\"}\n").unwrap();
    let out = tmp.path().join("out");
    let o = Command::new(BIN)
        .args(base_args(&model, &j.display().to_string(), &out, &[]))
        .output()
        .unwrap();
    fails_with(
        &o,
        &["c.jsonl:1", "no field 'text'", "body", "data.text_column"],
    );
    no_manifest(&out);

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    let p = tmp.path().join("c.parquet");
    let schema = std::sync::Arc::new(Schema::new(vec![Field::new(
        "content",
        DataType::Utf8,
        false,
    )]));
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema.clone(),
        vec![std::sync::Arc::new(StringArray::from(vec!["the of and"]))],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&p).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let o = Command::new(BIN)
        .args(base_args(&model, &p.display().to_string(), &out, &[]))
        .output()
        .unwrap();
    fails_with(&o, &["c.parquet", "no text column 'text'", "content"]);
    no_manifest(&out);
}

#[test]
fn full_disk_fails_cleanly_without_finished_output() {
    let (tmp, model) = setup();
    let c = good_corpus(tmp.path());
    let out = tmp.path().join("out");
    // RLIMIT_FSIZE of 96 KiB; SIGXFSZ ignored (inherited through exec) so writes fail with
    // EFBIG like on a full disk instead of killing the process.
    let args: Vec<String> = base_args(&model, &c.display().to_string(), &out, &[])
        .into_iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!(
        "trap '' XFSZ; ulimit -f 96; exec '{BIN}' {}",
        args.join(" ")
    );
    let o = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    fails_with(&o, &["File too large", "part-0000"]);
    no_manifest(&out);
}

#[test]
fn corrupt_or_foreign_shards_are_named() {
    let (tmp, model) = setup();
    let c = good_corpus(tmp.path());
    let out = tmp.path().join("out");
    let o = Command::new(BIN)
        .args(base_args(&model, &c.display().to_string(), &out, &[]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let acts = out.join("smoke").join("activations");
    let set = acts.join(HP);

    // inspect on a good set: schema, metadata, rows, summaries.
    let o = Command::new(BIN).arg("inspect").arg(&set).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "activation set (train split)",
        "2048 rows",
        "act: FixedSizeList",
        "hookpoint = blocks.1.hook_resid_mid",
        "d_model = 64",
        "excluded_token_ids = [1,2]",
        "per-dimension mean: min",
        "row L2 norm: p0",
    ] {
        assert!(
            text.contains(needle),
            "inspect output lacks '{needle}':\n{text}"
        );
    }

    // The reader refuses another model / hookpoint, naming the key.
    use saepipe::store::reader::{ActivationSet, Expect};
    let e = ActivationSet::open(
        &set,
        &Expect {
            model_revision: Some("0123abc".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model_revision is sha256:") && e.contains("expected 0123abc"),
        "{e}"
    );
    let e = ActivationSet::open(
        &set,
        &Expect {
            hookpoint: Some("blocks.0.hook_mlp_out".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("hookpoint is blocks.1.hook_resid_mid, expected blocks.0.hook_mlp_out"),
        "{e}"
    );

    // A shard of the other hookpoint copied in: named by its config hash.
    std::fs::copy(
        acts.join("blocks.0.hook_mlp_out")
            .join("part-00000.parquet"),
        set.join("part-00000.parquet"),
    )
    .unwrap();
    let o = Command::new(BIN).arg("inspect").arg(&set).output().unwrap();
    fails_with(
        &o,
        &["part-00000.parquet", "config_hash is", "another capture"],
    );

    // A truncated shard: named, with the fix.
    let p = set.join("part-00001.parquet");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let o = Command::new(BIN).arg("inspect").arg(&p).output().unwrap();
    fails_with(&o, &["part-00001.parquet"]);
    let e = ActivationSet::open(&set.join("eval"), &Expect::default());
    assert!(e.is_ok(), "the eval set is untouched");
    let e = saepipe::store::reader::read_shard_meta(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
}
