//! `saepipe bench train` end to end on a tiny shape: the one-GEMM ceiling and the fraction of
//! it, the per-phase breakdown, and `--start-l0` holding the penalty variants at the asked L0.

use std::process::Command;

/// Column `col` (0-based, whitespace-separated) of the table row starting with `variant`.
fn cell(table: &str, variant: &str, col: usize) -> String {
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(variant))
        .unwrap_or_else(|| panic!("no row {variant} in:\n{table}"));
    row.split_whitespace()
        .nth(col)
        .unwrap_or_else(|| panic!("no column {col} in {row}"))
        .to_string()
}

#[test]
fn bench_train_prints_ceiling_breakdown_and_holds_start_l0() {
    let out = Command::new(env!("CARGO_BIN_EXE_saepipe"))
        .args(["-q", "bench", "train", "--d-in", "32", "--d-sae", "256"])
        .args([
            "--batch", "512", "--k", "8", "--steps", "2", "--warmup", "1",
        ])
        .args(["--variants", "topk,relu_l1,gated", "--start-l0", "16"])
        .arg("--breakdown")
        .output()
        .expect("run saepipe");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("one-GEMM ceiling"), "{stdout}");
    // the throughput table: TopK's L0 is k; the penalty variants start near --start-l0
    // (a fresh init fires about half of the 256 latents)
    assert_eq!(
        cell(&stdout, "topk", 1).parse::<f64>().ok(),
        Some(8.0),
        "{stdout}"
    );
    for v in ["relu_l1", "gated"] {
        let l0: f64 = cell(&stdout, v, 1).parse().expect("L0 column");
        assert!(
            (4.0..=64.0).contains(&l0),
            "{v}: L0 {l0} after --start-l0 16:\n{stdout}"
        );
        let frac = cell(&stdout, v, 4);
        assert!(frac.ends_with('%'), "{v}: fraction of the ceiling: {frac}");
    }
    // the breakdown: every phase, and the encoder GEMM takes time
    let at = stdout
        .find("time per step by phase")
        .expect("breakdown table");
    let bd = &stdout[at..];
    for phase in [
        "encoder GEMM",
        "selection",
        "sparse decode",
        "bwd: dots",
        "bwd: accumulate",
        "bwd: rest",
        "optimiser",
        "other",
    ] {
        assert!(bd.contains(phase), "{phase} missing:\n{bd}");
    }
    let gemm_ms: f64 = cell(bd, "topk", 1).parse().expect("ms of the GEMM");
    assert!(gemm_ms > 0.0, "{bd}");
}
