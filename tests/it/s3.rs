//! `run.data_dir = "s3://bucket/prefix"` against a real S3-compatible server (issue 15 item
//! 4): moto's standalone server, started here on localhost with IAM authentication on, so
//! wrong keys are refused as AWS refuses them.
//!
//! - Round trip: capture, train and evaluate of the smoke pipeline, each from its own
//!   empty staging folder (three "machines"): train and evaluate stream the shards from the
//!   bucket (no `part-*.parquet` ever lands in their staging folders), and the metrics
//!   equal a local-folder `saepipe run` apart from the wall-clock and path columns.
//! - A capture killed (SIGKILL) while a multipart upload is open leaves neither that object
//!   nor any manifest visible; the re-run completes, and a fresh machine then finds the
//!   capture done without recapturing.
//! - Bad credentials and a missing bucket fail with a message naming the bucket and the fix.
//!
//! The server's Python comes from `SAEPIPE_MOTO` (set by `make test` through
//! scripts/test_moto.sh), else `.venv-moto/bin/python`. Without one the tests print
//! "skipped: no moto" and pass, unless `SAEPIPE_REQUIRE_S3=1` (set by `.ci/run`).

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");
/// Columns that are wall-clock measurements or paths of the run folder.
const VOLATILE: [&str; 3] = ["train_seconds", "train_tokens_per_s", "sae_path"];
const BUCKET: &str = "runs";

/// Creates an IAM user with an allow-all policy and an access key, and the bucket: the
/// four requests the server lets through before it enforces authentication.
const SETUP: &str = r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="saepipe")
iam.put_user_policy(UserName="saepipe", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="saepipe")["AccessKey"]
boto3.client("s3", **kw).create_bucket(Bucket=sys.argv[2])
print(k["AccessKeyId"], k["SecretAccessKey"])
"#;

/// Prints every object as `key size`, then every open multipart upload as `UPLOAD key`.
const LIST: &str = r#"
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2]):
    for o in page.get("Contents", []):
        print(o["Key"], o["Size"])
for u in s3.list_multipart_uploads(Bucket=sys.argv[2]).get("Uploads", []):
    print("UPLOAD", u["Key"])
"#;

/// A moto server on a free localhost port, with a user and the bucket; killed on drop.
struct Moto {
    child: Child,
    python: PathBuf,
    endpoint: String,
    key: String,
    secret: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_python() -> Option<PathBuf> {
    let p = std::env::var_os("SAEPIPE_MOTO")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-moto/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import moto.server, boto3"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(p)
}

/// Start the server, or `None` (after saying so) when there is no moto and it is not
/// required.
fn moto(test: &str) -> Option<Moto> {
    let Some(python) = moto_python() else {
        assert!(
            std::env::var("SAEPIPE_REQUIRE_S3").as_deref() != Ok("1"),
            "SAEPIPE_REQUIRE_S3=1 but no Python with moto: run `bash scripts/test_moto.sh` \
             (or `make test`, which does) or set SAEPIPE_MOTO"
        );
        eprintln!(
            "{test}: skipped: no moto (run `bash scripts/test_moto.sh`, or `make test`, which \
             sets SAEPIPE_MOTO; SAEPIPE_REQUIRE_S3=1 makes this a failure)"
        );
        return None;
    };
    let t0 = Instant::now();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let child = Command::new(&python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut m = Moto {
        child,
        python,
        endpoint: format!("http://127.0.0.1:{port}"),
        key: String::new(),
        secret: String::new(),
    };
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            m.child.try_wait().unwrap().is_none(),
            "moto server exited at start"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "moto never listened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = Command::new(&m.python)
        .args(["-c", SETUP, &m.endpoint, BUCKET])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moto setup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (k, s) = text.trim().split_once(' ').unwrap();
    (m.key, m.secret) = (k.to_string(), s.to_string());
    eprintln!("{test}: moto up in {:.1}s", t0.elapsed().as_secs_f64());
    Some(m)
}

impl Moto {
    /// Objects (key → size) and open multipart uploads (keys) of the bucket.
    fn list(&self) -> (BTreeMap<String, u64>, Vec<String>) {
        let out = Command::new(&self.python)
            .args(["-c", LIST, &self.endpoint, BUCKET, &self.key, &self.secret])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut objects = BTreeMap::new();
        let mut uploads = Vec::new();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let (a, b) = l.rsplit_once(' ').unwrap();
            if a == "UPLOAD" {
                uploads.push(b.to_string());
            } else {
                objects.insert(a.to_string(), b.parse().unwrap());
            }
        }
        (objects, uploads)
    }

    /// A saepipe command on the smoke pipeline with this server's credentials and the
    /// staging folder `stage`.
    fn saepipe(&self, args: &[&str], sets: &[String], stage: &Path) -> Command {
        let mut cmd = saepipe(args, sets);
        cmd.env("AWS_ACCESS_KEY_ID", &self.key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("SAEPIPE_STAGING_DIR", stage);
        cmd
    }
}

fn saepipe(args: &[&str], sets: &[String]) -> Command {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml");
    let mut cmd = Command::new(BIN);
    cmd.args(["--progress", "off"]).args(args).arg(&smoke);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.arg("--offline");
    for k in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT",
        "AWS_DEFAULT_REGION",
    ] {
        cmd.env_remove(k);
    }
    cmd
}

fn ok(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sets(tmp: &Path, data_dir: &str) -> Vec<String> {
    let model = common::tiny_llama(&tmp.join("model"), 7, false);
    let corpus = common::write_corpus(tmp, 1500, 3);
    vec![
        format!("model.source=local:{}", model.display()),
        format!("data.files=[\"{}\"]", corpus.display()),
        format!("run.data_dir={data_dir}"),
        // Several shards per set (32-token windows, 16 per shard).
        "capture.shard_tokens=512".into(),
    ]
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

fn assert_tables_equal(a: &Path, b: &Path) {
    let (x, y) = (read(a), read(b));
    assert_eq!(x.num_rows(), y.num_rows(), "row counts of {a:?} and {b:?}");
    for f in x.schema().fields() {
        let name = f.name();
        if VOLATILE.contains(&name.as_str()) {
            continue;
        }
        let cy = y
            .column_by_name(name)
            .unwrap_or_else(|| panic!("{b:?} lacks column {name}"));
        assert_eq!(
            x.column_by_name(name).unwrap().to_data(),
            cy.to_data(),
            "column {name} differs between the local run and the S3 run"
        );
    }
}

/// Files under `dir` whose name matches `pred`.
fn files(dir: &Path, pred: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if pred(&e.file_name().to_string_lossy()) {
                out.push(p);
            }
        }
    }
    out
}

fn is_shard(name: &str) -> bool {
    name.starts_with("part-") && name.ends_with(".parquet")
}

#[test]
fn capture_train_evaluate_through_s3_equal_a_local_run_and_stream_the_shards() {
    let Some(moto) = moto("s3 round trip") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let remote = sets(tmp.path(), &format!("s3://{BUCKET}/sweeps"));
    let t0 = Instant::now();
    // Each stage on its own "machine": an empty staging folder.
    let stage = |n: &str| tmp.path().join(format!("stage-{n}"));
    ok(
        moto.saepipe(&["capture"], &remote, &stage("capture")),
        "capture",
    );
    ok(moto.saepipe(&["train"], &remote, &stage("train")), "train");
    let table = ok(
        moto.saepipe(&["evaluate"], &remote, &stage("evaluate")),
        "evaluate",
    );
    let s3_secs = t0.elapsed().as_secs_f64();
    assert!(table.contains("blocks.0.hook_mlp_out"), "{table}");

    let (objects, uploads) = moto.list();
    assert!(uploads.is_empty(), "open multipart uploads: {uploads:?}");
    let run = "sweeps/smoke";
    for k in [
        "config.resolved.toml",
        "activations/blocks.0.hook_mlp_out/manifest.json",
        "activations/blocks.1.hook_resid_mid/eval/manifest.json",
        "results/metrics.parquet",
        "results/pareto.parquet",
        "results/pareto.svg",
    ] {
        assert!(
            objects.contains_key(&format!("{run}/{k}")),
            "{k} missing: {objects:?}"
        );
    }
    let n_shards = objects
        .keys()
        .filter(|k| is_shard(k.rsplit('/').next().unwrap()))
        .count();
    let n_done = objects
        .keys()
        .filter(|k| k.ends_with("/train_done.json"))
        .count();
    assert!(n_shards >= 8, "{objects:?}");
    assert_eq!(n_done, 8, "4 grid points x 2 hookpoints: {objects:?}");
    assert!(!objects
        .keys()
        .any(|k| k.ends_with(".tmp") || k.ends_with(".lock")));
    // Train and evaluate read the activations from the bucket, never a local copy.
    for m in ["train", "evaluate"] {
        let local = files(&stage(m), &is_shard);
        assert!(local.is_empty(), "{m} downloaded shards: {local:?}");
    }

    let t1 = Instant::now();
    let data = tmp.path().join("data");
    ok(
        saepipe(&["run"], &sets(tmp.path(), &data.display().to_string())),
        "local run",
    );
    eprintln!(
        "s3 round trip: capture+train+evaluate through s3 {s3_secs:.1}s, the same run on a local folder {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    let s3_metrics = stage("evaluate").join("runs/sweeps/smoke/results/metrics.parquet");
    assert_tables_equal(&data.join("smoke/results/metrics.parquet"), &s3_metrics);
}

#[test]
fn a_capture_killed_mid_upload_leaves_nothing_partial_and_resumes() {
    let Some(moto) = moto("s3 kill") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let remote = sets(tmp.path(), &format!("s3://{BUCKET}/killed"));
    let stage = tmp.path().join("stage");
    let mut cmd = moto.saepipe(&["capture"], &remote, &stage);
    // Every file goes up as a multipart upload; the first one stalls after its first part.
    cmd.env("SAEPIPE_S3_MULTIPART_BYTES", "1")
        .env("SAEPIPE_S3_TEST_STALL_SECS", "600")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut stalled = None;
    let mut log = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.strip_prefix("s3: test stall: part 1 of ") {
            stalled = rest.split(' ').next().map(str::to_string);
            break;
        }
    }
    let stalled = stalled.unwrap_or_else(|| panic!("no upload stalled: {log}"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (objects, uploads) = moto.list();
    assert!(
        !objects.contains_key(&stalled),
        "the killed upload {stalled} is visible"
    );
    assert!(
        uploads.contains(&stalled),
        "moto should still hold the open upload of {stalled}: {uploads:?}"
    );
    assert!(
        !objects.keys().any(|k| k.ends_with("manifest.json")),
        "a manifest went up before its shards: {objects:?}"
    );

    // The re-run (same machine) uploads everything; its manifests list shards all there.
    ok(
        moto.saepipe(&["capture"], &remote, &stage),
        "capture after the kill",
    );
    let (objects, _) = moto.list();
    let manifests: Vec<&String> = objects
        .keys()
        .filter(|k| k.ends_with("manifest.json"))
        .collect();
    assert_eq!(manifests.len(), 4, "{objects:?}");
    for m in manifests {
        let local = stage.join(BUCKET).join(m);
        let text = std::fs::read_to_string(&local).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let dir = m.rsplit_once('/').unwrap().0;
        for s in json["shards"].as_array().unwrap() {
            let key = format!("{dir}/{}", s["file"].as_str().unwrap());
            assert_eq!(
                objects.get(&key).copied(),
                s["bytes"].as_u64(),
                "{key}: size on the bucket vs the manifest"
            );
        }
    }
    // Another machine finds the capture done, without recapturing or downloading shards.
    let fresh = tmp.path().join("fresh");
    let out = moto
        .saepipe(&["-v", "capture"], &remote, &fresh)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("already captured"), "{err}");
    assert!(files(&fresh, &is_shard).is_empty());
}

#[test]
fn bad_credentials_and_a_missing_bucket_name_the_bucket_and_the_fix() {
    let Some(moto) = moto("s3 credentials") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    let mut cmd = moto.saepipe(
        &["capture"],
        &sets(tmp.path(), &format!("s3://{BUCKET}/sweeps")),
        &stage,
    );
    cmd.env("AWS_SECRET_ACCESS_KEY", "wrong");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        "s3://runs/sweeps/smoke",
        "access denied",
        "bucket 'runs'",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }

    let mut cmd = moto.saepipe(
        &["capture"],
        &sets(tmp.path(), "s3://no-such-bucket/sweeps"),
        &stage,
    );
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in ["s3://no-such-bucket", "no such bucket", "aws s3 mb"] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
}

#[test]
fn array_tasks_on_separate_machines_share_the_run_through_the_bucket() {
    let Some(moto) = moto("s3 array tasks") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let remote = sets(tmp.path(), &format!("s3://{BUCKET}/array"));
    let stage = |n: &str| tmp.path().join(format!("stage-{n}"));
    let listing: serde_json::Value = serde_json::from_str(&ok(
        moto.saepipe(&["units", "--json"], &remote, &stage("units")),
        "units",
    ))
    .unwrap();
    let n = (listing["capture_train"].as_u64().unwrap() + listing["capture_eval"].as_u64().unwrap())
        as usize;
    assert!(n >= 4, "{listing}");
    // Two shard tasks on two machines, then finalize on a third: it sees the shards of
    // both on the bucket only.
    let half = n / 2;
    for (m, range) in [("a", format!("0..{half}")), ("b", format!("{half}..{n}"))] {
        ok(
            moto.saepipe(&["capture", "--shard", &range], &remote, &stage(m)),
            "capture --shard",
        );
    }
    let (objects, _) = moto.list();
    assert!(!objects.keys().any(|k| k.ends_with("manifest.json")));
    ok(
        moto.saepipe(&["capture", "--finalize"], &remote, &stage("finalize")),
        "capture --finalize",
    );
    assert!(files(&stage("finalize"), &is_shard).is_empty());
    // One train unit and its evaluation, each on a machine of its own.
    ok(
        moto.saepipe(&["train", "--unit", "3"], &remote, &stage("train")),
        "train --unit 3",
    );
    ok(
        moto.saepipe(&["evaluate", "--unit", "3"], &remote, &stage("evaluate")),
        "evaluate --unit 3",
    );
    let (objects, _) = moto.list();
    let manifests = objects
        .keys()
        .filter(|k| k.ends_with("manifest.json"))
        .count();
    assert_eq!(manifests, 4, "{objects:?}");
    let metrics: Vec<&String> = objects
        .keys()
        .filter(|k| k.ends_with("/metrics.json"))
        .collect();
    assert_eq!(metrics.len(), 1, "{objects:?}");
    let unit = listing["train"][3]["dir"].as_str().unwrap();
    let unit_rel = unit.rsplit_once("/saes/").unwrap().1;
    assert!(
        metrics[0].ends_with(&format!("saes/{unit_rel}/metrics.json")),
        "{metrics:?} vs {unit}"
    );
}
