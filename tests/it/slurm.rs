//! `saepipe slurm` on a real one-node Slurm cluster (issue 15 item 2): the generated
//! submit script runs the tiny pipeline as job arrays (capture shards → finalize → train
//! units → evaluate units → results), and the metrics equal those of `saepipe run` on the
//! same pipeline, apart from the wall-clock columns and the paths. One train task is
//! cancelled mid-run (`scancel JOB_I`); re-running the submit script computes only what
//! was missing: the files of the units that were done stay byte for byte and mtime for
//! mtime as they were.
//!
//! Needs a cluster that answers `sinfo` (start one with `scripts/local_slurm.sh`, as
//! `.ci/run` does). Without one the test prints "skipped: no slurm" and passes, unless
//! `SAEPIPE_REQUIRE_SLURM=1` (set by `.ci/run`), when it fails.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
/// The longest any phase may wait for the cluster.
const TIMEOUT: Duration = Duration::from_secs(600);
/// Columns that are wall-clock measurements or paths of the run folder.
const VOLATILE: [&str; 3] = ["train_seconds", "train_tokens_per_s", "sae_path"];

fn slurm_up() -> bool {
    Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| ["idle", "mixed", "allocated"].contains(&l.trim()))
        })
}

fn sets(model: &Path, corpus: &Path, data: &Path) -> Vec<String> {
    vec![
        format!("model.source=local:{}", model.display()),
        format!("data.files=[\"{}\"]", corpus.display()),
        format!("run.data_dir={}", data.display()),
        // Several capture shards (32-token windows, 16 per shard).
        "capture.shard_tokens=512".into(),
        // Long enough that a train task can be caught running.
        "train.train_tokens=200000".into(),
    ]
}

fn saepipe(args: &[&str], sets: &[String]) -> String {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let mut cmd = Command::new(BIN);
    cmd.args(["--progress", "off"]).args(args).arg(&smoke);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.arg("--offline").output().unwrap();
    assert!(
        out.status.success(),
        "saepipe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run submit.sh; the job ids it submitted, by stage.
fn submit(script: &Path) -> Vec<(String, String)> {
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs = std::fs::read_to_string(script.with_file_name("jobs.txt")).unwrap();
    jobs.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// `squeue` lines `<jobid>_<task> <state>` of these jobs (arrays expanded).
fn queue(ids: &[&str]) -> Vec<(String, String)> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-o", "%i %t", "-j"])
        .arg(ids.join(","))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn wait_gone(ids: &[&str], logs: &Path) {
    let t0 = Instant::now();
    while !queue(ids).is_empty() {
        if t0.elapsed() > TIMEOUT {
            panic!(
                "jobs {ids:?} still queued after {TIMEOUT:?}: {:?}; logs in {}",
                queue(ids),
                logs.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read(path: &Path) -> arrow::record_batch::RecordBatch {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let batches: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Every file under `dir` except lock files: path → (mtime, bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (SystemTime, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().ends_with(".lock") {
                let m = std::fs::metadata(&p).unwrap().modified().unwrap();
                out.insert(p.clone(), (m, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn assert_tables_equal(a: &Path, b: &Path) {
    let (x, y) = (read(a), read(b));
    assert_eq!(x.num_rows(), y.num_rows(), "row counts of {a:?} and {b:?}");
    for f in x.schema().fields() {
        let name = f.name();
        if VOLATILE.contains(&name.as_str()) {
            continue;
        }
        let cx = x.column_by_name(name).unwrap();
        let cy = y
            .column_by_name(name)
            .unwrap_or_else(|| panic!("{b:?} lacks column {name}"));
        assert_eq!(
            cx.to_data(),
            cy.to_data(),
            "column {name} differs between saepipe run and the Slurm run"
        );
    }
}

#[test]
fn slurm_arrays_equal_saepipe_run_and_a_resubmission_completes_only_what_was_missing() {
    if !slurm_up() {
        if std::env::var("SAEPIPE_REQUIRE_SLURM").as_deref() == Ok("1") {
            panic!("SAEPIPE_REQUIRE_SLURM=1 but no Slurm cluster answers `sinfo`; start one with scripts/local_slurm.sh");
        }
        eprintln!(
            "skipped: no slurm (no cluster answers `sinfo`; scripts/local_slurm.sh starts one)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 7, false);
    let corpus = common::write_corpus(tmp.path(), 1500, 3);

    // 1. The reference: one process.
    let ref_data = tmp.path().join("ref");
    let t = Instant::now();
    saepipe(&["run"], &sets(&model, &corpus, &ref_data));
    eprintln!("saepipe run (reference): {:.1}s", t.elapsed().as_secs_f64());

    // 2. The same pipeline through the generated Slurm scripts.
    let data = tmp.path().join("slurm");
    let s = sets(&model, &corpus, &data);
    let listing: serde_json::Value =
        serde_json::from_str(&saepipe(&["units", "--json"], &s)).unwrap();
    // The unit folders (one may not exist yet when its task is cancelled early).
    let units: Vec<PathBuf> = listing["train"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| PathBuf::from(u["dir"].as_str().unwrap()))
        .collect();
    assert_eq!(units.len(), 8, "{listing}");
    let out_dir = tmp.path().join("scripts");
    let script = saepipe(
        &[
            "slurm",
            "--out",
            out_dir.to_str().unwrap(),
            "--cpus-per-task",
            "1",
        ],
        &s,
    );
    let script = PathBuf::from(script.trim());
    let logs = out_dir.join("logs");
    let t0 = Instant::now();
    let jobs = submit(&script);
    let id = |stage: &str| {
        jobs.iter()
            .find(|(s, _)| s == stage)
            .map(|(_, id)| id.clone())
            .unwrap_or_else(|| panic!("no {stage} job in {jobs:?}"))
    };
    let (train, evaluate, results) = (id("train"), id("evaluate"), id("results"));
    assert!(id("capture") != id("finalize"));

    // 3. Cancel one train task while it runs.
    let victim = loop {
        if let Some((task, _)) = queue(&[&train]).into_iter().find(|(_, st)| st == "R") {
            break task;
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "no train task ever ran; logs in {}",
            logs.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let t_cancel = t0.elapsed();
    let st = Command::new("scancel").arg(&victim).status().unwrap();
    assert!(st.success(), "scancel {victim}");
    let index: usize = victim.rsplit('_').next().unwrap().parse().unwrap();
    wait_gone(&[&train], &logs);
    // evaluate/results never start now (afterok on a cancelled task): remove them.
    Command::new("scancel")
        .args([&evaluate, &results])
        .status()
        .unwrap();
    wait_gone(&[&evaluate, &results], &logs);
    let t_first = t0.elapsed();
    let run = data.join("smoke");
    let done: Vec<&PathBuf> = units
        .iter()
        .filter(|u| u.join("train_done.json").is_file())
        .collect();
    assert_eq!(
        done.len(),
        7,
        "exactly the cancelled train task (unit {index}) should be missing; logs in {}",
        logs.display()
    );
    assert!(!run.join("results/metrics.parquet").exists());
    let before: Vec<_> = done
        .iter()
        .map(|u| snapshot(u))
        .chain([snapshot(&run.join("activations"))])
        .collect();

    // 4. Re-submit the same script: only the missing unit trains, then everything is
    //    evaluated and merged.
    let t1 = Instant::now();
    let jobs2 = submit(&script);
    let ids: Vec<&str> = jobs2.iter().map(|(_, i)| i.as_str()).collect();
    wait_gone(&ids, &logs);
    let t_second = t1.elapsed();
    let metrics = run.join("results/metrics.parquet");
    assert!(
        metrics.is_file(),
        "the resubmission left no results; logs in {}",
        logs.display()
    );
    for (dir, snap) in done
        .iter()
        .map(|p| p.as_path())
        .chain([run.join("activations").as_path()])
        .zip(&before)
    {
        let now = snapshot(dir);
        for (p, (mtime, bytes)) in snap {
            let (m2, b2) = now
                .get(p)
                .unwrap_or_else(|| panic!("{} vanished", p.display()));
            assert!(
                m2 == mtime && b2 == bytes,
                "{} was rewritten by the resubmission",
                p.display()
            );
        }
    }
    assert!(units.iter().all(|u| u.join("metrics.json").is_file()));
    assert_tables_equal(&ref_data.join("smoke/results/metrics.parquet"), &metrics);
    assert_tables_equal(
        &ref_data.join("smoke/results/pareto.parquet"),
        &run.join("results/pareto.parquet"),
    );
    eprintln!(
        "slurm timeline: submit → train task {victim} cancelled at {:.1}s → first submission drained at {:.1}s; resubmission → results in {:.1}s",
        t_cancel.as_secs_f64(),
        t_first.as_secs_f64(),
        t_second.as_secs_f64()
    );
}
