//! `saepipe k8s`: one Kubernetes Indexed Job per stage (`completionMode: Indexed`,
//! `completions` = the stage's units; pod `i` runs unit `i`, read from
//! `JOB_COMPLETION_INDEX`), the pipeline file in a ConfigMap, and `apply.sh`, which
//! applies the Jobs one after the other and waits for each to complete
//! (`kubectl wait --for=condition=complete`) before the next: the ordering between stages
//! is the script's, not the cluster's.
//!
//! Decision: the manifests are JSON, which is YAML and which `kubectl apply -f` reads as
//! is; serde_yaml is archived (unmaintained since 2024) and its forks are young, so no
//! YAML writer is added for what serde_json writes exactly.
//! Decision: the index reaches the command through an env var of the container's own
//! (`SAEPIPE_UNIT`, from the pod's `batch.kubernetes.io/job-completion-index`
//! annotation, which is what `JOB_COMPLETION_INDEX` is), so `$(SAEPIPE_UNIT)` in `args`
//! is expanded by Kubernetes itself and the image needs no shell.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{sh_quote, stages, Invocation, Stage};
use crate::pipeline::units::Units;

/// The ConfigMap key and mount folder of the pipeline file.
pub const PIPELINE_MOUNT: &str = "/etc/saepipe";

/// What every pod gets.
#[derive(Debug, Clone)]
pub struct K8sOptions {
    /// Container image with saepipe on its PATH (or at [`K8sOptions::binary`]).
    pub image: String,
    /// The saepipe binary inside the image.
    pub binary: String,
    /// Namespace of every object.
    pub namespace: String,
    /// A ReadWriteMany PersistentVolumeClaim holding run.data_dir and the hub cache.
    pub pvc: String,
    /// Where the claim is mounted.
    pub mount: String,
    /// `nvidia.com/gpu` per pod (0: none).
    pub gpus: u32,
    /// Pods of a stage at once.
    pub parallelism: usize,
    /// Retries of each index before the Job fails (`backoffLimitPerIndex`).
    pub retries: u32,
}

/// A name Kubernetes accepts (RFC 1123 label: lowercase alphanumerics and `-`).
pub fn k8s_name(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(50);
    out.trim_matches('-').to_string()
}

/// The Job of one stage.
pub fn job(stage: &Stage, inv: &Invocation, opts: &K8sOptions, run_name: &str) -> Value {
    let name = k8s_name(&format!("saepipe-{run_name}-{}", stage.name));
    let mut unit: Vec<&str> = stage.extra.to_vec();
    if let Some(flag) = stage.index_flag {
        unit.push(flag);
        unit.push("$(SAEPIPE_UNIT)");
    }
    let args = inv.args(stage.command, &unit);
    let mut resources = json!({});
    if opts.gpus > 0 && stage.name != "results" && stage.name != "finalize" {
        resources = json!({ "limits": { "nvidia.com/gpu": opts.gpus } });
    }
    // The hub cache lives on the claim too, filled before the Jobs run.
    let mut env = vec![
        json!({ "name": "HF_HUB_OFFLINE", "value": "1" }),
        json!({ "name": "HF_HOME", "value": format!("{}/huggingface", opts.mount.trim_end_matches('/')) }),
    ];
    if stage.index_flag.is_some() {
        env.push(json!({
            "name": "SAEPIPE_UNIT",
            "valueFrom": { "fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            } }
        }));
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": opts.namespace,
            "labels": { "app.kubernetes.io/name": "saepipe", "saepipe/run": k8s_name(run_name), "saepipe/stage": stage.name }
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": stage.tasks,
            "parallelism": opts.parallelism.max(1).min(stage.tasks),
            "backoffLimitPerIndex": opts.retries,
            "backoffLimit": (opts.retries as usize + 1) * stage.tasks,
            "template": {
                "metadata": { "labels": { "app.kubernetes.io/name": "saepipe", "saepipe/stage": stage.name } },
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "saepipe",
                        "image": opts.image,
                        "command": [opts.binary],
                        "args": args,
                        "env": env,
                        "resources": resources,
                        "volumeMounts": [
                            { "name": "data", "mountPath": opts.mount },
                            { "name": "pipeline", "mountPath": PIPELINE_MOUNT, "readOnly": true }
                        ]
                    }],
                    "volumes": [
                        { "name": "data", "persistentVolumeClaim": { "claimName": opts.pvc } },
                        { "name": "pipeline", "configMap": { "name": k8s_name(&format!("saepipe-{run_name}-pipeline")) } }
                    ]
                }
            }
        }
    })
}

/// The ConfigMap that carries the pipeline file.
pub fn config_map(
    pipeline_text: &str,
    file_name: &str,
    opts: &K8sOptions,
    run_name: &str,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": k8s_name(&format!("saepipe-{run_name}-pipeline")),
            "namespace": opts.namespace,
            "labels": { "app.kubernetes.io/name": "saepipe", "saepipe/run": k8s_name(run_name) }
        },
        "data": { file_name: pipeline_text }
    })
}

/// The files written: manifests in apply order, then `apply.sh`.
#[derive(Debug, Clone)]
pub struct Written {
    /// The ConfigMap and the Jobs.
    pub manifests: Vec<PathBuf>,
    /// `apply.sh`.
    pub apply: PathBuf,
}

/// Write the manifests of `units` into `out`. `inv.pipeline` must already be the path
/// inside the pod ([`PIPELINE_MOUNT`]/file name).
pub fn write(
    out: &Path,
    units: &Units,
    inv: &Invocation,
    opts: &K8sOptions,
    run_name: &str,
    pipeline_text: &str,
) -> std::io::Result<Written> {
    std::fs::create_dir_all(out)?;
    let file_name = inv
        .pipeline
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline.toml".into());
    let mut manifests = Vec::new();
    let cm = out.join("00-pipeline.json");
    let text = serde_json::to_string_pretty(&config_map(pipeline_text, &file_name, opts, run_name))
        .map_err(std::io::Error::other)?;
    crate::util::fs::atomic_write(&cm, text.as_bytes())?;
    manifests.push(cm);
    let mut script = String::from(
        "#!/usr/bin/env bash\n# Generated by `saepipe k8s`. Applies the stages' Indexed Jobs in order, each after the\n# previous one completed. To resume a partly failed sweep run it again: finished units\n# are skipped by their pods, only the missing ones are computed.\nset -euo pipefail\nhere=\"$(cd \"$(dirname \"$0\")\" && pwd)\"\nKUBECTL=\"${KUBECTL:-kubectl}\"\nTIMEOUT=\"${TIMEOUT:-168h}\"\n",
    );
    script.push_str("\"$KUBECTL\" apply -f \"$here/00-pipeline.json\"\n");
    for (i, st) in stages(units).iter().enumerate() {
        let j = job(st, inv, opts, run_name);
        let name = j["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let file = format!("{:02}-{}.json", i + 1, st.name);
        let path = out.join(&file);
        let text = serde_json::to_string_pretty(&j).map_err(std::io::Error::other)?;
        crate::util::fs::atomic_write(&path, text.as_bytes())?;
        manifests.push(path);
        // A Job's spec is immutable and a finished one stays: replace it on a rerun.
        script.push_str(&format!(
            "echo \"{stage}: {tasks} pod(s)\"\n\"$KUBECTL\" -n {ns} delete job {name} --ignore-not-found\n\"$KUBECTL\" apply -f \"$here/{file}\"\n\"$KUBECTL\" -n {ns} wait --for=condition=complete --timeout=\"$TIMEOUT\" job/{name}\n",
            stage = st.name,
            tasks = st.tasks,
            ns = sh_quote(&opts.namespace),
        ));
    }
    let apply = out.join("apply.sh");
    crate::util::fs::atomic_write(&apply, script.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&apply, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(Written { manifests, apply })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_rfc1123_labels() {
        assert_eq!(k8s_name("saepipe-My_Run.1-train"), "saepipe-my-run-1-train");
    }
}
