//! Every end-to-end, property and conformance test in one test binary: one link of the
//! crate and its dependencies instead of one per file (CI time; `cargo test --test it NAME::`
//! runs one file's tests). Each module is one former `tests/NAME.rs`.

mod common;

mod advice;
mod bench_train;
mod capture_bad_input;
mod capture_resume;
mod cli_messages;
mod compute_dtype;
mod config_keys;
mod config_pipelines;
mod e2e_pipeline;
mod env_flags;
mod eval_tensor_encode;
mod export_metadata;
mod forward;
mod hub_download;
mod hub_pytorch;
mod inspect_sae;
mod interop_pyarrow;
mod jsae;
mod jsae_tensor;
mod k8s;
mod kmeans_baselines;
mod layers;
mod model_dtype;
mod model_errors;
mod nan_data;
mod optimizers;
mod pam_sgd;
mod parity;
mod parity_dtype;
mod plan;
mod power_diagram;
mod run_concurrency;
mod run_folder_identity;
mod run_lock;
mod s3;
mod sa_gsae_synthetic;
mod sae_conformance;
mod sae_export;
mod sae_gradients;
mod sae_props;
mod sae_recovery;
mod settings_at_load;
mod shuffle_quality;
mod slurm;
mod streaming;
mod tensor_oracle;
mod tensor_oracle_state;
mod tensor_resident;
mod trace_cli;
mod trace_sources;
mod train_keys;
mod train_resume;
mod unit_identity;
mod units;

/// A file in `tests/it/` is compiled only when this file names it: one left out would
/// silently never run. Every `tests/it/*.rs` (and folder) must appear as a `mod` here.
#[test]
fn every_test_file_is_a_module() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let main = std::fs::read_to_string(dir.join("main.rs")).expect("tests/it/main.rs is readable");
    let declared: std::collections::BTreeSet<String> = main
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod "))
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .collect();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/it is readable") {
        let path = entry.expect("readable entry").path();
        let name = if path.is_dir() {
            path.file_name().map(|n| n.to_string_lossy().into_owned())
        } else if path.extension().is_some_and(|e| e == "rs") {
            path.file_stem().map(|n| n.to_string_lossy().into_owned())
        } else {
            None
        };
        match name {
            Some(n) if n != "main" && !declared.contains(&n) => missing.push(n),
            _ => {}
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "tests/it/ has files that tests/it/main.rs does not name, so they never run: {missing:?}; add `mod NAME;` for each"
    );
    assert!(
        declared.len() > 40,
        "expected the suite's modules in main.rs, found {}",
        declared.len()
    );
}
