//! Two `saepipe run` on one run folder (issue 17, "Done when"): in both orders, with seeded
//! random start delays that land before, during and after the other's run, the outcome of
//! every trial is one complete, valid run (every manifest's shards exist with the bytes and
//! rows it claims and read back; every SAE unit has its marker and loadable weights;
//! `metrics.parquet` reads) and, for a process that did not run, a refusal naming the other
//! process; never a manifest over a corrupt file. A final rerun then completes.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{Rng as _, SeedableRng};
use saepipe::sae::export::LoadedSae;
use saepipe::store::reader::{ActivationSet, Expect};
use saepipe::store::Manifest;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
/// Trials, half with each process starting first.
const TRIALS: usize = 10;
const HOOKPOINTS: [&str; 2] = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"];
/// Grid points of the pipeline (`sae.arch.k` = 2, 4).
const POINTS: usize = 2;
const N_TOKENS: u64 = 2048;
const EVAL_TOKENS: u64 = 512;

fn pipeline(root: &Path, model: &Path, corpus: &Path) -> PathBuf {
    let p = root.join("race.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[run]
name = "race"
data_dir = "{data}"

[model]
source = "local:{model}"

[data]
files = ["{corpus}"]
context_len = 32
n_tokens = {N_TOKENS}
eval_tokens = {EVAL_TOKENS}

[capture]
hookpoints = {hps:?}
batch_size = 4
shard_tokens = 512
row_group_rows = 256

[train]
batch_tokens = 256
lr_warmup_steps = 1
init_tokens = 512
checkpoint_every = 512

[sae]
expansion_factor = 2
arch = {{ kind = "topk", k = 4 }}

[eval]
ce_sequences = 2

[sweep]
"sae.arch.k" = [2, 4]
"#,
            data = root.join("runs").display(),
            model = model.display(),
            corpus = corpus.display(),
            hps = HOOKPOINTS,
        ),
    )
    .unwrap();
    p
}

fn spawn(file: &Path, name: &str) -> Child {
    Command::new(BIN)
        .args(["--progress", "off", "run"])
        .arg(file)
        .args(["--offline", "--set", &format!("run.name={name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// One activation set: the manifest's shards exist with the sizes and rows it claims, and
/// every row reads back.
fn check_set(dir: &Path, rows: u64, ctx: &str) {
    let m = Manifest::read(dir)
        .unwrap_or_else(|e| panic!("{ctx}: {}: {e}", dir.display()))
        .unwrap_or_else(|| panic!("{ctx}: no manifest in {}", dir.display()));
    assert_eq!(m.n_tokens, rows, "{ctx}: {}", dir.display());
    assert_eq!(
        m.shards.iter().map(|s| s.rows).sum::<u64>(),
        rows,
        "{ctx}: {}",
        dir.display()
    );
    for s in &m.shards {
        let path = dir.join(&s.file);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{ctx}: {}: {e}", path.display()))
            .len();
        assert_eq!(len, s.bytes, "{ctx}: {} size", path.display());
        let f = std::fs::File::open(&path).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap_or_else(|e| panic!("{ctx}: {}: {e}", path.display()));
        assert_eq!(
            b.metadata().file_metadata().num_rows() as u64,
            s.rows,
            "{ctx}: {} rows",
            path.display()
        );
    }
    let set = ActivationSet::open(dir, &Expect::default()).unwrap();
    let mut n = 0u64;
    for b in set.batches(1024) {
        let b = b.unwrap_or_else(|e| panic!("{ctx}: reading {}: {e}", dir.display()));
        n += b.seq.len() as u64;
    }
    assert_eq!(n, rows, "{ctx}: rows read from {}", dir.display());
}

/// The whole run folder is one complete, valid run.
fn check_run(run: &Path, ctx: &str) {
    let acts = run.join("activations");
    for hp in HOOKPOINTS {
        check_set(&acts.join(hp), N_TOKENS, ctx);
        check_set(&acts.join(hp).join("eval"), EVAL_TOKENS, ctx);
    }
    let mut units = 0;
    for point in std::fs::read_dir(run.join("saes")).unwrap().flatten() {
        for hp in HOOKPOINTS {
            let dir = point.path().join(hp);
            assert!(
                dir.join("train_done.json").is_file(),
                "{ctx}: {} has no marker",
                dir.display()
            );
            let sae =
                LoadedSae::load(&dir).unwrap_or_else(|e| panic!("{ctx}: {}: {e}", dir.display()));
            assert_eq!(sae.hook_name, hp, "{ctx}");
            units += 1;
        }
    }
    assert_eq!(units, POINTS * HOOKPOINTS.len(), "{ctx}: SAE units");
    let metrics = run.join("results/metrics.parquet");
    let f = std::fs::File::open(&metrics)
        .unwrap_or_else(|e| panic!("{ctx}: {}: {e}", metrics.display()));
    let rows: usize = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert!(rows >= units, "{ctx}: {rows} metrics rows for {units} SAEs");
    let mut files = Vec::new();
    all_files(run, &mut files);
    let stray: Vec<_> = files
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{ctx}: temporary files left: {stray:?}");
}

#[test]
fn two_runs_on_one_folder_give_one_valid_run_or_a_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 3, false);
    let corpus = common::write_corpus(tmp.path(), 1500, 9);
    let file = pipeline(tmp.path(), &model, &corpus);
    let runs = tmp.path().join("runs");
    // A solo run sets the time scale of the delays (and is itself checked).
    let t0 = Instant::now();
    let out = spawn(&file, "solo").wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let solo = t0.elapsed();
    check_run(&runs.join("solo"), "solo");
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let (mut refused, mut both_ran) = (0, 0);
    for trial in 0..TRIALS {
        let name = format!("t{trial}");
        // Delay of the second process: from a near-simultaneous start to after the first
        // has finished.
        let late = solo.mul_f64(rng.random_range(0.0..1.3));
        let first_is_a = trial % 2 == 0;
        let mut procs: Vec<(usize, Child)> = Vec::new();
        let first = spawn(&file, &name);
        std::thread::sleep(late);
        let second = spawn(&file, &name);
        if first_is_a {
            procs.push((0, first));
            procs.push((1, second));
        } else {
            procs.push((1, first));
            procs.push((0, second));
        }
        procs.sort_by_key(|p| p.0);
        let pids: Vec<u32> = procs.iter().map(|p| p.1.id()).collect();
        let outs: Vec<_> = procs
            .into_iter()
            .map(|(_, c)| c.wait_with_output().unwrap())
            .collect();
        let ctx = format!("trial {trial} (second after {late:?})");
        let mut ok = 0;
        for (i, o) in outs.iter().enumerate() {
            let err = String::from_utf8_lossy(&o.stderr);
            if o.status.success() {
                ok += 1;
            } else {
                let other = pids[1 - i];
                assert!(
                    err.contains("in use by another saepipe process")
                        && err.contains(&format!("pid {other}")),
                    "{ctx}: process {i} failed without the lock refusal naming pid {other}: {err}"
                );
                refused += 1;
            }
        }
        assert!(ok >= 1, "{ctx}: neither process completed");
        if ok == 2 {
            both_ran += 1;
        }
        check_run(&runs.join(&name), &ctx);
    }
    eprintln!(
        "{TRIALS} trials: {refused} refusals, {both_ran} with both completing (solo run {solo:?})"
    );
    assert!(refused > 0, "no trial overlapped the two processes");
    // A final rerun on a raced folder completes and leaves it valid.
    let last = format!("t{}", TRIALS - 1);
    let out = spawn(&file, &last).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "final rerun: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_run(&runs.join(&last), "final rerun");
}
