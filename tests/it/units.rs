//! Units addressed by index (issue 15 item 1), without a cluster: every unit command run
//! by hand — capture shards (two of them duplicated and run at the same time), finalize,
//! train and evaluate units, results — gives the metrics of `saepipe run`, apart from the
//! wall-clock columns and paths. Finalize names missing shards; a whole-stage command
//! refuses while a unit task holds the run folder; a finished unit is skipped untouched.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn cmd(args: &[&str], sets: &[String]) -> Command {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let mut c = Command::new(BIN);
    c.args(["--progress", "off"]).arg(args[0]).arg(&smoke);
    c.args(&args[1..]);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.arg("--offline");
    c
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(args: &[&str], sets: &[String]) -> String {
    ok(cmd(args, sets).output().unwrap(), &format!("{args:?}"))
}

fn read(path: &Path) -> arrow::record_batch::RecordBatch {
    let f = std::fs::File::open(path).unwrap();
    let b: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    arrow::compute::concat_batches(&b[0].schema(), &b).unwrap()
}

#[test]
fn unit_commands_by_index_equal_saepipe_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 5, false);
    let corpus = common::write_corpus(tmp.path(), 1500, 4);
    let sets = |data: &str| {
        vec![
            format!("model.source=local:{}", model.display()),
            format!("data.files=[\"{}\"]", corpus.display()),
            format!("run.data_dir={}", tmp.path().join(data).display()),
            "capture.shard_tokens=512".to_string(),
        ]
    };
    let (a, b) = (sets("ref"), sets("units"));
    run(&["run"], &a);

    let u: Value = serde_json::from_str(&run(&["units", "--json"], &b)).unwrap();
    let n_cap =
        (u["capture_train"].as_u64().unwrap() + u["capture_eval"].as_u64().unwrap()) as usize;
    let n_train = u["train"].as_array().unwrap().len();
    assert!(n_cap >= 3, "{u}");
    assert_eq!(n_train, 8);

    // Shard 0 twice and shard 1 at the same time; then the rest but the last.
    let kids: Vec<_> = ["0", "0", "1"]
        .iter()
        .map(|i| cmd(&["capture", "--shard", i], &b).spawn().unwrap())
        .collect();
    for k in kids {
        ok(k.wait_with_output().unwrap(), "concurrent capture --shard");
    }
    if n_cap > 3 {
        run(&["capture", "--shard", &format!("2..{}", n_cap - 1)], &b);
    }
    let out = cmd(&["capture", "--finalize"], &b).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("[{}]", n_cap - 1)),
        "{err}"
    );
    let out = cmd(&["capture", "--shard", &n_cap.to_string()], &b)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a unit beyond the last was accepted");
    run(&["capture", "--shard", &(n_cap - 1).to_string()], &b);
    run(&["capture", "--finalize"], &b);

    for i in 0..n_train {
        run(&["train", "--unit", &i.to_string()], &b);
    }
    let unit0 = u["train"][0]["dir"].as_str().unwrap().to_string();
    let weights = Path::new(&unit0).join("sae_weights.safetensors");
    let m0 = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let again = run(&["train", "--unit", "0"], &b);
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        m0,
        "{again}"
    );

    // A whole-stage command refuses while a unit task shares the folder.
    let run_dir = tmp.path().join("units/smoke");
    let shared = saepipe::util::lock::RunLock::acquire_shared(&run_dir).unwrap();
    let out = cmd(&["evaluate"], &b).output().unwrap();
    assert!(!out.status.success(), "evaluate ran beside a unit task");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    for i in 0..n_train {
        run(&["evaluate", "--unit", &i.to_string()], &b);
    }
    drop(shared);
    assert!(!run_dir.join("results/metrics.parquet").exists());
    run(&["results"], &b);

    let (x, y) = (
        read(&tmp.path().join("ref/smoke/results/metrics.parquet")),
        read(&run_dir.join("results/metrics.parquet")),
    );
    assert_eq!(x.num_rows(), y.num_rows());
    for f in x.schema().fields() {
        if ["train_seconds", "train_tokens_per_s", "sae_path"].contains(&f.name().as_str()) {
            continue;
        }
        assert_eq!(
            x.column_by_name(f.name()).unwrap().to_data(),
            y.column_by_name(f.name()).unwrap().to_data(),
            "column {} differs",
            f.name()
        );
    }
}
