//! Behaviour of the hookable forward passes beyond numerical parity: site identities,
//! replacements flowing onward, early stopping, dtypes and sharded checkpoints.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, TinyModel};
use saepipe::models::{load_dir, HookedModel, Hookpoint, Hooks, NoHooks, Recorder, Site};

fn ids() -> Tensor {
    Tensor::new(
        &[[1u32, 7, 30, 4, 99, 12], [1, 2, 3, 5, 8, 13]],
        &Device::Cpu,
    )
    .unwrap()
}

fn all_hps(n_layers: usize) -> Vec<Hookpoint> {
    (0..n_layers)
        .flat_map(|l| Site::ALL.into_iter().map(move |s| Hookpoint::new(l, s)))
        .collect()
}

/// Records everything and replaces one hookpoint with `f(x)`.
struct RecordAndReplace<F> {
    target: Hookpoint,
    f: F,
    acts: BTreeMap<Hookpoint, Tensor>,
}

impl<F: FnMut(&Tensor) -> candle_core::Result<Tensor>> Hooks for RecordAndReplace<F> {
    fn wants(&self, _: Hookpoint) -> bool {
        true
    }
    fn visit(&mut self, hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if hp == self.target {
            let r = (self.f)(x)?;
            self.acts.insert(hp, r.clone());
            Ok(Some(r))
        } else {
            self.acts.insert(hp, x.clone());
            Ok(None)
        }
    }
}

fn models(root: &Path) -> Vec<(&'static str, Box<dyn HookedModel>)> {
    let mk = |name: &'static str, m: TinyModel| {
        let dir = m.write(&root.join(name));
        (name, load_dir(&dir, &Device::Cpu).unwrap().model)
    };
    vec![
        mk("neox_parallel", TinyModel::gpt_neox(1, true)),
        mk("neox_sequential", TinyModel::gpt_neox(2, false)),
        mk("llama", TinyModel::llama(3, false)),
        mk("smollm3", TinyModel::llama(4, true)),
    ]
}

#[test]
fn site_identities_hold() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, m) in models(tmp.path()) {
        let n = m.info().n_layers;
        let mut rec = Recorder::new(all_hps(n));
        m.forward_hooked(&ids(), &mut rec, None).unwrap().unwrap();
        let a = |l, s| rec.acts[&Hookpoint::new(l, s)].clone();
        for l in 0..n {
            let mid = (a(l, Site::ResidPre) + a(l, Site::AttnOut)).unwrap();
            assert!(
                max_abs_diff(&mid, &a(l, Site::ResidMid)) < 1e-5,
                "{name} L{l}: resid_mid"
            );
            let post = (a(l, Site::ResidMid) + a(l, Site::MlpOut)).unwrap();
            assert!(
                max_abs_diff(&post, &a(l, Site::ResidPost)) < 1e-5,
                "{name} L{l}: resid_post"
            );
            if l + 1 < n {
                assert_eq!(
                    max_abs_diff(&a(l, Site::ResidPost), &a(l + 1, Site::ResidPre)),
                    0.0,
                    "{name}"
                );
            }
            assert_eq!(a(l, Site::MlpIn).dims(), &[2, 6, m.info().d_model]);
        }
    }
}

#[test]
fn replacements_flow_onward() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, m) in models(tmp.path()) {
        let clean = m
            .forward_hooked(&ids(), &mut NoHooks, None)
            .unwrap()
            .unwrap();
        let target = Hookpoint::new(1, Site::MlpOut);
        let mut h = RecordAndReplace {
            target,
            f: |x: &Tensor| x.zeros_like(),
            acts: BTreeMap::new(),
        };
        let spliced = m.forward_hooked(&ids(), &mut h, None).unwrap().unwrap();
        // Zeroed mlp_out: resid_post == resid_mid, and the logits change.
        let mid = &h.acts[&Hookpoint::new(1, Site::ResidMid)];
        let post = &h.acts[&Hookpoint::new(1, Site::ResidPost)];
        assert_eq!(
            max_abs_diff(mid, post),
            0.0,
            "{name}: replaced mlp_out did not reach resid_post"
        );
        assert!(
            max_abs_diff(&clean, &spliced) > 1e-3,
            "{name}: replacement did not change the logits"
        );
        // The identity replacement changes nothing.
        let mut same = RecordAndReplace {
            target,
            f: |x: &Tensor| Ok(x.clone()),
            acts: BTreeMap::new(),
        };
        let again = m.forward_hooked(&ids(), &mut same, None).unwrap().unwrap();
        assert_eq!(max_abs_diff(&clean, &again), 0.0, "{name}");
    }
}

#[test]
fn parallel_neox_mlp_reads_resid_pre_not_resid_mid() {
    let tmp = tempfile::tempdir().unwrap();
    for (parallel, name) in [(true, "par"), (false, "seq")] {
        let dir = TinyModel::gpt_neox(5, parallel).write(&tmp.path().join(name));
        let m = load_dir(&dir, &Device::Cpu).unwrap().model;
        let mut clean = Recorder::new([Hookpoint::new(0, Site::MlpIn)]);
        m.forward_hooked(&ids(), &mut clean, Some(0)).unwrap();
        let target = Hookpoint::new(0, Site::ResidMid);
        // Not a scale or shift: LayerNorm would undo those.
        let mut h = RecordAndReplace {
            target,
            f: |x: &Tensor| x.sqr(),
            acts: BTreeMap::new(),
        };
        m.forward_hooked(&ids(), &mut h, Some(0)).unwrap();
        let d = max_abs_diff(
            &clean.acts[&Hookpoint::new(0, Site::MlpIn)],
            &h.acts[&Hookpoint::new(0, Site::MlpIn)],
        );
        if parallel {
            assert_eq!(
                d, 0.0,
                "parallel block: mlp_in must not depend on resid_mid"
            );
        } else {
            assert!(
                d > 1e-3,
                "sequential block: mlp_in must depend on resid_mid"
            );
        }
        // Either way, resid_post is built from the (replaced) resid_mid.
        let post = (&h.acts[&target] + &h.acts[&Hookpoint::new(0, Site::MlpOut)]).unwrap();
        assert!(max_abs_diff(&post, &h.acts[&Hookpoint::new(0, Site::ResidPost)]) < 1e-5);
    }
}

#[test]
fn stop_after_gives_the_same_activations_and_no_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, m) in models(tmp.path()) {
        let hps = [
            Hookpoint::new(0, Site::AttnOut),
            Hookpoint::new(1, Site::ResidPost),
        ];
        let mut full = Recorder::new(hps);
        m.forward_hooked(&ids(), &mut full, None).unwrap();
        let mut early = Recorder::new(hps);
        assert_eq!(early.deepest_layer(), Some(1));
        let stop = early.deepest_layer();
        let out = m.forward_hooked(&ids(), &mut early, stop).unwrap();
        assert!(out.is_none(), "{name}: stopped pass returned logits");
        for hp in hps {
            assert_eq!(
                max_abs_diff(&full.acts[&hp], &early.acts[&hp]),
                0.0,
                "{name} {hp}"
            );
        }
        // Nothing past the stop is visited.
        let mut deeper = Recorder::new([Hookpoint::new(2, Site::ResidPre)]);
        m.forward_hooked(&ids(), &mut deeper, Some(1)).unwrap();
        assert!(deeper.acts.is_empty(), "{name}");
    }
}

#[test]
fn causal_prefix_is_unaffected_by_later_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, m) in models(tmp.path()) {
        let a = Tensor::new(&[[1u32, 7, 30, 4, 99, 12]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 7, 30, 50, 51, 52]], &Device::Cpu).unwrap();
        let la = m
            .forward_hooked(&a, &mut NoHooks, None)
            .unwrap()
            .unwrap()
            .narrow(1, 0, 3)
            .unwrap();
        let lb = m
            .forward_hooked(&b, &mut NoHooks, None)
            .unwrap()
            .unwrap()
            .narrow(1, 0, 3)
            .unwrap();
        assert!(max_abs_diff(&la, &lb) < 1e-5, "{name}: causal mask leaks");
        // Batch rows are independent: row 0 alone equals row 0 in a batch.
        let both = m
            .forward_hooked(&ids(), &mut NoHooks, None)
            .unwrap()
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        let one = m
            .forward_hooked(&ids().narrow(0, 0, 1).unwrap(), &mut NoHooks, None)
            .unwrap()
            .unwrap();
        assert!(
            max_abs_diff(&both, &one) < 1e-4,
            "{name}: batch rows interact"
        );
    }
}

#[test]
fn half_precision_checkpoints_load_as_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let m = TinyModel::llama(6, false);
    let f32_dir = m.write(&tmp.path().join("f32"));
    let ref_logits = load_dir(&f32_dir, &Device::Cpu)
        .unwrap()
        .model
        .forward_hooked(&ids(), &mut NoHooks, None)
        .unwrap()
        .unwrap();
    let scale = ref_logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for dt in [DType::F16, DType::BF16] {
        let dir = m.write_as(&tmp.path().join(format!("{dt:?}")), dt);
        let logits = load_dir(&dir, &Device::Cpu)
            .unwrap()
            .model
            .forward_hooked(&ids(), &mut NoHooks, None)
            .unwrap()
            .unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let err = max_abs_diff(&logits, &ref_logits);
        assert!(err < 0.05 * scale, "{dt:?}: {err} vs scale {scale}");
    }
}

#[test]
fn sharded_checkpoint_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let m = TinyModel::gpt_neox(7, true);
    let single = m.write(&tmp.path().join("single"));
    let want = load_dir(&single, &Device::Cpu)
        .unwrap()
        .model
        .forward_hooked(&ids(), &mut NoHooks, None)
        .unwrap()
        .unwrap();
    // Split the tensors over two shards with an index, as save_pretrained does for big models.
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(single.join("config.json"), dir.join("config.json")).unwrap();
    let (mut a, mut b) = (
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
    let mut weight_map = serde_json::Map::new();
    for (i, (k, v)) in m.tensors.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(k.clone(), v.clone());
        weight_map.insert(k.clone(), serde_json::json!(file));
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let got = load_dir(&dir, &Device::Cpu)
        .unwrap()
        .model
        .forward_hooked(&ids(), &mut NoHooks, None)
        .unwrap()
        .unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    // A missing shard is named.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn models_are_send_and_sync() {
    fn check<T: Send + Sync + ?Sized>() {}
    check::<dyn HookedModel>();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_llama(tmp.path(), 8, false);
    let m = load_dir(&dir, &Device::Cpu).unwrap().model;
    // Two threads share one model and agree.
    let outs: Vec<Tensor> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    m.forward_hooked(&ids(), &mut NoHooks, None)
                        .unwrap()
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(max_abs_diff(&outs[0], &outs[1]), 0.0);
}
