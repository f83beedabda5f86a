//! NaN in the activation data is a data problem (issue 17 item 8): training on a shard
//! with a NaN names the shard file and row and gives no learning-rate advice, and the fix
//! the message gives (delete the set folder, capture again) works.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array};
use arrow::datatypes::{DataType, Float32Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.1.hook_resid_mid";

fn stage(root: &Path, name: &str, model: &Path, corpus: &Path) -> Output {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    Command::new(BIN)
        .args(["-q", "--progress", "off", name])
        .arg(smoke)
        .arg("--set")
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", root.join("data").display()))
        .arg("--set")
        .arg(format!("capture.hookpoints=[\"{HP}\"]"))
        .output()
        .unwrap()
}

fn ok(o: Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Rewrite `shard` with `value` at (`row`, `dim`), keeping its schema and metadata.
fn poison(shard: &Path, row: usize, dim: usize, value: f32) {
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(shard).unwrap()).unwrap();
    let schema = b.schema().clone();
    let kv: Vec<_> = b
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| kv.key != "ARROW:schema")
        .collect();
    let batches: Vec<RecordBatch> = b.build().unwrap().collect::<Result<_, _>>().unwrap();
    let batch = arrow::compute::concat_batches(&schema, &batches).unwrap();
    let idx = schema.index_of("act").unwrap();
    let act = batch.column(idx).as_fixed_size_list();
    let d = act.value_length() as usize;
    let mut vals = act.values().as_primitive::<Float32Type>().values().to_vec();
    vals[row * d + dim] = value;
    let DataType::FixedSizeList(item, _) = schema.field(idx).data_type() else {
        panic!("act is a FixedSizeList");
    };
    let act = FixedSizeListArray::new(
        item.clone(),
        d as i32,
        Arc::new(Float32Array::from(vals)),
        act.nulls().cloned(),
    );
    let mut cols = batch.columns().to_vec();
    cols[idx] = Arc::new(act);
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(shard).unwrap(), schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn nan_in_a_shard_names_file_and_row_and_recapture_fixes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = common::tiny_llama(&root.join("model"), 3, false);
    let corpus = common::write_corpus(root, 1500, 5);
    ok(stage(root, "capture", &model, &corpus));
    let set = root.join("data/smoke/activations").join(HP);
    let shard = set.join("part-00000.parquet");
    poison(&shard, 5, 3, f32::NAN);

    let o = stage(root, "train", &model, &corpus);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "training on NaN data: {e}");
    for needle in [
        shard.display().to_string().as_str(),
        "row 5",
        "dimension 3",
        "NaN",
        "problem of the data",
    ] {
        assert!(e.contains(needle), "stderr lacks '{needle}': {e}");
    }
    assert!(
        !e.contains("learning rate"),
        "NaN input is not a learning-rate problem: {e}"
    );
    // The advice: delete the set folder it names and capture again.
    let named = format!("delete the folder {}", set.display());
    assert!(e.contains(&named), "{e}");
    std::fs::remove_dir_all(&set).unwrap();
    ok(stage(root, "capture", &model, &corpus));
    ok(stage(root, "train", &model, &corpus));
}
