//! Every error message that suggests a fix suggests one that works (issue 17 item 6): each
//! test provokes one message through the real binary, checks that it gives the advice, then
//! follows the advice to the letter and checks that the command then succeeds.
//!
//! Messages covered elsewhere: the unit-folder mismatch (`tests/it/unit_identity.rs`), the
//! settings checked at load (`tests/it/settings_at_load.rs`), "nothing to evaluate"
//! (`tests/it/run_folder_identity.rs` gives the refusal; here its advice is followed).
//! Not covered: the `--offline` cache miss ("run `saepipe download` with network access"),
//! which needs the network.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
const HP: &str = "blocks.0.hook_mlp_out";

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    corpus: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let model = common::tiny_llama(&root.join("model"), 3, false);
        let corpus = common::write_corpus(&root, 1500, 5);
        Self {
            _tmp: tmp,
            root,
            model,
            corpus,
        }
    }

    fn pipeline(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml")
    }

    /// `saepipe <stage> <file> <flags>` with the small test settings, then `sets`.
    fn run_file(&self, file: &Path, stage: &str, flags: &[&str], sets: &[&str]) -> Output {
        let mut all = vec![
            format!("model.source=local:{}", self.model.display()),
            format!("data.files=[\"{}\"]", self.corpus.display()),
            format!("run.data_dir={}", self.root.join("data").display()),
            "data.n_tokens=1024".into(),
            "data.eval_tokens=256".into(),
            "capture.shard_tokens=256".into(),
            format!("capture.hookpoints=[\"{HP}\"]"),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&self.root)
            .args(["--progress", "off", stage])
            .arg(file)
            .args(flags);
        for s in &all {
            cmd.arg("--set").arg(s);
        }
        cmd.output().unwrap()
    }

    fn run(&self, stage: &str, flags: &[&str], sets: &[&str]) -> Output {
        let eval = ["eval.eval_tokens=256"];
        let sets: Vec<&str> = eval.iter().chain(sets).copied().collect();
        self.run_file(&self.pipeline(), stage, flags, &sets)
    }

    fn train_set(&self) -> PathBuf {
        self.root.join("data/smoke/activations").join(HP)
    }
}

fn ok(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{what} failed: {err}");
    err
}

/// A clean failure (exit 1) whose stderr holds every needle.
fn fails(o: &Output, what: &str, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{what}: expected an error: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks '{n}': {err}");
    }
    err
}

#[test]
fn a_jsonl_without_the_text_field_names_data_text_column_and_setting_it_works() {
    let env = Env::new();
    let j = env.root.join("c.jsonl");
    let mut text = String::new();
    for doc in std::fs::read_to_string(&env.corpus).unwrap().split("\n\n") {
        text.push_str(&serde_json::json!({ "body": doc }).to_string());
        text.push('\n');
    }
    std::fs::write(&j, text).unwrap();
    let files = format!("data.files=[\"{}\"]", j.display());
    let o = env.run("capture", &[], &[&files]);
    fails(&o, "capture", &["no field 'text'", "set data.text_column"]);
    let o = env.run("capture", &[], &[&files, "data.text_column=body"]);
    ok(&o, "capture with data.text_column = body");
}

#[test]
fn a_glob_matching_an_unknown_format_says_to_list_only_text_files_and_that_works() {
    let env = Env::new();
    let dir = env.root.join("texts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&env.corpus, dir.join("a.txt")).unwrap();
    std::fs::write(dir.join("notes.csv"), "a,b\n1,2\n").unwrap();
    let all = format!("data.files=[\"{}/*\"]", dir.display());
    let o = env.run("capture", &[], &[&all]);
    fails(
        &o,
        "capture",
        &["notes.csv", "list only those in data.files"],
    );
    let only = format!("data.files=[\"{}/*.txt\"]", dir.display());
    ok(&env.run("capture", &[], &[&only]), "capture of *.txt");
}

#[test]
fn a_missing_or_truncated_shard_is_captured_again_and_training_then_works() {
    let env = Env::new();
    ok(&env.run("capture", &[], &[]), "capture");
    let set = env.train_set();
    let p1 = set.join("part-00001.parquet");
    let p2 = set.join("part-00002.parquet");
    let (b1, b2) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
    let manifest = std::fs::read(set.join("manifest.json")).unwrap();
    // What two racing writers left in issue 17: a listed shard of 4 bytes, another gone.
    std::fs::write(&p1, &b1[..4]).unwrap();
    std::fs::remove_file(&p2).unwrap();
    let o = env.run("train", &[], &[]);
    fails(
        &o,
        "train on a damaged set",
        &["part-0000", "saepipe capture"],
    );
    // The advice: capture again. It must not say "already captured" and stop there.
    let err = ok(&env.run("capture", &[], &[]), "capture after the damage");
    assert!(err.contains("captured again"), "{err}");
    assert_eq!(std::fs::read(&p1).unwrap(), b1, "shard 1 is restored");
    assert_eq!(std::fs::read(&p2).unwrap(), b2, "shard 2 is restored");
    assert_eq!(std::fs::read(set.join("manifest.json")).unwrap(), manifest);
    ok(&env.run("train", &[], &[]), "train after capture");
}

#[test]
fn a_shard_damaged_inside_is_named_and_capture_force_recaptures_it() {
    let env = Env::new();
    ok(&env.run("capture", &[], &[]), "capture");
    let p1 = env.train_set().join("part-00001.parquet");
    let good = std::fs::read(&p1).unwrap();
    // Same size, same footer: the header of the first page of the `act` column (the
    // column training reads) is zeroed.
    let act_page = {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let r = SerializedFileReader::new(std::fs::File::open(&p1).unwrap()).unwrap();
        let rg = r.metadata().row_group(0);
        let act = (0..rg.num_columns())
            .find(|&i| rg.column(i).column_path().parts()[0] == "act")
            .expect("an act column");
        rg.column(act).data_page_offset() as usize
    };
    let mut bad = good.clone();
    bad[act_page..act_page + 64].iter_mut().for_each(|b| *b = 0);
    std::fs::write(&p1, &bad).unwrap();
    let o = env.run("train", &[], &[]);
    fails(
        &o,
        "train on a damaged shard",
        &[
            "part-00001.parquet",
            "saepipe capture <pipeline.toml> --force",
        ],
    );
    let err = ok(&env.run("capture", &["--force"], &[]), "capture --force");
    assert!(err.contains("captured again"), "{err}");
    assert_eq!(std::fs::read(&p1).unwrap(), good, "the shard is restored");
    ok(&env.run("train", &[], &[]), "train after capture --force");
}

#[test]
fn an_unreadable_manifest_is_rebuilt_by_capture_force() {
    let env = Env::new();
    ok(&env.run("capture", &[], &[]), "capture");
    let m = env.train_set().join("manifest.json");
    let before = std::fs::read(&m).unwrap();
    std::fs::write(&m, b"{ not json").unwrap();
    let o = env.run("capture", &[], &[]);
    fails(&o, "capture", &["unreadable manifest", "--force"]);
    ok(&env.run("capture", &["--force"], &[]), "capture --force");
    assert_eq!(std::fs::read(&m).unwrap(), before);
    ok(&env.run("train", &[], &[]), "train");
}

#[test]
fn a_capture_of_another_config_is_replaced_with_force() {
    let env = Env::new();
    ok(&env.run("capture", &[], &[]), "capture");
    let o = env.run("capture", &[], &["data.n_tokens=768"]);
    fails(&o, "capture", &["config hash", "--force"]);
    ok(
        &env.run("capture", &["--force"], &["data.n_tokens=768"]),
        "capture --force",
    );
    ok(
        &env.run("train", &[], &["data.n_tokens=768"]),
        "train on the new capture",
    );
}

#[test]
fn each_stage_run_too_early_names_the_stage_to_run_and_that_works() {
    let env = Env::new();
    let o = env.run("train", &[], &[]);
    fails(&o, "train before capture", &["saepipe capture"]);
    ok(&env.run("capture", &[], &[]), "capture");
    let o = env.run("evaluate", &[], &[]);
    fails(&o, "evaluate before train", &["saepipe train"]);
    ok(&env.run("train", &[], &[]), "train");
    ok(&env.run("evaluate", &[], &[]), "evaluate");
}

#[test]
fn evaluation_without_a_held_out_split_says_how_to_capture_one_and_that_works() {
    let env = Env::new();
    // smoke.toml without eval.eval_tokens (which would be refused with data.eval_tokens = 0).
    let smoke = std::fs::read_to_string(env.pipeline()).unwrap();
    let at = smoke.find("[eval]").unwrap();
    let text = format!(
        "{}{}",
        &smoke[..at],
        smoke[at..].replacen("eval_tokens = 1024\n", "", 1)
    );
    let file = env.root.join("no-eval.toml");
    std::fs::write(&file, text).unwrap();
    let o = env.run_file(&file, "run", &[], &["data.eval_tokens=0"]);
    fails(
        &o,
        "run with data.eval_tokens = 0",
        &[
            "data.eval_tokens is 0",
            "--set data.eval_tokens=1024",
            "--force",
        ],
    );
    let o = env.run_file(&file, "run", &["--force"], &["data.eval_tokens=1024"]);
    ok(&o, "run --force with data.eval_tokens = 1024");
    assert!(env
        .root
        .join("data/smoke/results/metrics.parquet")
        .is_file());
}

#[test]
fn a_hookpoint_beyond_the_last_layer_names_the_layers_and_one_of_them_works() {
    let env = Env::new();
    let o = env.run(
        "capture",
        &[],
        &["capture.hookpoints=[\"blocks.7.hook_mlp_out\"]"],
    );
    fails(
        &o,
        "capture",
        &["blocks.7.hook_mlp_out", "use a layer in 0..=3"],
    );
    let o = env.run(
        "capture",
        &[],
        &["capture.hookpoints=[\"blocks.3.hook_mlp_out\"]"],
    );
    ok(&o, "capture at layer 3");
}

/// The pipeline-file messages that advise a change of key: each bad setting is refused
/// with its advice, and the setting the advice names loads (`saepipe download` loads the
/// file and resolves the local model and corpus, nothing more).
#[test]
fn config_advice_gives_a_file_that_loads() {
    let env = Env::new();
    let smoke = std::fs::read_to_string(env.pipeline()).unwrap();
    let file = env.root.join("no-sweep.toml");
    std::fs::write(&file, &smoke[..smoke.find("[sweep]").unwrap()]).unwrap();
    let cases: &[(&[&str], &str, &[&str])] = &[
        (
            &[
                "sae.arch={ kind = \"gated\" }",
                "train.optimizer={ kind = \"pam_sgd\" }",
            ],
            "use kind = \"adam\"",
            &["train.optimizer={ kind = \"adam\" }"],
        ),
        (
            &["run.name=my run"],
            "use letters, digits",
            &["run.name=my-run"],
        ),
        (
            &["data.eval_fraction=0.0"],
            "set it > 0 (e.g. 0.1)",
            &["data.eval_fraction=0.1"],
        ),
        (
            &["jsae={ layer = 1, k = 4, expansion_factor = 2 }"],
            "in capture.hookpoints; add it",
            &["capture.hookpoints=[\"blocks.1.hook_mlp_in\", \"blocks.1.hook_mlp_out\"]"],
        ),
    ];
    for (bad, advice, fix) in cases {
        let mut sets: Vec<&str> = vec!["eval.eval_tokens=256"];
        sets.extend(bad.iter());
        let o = env.run_file(&file, "download", &[], &sets);
        fails(&o, &format!("{bad:?}"), &[advice]);
        sets.extend(fix.iter());
        let o = env.run_file(&file, "download", &[], &sets);
        ok(&o, &format!("{bad:?} fixed by {fix:?}"));
    }
}
