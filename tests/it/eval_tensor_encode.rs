//! The evaluation encode on tensors (issue #13 item 2; `saepipe::sae::export_tensor`): for
//! every format the loader runs (one trained SAE of each variant, plus SA-GSAE's untied
//! gate form and k-flats' residual assignment), the tensor encode on candle's CPU device and
//! the kernels' encode give the same evaluation metrics on held-out raw activations, and the
//! same CE splice.
//!
//! Tolerances (both sides compute the same pre-activations in f32 with different summation
//! orders; the selections are the same rule): R², MSE and L1 within 1e-4 relative; L0 and
//! the dead/dense fractions within 1% (a latent at a threshold, or tied at the k-th place
//! within rounding, may flip on a token without any bug); codes differ on at most 0.5% of
//! tokens. The CE delta is a function of the spliced activations, which agree within 1e-4
//! of their largest entry, special-token positions exactly.

use candle_core::{Device, Tensor};
use saepipe::eval::Metrics;
use saepipe::kernels::Workspace;
use saepipe::sae::export::{ExportMeta, LoadedSae};
use saepipe::sae::ArchConfig;
use saepipe::store::InMemorySource;
use saepipe::synthetic::{SyntheticConfig, SyntheticData};
use saepipe::train::{TrainConfig, Trainer};
use saepipe::util::progress::Silent;

const D: usize = 16;
const F: usize = 48;

fn archs() -> Vec<ArchConfig> {
    use saepipe::sae::sa_gsae::Config;
    let mut v = ArchConfig::examples();
    v.push(ArchConfig::new(Config {
        tied_magnitudes: false,
        ..Config::default()
    }));
    v
}

#[test]
fn tensor_and_kernel_encodes_give_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let synth = SyntheticData::new(SyntheticConfig {
        d: D,
        n_features: 32,
        mean_active: 2.0,
        noise: 0.01,
        bipolar: true,
        seed: 3,
    });
    let raw: Vec<f32> = synth
        .sample(2048, 1)
        .iter()
        .enumerate()
        .map(|(i, v)| 3.0 * v + 0.25 * ((i % D) as f32 - 8.0))
        .collect();
    let held: Vec<f32> = synth.sample(1024, 2).iter().map(|v| 3.0 * v).collect();
    let n = held.len() / D;
    let mut formats = Vec::new();
    for (a, arch) in archs().iter().enumerate() {
        let cfg = TrainConfig {
            batch_tokens: 128,
            total_tokens: 16 * 128,
            lr: Some(3e-3),
            lr_warmup_steps: 0,
            init_tokens: 512,
            dead_after_tokens: 256,
            checkpoint_every: 0,
            ..Default::default()
        };
        let mut src = InMemorySource::new(raw.clone(), D);
        let mut t = Trainer::new(cfg, arch, F, &mut src).unwrap();
        t.run(&mut src, None, &Silent, None).unwrap();
        let dir = tmp.path().join(format!("{a}-{}", arch.kind()));
        t.export(&dir, &ExportMeta::default()).unwrap();
        let sae = LoadedSae::load(&dir).unwrap();
        let what = format!("{} ({})", arch.kind(), sae.t.architecture);
        formats.push(sae.t.architecture.clone());
        // kernels
        let (mut wk, mut rk) = (Workspace::default(), Vec::new());
        sae.encode(&held, n, &mut wk);
        let codes = std::mem::take(&mut wk.codes);
        sae.decode(&codes, &mut rk, &mut wk);
        wk.codes = codes;
        let mut mk = Metrics::new(D, F);
        mk.update(&held, &rk, &wk.codes);
        // tensors
        let ds = sae.t.to_device(&Device::Cpu).unwrap();
        let (mut wt, mut rt) = (Workspace::default(), Vec::new());
        ds.run(&held, n, &mut wt, &mut rt).unwrap();
        let mut mt = Metrics::new(D, F);
        mt.update(&held, &rt, &wt.codes);
        let (k, t) = (mk.finish(), mt.finish());
        assert!(k.l0 > 0.0, "{what}: nothing fires");
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1e-12);
        assert!(close(t.r2, k.r2, 1e-4), "{what}: R² {} vs {}", t.r2, k.r2);
        assert!(
            close(t.mse, k.mse, 1e-4),
            "{what}: MSE {} vs {}",
            t.mse,
            k.mse
        );
        assert!(close(t.l1, k.l1, 1e-4), "{what}: L1 {} vs {}", t.l1, k.l1);
        assert!(close(t.l0, k.l0, 1e-2), "{what}: L0 {} vs {}", t.l0, k.l0);
        for (name, a, b) in [
            ("dead", t.dead_frac, k.dead_frac),
            ("dense", t.dense_frac_10pct, k.dense_frac_10pct),
            ("bipolar", t.bipolar_frac, k.bipolar_frac),
        ] {
            assert!((a - b).abs() <= 1e-2, "{what}: {name} fraction {a} vs {b}");
        }
        let (ck, ct) = (wk.codes.to_dense(F), wt.codes.to_dense(F));
        let differ = (0..n)
            .filter(|&b| (0..F).any(|i| (ck[b * F + i] != 0.0) != (ct[b * F + i] != 0.0)))
            .count();
        assert!(
            differ * 200 <= n,
            "{what}: codes differ on {differ} of {n} tokens"
        );
        // the CE splice: the same spliced activations, specials kept exactly
        let x = Tensor::from_slice(&held[..64 * D], (4, 16, D), &Device::Cpu).unwrap();
        let windows: Vec<saepipe::data::pack::Window> = (0..4u32)
            .map(|w| saepipe::data::pack::Window {
                index: w as u64,
                ids: (0..16u32)
                    .map(|i| if i == 0 || i == 7 + w { 1 } else { 5 + i })
                    .collect(),
                n_real: 16,
            })
            .collect();
        let sk = saepipe::pipeline::evaluate::splice_sae(&sae, None, &[1], &x, &windows)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let st = saepipe::pipeline::evaluate::splice_sae(&sae, Some(&ds), &[1], &x, &windows)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = sk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = sk
            .iter()
            .zip(&st)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{what}: splice differs by {err}");
        for (w, win) in windows.iter().enumerate() {
            for (p, id) in win.ids.iter().enumerate() {
                if *id == 1 {
                    let at = (w * 16 + p) * D;
                    assert_eq!(&st[at..at + D], &held[at..at + D], "{what}: special kept");
                }
            }
        }
    }
    for f in [
        "standard",
        "topk",
        "jumprelu",
        "gated",
        "kmeans",
        "bi_jumprelu",
        "sa_gsae",
        "abs_topk",
    ] {
        assert!(
            formats.iter().any(|a| a == f),
            "format {f} tested: {formats:?}"
        );
    }
}
