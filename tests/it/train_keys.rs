//! Every key of `[train]` and `[sae]` has an effect on training (issue 12, "config that
//! tells the truth"): each is changed from `pipelines/smoke.toml`'s value, the SAE is
//! trained for a few steps by the real engine on the same rows, and something the user can
//! see differs: the weights, the training log, or the steps at which checkpoints are due.
//! A key added to either section without a line here fails
//! `every_train_and_sae_key_is_covered`.

use std::collections::BTreeSet;
use std::path::Path;

use saepipe::config::{self, Pipeline};
use saepipe::store::InMemorySource;
use saepipe::train::Trainer;

const D: usize = 16;

/// What one short training run shows.
#[derive(Debug, PartialEq)]
struct Seen {
    weights: Vec<Vec<u32>>,
    log_columns: Vec<String>,
    log_rows: usize,
    checkpoint_steps: Vec<u64>,
    d_sae: usize,
}

fn rows(n: usize) -> Vec<f32> {
    // Sparse-ish, non-centred rows so that every init and schedule choice matters.
    let mut s = 7u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % 10_000) as f32 / 10_000.0
    };
    (0..n * D)
        .map(|i| {
            let v = next();
            if v > 0.7 {
                v * 4.0 + (i % D) as f32 * 0.1
            } else {
                0.05 * v
            }
        })
        .collect()
}

/// `pipelines/smoke.toml` without its `[sweep]` (one point), written to a temp file;
/// `d_sae` replaces `expansion_factor` when asked.
fn write_pipeline(dir: &Path, d_sae: bool) -> std::path::PathBuf {
    let smoke =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml"))
            .unwrap();
    let mut text = smoke[..smoke.find("[sweep]").unwrap()].to_string();
    if d_sae {
        text = text.replace("expansion_factor = 2", "d_sae = 24");
    }
    let f = dir.join(if d_sae { "d_sae.toml" } else { "base.toml" });
    std::fs::write(&f, text).unwrap();
    f
}

fn load_from(file: &Path, sets: &[&str]) -> Pipeline {
    let mut all: Vec<String> = vec![
        // 40 steps of 32 tokens, every step logged, no checkpoint by default. (The engine
        // caps the LR warmup at 10% of the run: at 40 steps, 4 warmup steps count.)
        "data.n_tokens=1280".into(),
        "train.batch_tokens=32".into(),
        "train.log_every=1".into(),
        "train.lr_warmup_steps=4".into(),
        "train.l1_warmup_steps=1".into(),
        "train.dead_after_tokens=64".into(),
        "train.init_tokens=128".into(),
        "sae.arch={ kind = \"relu_l1\", l1_coefficient = 0.5 }".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    config::load(file, &all).unwrap_or_else(|e| panic!("{sets:?}: {e}"))
}

fn load(sets: &[&str]) -> Pipeline {
    let tmp = tempfile::tempdir().unwrap();
    load_from(&write_pipeline(tmp.path(), false), sets)
}

fn train(p: &Pipeline) -> Seen {
    let cfg = p.config.trainer_config();
    let d_sae = p.config.sae.d_sae(D);
    let mut src = InMemorySource::new(rows(1024), D);
    let mut t = Trainer::new(cfg, &p.config.sae.arch, d_sae, &mut src).unwrap();
    let mut checkpoint_steps = Vec::new();
    while t.step_count() < t.total_steps() {
        t.step(&mut src).unwrap();
        if t.checkpoint_due() {
            checkpoint_steps.push(t.step_count());
        }
    }
    Seen {
        weights: t
            .sae()
            .params()
            .iter()
            .map(|p| p.data.iter().map(|v| v.to_bits()).collect())
            .collect(),
        log_columns: t.log().columns.clone(),
        log_rows: t.log().len(),
        checkpoint_steps,
        d_sae,
    }
}

/// Each key with a value that differs from the base.
const CHANGES: &[(&str, &str)] = &[
    ("train.optimizer", "{ kind = \"adam\", lr = 3e-2 }"),
    ("train.lr_warmup_steps", "1"),
    ("train.lr_decay", "\"none\""),
    ("train.lr_decay_steps", "30"),
    ("train.batch_tokens", "64"),
    ("train.train_tokens", "640"),
    ("train.l1_warmup_steps", "20"),
    ("train.grad_clip", "0.01"),
    ("train.dead_after_tokens", "32"),
    ("train.b_dec_init", "\"zeros\""),
    ("train.init_tokens", "16"),
    ("train.scale_inputs", "false"),
    ("train.checkpoint_every", "320"),
    ("train.log_every", "3"),
    ("sae.expansion_factor", "3"),
    ("sae.d_sae", "24"),
    ("sae.arch", "{ kind = \"relu_l1\", l1_coefficient = 2.0 }"),
    // the tensor backend: the same training up to f32 rounding, so other bits
    ("train.backend", "\"tensor\""),
];

/// Keys of the training *reader*, not of the engine: they change which captured rows make
/// up each batch, which an in-memory source cannot show. Their effect is measured on real
/// Parquet shards by `tests/it/shuffle_quality.rs` (buffer size and chunk interleaving each
/// change the batches' window mix, and the test fails if either is ignored).
const READER_KEYS: &[(&str, &str)] = &[
    ("train.shuffle_buffer_bytes", "tests/it/shuffle_quality.rs"),
    ("train.shuffle_chunk_tokens", "tests/it/shuffle_quality.rs"),
];

/// Keys whose other values cannot run here: `train.device = "cuda"` needs a CUDA build and a
/// GPU; its mapping and refusals are tested in `config::trainer`, the backend it selects in
/// `tests/it/tensor_oracle.rs`; `train.compute_dtype` only runs with `train.backend =
/// "tensor"` (it is refused on the kernels), so its effect (narrow GEMMs: other losses, still
/// training) and its mapping are tested in `tests/it/compute_dtype.rs`.
const DEVICE_KEYS: &[(&str, &str)] = &[
    ("train.device", "src/config/trainer.rs"),
    ("train.compute_dtype", "tests/it/compute_dtype.rs"),
];

#[test]
fn every_train_and_sae_key_changes_training() {
    let base = train(&load(&[]));
    assert_eq!(
        base.log_rows, 40,
        "the base run logs every one of its 40 steps"
    );
    // The dead window matters to a variant that uses it in training: TopK's AuxK.
    let topk = "sae.arch={ kind = \"topk\", k = 2 }";
    let topk_base = train(&load(&[topk]));
    for (key, value) in CHANGES {
        let set = format!("{key}={value}");
        if *key == "train.dead_after_tokens" {
            let seen = train(&load(&[topk, &set]));
            assert!(seen != topk_base, "{set} changed nothing a user can see");
            continue;
        }
        // `sae.d_sae` and `sae.expansion_factor` are exclusive: the file sets one.
        let p = if *key == "sae.d_sae" {
            let tmp = tempfile::tempdir().unwrap();
            load_from(&write_pipeline(tmp.path(), true), &[])
        } else {
            load(&[&set])
        };
        let seen = train(&p);
        assert!(seen != base, "{set} changed nothing a user can see");
    }
}

/// The keys of a section as a fully populated file would have them.
fn keys(table: &toml::Table, prefix: &str) -> BTreeSet<String> {
    table.keys().map(|k| format!("{prefix}.{k}")).collect()
}

#[test]
fn every_train_and_sae_key_is_covered() {
    // Every optional key set, so that serialisation lists it.
    let p = load(&[
        "train.lr_decay_steps=6",
        "train.train_tokens=512",
        "train.l1_warmup_steps=6",
        "train.checkpoint_every=64",
        "train.device=\"cpu\"",
        "train.backend=\"kernels\"",
    ]);
    let v = toml::Table::try_from(&p.config).unwrap();
    let mut all = keys(v["train"].as_table().unwrap(), "train");
    all.extend(keys(v["sae"].as_table().unwrap(), "sae"));
    // `d_sae` is exclusive with `expansion_factor`, so it is never serialised beside it.
    all.insert("sae.d_sae".into());
    let covered: BTreeSet<String> = CHANGES
        .iter()
        .chain(READER_KEYS)
        .chain(DEVICE_KEYS)
        .map(|c| c.0.to_string())
        .collect();
    assert_eq!(
        all, covered,
        "a [train]/[sae] key without an effect test (or a test for a removed key)"
    );
}
