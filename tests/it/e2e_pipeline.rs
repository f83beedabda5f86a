//! End to end through the real binary (issue 5 item 5): `saepipe run` on the smoke
//! pipeline with a generated tiny Llama and corpus, offline. Checks the result files'
//! schemas and value ranges, then deletes one SAE's outputs and checks that a re-run
//! redoes only that unit.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use arrow::array::{Array, BooleanArray, Float64Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn corpus(dir: &Path) -> PathBuf {
    common::write_corpus(dir, 1500, 3)
}

fn run_pipeline(model: &Path, corpus: &Path, data_dir: &Path) -> String {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let out = Command::new(BIN)
        .args(["--progress", "off", "run"])
        .arg(&smoke)
        .args(["--offline", "--set"])
        .arg(format!("model.source=local:{}", model.display()))
        .arg("--set")
        .arg(format!("data.files=[\"{}\"]", corpus.display()))
        .arg("--set")
        .arg(format!("run.data_dir={}", data_dir.display()))
        // small enough that some top-1 groups of the 1024 held-out tokens qualify
        .args(["--set", "eval.power_min_cell_tokens=32"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "saepipe run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> arrow::record_batch::RecordBatch {
    let f = std::fs::File::open(path).unwrap();
    let batches: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn f64s(b: &arrow::record_batch::RecordBatch, name: &str) -> Vec<Option<f64>> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("column {name} missing"));
    let a = c.as_any().downcast_ref::<Float64Array>().unwrap();
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value(i)))
        .collect()
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn run_produces_results_and_resumes_only_missing_points() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 7, false);
    let corpus = corpus(tmp.path());
    let data = tmp.path().join("data");
    let table = run_pipeline(&model, &corpus, &data);
    assert!(table.contains("blocks.0.hook_mlp_out"), "{table}");

    let run = data.join("smoke");
    let results = run.join("results");
    for f in ["metrics.parquet", "pareto.parquet", "pareto.svg"] {
        assert!(results.join(f).is_file(), "{f} missing");
    }
    assert!(run.join("config.resolved.toml").is_file());
    let m = read(&results.join("metrics.parquet"));
    // smoke.toml: 2 values of k × 2 seeds, at 2 hookpoints.
    assert_eq!(m.num_rows(), 8);
    for col in [
        "run",
        "model",
        "revision",
        "hookpoint",
        "arch",
        "d_sae",
        "expansion",
        "sparsity_param",
        "sparsity_value",
        "seed",
        "optimizer",
        "train_tokens",
        "eval_tokens",
        "r2",
        "fvu",
        "mse",
        "l0",
        "l1",
        "dead_frac",
        "dense_frac",
        "ce_clean",
        "ce_spliced",
        "ce_delta",
        "ce_loss_score",
        "bipolar_frac",
        "jacobian_sparsity",
        "train_seconds",
        "train_tokens_per_s",
        "sae_path",
    ] {
        assert!(m.column_by_name(col).is_some(), "column {col} missing");
    }
    let k = f64s(&m, "sparsity_value");
    for (i, (r2, l0)) in f64s(&m, "r2").iter().zip(f64s(&m, "l0")).enumerate() {
        let (r2, l0) = (r2.unwrap(), l0.unwrap());
        assert!(r2.is_finite() && r2 <= 1.0 && r2 > -1.0, "r2 {r2}");
        // TopK: exactly k active latents per token (k ≤ d_sae, codes of top-k are > 0 here
        // or zero when the pre-activation is not positive).
        assert!(
            l0 > 0.0 && l0 <= k[i].unwrap() + 1e-9,
            "l0 {l0} k {:?}",
            k[i]
        );
    }
    for v in f64s(&m, "dead_frac") {
        assert!((0.0..=1.0).contains(&v.unwrap()));
    }
    let (clean, spliced, delta) = (
        f64s(&m, "ce_clean"),
        f64s(&m, "ce_spliced"),
        f64s(&m, "ce_delta"),
    );
    for i in 0..m.num_rows() {
        let (c, s, d) = (clean[i].unwrap(), spliced[i].unwrap(), delta[i].unwrap());
        assert!(c > 0.0 && s > 0.0 && (s - c - d).abs() < 1e-9);
    }
    let arch = m.column_by_name("arch").unwrap();
    let arch = arch.as_any().downcast_ref::<StringArray>().unwrap();
    assert!((0..arch.len()).all(|i| arch.value(i) == "topk"));
    // power-diagram diagnostics (eval/power.rs) on every TopK row
    let col = |n: &str| f64s(&m, n);
    let (margin, facet, rel) = (
        col("pd_margin_mean"),
        col("pd_facet_dist_mean"),
        col("pd_facet_dist_rel"),
    );
    let (sets, share, eff) = (
        col("pd_n_active_sets"),
        col("pd_top_set_share"),
        col("pd_eff_active_sets"),
    );
    let (cells, ratio, sae_mse, pca_mse) = (
        col("pd_affine_cells"),
        col("pd_affine_ratio"),
        col("pd_affine_sae_mse"),
        col("pd_affine_pca_mse"),
    );
    let eval_tokens = 1024.0;
    for i in 0..m.num_rows() {
        assert!(margin[i].unwrap() >= 0.0, "margin {:?}", margin[i]);
        let f = facet[i].unwrap();
        assert!(
            f.is_finite() && f > 0.0 && rel[i].unwrap() > 0.0,
            "facet {f}"
        );
        let n = sets[i].unwrap();
        assert!(n >= 1.0 && n <= eval_tokens, "active sets {n}");
        assert!(eff[i].unwrap() <= n + 1e-9 && eff[i].unwrap() >= 1.0 - 1e-9);
        assert!(share[i].unwrap() > 0.0 && share[i].unwrap() <= 1.0);
        if let Some(c) = cells[i] {
            assert!(c >= 1.0);
            let (s, p) = (sae_mse[i].unwrap(), pca_mse[i].unwrap());
            assert!(s >= 0.0 && p >= 0.0);
            if let Some(r) = ratio[i] {
                assert!(
                    (r - s / p).abs() <= 1e-9 * r.max(1.0),
                    "ratio {r} vs {s}/{p}"
                );
            }
        }
    }
    assert!(
        cells.iter().any(|c| c.is_some()),
        "no SAE had a top-1 group of 32 tokens: {cells:?}"
    );
    let p = read(&results.join("pareto.parquet"));
    assert!(p.num_rows() >= 2 && p.num_rows() <= 8);
    let flags = p.column_by_name("is_pareto").unwrap();
    let flags = flags.as_any().downcast_ref::<BooleanArray>().unwrap();
    assert!((0..flags.len()).all(|i| flags.value(i)));

    // Delete one SAE's outputs: a re-run redoes that unit only.
    let saes = run.join("saes");
    let mut units: Vec<PathBuf> = Vec::new();
    for point in std::fs::read_dir(&saes).unwrap() {
        for hp in std::fs::read_dir(point.unwrap().path()).unwrap() {
            units.push(hp.unwrap().path());
        }
    }
    units.sort();
    assert_eq!(units.len(), 8);
    let victim = units[0].clone();
    let before: Vec<(PathBuf, SystemTime)> = units[1..]
        .iter()
        .map(|u| (u.clone(), mtime(&u.join("sae_weights.safetensors"))))
        .collect();
    let shard_before = mtime(&run.join("activations/blocks.0.hook_mlp_out/manifest.json"));
    std::fs::remove_dir_all(&victim).unwrap();
    run_pipeline(&model, &corpus, &data);
    assert!(victim.join("sae_weights.safetensors").is_file());
    assert!(victim.join("metrics.json").is_file());
    for (u, t) in before {
        assert_eq!(
            mtime(&u.join("sae_weights.safetensors")),
            t,
            "{} was retrained",
            u.display()
        );
    }
    assert_eq!(
        mtime(&run.join("activations/blocks.0.hook_mlp_out/manifest.json")),
        shard_before,
        "the capture was redone"
    );
    assert_eq!(read(&results.join("metrics.parquet")).num_rows(), 8);
}
