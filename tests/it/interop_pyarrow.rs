//! Interop: our activation shards read by an independent Parquet reader (pyarrow).
//!
//! Fails (does not skip) when pyarrow is missing. `SAEPIPE_PYTHON` picks the interpreter
//! (default `python3`); `make test` sets it (scripts/test_python.sh: python3 when it has
//! pyarrow, else a local `.venv-test` with pyarrow, made on first use).

use std::path::Path;
use std::process::Command;

use saepipe::store::{ActDtype, ActMeta, Rows, ShardWriter, WriterSettings};

fn meta(dtype: ActDtype) -> ActMeta {
    ActMeta {
        saepipe_version: env!("CARGO_PKG_VERSION").into(),
        model_repo: "local:/tmp/tiny".into(),
        model_revision: "rev0".into(),
        hookpoint: "blocks.1.hook_mlp_out".into(),
        d_model: 5,
        dtype,
        context_len: 16,
        tokenizer_sha256: "abc".into(),
        dataset: "corpus.txt".into(),
        config_hash: "0123456789abcdef".into(),
        split: "train".into(),
        exclude_special_tokens: true,
        excluded_token_ids: vec![1, 2],
        packing: r#"{"context_len":16}"#.into(),
    }
}

fn rows(n: usize) -> Rows {
    Rows {
        seq: (0..n as u64).map(|i| i / 3).collect(),
        pos: (0..n as u32).map(|i| i % 3 + 1).collect(),
        token_id: (0..n as u32).map(|i| 100 + i).collect(),
        act: (0..n * 5).map(|i| (i as f32 * 0.37).sin() * 3.0).collect(),
    }
}

const SCRIPT: &str = r#"
import json, struct, sys
try:
    import pyarrow.parquet as pq
except ImportError:
    print("MISSING_PYARROW")
    sys.exit(3)
t = pq.read_table(sys.argv[1])
md = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items() if k != b"ARROW:schema"}
out = {
    "schema": [[f.name, str(f.type)] for f in t.schema],
    "rows": t.num_rows,
    "meta": md,
    "seq": t.column("seq").to_pylist(),
    "pos": t.column("pos").to_pylist(),
    "token_id": t.column("token_id").to_pylist(),
    "act": [[float(x) for x in r] for r in t.column("act").to_pylist()],
    "item_meta": {k.decode(): v.decode() for k, v in (t.schema.field("act").type.value_field.metadata or {}).items()},
    # bfloat16 bits (UInt16 items) -> f32, the documented decoding.
    "act_bf16": [[struct.unpack("<f", struct.pack("<I", int(x) << 16))[0] for x in r]
                 for r in t.column("act").to_pylist()] if str(t.schema.field("act").type.value_type) == "uint16" else None,
    "row_groups": pq.ParquetFile(sys.argv[1]).num_row_groups,
}
print(json.dumps(out))
"#;

fn read_with_pyarrow(path: &Path) -> serde_json::Value {
    let py = std::env::var("SAEPIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {py}: {e}; install Python 3 and `pip install pyarrow`")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("MISSING_PYARROW"),
        "pyarrow is not installed for {py}: run the tests with `make test` (it sets up a Python with pyarrow), or `pip install pyarrow`"
    );
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("the script prints JSON")
}

fn check(dtype: ActDtype, type_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("part-00000.parquet");
    let settings = WriterSettings {
        row_group_rows: 4,
        ..Default::default()
    };
    let m = meta(dtype);
    let mut w = ShardWriter::create(&path, &m, &settings).unwrap();
    let r = rows(10);
    w.write(r.clone()).unwrap();
    w.finish().unwrap();
    let v = read_with_pyarrow(&path);
    assert_eq!(v["rows"], 10);
    assert_eq!(v["row_groups"], 3, "row groups bounded at 4 rows");
    let schema: Vec<(String, String)> = serde_json::from_value(v["schema"].clone()).unwrap();
    assert_eq!(schema[0], ("seq".into(), "uint64".into()));
    assert_eq!(schema[1], ("pos".into(), "uint32".into()));
    assert_eq!(schema[2], ("token_id".into(), "uint32".into()));
    assert_eq!(schema[3].0, "act");
    assert!(
        schema[3]
            .1
            .starts_with(&format!("fixed_size_list<item: {type_name}"))
            && schema[3].1.ends_with("[5]"),
        "{}",
        schema[3].1
    );
    for (k, val) in m.to_map() {
        assert_eq!(
            v["meta"][&k],
            serde_json::Value::String(val),
            "metadata key {k}"
        );
    }
    assert_eq!(v["seq"], serde_json::json!(r.seq));
    assert_eq!(v["pos"], serde_json::json!(r.pos));
    assert_eq!(v["token_id"], serde_json::json!(r.token_id));
    let column = match dtype {
        ActDtype::Bf16 => {
            assert_eq!(v["item_meta"]["saepipe.dtype"], "bfloat16");
            "act_bf16"
        }
        _ => "act",
    };
    let acts: Vec<Vec<f64>> = serde_json::from_value(v[column].clone()).unwrap();
    assert_eq!(acts.len(), 10);
    for (i, row) in acts.iter().enumerate() {
        for (j, &x) in row.iter().enumerate() {
            let want = r.act[i * 5 + j];
            let want = match dtype {
                ActDtype::F32 => want,
                ActDtype::F16 => half::f16::from_f32(want).to_f32(),
                ActDtype::Bf16 => half::bf16::from_f32(want).to_f32(),
            };
            assert_eq!(x as f32, want, "row {i} dim {j}");
        }
    }
}

#[test]
fn pyarrow_reads_f32_shards_bit_exact() {
    check(ActDtype::F32, "float");
}

#[test]
fn pyarrow_reads_f16_shards_bit_exact() {
    check(ActDtype::F16, "halffloat");
}

#[test]
fn pyarrow_reads_bf16_shards_as_uint16_bits() {
    check(ActDtype::Bf16, "uint16");
}
