//! Every key of `[run]`, `[model]`, `[data]`, `[capture]`, `[eval]`, `[jsae]` and
//! `[synthetic]` has an effect: each case changes one key of a valid base pipeline and
//! observes the change through the library's public functions (the capture spec, the run
//! folder, the train units, the JSAE pair config, the dataset resolution, the loaded
//! model, the synthetic generator, a tiny synthetic evaluation). Keys whose effect is a
//! refusal, or cannot be observed cheaply, are listed with the reason.
//!
//! [`every_key_is_covered`] compares the keys of the resolved configs with the cases, so
//! a new key with a default fails it until it gets a case. (A new optional key that is
//! left out of the resolved file when absent is only seen once some case sets it.)
//!
//! `[train]` and `[sae]` are covered elsewhere (`config::trainer` tests, `tests/it/sae_*`).

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use saepipe::config::{self, Pipeline};
use saepipe::hub::HubOptions;
use saepipe::pipeline::capture::{load_pipeline_model, spec_from_pipeline};
use saepipe::pipeline::{evaluate, jsae, train};
use saepipe::util::progress::Silent;

/// The sections this file covers.
const SECTIONS: [&str; 7] = [
    "run",
    "model",
    "data",
    "capture",
    "eval",
    "jsae",
    "synthetic",
];

/// Every key of those sections set (or, for the optional ones whose base value must stay
/// absent, set by their case). `{dir}` is the fixture folder.
const BASE: &str = r#"
[run]
name = "keys"
seed = 0
data_dir = "{dir}/data"
offline = true

[model]
source = "local:{dir}/model"
dtype = "f32"
device = "cpu"
random_init = true
random_init_seed = 1

[data]
files = ["{dir}/a.txt"]
text_column = "text"
context_len = 16
n_tokens = 4096
eval_tokens = 512
prepend_bos = true
concat_docs = true
separator = "eos"
txt_unit = "paragraph"
eval_fraction = 0.1
split_seed = 0
shuffle_seed = 5

[capture]
hookpoints = ["blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]
batch_size = 8
dtype = "f32"
exclude_special_tokens = true
row_group_rows = 8192
shard_tokens = 65536
compression = "none"

[sae]
expansion_factor = 2
arch = { kind = "topk", k = 4 }

[eval]
eval_tokens = 256
dead_window_tokens = 128
ce_sequences = 16

[jsae]
layer = 0
k = 4
expansion_factor = 2
baseline = true
jac_at = "true_input"
lr = 5e-4
"#;

/// A synthetic pipeline small enough to train and evaluate in well under a second.
const SYNTHETIC: &str = r#"
[run]
name = "syn"
data_dir = "{dir}/syn"

[synthetic]
d = 8
n_features = 16
mean_active = 2.0
noise = 0.02
bipolar_share = 0.0
seed = 0

[data]
n_tokens = 2048
eval_tokens = 1024

[train]
batch_tokens = 256
lr_warmup_steps = 1
init_tokens = 256

[sae]
d_sae = 16
arch = { kind = "topk", k = 2 }

[eval]
eval_tokens = 1024
dead_window_tokens = 1024
ce_sequences = 0
"#;

/// Keys whose only effect in a build without the `cuda` feature is to be refused, with the
/// value that is refused (with the feature, `model.device = "cuda"` needs a GPU to observe:
/// `make test-gpu`; tests/it/model_dtype.rs runs the refusal through the binary).
const REFUSED: [(&str, &str); 1] = [("model.device", "\"cuda\"")];

/// Keys with an effect that this file cannot observe cheaply, and why.
const DOCUMENTED: [(&str, &str); 1] = [(
    "eval.ce_sequences",
    "the number of held-out windows over which pipeline::ce measures the CE-loss delta; \
     observing it needs a model, a tokenizer and forward passes over the windows with the \
     SAE spliced in (pipeline::ce::ce_context is crate-private); tests/it/e2e_pipeline.rs runs \
     the smoke pipeline with ce_sequences > 0 and checks the ce_* columns",
)];

/// Fixture folder: a tiny Llama with tokenizer, two text files.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("saepipe-config-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        common::tiny_llama(&d.join("model"), 7, false);
        let corpus = common::tiny_corpus().join("\n\n");
        std::fs::write(d.join("a.txt"), &corpus).unwrap();
        std::fs::write(d.join("b.txt"), &corpus).unwrap();
        d
    })
}

fn text(base: &str) -> String {
    base.replace("{dir}", &dir().display().to_string())
}

fn try_load(base: &str, sets: &[String]) -> Result<Pipeline, String> {
    config::from_str(&text(base), Path::new("keys.toml"), sets).map_err(|e| e.to_string())
}

fn load(base: &str, sets: &[String]) -> Pipeline {
    try_load(base, sets).unwrap_or_else(|e| panic!("{e}"))
}

/// Hub options that never reach a network: a closed local port and an empty cache.
fn hub(offline: bool) -> HubOptions {
    HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: dir().join("hub-cache"),
        token: None,
        offline,
    }
}

fn spec(p: &Pipeline) -> saepipe::capture::CaptureSpec {
    spec_from_pipeline(p, "rev".into(), &[PathBuf::from("a.txt")], false)
}

fn pair(p: &Pipeline) -> saepipe::jsae::PairConfig {
    jsae::pair_config(p, 8, 0.5).expect("the base has [jsae]").0
}

/// One key: settings applied to both sides, the change, and what is observed.
struct Case {
    key: &'static str,
    base: &'static [&'static str],
    alt: &'static [&'static str],
    observe: fn(&Pipeline) -> String,
}

/// Cases on [`BASE`].
fn cases() -> Vec<Case> {
    macro_rules! case {
        ($key:literal, [$($b:literal),*], [$($a:literal),*], $f:expr) => {
            Case { key: $key, base: &[$($b),*], alt: &[$($a),*], observe: $f }
        };
    }
    vec![
        // [run]
        case!("run.name", [], ["run.name=\"other\""], |p| p
            .run_dir()
            .display()
            .to_string()),
        case!("run.seed", [], ["run.seed=3"], |p| format!(
            "trainer seed {} pair seed {}",
            p.config.trainer_config().seed,
            pair(p).seed
        )),
        case!("run.data_dir", [], ["run.data_dir=\"elsewhere\""], |p| p
            .run_dir()
            .display()
            .to_string()),
        // Offline: the hub model is refused from the empty cache; online: the download is
        // attempted (and fails on the closed port with a different error).
        case!(
            "run.offline",
            ["model.source=\"org/model\"", "model.revision=\"abc\""],
            ["run.offline=false"],
            |p| {
                let r = saepipe::pipeline::download::download(p, &hub(false), &Silent);
                r.err().map(|e| e.to_string()).unwrap_or_default()
            }
        ),
        // [model]
        case!(
            "model.source",
            [],
            ["model.source=\"local:elsewhere\""],
            |p| format!("{} {:?}", spec(p).model_repo, p.model_source())
        ),
        case!(
            "model.revision",
            ["model.source=\"org/model\"", "model.revision=\"abc\""],
            ["model.revision=\"def\""],
            |p| format!("{:?}", p.model_source())
        ),
        case!("model.random_init", [], ["model.random_init=false"], logits),
        case!("model.dtype", [], ["model.dtype=\"bf16\""], logits),
        case!(
            "model.random_init_seed",
            [],
            ["model.random_init_seed=2"],
            logits
        ),
        // [data]
        case!(
            "data.repo",
            [],
            ["data.repo=\"org/corpus\"", "data.revision=\"abc\""],
            dataset
        ),
        case!(
            "data.revision",
            ["data.repo=\"org/corpus\"", "data.revision=\"abc\""],
            ["data.revision=\"def\""],
            dataset
        ),
        case!("data.files", [], ["data.files=[\"{dir}/b.txt\"]"], dataset),
        case!(
            "data.text_column",
            [],
            ["data.text_column=\"body\""],
            |p| format!("{:?}", spec(p).source)
        ),
        case!(
            "data.txt_unit",
            [],
            ["data.txt_unit=\"file\""],
            |p| format!("{:?}", spec(p).source)
        ),
        case!(
            "data.context_len",
            [],
            ["data.context_len=32"],
            |p| format!("{:?} {}", spec(p).pack, spec(p).shard_windows)
        ),
        case!("data.n_tokens", [], ["data.n_tokens=8192"], |p| spec(p)
            .n_tokens
            .to_string()),
        case!("data.eval_tokens", [], ["data.eval_tokens=1024"], |p| spec(
            p
        )
        .n_eval_tokens
        .to_string()),
        case!(
            "data.prepend_bos",
            [],
            ["data.prepend_bos=false"],
            |p| format!("{:?}", spec(p).pack)
        ),
        case!(
            "data.concat_docs",
            [],
            ["data.concat_docs=false"],
            |p| format!("{:?}", spec(p).pack)
        ),
        case!(
            "data.separator",
            [],
            ["data.separator=\"bos\""],
            |p| format!("{:?}", spec(p).pack)
        ),
        case!(
            "data.shuffle_seed",
            [],
            ["data.shuffle_seed=6"],
            |p| format!("{:?}", spec(p).pack)
        ),
        case!(
            "data.eval_fraction",
            [],
            ["data.eval_fraction=0.2"],
            |p| format!("{:?}", spec(p).split)
        ),
        case!("data.split_seed", [], ["data.split_seed=1"], |p| format!(
            "{:?}",
            spec(p).split
        )),
        // [capture]
        case!(
            "capture.hookpoints",
            [],
            ["capture.hookpoints=[\"blocks.0.hook_mlp_in\", \"blocks.0.hook_mlp_out\"]"],
            |p| format!(
                "{:?} {:?}",
                spec(p).hookpoints,
                train::units(p, None)
                    .unwrap()
                    .iter()
                    .map(|u| u.dir.clone())
                    .collect::<Vec<_>>()
            )
        ),
        case!("capture.batch_size", [], ["capture.batch_size=4"], |p| {
            spec(p).batch_size.to_string()
        }),
        case!("capture.dtype", [], ["capture.dtype=\"f16\""], |p| format!(
            "{:?}",
            spec(p).dtype
        )),
        case!(
            "capture.exclude_special_tokens",
            [],
            ["capture.exclude_special_tokens=false"],
            |p| spec(p).exclude_special_tokens.to_string()
        ),
        case!(
            "capture.row_group_rows",
            [],
            ["capture.row_group_rows=1024"],
            |p| { format!("{:?}", spec(p).writer) }
        ),
        case!(
            "capture.shard_tokens",
            [],
            ["capture.shard_tokens=1024"],
            |p| spec(p).shard_windows.to_string()
        ),
        case!(
            "capture.compression",
            [],
            ["capture.compression=\"zstd\""],
            |p| { format!("{:?}", spec(p).writer) }
        ),
        // [jsae]: the stage's first step names the layer's activation sets; none are
        // captured here, so it stops there.
        case!("jsae.layer", [], ["jsae.layer=1"], |p| {
            let e = jsae::jsae_stage(p, &hub(true), false, &Silent)
                .map(|n| n.to_string())
                .unwrap_or_else(|e| format!("{e:#}"));
            e.replace(&dir().display().to_string(), "")
        }),
        case!("jsae.k", [], ["jsae.k=8"], |p| format!(
            "{} {:?}",
            pair(p).k,
            jsae::variants(p, 8)
        )),
        case!(
            "jsae.expansion_factor",
            [],
            ["jsae.expansion_factor=4"],
            |p| pair(p).d_sae.to_string()
        ),
        case!("jsae.d_sae", [], ["jsae.d_sae=24"], |p| pair(p)
            .d_sae
            .to_string()),
        case!("jsae.lambda", [], ["jsae.lambda=0.25"], |p| format!(
            "{:?}",
            jsae::variants(p, 8)
        )),
        case!("jsae.baseline", [], ["jsae.baseline=false"], |p| format!(
            "{:?}",
            jsae::variants(p, 8)
        )),
        case!(
            "jsae.jac_at",
            [],
            ["jsae.jac_at=\"reconstruction\""],
            |p| format!("{:?}", pair(p).jac_at)
        ),
        case!("jsae.lr", [], ["jsae.lr=1e-3"], |p| format!(
            "{:?}",
            pair(p).lr
        )),
    ]
}

/// Cases on [`SYNTHETIC`].
fn synthetic_cases() -> Vec<Case> {
    macro_rules! case {
        ($key:literal, [$($a:literal),*], $f:expr) => {
            Case { key: $key, base: &[], alt: &[$($a),*], observe: $f }
        };
    }
    vec![
        case!("synthetic.d", ["synthetic.d=12"], generator),
        case!(
            "synthetic.n_features",
            ["synthetic.n_features=20"],
            generator
        ),
        case!(
            "synthetic.mean_active",
            ["synthetic.mean_active=4.0"],
            generator
        ),
        case!("synthetic.noise", ["synthetic.noise=0.5"], generator),
        case!(
            "synthetic.bipolar_share",
            ["synthetic.bipolar_share=1.0"],
            generator
        ),
        case!("synthetic.seed", ["synthetic.seed=1"], generator),
        // A real (tiny) train + evaluate: the metrics row's evaluation tokens and dead share.
        case!("eval.eval_tokens", ["eval.eval_tokens=512"], |p| format!(
            "eval_tokens {}",
            evaluated(p)["eval_tokens"]
        )),
        case!(
            "eval.dead_window_tokens",
            ["eval.dead_window_tokens=1"],
            |p| format!("dead_frac {}", evaluated(p)["dead_frac"])
        ),
        // The power-diagram columns of the TopK row: off with 0 candidates; the affine gap
        // has no group when every top-1 group is below the minimum.
        case!(
            "eval.power_candidates",
            ["eval.power_candidates=0"],
            |p| format!("facet {}", evaluated(p)["pd_facet_dist_mean"])
        ),
        case!(
            "eval.power_min_cell_tokens",
            ["eval.power_min_cell_tokens=100000"],
            |p| format!("cells {}", evaluated(p)["pd_affine_cells"])
        ),
    ]
}

/// Logits of the model `load_pipeline_model` loads, on a few tokens.
fn logits(p: &Pipeline) -> String {
    let (_, loaded) = load_pipeline_model(p, &hub(true), &Silent).unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 12]], &candle_core::Device::Cpu).unwrap();
    let out = loaded
        .model
        .forward_hooked(&ids, &mut saepipe::models::NoHooks, None)
        .unwrap()
        .unwrap();
    format!("{:?}", out.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

/// What `[data]` resolves to (offline, so hub datasets fail naming repo and revision).
fn dataset(p: &Pipeline) -> String {
    match saepipe::hub::resolve_dataset(&p.config.data, &hub(true), &Silent) {
        Ok(r) => format!("{:?}", r.files),
        Err(e) => e.to_string().replace(&dir().display().to_string(), ""),
    }
}

/// The dictionary and a few training rows of `[synthetic]`.
fn generator(p: &Pipeline) -> String {
    let s = p.config.synthetic.as_ref().expect("a [synthetic] pipeline");
    let data = s.data();
    let mut rows = Vec::new();
    data.rows(0, 64, s.train_seed(), &mut rows);
    format!("{} {:?} {:?}", data.n_bipolar, data.dict, rows)
}

/// Train and evaluate the pipeline's single SAE (again, `force`); its metrics row.
fn evaluated(p: &Pipeline) -> serde_json::Value {
    train::train_stage(p, None, true, &Silent).unwrap();
    evaluate::evaluate_stage(p, &hub(true), true, &Silent).unwrap();
    let unit = &train::units(p, None).unwrap()[0];
    let text = std::fs::read_to_string(unit.dir.join(evaluate::METRICS_FILE)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["row"].clone()
}

fn sets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| text(s)).collect()
}

fn check(base_text: &str, cases: &[Case]) {
    for c in cases {
        let b = load(base_text, &sets(c.base));
        let mut both = sets(c.base);
        both.extend(sets(c.alt));
        let a = try_load(base_text, &both)
            .unwrap_or_else(|e| panic!("{}: the changed pipeline does not load: {e}", c.key));
        let (ob, oa) = ((c.observe)(&b), (c.observe)(&a));
        assert_ne!(
            ob, oa,
            "{}: changing it ({:?}) changed nothing observed",
            c.key, c.alt
        );
    }
}

#[test]
fn every_key_of_a_text_pipeline_has_an_effect() {
    check(BASE, &cases());
}

#[test]
fn every_key_of_a_synthetic_pipeline_has_an_effect() {
    check(SYNTHETIC, &synthetic_cases());
}

#[test]
fn unimplemented_values_are_refused_naming_the_key() {
    if cfg!(feature = "cuda") {
        return; // accepted at load; the GPU is checked when the model is loaded
    }
    for (key, value) in REFUSED {
        let e = try_load(BASE, &[format!("{key}={value}")]).unwrap_err();
        assert!(
            e.contains(key) && e.contains("--features cuda") && e.contains("\"cpu\""),
            "{key}: {e}"
        );
    }
}

/// The keys of the covered sections in a resolved config.
fn keys_of(p: &Pipeline, out: &mut BTreeSet<String>) {
    let t: toml::Table = toml::from_str(p.resolved_toml()).unwrap();
    for s in SECTIONS {
        if let Some(toml::Value::Table(sec)) = t.get(s) {
            out.extend(sec.keys().map(|k| format!("{s}.{k}")));
        }
    }
}

#[test]
fn every_key_is_covered() {
    let mut seen = BTreeSet::new();
    for (base, cases) in [(BASE, cases()), (SYNTHETIC, synthetic_cases())] {
        keys_of(&load(base, &[]), &mut seen);
        for c in &cases {
            let mut both = sets(c.base);
            both.extend(sets(c.alt));
            keys_of(&load(base, &both), &mut seen);
        }
    }
    // The synthetic pipeline fills in [model], [data] and [capture] keys that the text
    // pipeline covers already.
    let covered: BTreeSet<String> = cases()
        .iter()
        .chain(&synthetic_cases())
        .map(|c| c.key.to_string())
        .chain(REFUSED.iter().map(|(k, _)| k.to_string()))
        .chain(DOCUMENTED.iter().map(|(k, _)| k.to_string()))
        .collect();
    let missing: Vec<_> = seen.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "keys without a case in tests/it/config_keys.rs: {missing:?}"
    );
    let stale: Vec<_> = covered.difference(&seen).collect();
    assert!(
        stale.is_empty(),
        "cases for keys the schema lacks: {stale:?}"
    );
}
