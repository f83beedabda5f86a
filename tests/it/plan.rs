//! `saepipe plan` (issue 14 item 4): its arithmetic on the smoke pipeline with a generated
//! model, checked against values computed here and against the shards a real capture
//! writes; and the refusal of a keep-everything capture that cannot fit on the data_dir
//! filesystem (a real 256 KiB tmpfs in a user+mount namespace where `unshare` allows it,
//! else the documented `SAEPIPE_TEST_FREE_BYTES` hook).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

fn smoke() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml")
}

fn cmd(stage: &str, sets: &[String]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--progress", "off", stage]).arg(smoke());
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

/// The number after `key` on the first line containing `line_has`.
fn num_after(text: &str, line_has: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(line_has))
        .unwrap_or_else(|| panic!("no line with {line_has:?} in\n{text}"));
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("{key} in {line}"))
}

/// The byte count in the first `(N B)` after `key` on the line containing `line_has`.
fn bytes_after(text: &str, line_has: &str, key: &str) -> u64 {
    let line = text.lines().find(|l| l.contains(line_has)).unwrap();
    let rest = &line[line.find(key).unwrap()..];
    let open = rest.find('(').unwrap();
    let close = rest[open..].find(" B)").unwrap();
    rest[open + 1..open + close].parse().unwrap()
}

fn setup(tmp: &Path) -> Vec<String> {
    let model = common::tiny_llama(&tmp.join("model"), 5, false);
    let corpus = common::write_corpus(tmp, 1500, 4);
    vec![
        format!("model.source=local:{}", model.display()),
        format!("data.files=[\"{}\"]", corpus.display()),
        format!("run.data_dir={}", tmp.join("data").display()),
        "capture.shard_tokens=512".to_string(),
    ]
}

#[test]
fn plan_arithmetic_matches_the_formula_and_a_real_capture() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = setup(tmp.path());
    let plan = ok(cmd("plan", &sets).output().unwrap(), "plan");
    assert!(plan.contains("shape from:"), "{plan}");
    assert!(plan.contains("config.json"), "{plan}");
    let d = num_after(&plan, "model:", "d_model");
    // smoke.toml: context 32, BOS prepended and excluded -> 31 rows per window;
    // shard_tokens 512 -> 16 windows per shard; f32 rows of d values + 16 bytes.
    let (ctx_rows, shard_windows) = (31u64, 512u64 / 32);
    for (split, tokens) in [("train:", 4096u64), ("eval:", 1024u64)] {
        let windows = tokens.div_ceil(ctx_rows);
        let shards = windows.div_ceil(shard_windows);
        assert_eq!(num_after(&plan, split, "tokens"), tokens, "{plan}");
        assert_eq!(num_after(&plan, split, "windows"), windows, "{plan}");
        assert_eq!(num_after(&plan, split, "shards"), shards, "{plan}");
        let bytes = tokens * (d * 4 + 16) + shards * (64 << 10);
        assert_eq!(
            bytes_after(&plan, split, "bytes per hookpoint"),
            bytes,
            "{plan}"
        );
    }
    let per_hp = |t: u64| {
        let w = t.div_ceil(ctx_rows);
        t * (d * 4 + 16) + w.div_ceil(shard_windows) * (64 << 10)
    };
    let keep = 2 * (per_hp(4096) + per_hp(1024));
    assert_eq!(
        bytes_after(&plan, "keep everything (capture.keep", "true)"),
        keep
    );
    let streamed = bytes_after(&plan, "streamed (capture.keep = false)", "at least");
    assert!(streamed < keep, "{plan}");
    // The grid: 2 k × 2 seeds at 2 hookpoints, all in groups that fit the cap.
    let n_saes = num_after(&plan, "train (", "train (");
    assert_eq!(n_saes, 8, "{plan}");

    // The real capture's shards are no larger than planned and hold the planned rows.
    ok(cmd("capture", &sets).output().unwrap(), "capture");
    let set = tmp
        .path()
        .join("data/smoke/activations/blocks.0.hook_mlp_out");
    let on_disk: u64 = std::fs::read_dir(&set)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let planned = bytes_after(&plan, "train:", "bytes per hookpoint");
    assert!(
        on_disk <= planned && on_disk >= 4096 * d * 4,
        "train set of blocks.0.hook_mlp_out: {on_disk} bytes on disk, planned {planned}"
    );
}

#[test]
fn a_capture_that_does_not_fit_is_refused_with_the_shortfall_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = setup(tmp.path());
    let out = cmd("capture", &sets)
        .env("SAEPIPE_TEST_FREE_BYTES", "100000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "short by",
        "capture.keep=false",
        "capture.disk_budget_bytes",
        "run.data_dir",
    ] {
        assert!(err.contains(want), "{want} missing from: {err}");
    }
    assert!(
        !tmp.path()
            .join("data/smoke/activations/blocks.0.hook_mlp_out/part-00000.parquet")
            .exists(),
        "nothing is captured before the refusal"
    );
}

#[test]
fn a_real_small_filesystem_refuses_the_capture() {
    // A 256 KiB tmpfs, mounted in a private user+mount namespace (gone with the process).
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "unshare is not available here; the SAEPIPE_TEST_FREE_BYTES test covers the refusal"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = setup(tmp.path());
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    sets.push(format!("run.data_dir={}", small.display()));
    let mut script = format!(
        "mount -t tmpfs -o size=256k tmpfs '{}' && exec '{BIN}' --progress off capture '{}'",
        small.display(),
        smoke().display()
    );
    for s in &sets {
        script += &format!(" --set '{s}'");
    }
    script += " --offline";
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env_remove("SAEPIPE_TEST_FREE_BYTES")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the capture ran on a 256 KiB filesystem: {err}"
    );
    assert!(
        err.contains("short by") && err.contains("run.data_dir"),
        "{err}"
    );
}

/// The seconds of the time section's line `  <stage>: <seconds> s …`.
fn stage_seconds(plan: &str, stage: &str) -> f64 {
    let time = &plan[plan
        .find("\ntime (estimate from a calibration")
        .unwrap_or_else(|| panic!("no calibrated time section in\n{plan}"))..];
    let prefix = format!("  {stage}: ");
    let line = time
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {stage} line in\n{time}"));
    let num = line[prefix.len()..].split_whitespace().next().unwrap();
    num.parse()
        .unwrap_or_else(|_| panic!("{stage}: not a number of seconds in {line:?}"))
}

#[test]
fn calibration_prints_finite_positive_times_per_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = setup(tmp.path());
    let plan = ok(cmd("plan", &sets).output().unwrap(), "plan");
    assert!(
        plan.contains("calibration on this machine that took"),
        "{plan}"
    );
    for stage in ["capture", "train", "evaluate", "total"] {
        let s = stage_seconds(&plan, stage);
        assert!(s.is_finite() && s > 0.0, "{stage}: {s} in\n{plan}");
    }
    assert!(plan.contains("extrapolated"), "{plan}");
    // Nothing was captured or trained: the plan only measures.
    assert!(!tmp.path().join("data/smoke/activations").exists());
}

#[test]
fn no_calibrate_prints_no_time() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = setup(tmp.path());
    let mut c = cmd("plan", &sets);
    c.arg("--no-calibrate");
    let plan = ok(c.output().unwrap(), "plan --no-calibrate");
    assert!(
        plan.contains("time: not estimated (--no-calibrate)"),
        "{plan}"
    );
    assert!(!plan.contains("calibration on this machine"), "{plan}");
    assert!(!plan.contains("  total: "), "{plan}");
}

/// stream.rs's estimate of one shard of `rows` rows at width `d`, f32 (its module doc).
fn stream_shard_bytes(rows: u64, d: u64) -> u64 {
    rows * (d * 4 + 16) * 17 / 16 + (64 << 10)
}

#[test]
fn the_streamed_section_follows_the_chunk_arithmetic_at_the_configured_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = setup(tmp.path());
    let plan = ok(
        cmd("plan", &sets).arg("--no-calibrate").output().unwrap(),
        "plan",
    );
    let d = num_after(&plan, "model:", "d_model");
    // smoke.toml with 512-token shards: 16 windows of 31 rows (BOS excluded) = 496 rows a
    // shard; 4096 training rows, 1024 held-out; 2 hookpoints.
    let shards = |tokens: u64| {
        let mut r = vec![496u64; (tokens / 496) as usize];
        if !tokens.is_multiple_of(496) {
            r.push(tokens % 496);
        }
        r
    };
    let (train, eval) = (shards(4096), shards(1024));
    let per = |r: u64| 2 * stream_shard_bytes(r, d);
    let eval_est: u64 = eval.iter().map(|&r| per(r)).sum();
    let pair = train
        .windows(2)
        .map(|w| per(w[0]) + per(w[1]))
        .max()
        .unwrap();
    let slack = 64 << 10;
    let minimum = eval_est + slack + pair;
    // Room for three full shards a chunk: chunks of 3, 3, 3 and the rest.
    let budget = eval_est + slack + 3 * per(496);
    let avail = budget - eval_est - slack;
    let mut sizes: Vec<usize> = Vec::new(); // shards per chunk, packed as stream.rs does
    let mut used = 0;
    for &r in &train {
        match sizes.last_mut() {
            Some(n) if used + per(r) <= avail => {
                *n += 1;
                used += per(r);
            }
            _ => {
                sizes.push(1);
                used = per(r);
            }
        }
    }
    let chunks = sizes.len() as u64;
    assert!(chunks > 1, "the budget must split the training shards");
    sets.push("capture.keep=false".to_string());
    sets.push(format!("capture.disk_budget_bytes={budget}"));
    let plan = ok(
        cmd("plan", &sets).arg("--no-calibrate").output().unwrap(),
        "plan",
    );
    let line = "streamed at the configured capture.disk_budget_bytes";
    assert_eq!(num_after(&plan, line, "): "), chunks, "{plan}");
    let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(
        plan.contains(&format!("{chunks} chunks of {lo}..={hi} training shards")),
        "{plan}"
    );
    assert_eq!(
        bytes_after(&plan, line, "minimum budget"),
        minimum,
        "{plan}"
    );
    assert_eq!(
        bytes_after(&plan, line, "peak disk"),
        eval_est + slack + 3 * per(496),
        "{plan}"
    );

    // One byte below the minimum: flagged, as `saepipe run` would refuse it.
    let n = sets.len();
    sets[n - 1] = format!("capture.disk_budget_bytes={}", minimum - 1);
    let plan = ok(
        cmd("plan", &sets).arg("--no-calibrate").output().unwrap(),
        "plan",
    );
    assert!(plan.contains("BELOW THE MINIMUM"), "{plan}");
    assert_eq!(bytes_after(&plan, line, "MINIMUM"), minimum, "{plan}");
}
