//! Power-diagram diagnostics in `metrics.parquet` (eval/power.rs, `jsae_pamsgd.md` §2.5):
//! a tiny synthetic run with TopK, AbsTopK, BatchTopK and ReLU+L1 SAEs. The `pd_*` columns
//! are filled for TopK and AbsTopK (the variants with a K-th-order power diagram) and null
//! for the others. The formulas are checked against brute force in `src/eval/power/tests.rs`.

use std::path::Path;

use arrow::array::{Array, Float64Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use saepipe::config;
use saepipe::hub::HubOptions;
use saepipe::pipeline::{evaluate, train};
use saepipe::util::progress::Silent;

const PIPELINE: &str = r#"
[run]
name = "pd"
data_dir = "{dir}"

[synthetic]
d = 8
n_features = 16
mean_active = 2.0
noise = 0.02
bipolar_share = 0.5
seed = 0

[data]
n_tokens = 2048
eval_tokens = 1024

[train]
batch_tokens = 256
lr_warmup_steps = 1
init_tokens = 256

[sae]
d_sae = 16
arch = { kind = "topk", k = 2 }

[eval]
ce_sequences = 0
power_min_cell_tokens = 16

[sweep]
"sae.arch" = [
    { kind = "topk", k = 2 },
    { kind = "abs_topk", k = 2 },
    { kind = "batchtopk", k = 2 },
    { kind = "relu_l1" },
]
"#;

#[test]
fn topk_and_abs_topk_rows_have_the_power_columns_and_the_others_are_null() {
    let tmp = tempfile::tempdir().unwrap();
    let text = PIPELINE.replace("{dir}", &tmp.path().display().to_string());
    let p = config::from_str(&text, Path::new("pd.toml"), &[]).unwrap();
    train::train_stage(&p, None, false, &Silent).unwrap();
    let hub = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: tmp.path().join("hub-cache"),
        token: None,
        offline: true,
    };
    evaluate::evaluate_stage(&p, &hub, false, &Silent).unwrap();
    let f = std::fs::File::open(tmp.path().join("pd/results/metrics.parquet")).unwrap();
    let batches: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let m = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(m.num_rows(), 4);
    let arch = m.column_by_name("arch").unwrap();
    let arch = arch.as_any().downcast_ref::<StringArray>().unwrap();
    let col = |n: &str| {
        let c = m
            .column_by_name(n)
            .unwrap_or_else(|| panic!("column {n} missing"));
        let a = c.as_any().downcast_ref::<Float64Array>().unwrap().clone();
        (0..a.len())
            .map(|i| a.is_valid(i).then(|| a.value(i)))
            .collect::<Vec<_>>()
    };
    let names = saepipe::eval::power::PowerValues::NAMES;
    let mut seen = Vec::new();
    for i in 0..m.num_rows() {
        let kind = arch.value(i).to_string();
        let has = matches!(kind.as_str(), "topk" | "abs_topk");
        for n in names {
            let v = col(n)[i];
            if has {
                assert!(v.is_some_and(f64::is_finite), "{kind}: {n} = {v:?}");
            } else {
                assert!(v.is_none(), "{kind}: {n} = {v:?} should be null");
            }
        }
        if has {
            let sets = col("pd_n_active_sets")[i].unwrap();
            // K = 2 of 16 latents: at most C(16, 2) = 120 sets
            assert!((1.0..=120.0).contains(&sets), "{kind}: {sets} active sets");
            assert!(col("pd_affine_tokens_frac")[i].unwrap() > 0.0);
        }
        seen.push(kind);
    }
    seen.sort();
    assert_eq!(seen, ["abs_topk", "batchtopk", "relu_l1", "topk"]);
}
