//! `saepipe k8s` (issue 15 item 3): the manifests it writes for the tiny pipeline parse,
//! are Indexed Jobs sized by `saepipe units`, hand the completion index to the unit flag,
//! mount the claim, and `apply.sh` applies them in stage order, each after the previous
//! completed. No cluster is needed.

use crate::common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_saepipe");

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

#[test]
fn k8s_writes_indexed_jobs_sized_by_the_units_in_stage_order() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(&tmp.path().join("model"), 7, false);
    let corpus = common::write_corpus(tmp.path(), 1500, 3);
    let sets = vec![
        format!("model.source=local:{}", model.display()),
        format!("data.files=[\"{}\"]", corpus.display()),
        format!("run.data_dir={}", tmp.path().join("data").display()),
        "capture.shard_tokens=512".to_string(),
    ];
    let units: Value = serde_json::from_str(&saepipe(&["units", "--json"], &sets)).unwrap();
    let n_capture = (units["capture_train"].as_u64().unwrap()
        + units["capture_eval"].as_u64().unwrap()) as usize;
    let n_train = units["train"].as_array().unwrap().len();
    let n_eval = units["evaluate"].as_u64().unwrap() as usize;
    assert!(n_capture > 2, "{units}");
    assert_eq!((n_train, n_eval), (8, 8));

    let out = tmp.path().join("k8s");
    let listed = saepipe(
        &[
            "k8s",
            "--image",
            "ghcr.io/example/saepipe:1",
            "--pvc",
            "sweeps",
            "--gpus",
            "1",
            "--parallelism",
            "4",
            "--out",
            out.to_str().unwrap(),
        ],
        &sets,
    );
    let files: Vec<&str> = listed.lines().collect();
    assert_eq!(files.len(), 6, "{listed}");
    let cm: Value = serde_json::from_str(&std::fs::read_to_string(files[0]).unwrap()).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert!(cm["data"]["smoke.toml"]
        .as_str()
        .unwrap()
        .contains("[sweep]"));
    let expect = [
        ("capture", n_capture, Some("--shard")),
        ("finalize", 1, None),
        ("train", n_train, Some("--unit")),
        ("evaluate", n_eval, Some("--unit")),
        ("results", 1, None),
    ];
    let mut names = Vec::new();
    for (file, (stage, n, flag)) in files[1..].iter().zip(expect) {
        let j: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(j["apiVersion"], "batch/v1", "{file}");
        assert_eq!(j["kind"], "Job", "{file}");
        let spec = &j["spec"];
        assert_eq!(spec["completionMode"], "Indexed", "{file}");
        assert_eq!(spec["completions"], n as u64, "{file}");
        assert_eq!(spec["parallelism"], 4.min(n) as u64, "{file}");
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(
            pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "sweeps"
        );
        let c = &pod["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"/etc/saepipe/smoke.toml"), "{args:?}");
        assert!(
            args.iter().any(|a| a.starts_with("run.data_dir=")),
            "{args:?}"
        );
        match flag {
            Some(f) => {
                let at = args.iter().position(|a| a == &f).unwrap();
                assert_eq!(args[at + 1], "$(SAEPIPE_UNIT)", "{args:?}");
                let env = c["env"].as_array().unwrap();
                let unit = env.iter().find(|e| e["name"] == "SAEPIPE_UNIT").unwrap();
                assert_eq!(
                    unit["valueFrom"]["fieldRef"]["fieldPath"],
                    "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                );
                assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1);
            }
            None => {
                assert!(!args.iter().any(|a| a == &"--unit" || a == &"--shard"));
                assert!(
                    c["resources"].get("limits").is_none(),
                    "{stage} asks for a GPU"
                );
            }
        }
        assert_eq!(
            args[2],
            if stage == "finalize" {
                "capture"
            } else {
                stage
            }
        );
        names.push(j["metadata"]["name"].as_str().unwrap().to_string());
    }
    // apply.sh: each Job applied, then waited for, before the next.
    let apply = std::fs::read_to_string(out.join("apply.sh")).unwrap();
    let mut at = 0;
    for n in &names {
        let a = apply[at..]
            .find("apply -f")
            .unwrap_or_else(|| panic!("{apply}"));
        let w = apply[at..]
            .find(&format!(
                "wait --for=condition=complete --timeout=\"$TIMEOUT\" job/{n}"
            ))
            .unwrap_or_else(|| panic!("no wait for {n} in {apply}"));
        assert!(a < w, "{apply}");
        at += w + 1;
    }
}
