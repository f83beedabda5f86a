//! Unit tests of the SA-GSAE: reduction to the Gated SAE, gradients against finite
//! differences, the Bi-Jump-ReLU export and threshold resets.

use super::*;
use crate::sae::export::{save_saelens, ExportMeta, LoadedSae};
use crate::sae::gated::{self, Gated};
use crate::sae::param;

const D: usize = 6;
const F: usize = 10;
const N: usize = 24;

fn randv(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| s * rng.normal() as f32).collect()
}

/// Random (non-initial) parameters, so every path is exercised.
fn randomise(sae: &mut dyn Sae, seed: u64) {
    let mut rng = Rng::new(seed);
    let d = sae.dims().0;
    for p in sae.params_mut() {
        let n = p.data.len();
        p.data = match p.name {
            "W_enc" => randv(&mut rng, n, 0.6),
            "W_dec" => c::random_rows(&mut rng, n / d, d, 1.0),
            n2 if n2.starts_with("log_threshold") => (0..n)
                .map(|_| (0.1 + 0.3 * rng.uniform() as f32).ln())
                .collect(),
            "revived" => vec![0.0],
            _ => randv(&mut rng, n, 0.3),
        };
    }
}

fn x(seed: u64) -> Vec<f32> {
    randv(&mut Rng::new(seed), N * D, 1.0)
}

fn run(sae: &mut dyn Sae, x: &[f32]) -> (StepOutput, Vec<Vec<f32>>, Workspace) {
    let mut grads: Vec<Vec<f32>> = sae
        .params()
        .iter()
        .map(|p| vec![0.0; p.data.len()])
        .collect();
    let mut ws = Workspace::default();
    let dead = vec![false; sae.dims().1];
    let input = StepInput {
        x,
        n: N,
        step: 1,
        sparsity_scale: 1.0,
        dead: &dead,
    };
    let out = sae.forward_backward(&input, &mut grads, &mut ws).unwrap();
    (out, grads, ws)
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn negative_side_off_is_the_gated_sae() {
    let mut rng = Rng::new(1);
    let mut g = Gated::new(
        gated::Config {
            l1_coefficient: 0.7,
            ..gated::Config::default()
        },
        D,
        F,
        &mut rng,
    )
    .unwrap();
    randomise(&mut g, 2);
    let cfg = Config {
        l1_coefficient: 0.7,
        negative_side: false,
        ..Config::default()
    };
    let mut s = SaGsae::new(cfg, D, F, &mut rng).unwrap();
    randomise(&mut s, 3);
    // same parameters; the learnable θ is absorbed into b_gate: b_gate^SA = b_gate^G + θ
    let theta: Vec<f32> = param(s.params(), "log_threshold")
        .unwrap()
        .data
        .iter()
        .map(|t| t.exp())
        .collect();
    for name in ["W_enc", "b_mag", "r_mag", "W_dec", "b_dec"] {
        let v = param(g.params(), name).unwrap().data.clone();
        s.params_mut()
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap()
            .data = v;
    }
    let bg: Vec<f32> = param(g.params(), "b_gate")
        .unwrap()
        .data
        .iter()
        .zip(&theta)
        .map(|(b, t)| b + t)
        .collect();
    s.params_mut()[1].data = bg;
    let xs = x(4);
    let (og, gg, wg) = run(&mut g, &xs);
    let (os, gs, wsa) = run(&mut s, &xs);
    assert_eq!(wg.codes.idx, wsa.codes.idx, "active sets");
    assert_eq!(wg.codes.indptr, wsa.codes.indptr);
    assert_eq!(wg.aux.idx, wsa.aux.idx, "open gates");
    assert!(!wg.codes.idx.is_empty() && wg.aux.nnz() > wg.codes.nnz());
    for (a, b) in wg.codes.val.iter().zip(&wsa.codes.val) {
        assert!(close(*a, *b, 1e-5), "{a} {b}");
    }
    assert!(close(og.loss as f32, os.loss as f32, 1e-5), "{og:?} {os:?}");
    for name in ["mse", "l1", "aux"] {
        let a = og.losses.iter().find(|t| t.0 == name).unwrap().1;
        let b = os.losses.iter().find(|t| t.0 == name).unwrap().1;
        assert!(close(a as f32, b as f32, 1e-5), "{name}: {a} {b}");
    }
    for name in ["W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"] {
        let ig = g.params().iter().position(|p| p.name == name).unwrap();
        let is = s.params().iter().position(|p| p.name == name).unwrap();
        for (a, b) in gg[ig].iter().zip(&gs[is]) {
            assert!(close(*a, *b, 1e-4), "grad {name}: {a} vs {b}");
        }
    }
    // inference encode agrees too
    let (mut e1, mut e2) = (Workspace::default(), Workspace::default());
    g.encode(&xs, N, &mut e1).unwrap();
    s.encode(&xs, N, &mut e2).unwrap();
    assert_eq!(e1.codes.idx, e2.codes.idx);
}

/// Finite-difference check of `names` (all of a parameter's entries, central differences
/// in f64 around f32 parameters; entries whose perturbation flips a gate are skipped).
fn fd_check(cfg: Config, names: &[&str]) {
    let mut rng = Rng::new(5);
    let mut s = SaGsae::new(cfg.clone(), D, F, &mut rng).unwrap();
    randomise(&mut s, 6);
    let xs = x(7);
    let (_, grads, ws0) = run(&mut s, &xs);
    let h = 1e-3f32;
    let mut checked = 0;
    for name in names {
        let pi = s.params().iter().position(|p| p.name == *name).unwrap();
        #[allow(clippy::needless_range_loop)] // perturbs params in place while reading grads
        for e in 0..s.params()[pi].data.len() {
            let v0 = s.params()[pi].data[e];
            s.params_mut()[pi].data[e] = v0 + h;
            let (lp, _, wp) = run(&mut s, &xs);
            s.params_mut()[pi].data[e] = v0 - h;
            let (lm, _, wm) = run(&mut s, &xs);
            s.params_mut()[pi].data[e] = v0;
            if wp.aux.idx != ws0.aux.idx
                || wm.aux.idx != ws0.aux.idx
                || wp.codes.idx != ws0.codes.idx
                || wm.codes.idx != ws0.codes.idx
            {
                continue; // a gate or an active set changed: not differentiable here
            }
            let fd = ((lp.loss - lm.loss) / (2.0 * h as f64)) as f32;
            let an = grads[pi][e];
            assert!(
                (fd - an).abs() <= 2e-2 * (1.0 + fd.abs()),
                "{cfg:?}\n{name}[{e}]: finite difference {fd} vs analytic {an}"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} entries checked");
}

#[test]
fn gradients_match_finite_differences() {
    // Unit decoder: the aux term's decoder and b_dec are stop-gradient, so the loss is not
    // their potential; every other parameter's gradient is the true one.
    let enc = ["W_enc", "b_gate", "log_threshold", "r_mag", "b_mag"];
    fd_check(Config::default(), &enc);
    fd_check(
        Config {
            output: OutputSign::Raw,
            ..Config::default()
        },
        &enc,
    );
    fd_check(
        Config {
            tied_thresholds: false,
            tied_magnitudes: false,
            pre_encoder_bias: false,
            ..Config::default()
        },
        &[
            "W_enc",
            "b_gate",
            "log_threshold_pos",
            "log_threshold_neg",
            "r_mag_pos",
            "r_mag_neg",
            "b_mag_pos",
            "b_mag_neg",
        ],
    );
    // Norm-weighted penalty with the live decoder in the aux term: every parameter.
    fd_check(
        Config {
            decoder_norm: DecoderNorm::Penalty,
            ..Config::default()
        },
        &[
            "W_enc",
            "b_gate",
            "log_threshold",
            "r_mag",
            "b_mag",
            "W_dec",
            "b_dec",
        ],
    );
}

#[test]
fn ste_and_l0_move_thresholds_through_the_band() {
    // With the STE / L0 penalty, closed gates inside the band carry threshold gradient.
    for cfg in [
        Config {
            threshold_ste: true,
            bandwidth: 0.5,
            ..Config::default()
        },
        Config {
            sparsity: SparsityPenalty::L0,
            bandwidth: 0.5,
            ..Config::default()
        },
    ] {
        let mut rng = Rng::new(8);
        let mut s = SaGsae::new(cfg.clone(), D, F, &mut rng).unwrap();
        randomise(&mut s, 9);
        let base = Config {
            threshold_ste: false,
            sparsity: SparsityPenalty::L1Gate,
            ..cfg.clone()
        };
        let mut s0 = SaGsae::new(base, D, F, &mut rng).unwrap();
        for (a, b) in s0.params_mut().iter_mut().zip(s.params()) {
            a.data = b.data.clone();
        }
        let xs = x(10);
        let (_, g, ws) = run(&mut s, &xs);
        let (_, g0, ws0) = run(&mut s0, &xs);
        assert_eq!(ws.codes, ws0.codes, "the forward pass does not change");
        let closed_band = ws.aux.val.iter().filter(|v| **v == 0.0).count();
        assert!(closed_band > 0, "{cfg:?}: no closed gate in the band");
        let t = s.ix.t[0];
        assert_ne!(g[t], g0[t], "{cfg:?}: threshold gradient unchanged");
        if cfg.threshold_ste {
            assert_eq!(g[0], g0[0], "encoder gradient: the STE adds no π gradient");
        }
    }
}

/// Export through SAELens files and compare the loaded inference form with the training
/// model on raw inputs (scale folded in).
fn export_matches(cfg: Config, arch_name: &str) {
    let mut rng = Rng::new(11);
    let mut s = SaGsae::new(cfg.clone(), D, F, &mut rng).unwrap();
    randomise(&mut s, 12);
    let scale = 0.7f32;
    let dir = tempfile::tempdir().unwrap();
    let meta = ExportMeta {
        model_name: "synthetic".into(),
        hook_name: "blocks.0.hook_resid_post".into(),
        context_size: 8,
        dataset_path: "synthetic".into(),
        ..ExportMeta::default()
    };
    save_saelens(&s, scale, &meta, dir.path()).unwrap();
    let loaded = LoadedSae::load(dir.path()).unwrap();
    assert_eq!(loaded.t.architecture, arch_name);
    assert_eq!(loaded.t.saepipe_arch, ARCH);
    let raw = x(13);
    let scaled: Vec<f32> = raw.iter().map(|v| v * scale).collect();
    let mut ws = Workspace::default();
    s.encode(&scaled, N, &mut ws).unwrap();
    let mut ws2 = Workspace::default();
    loaded.encode(&raw, N, &mut ws2);
    assert_eq!(ws.codes.idx, ws2.codes.idx, "{cfg:?}: active sets");
    assert!(ws.codes.val.iter().any(|v| *v < 0.0) || !cfg.negative_side);
    // exported codes are in decoder-norm units: the folded decoder rows d_i/c have norm 1/c
    for (a, b) in ws.codes.val.iter().zip(&ws2.codes.val) {
        assert!(close(a / scale, *b, 1e-4), "{cfg:?}: {a} vs {b}");
    }
    let (c1, c2) = (ws.codes.clone(), ws2.codes.clone());
    let (mut r1, mut r2) = (Vec::new(), Vec::new());
    s.decode(&c1, &mut r1, &mut ws);
    loaded.decode(&c2, &mut r2, &mut ws2);
    for (a, b) in r1.iter().zip(&r2) {
        assert!(close(a / scale, *b, 1e-4), "{cfg:?}: recon {a} vs {b}");
    }
}

#[test]
fn exported_bi_jumprelu_gives_the_training_latents() {
    export_matches(Config::default(), EXPORT_BI_JUMPRELU);
    export_matches(
        Config {
            tied_thresholds: false,
            output: OutputSign::Raw,
            pre_encoder_bias: false,
            ..Config::default()
        },
        EXPORT_BI_JUMPRELU,
    );
    export_matches(
        Config {
            negative_side: false,
            ..Config::default()
        },
        EXPORT_BI_JUMPRELU,
    );
    export_matches(
        Config {
            tied_magnitudes: false,
            ..Config::default()
        },
        ARCH,
    );
}

#[test]
fn dead_latents_get_their_thresholds_reset() {
    let cfg = Config {
        threshold_reset_every: 5,
        reset_b_gate: true,
        ..Config::default()
    };
    let mut s = SaGsae::new(cfg, D, F, &mut Rng::new(14)).unwrap();
    randomise(&mut s, 15);
    let mut dead = vec![false; F];
    dead[2] = true;
    dead[7] = true;
    assert!(s.revive_dead(4, &dead).is_empty(), "only every 5 steps");
    let reset = s.revive_dead(5, &dead);
    let t = s.ix.t[0];
    assert_eq!(reset, vec![(t, 2), (1, 2), (t, 7), (1, 7)]);
    let th = &s.params()[t].data;
    assert_eq!(th[2], 0.05f32.ln());
    assert_ne!(th[3], 0.05f32.ln());
    assert_eq!(s.params()[1].data[7], 0.0);
    assert_eq!(param(s.params(), "revived").unwrap().data[0], 2.0);
    let (out, _, _) = run(&mut s, &x(1));
    assert_eq!(out.metrics.iter().find(|t| t.0 == "revived").unwrap().1, 2.0);
}
