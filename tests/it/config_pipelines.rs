//! Pipeline files: every file in pipelines/ loads; a broken file reports every problem at
//! once with key paths; overrides, the resolved config and its hash, sweep points.

use std::path::{Path, PathBuf};

use saepipe::config::{self, ConfigError};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// An integer of the arch table, whatever type carries it (works with the TOML-table
/// placeholder and with `sae::ArchConfig`).
fn arch_key(arch: &config::ArchConfig, key: &str) -> Option<i64> {
    toml::Value::try_from(arch).ok()?.get(key)?.as_integer()
}

fn smoke() -> PathBuf {
    root().join("pipelines/smoke.toml")
}

#[test]
fn every_pipeline_file_loads_and_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let p = config::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.hash().len(), 64);
        let ids: std::collections::BTreeSet<_> =
            p.points().iter().map(|pt| pt.id.clone()).collect();
        assert_eq!(
            ids.len(),
            p.points().len(),
            "{}: point ids must be distinct",
            path.display()
        );
        assert!(!p.points().is_empty());
        n += 1;
    }
    assert!(n >= 1, "no pipeline files found");
}

fn problems(text: &str, sets: &[&str]) -> (String, Vec<(String, String)>) {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match config::from_str(text, Path::new("pipelines/broken.toml"), &sets) {
        Err(e @ ConfigError::Invalid { .. }) => {
            let msg = e.to_string();
            let ConfigError::Invalid { problems, .. } = e else {
                unreachable!()
            };
            (
                msg,
                problems.into_iter().map(|p| (p.key, p.message)).collect(),
            )
        }
        Err(e) => panic!("expected Invalid, got {e}"),
        Ok(_) => panic!("expected problems"),
    }
}

const BROKEN: &str = r#"
[run]
name = "broken"

[model]
source = "EleutherAI/pythia-70m"

[data]
files = ["corpus.txt"]
context_len = 0
n_tokens = 1000

[capture]
hookpoints = ["blocks.1.hook_mlp_out", "blocks.x.hook_mlp", "blocks.2.hook_bogus"]

[train]
lr_warmup = 100
batch_tokens = "big"

[sae]
expansion_factor = 8
d_sae = 1024
arch = { kind = "topk", k = 32 }

[evals]
ce_sequences = 2
"#;

#[test]
fn every_problem_is_reported_at_once_with_its_key() {
    let (msg, probs) = problems(BROKEN, &[]);
    let find = |key: &str| {
        probs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| panic!("no problem at {key}; got {probs:#?}"))
    };
    assert!(msg.starts_with("pipelines/broken.toml: "), "{msg}");
    assert!(find("data.context_len").contains("must be >= 2"));
    assert!(find("model.revision").contains("required for hub repo EleutherAI/pythia-70m"));
    assert!(find("capture.hookpoints[1]").contains("'blocks.x.hook_mlp' is not a hookpoint name"));
    assert!(find("capture.hookpoints[2]").contains("unknown hook site"));
    assert!(find("train.lr_warmup").contains("unknown key; did you mean lr_warmup_steps?"));
    assert!(find("train.batch_tokens").contains("invalid type"));
    assert!(find("sae").contains("not both"));
    assert!(find("evals").contains("did you mean eval?"));
    assert_eq!(probs.len(), 8, "{probs:#?}");
    // One line per problem in the message.
    assert!(msg.contains("8 problems"), "{msg}");
    assert!(msg.contains("\n  - train.lr_warmup: unknown key"), "{msg}");
}

#[test]
fn missing_sections_and_keys_are_named() {
    let (_, probs) = problems("[run]\nnaem = \"x\"\n[sae]\nexpansion_factor = 2\n", &[]);
    let keys: Vec<&str> = probs.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "model", "data", "capture", "run.name", "run.naem", "sae.arch",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
}

#[test]
fn overrides_apply_and_unknown_override_keys_are_errors() {
    let p = config::load(
        smoke(),
        &[
            "train.batch_tokens=512".into(),
            "model.source=local:/tmp/x".into(),
            "sae.arch={ kind = \"topk\", k = 3 }".into(),
        ],
    )
    .unwrap();
    assert_eq!(p.config.train.batch_tokens, 512);
    assert_eq!(p.config.model.source, "local:/tmp/x");
    assert_eq!(arch_key(&p.config.sae.arch, "k"), Some(3));

    let err = config::load(
        smoke(),
        &["train.batch_tokenz=1".into(), "data.context_len=0".into()],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("smoke.toml"), "{msg}");
    assert!(
        msg.contains("train.batch_tokenz: unknown key; did you mean batch_tokens?"),
        "{msg}"
    );
    assert!(msg.contains("data.context_len: must be >= 2"), "{msg}");
}

#[test]
fn resolved_config_roundtrips_with_the_same_hash() {
    let p = config::load(smoke(), &["run.seed=7".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    p.write_resolved(dir.path()).unwrap();
    let back = config::load(dir.path().join(config::RESOLVED_FILE), &[]).unwrap();
    assert_eq!(back.hash(), p.hash());
    assert_eq!(back.config, p.config);
    let hash_file = std::fs::read_to_string(dir.path().join(config::HASH_FILE)).unwrap();
    assert_eq!(hash_file.trim(), p.hash());
    assert_eq!(p.short_hash(), &p.hash()[..8]);
    // Defaults are written out.
    assert!(p.resolved_toml().contains("exclude_special_tokens = true"));

    // The hash follows the content, but not the offline switch.
    let other = config::load(smoke(), &["run.seed=8".into()]).unwrap();
    assert_ne!(other.hash(), p.hash());
    let offline = config::load(smoke(), &["run.seed=7".into(), "run.offline=true".into()]).unwrap();
    assert_eq!(offline.hash(), p.hash());
}

#[test]
fn sweep_points_are_the_cartesian_product_with_stable_ids() {
    let p = config::load(smoke(), &[]).unwrap();
    let pts = p.points();
    assert_eq!(pts.len(), 4);
    let mut seen = std::collections::BTreeSet::new();
    for pt in pts {
        let k = arch_key(&pt.config.sae.arch, "k").unwrap();
        let s = pt.config.run.seed;
        assert!(pt.id.starts_with(&format!("topk-k{k}-s{s}-")), "{}", pt.id);
        assert!(pt.config.sweep.is_empty());
        assert!(seen.insert(pt.id.clone()));
    }
    let again = config::load(smoke(), &["train.batch_tokens=512".into()]).unwrap();
    let ids: Vec<_> = again.points().iter().map(|p| p.id.clone()).collect();
    assert_eq!(
        ids,
        pts.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        "ids depend only on the overrides"
    );
    assert_eq!(p.point(&pts[2].id).unwrap().id, pts[2].id);
    assert!(p
        .point("nope")
        .unwrap_err()
        .to_string()
        .contains(&pts[0].id));
}

#[test]
fn bad_sweep_values_are_reported_with_the_point() {
    let err = config::load(
        smoke(),
        &["sweep={ \"sae.expansion_factor\" = [2, 0] }".into()],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("sae.expansion_factor: must be > 0 (in sweep point"),
        "{msg}"
    );
    let err = config::load(smoke(), &["sweep={ \"sea.x\" = [1] }".into()]).unwrap_err();
    assert!(err.to_string().contains("did you mean sae?"), "{err}");
}

#[test]
fn table_values_couple_axes_for_paired_variants() {
    // Gated at 2H against TopK at H: one axis whose values set width and arch together
    // (a table with `kind` replaces the arch; a plain table merges into [sae]).
    let text = std::fs::read_to_string(smoke()).unwrap();
    let base = &text[..text.find("[sweep]").unwrap()];
    let text = format!(
        "{base}[sweep]\n\"run.seed\" = [0, 1]\nsae = [{{ expansion_factor = 2, arch = {{ kind = \"gated\" }} }}, {{ expansion_factor = 1, arch = {{ kind = \"topk\", k = 8 }} }}]\n"
    );
    let p = config::from_str(&text, Path::new("paired.toml"), &[]).unwrap();
    let ids: Vec<&str> = p.points().iter().map(|pt| pt.id.as_str()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let gated: Vec<_> = p
        .points()
        .iter()
        .filter(|pt| pt.id.starts_with("gated-x2-"))
        .collect();
    assert_eq!(gated.len(), 2, "{ids:?}");
    for pt in &gated {
        assert_eq!(pt.config.sae.expansion_factor, Some(2));
        // The gated arch does not inherit the base topk's k.
        assert_eq!(arch_key(&pt.config.sae.arch, "k"), None);
    }
    assert!(
        ids.iter().any(|id| id.starts_with("topk-x1-k8-s1-")),
        "{ids:?}"
    );
}

#[test]
fn root_axis_couples_sections_and_pam_sgd_is_refused_where_unsupported() {
    let p = config::load(root().join("pipelines/pam-kmeans-smollm2.toml"), &[]).unwrap();
    let pts = p.points();
    assert_eq!(pts.len(), 9);
    let pam: Vec<&str> = pts
        .iter()
        .filter(|pt| pt.config.train.optimizer.kind() == "pam_sgd")
        .map(|pt| pt.config.sae.arch.kind())
        .collect();
    assert_eq!(pam, ["topk", "topk", "relu_l1"]);
    // the optimiser shows in the id; the Adam twin has a different one
    let ids: Vec<&str> = pts.iter().map(|pt| pt.id.as_str()).collect();
    assert!(
        ids.iter().any(|i| i.starts_with("topk-k16-pam_sgd-")),
        "{ids:?}"
    );
    assert!(ids.iter().any(|i| i.starts_with("kmeans-x1-")), "{ids:?}");
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), ids.len());
    // a PAM-SGD point on a variant it cannot train is an error naming the key
    let text = std::fs::read_to_string(smoke()).unwrap();
    let base = &text[..text.find("[sweep]").unwrap()];
    let (msg, probs) = problems(
        &format!(
            "{base}[sweep]\n\".\" = [{{ sae = {{ arch = {{ kind = \"gated\" }} }}, train = {{ optimizer = {{ kind = \"pam_sgd\" }} }} }}]\n"
        ),
        &[],
    );
    assert!(
        probs
            .iter()
            .any(|(k, m)| k == "train.optimizer.kind" && m.contains("topk, relu_l1")),
        "{msg}"
    );
    let (msg, probs) = problems(
        &format!("{base}[sweep]\n\".\" = [{{ sea = {{ d_sae = 4 }} }}, 3]\n"),
        &[],
    );
    assert!(probs.iter().any(|(k, _)| k.contains("[0].sea")), "{msg}");
    assert!(probs.iter().any(|(k, _)| k.ends_with("[1]")), "{msg}");
}
