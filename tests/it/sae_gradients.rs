//! Finite-difference checks of every hand-written SAE gradient (sae_variants.md §2–6, §8).
//!
//! For every variant of `ArchConfig::examples()` and two code densities (one below the
//! kernels' `DENSE_FALLBACK`, so the sparse `decode` / `entry_dots` / `accumulate_rows` paths
//! run, and one above it, so the dense-GEMM fallback runs) the gradient that
//! `forward_backward` writes for a seeded sample of entries of every trainable parameter is
//! compared with the central finite difference of the returned `loss` (f64 loss, f32
//! parameters). Only the public surface that survives the `ArchConfig` refactor is used:
//! `examples()`, `kind()`, `build()`, the `Sae` trait's `params`/`params_mut`/
//! `forward_backward`, `StepOutput::loss`, the workspace codes, and (to read a
//! hyperparameter) the config's serde form, which is the pipeline-file format.
//!
//! What finite differences cannot see, and how it is handled:
//! - kinks: an entry whose ±h perturbation changes the active set (TopK boundary, ReLU at 0,
//!   a gate or JumpReLU threshold crossing, a k-means reassignment) is skipped; this is
//!   detected by comparing `ws.codes` and `ws.aux` (index lists and row offsets) of the two
//!   perturbed runs with the unperturbed one;
//! - stop-gradients: the Gated (§4.2) and unit-decoder SA-GSAE (§6.2) aux terms use
//!   `sg(W_dec)` and `sg(b_dec)`, so the loss is not the potential of those two gradients and
//!   they are excluded; AuxK (§3.3) uses `e = sg(x − x̂)`, see [`check_auxk`];
//! - straight-through estimators: JumpReLU's `scaled_log_threshold` gradient (§5.2) is a
//!   pseudo-gradient; it is checked against the spec's formula recomputed here from the
//!   parameters (see [`check_jumprelu_ste`]);
//! - state updated by `forward_backward` (BatchTopK's θ, k-means centroids and counts): every
//!   evaluation starts by restoring a snapshot of all parameters.

use std::collections::BTreeSet;

use saepipe::kernels::DENSE_FALLBACK;
use saepipe::sae::{ArchConfig, Param, Sae, StepInput, Workspace};
use saepipe::util::rng::Rng;

const D: usize = 16;
/// Tokens per batch (k-means: at least one per cluster, `max(N, d_sae)`).
const N: usize = 64;
/// Perturbation size: the loss is piecewise quadratic in most parameters (central differences
/// are exact there); small enough that few entries cross a kink.
const H: f32 = 1e-3;
/// Entries sampled per parameter tensor.
const SAMPLES: usize = 20;
/// `|g_fd − g| <= TOL · max(floor, |g|)`, `floor` = 1 except for the AuxK term (see
/// [`check_auxk`]).
const TOL: f64 = 5e-3;
/// Each checked tensor must have a checked entry with `|g| >= 2·TOL·floor`, so a factor-2
/// error (an error of `|g|`) exceeds the tolerance twofold and a sign flip (`2|g|`) fourfold.
const TEETH: f64 = 2.0 * TOL;
/// Tolerance floor of the AuxK checks.
const AUX_FLOOR: f64 = 1e-2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Density {
    Sparse,
    Dense,
}

/// How a parameter's gradient is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    /// Central finite differences of the loss.
    Fd,
    /// Finite differences on the subspace rows only; the k-means centroid rows must have a
    /// zero gradient (they are moved by mini-batch k-means, `jsae_pamsgd.md` §2.4).
    FdSubspaceRows,
    /// Straight-through estimator: checked against the spec formula.
    Ste,
    /// Not a derivative of the loss.
    Excluded(&'static str),
}

fn policy(kind: &str, name: &str, cfg: &serde_json::Value) -> Policy {
    match (kind, name) {
        ("gated", "W_dec" | "b_dec") => Policy::Excluded(
            "§4.2: the aux reconstruction uses sg(W_dec), sg(b_dec); the loss is not their potential",
        ),
        ("sa_gsae", "W_dec" | "b_dec") if cfg["decoder_norm"] == "unit" => Policy::Excluded(
            "§6.2 unit decoder: aux term uses sg(W_dec), sg(b_dec) (decoder_norm = penalty is FD-checked in src/sae/sa_gsae/tests.rs)",
        ),
        ("sa_gsae", n)
            if n.starts_with("log_threshold")
                && (cfg["threshold_ste"] == true || cfg["sparsity"] == "l0") =>
        {
            Policy::Excluded("§6.4: rectangle-kernel STE / L0 pseudo-gradient")
        }
        ("jumprelu", "scaled_log_threshold") => Policy::Ste,
        ("kmeans_pca", "W_enc" | "W_dec") => Policy::FdSubspaceRows,
        _ => Policy::Fd,
    }
}

struct Run {
    loss: f64,
    grads: Vec<Vec<f32>>,
    ws: Workspace,
}

/// Restore `snap` into the SAE, add `delta = (param, entry, h)` if given, run one
/// `forward_backward`.
fn run(
    sae: &mut dyn Sae,
    snap: &[Param],
    x: &[f32],
    dead: &[bool],
    delta: Option<(usize, usize, f32)>,
) -> Run {
    for (p, s) in sae.params_mut().iter_mut().zip(snap) {
        p.data.copy_from_slice(&s.data);
    }
    if let Some((pi, e, h)) = delta {
        sae.params_mut()[pi].data[e] += h;
    }
    let mut grads: Vec<Vec<f32>> = snap.iter().map(|p| vec![0.0; p.data.len()]).collect();
    let mut ws = Workspace::default();
    let input = StepInput {
        x,
        n: x.len() / D,
        step: 1,
        sparsity_scale: 1.0,
        dead,
    };
    let out = sae.forward_backward(&input, &mut grads, &mut ws).unwrap();
    assert!(out.loss.is_finite());
    Run {
        loss: out.loss,
        grads,
        ws,
    }
}

fn density(ws: &Workspace, f: usize) -> f64 {
    ws.codes.nnz() as f64 / (ws.codes.n() * f) as f64
}

/// Same active set (main codes and aux list: AuxK selection, open gates, JumpReLU band).
fn same_sets(a: &Workspace, b: &Workspace) -> bool {
    a.codes.indptr == b.codes.indptr
        && a.codes.idx == b.codes.idx
        && a.aux.indptr == b.aux.indptr
        && a.aux.idx == b.aux.idx
}

fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| s * rng.normal() as f32).collect()
}

fn index(sae: &dyn Sae, name: &str) -> Option<usize> {
    sae.params().iter().position(|p| p.name == name)
}

/// Result of one checked tensor, for the coverage table.
struct Row {
    label: String,
    param: &'static str,
    how: String,
}

/// Finite-difference check of `SAMPLES` entries of parameter `pi`. For per-latent tensors
/// (`[f]`, `[f, d]`) three quarters of the entries come from latents in `prefer` (active
/// ones), the rest from any latent; `allowed` filters latents. Returns (checked, skipped,
/// max |g| checked, max error / max(floor, |g|)).
#[allow(clippy::too_many_arguments)]
fn fd_tensor(
    sae: &mut dyn Sae,
    snap: &[Param],
    x: &[f32],
    dead: &[bool],
    base: &Run,
    pi: usize,
    f: usize,
    prefer: &BTreeSet<u32>,
    allowed: &dyn Fn(usize) -> bool,
    floor: f64,
    rng: &mut Rng,
    label: &str,
) -> (usize, usize, f64, f64) {
    let p = &snap[pi];
    let len = p.data.len();
    let per_latent = p.shape[0] == f && len.is_multiple_of(f);
    let cols = len / f;
    let pool: Vec<usize> = prefer
        .iter()
        .map(|&i| i as usize)
        .filter(|&i| allowed(i))
        .collect();
    let possible = if per_latent {
        (0..f).filter(|&i| allowed(i)).count() * cols
    } else {
        len
    };
    let target = SAMPLES.min(possible);
    let mut entries = BTreeSet::new();
    let mut s = 0;
    while entries.len() < target && s < 100 * SAMPLES {
        s += 1;
        let e = if per_latent {
            let lat = if s % 4 != 3 && !pool.is_empty() {
                pool[rng.below(pool.len() as u64) as usize]
            } else {
                let mut l = rng.below(f as u64) as usize;
                for _ in 0..10_000 {
                    if allowed(l) {
                        break;
                    }
                    l = rng.below(f as u64) as usize;
                }
                l
            };
            lat * cols + rng.below(cols as u64) as usize
        } else {
            rng.below(len as u64) as usize
        };
        if !per_latent || allowed(e / cols) {
            entries.insert(e);
        }
    }
    let (mut checked, mut skipped, mut max_g, mut max_err) = (0, 0, 0.0f64, 0.0f64);
    for &e in &entries {
        let v0 = p.data[e];
        // A perturbation that changes the active set (main codes or aux list) crosses a kink
        // (TopK boundary, ReLU 0, gate, JumpReLU band, k-means reassignment), where the
        // finite difference is meaningless: retry with a 4× and 16× smaller step, then skip.
        let mut fd = None;
        for h in [H, H / 4.0, H / 16.0] {
            let rp = run(sae, snap, x, dead, Some((pi, e, h)));
            let rm = run(sae, snap, x, dead, Some((pi, e, -h)));
            if same_sets(&rp.ws, &base.ws) && same_sets(&rm.ws, &base.ws) {
                // the perturbations actually applied in f32
                let (hp, hm) = (((v0 + h) - v0) as f64, (v0 - (v0 - h)) as f64);
                fd = Some((rp.loss - rm.loss) / (hp + hm));
                break;
            }
        }
        let Some(fd) = fd else {
            skipped += 1;
            continue;
        };
        let g = base.grads[pi][e] as f64;
        let err = (fd - g).abs() / g.abs().max(floor);
        assert!(
            err <= TOL,
            "{label}: {}[{e}]: finite difference {fd:.6e} vs hand-written {g:.6e}",
            p.name
        );
        checked += 1;
        max_g = max_g.max(g.abs());
        max_err = max_err.max(err);
    }
    assert!(
        checked >= target.div_ceil(2),
        "{label}: {}: only {checked} entries checked ({skipped} crossed a kink)",
        p.name
    );
    assert!(
        max_g >= TEETH * floor,
        "{label}: {}: largest checked |g| = {max_g:.3e}: the check could not see a sign error",
        p.name
    );
    (checked, skipped, max_g, max_err)
}

/// Small random offsets on every trainable parameter so that tied initialisations and zero
/// biases do not hide terms.
fn randomise(sae: &mut dyn Sae, rng: &mut Rng) {
    let d = sae.dims().0;
    for p in sae.params_mut() {
        if !p.trainable {
            continue;
        }
        let s = if p.shape.len() == 2 {
            0.3 / (d as f32).sqrt()
        } else {
            0.1
        };
        for v in &mut p.data {
            *v += s * rng.normal() as f32;
        }
    }
}

/// The parameter that sets the density of penalty variants and the direction in which
/// adding to it makes the codes sparser: the log-threshold (JumpReLU, SA-GSAE: a larger θ
/// closes gates on both sides) or the gate / encoder bias (ReLU+L1, Gated).
fn knob(sae: &dyn Sae, kind: &str) -> Option<(usize, f32)> {
    if matches!(
        kind,
        "topk" | "batchtopk" | "abs_topk" | "kmeans" | "kmeans_pca" | "local_pca" | "kflats"
    ) {
        return None; // density set by k, or L0 = 1 (+ rank)
    }
    if let Some(i) = index(sae, "log_threshold").or_else(|| index(sae, "scaled_log_threshold")) {
        return Some((i, 1.0));
    }
    index(sae, "b_gate")
        .or_else(|| index(sae, "b_enc"))
        .map(|i| (i, -1.0))
}

struct Case {
    sae: Box<dyn Sae>,
    snap: Vec<Param>,
    x: Vec<f32>,
    f: usize,
    kind: &'static str,
    cfg: serde_json::Value,
    label: String,
}

fn setup(arch: &ArchConfig, dens: Density) -> Case {
    let kind = arch.kind();
    let f = match (kind, dens) {
        (_, Density::Sparse) => 256,
        // L0 = 1 (local_pca, kflats: their subspaces are 0 until a PCA pass): 1/8 is above
        // the fallback
        ("kmeans" | "local_pca" | "kflats", Density::Dense) => 8,
        (_, Density::Dense) => 32,
    };
    let mut sae = arch.build(D, f, 11).unwrap();
    let mut rng = Rng::new(17 + f as u64);
    randomise(sae.as_mut(), &mut rng);
    let n = if kind.starts_with("kmeans") || matches!(kind, "local_pca" | "kflats") {
        N.max(f)
    } else {
        N
    };
    let x = randn(&mut rng, n * D, 1.0);
    let dead = vec![false; f];
    // warm-up step: seeds the k-means centroids, sets BatchTopK's θ
    let mut grads: Vec<Vec<f32>> = sae
        .params()
        .iter()
        .map(|p| vec![0.0; p.data.len()])
        .collect();
    let input = StepInput {
        x: &x,
        n,
        step: 1,
        sparsity_scale: 1.0,
        dead: &dead,
    };
    sae.forward_backward(&input, &mut grads, &mut Workspace::default())
        .unwrap();
    let mut snap = sae.params().to_vec();
    if let Some((ki, dir)) = knob(sae.as_ref(), kind) {
        // bisection on a shift of the knob until the density is in the target band
        let (t_lo, t_hi) = match dens {
            Density::Sparse => (0.01, 0.03),
            Density::Dense => (0.15, 0.35),
        };
        let base = snap[ki].data.clone();
        let (mut lo, mut hi) = (-20.0f32, 20.0f32); // density(lo) high, density(hi) low
        let mut ok = false;
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            for (v, b) in snap[ki].data.iter_mut().zip(&base) {
                *v = b + dir * mid;
            }
            let r = run(sae.as_mut(), &snap, &x, &dead, None);
            let dn = density(&r.ws, f);
            if dn > t_hi {
                lo = mid;
            } else if dn < t_lo {
                hi = mid;
            } else {
                ok = true;
                break;
            }
        }
        assert!(
            ok,
            "{kind}: no knob shift gives a density in [{t_lo}, {t_hi}]"
        );
    }
    Case {
        sae,
        snap,
        x,
        f,
        kind,
        cfg: serde_json::to_value(arch).unwrap(),
        label: format!("{kind} d_sae={f} {dens:?}"),
    }
}

fn assert_path(label: &str, ws: &Workspace, f: usize, dens: Density) -> f64 {
    let dn = density(ws, f);
    match dens {
        Density::Sparse => assert!(
            dn > 0.0 && dn < DENSE_FALLBACK,
            "{label}: density {dn} does not take the sparse path"
        ),
        Density::Dense => assert!(
            dn > DENSE_FALLBACK,
            "{label}: density {dn} does not take the dense path"
        ),
    }
    dn
}

/// Every trainable parameter of one case (dead mask off).
fn check_case(c: &mut Case, dens: Density, rows: &mut Vec<Row>) {
    let dead = vec![false; c.f];
    let base = run(c.sae.as_mut(), &c.snap, &c.x, &dead, None);
    let dn = assert_path(&c.label, &base.ws, c.f, dens);
    let active: BTreeSet<u32> = base.ws.codes.idx.iter().copied().collect();
    let mut rng = Rng::new(99 + c.f as u64);
    let label = format!("{} (density {dn:.3})", c.label);
    for pi in 0..c.snap.len() {
        let (name, trainable) = (c.snap[pi].name, c.snap[pi].trainable);
        if !trainable {
            assert!(
                base.grads[pi].iter().all(|&g| g == 0.0),
                "{label}: non-trainable {name} has a gradient"
            );
            rows.push(Row {
                label: label.clone(),
                param: name,
                how: "not trainable (state); gradient asserted zero".into(),
            });
            continue;
        }
        let how = match policy(c.kind, name, &c.cfg) {
            Policy::Excluded(why) => format!("excluded: {why}"),
            Policy::Ste => {
                let n = check_jumprelu_ste(c, &base, pi);
                format!("STE formula §5.2 ({n} band entries)")
            }
            Policy::Fd => {
                let (k, s, g, e) = fd_tensor(
                    c.sae.as_mut(),
                    &c.snap,
                    &c.x,
                    &dead,
                    &base,
                    pi,
                    c.f,
                    &active,
                    &|_| true,
                    1.0,
                    &mut rng,
                    &label,
                );
                format!("FD: {k} checked, {s} kink-skipped, max|g| {g:.2e}, max err {e:.1e}")
            }
            Policy::FdSubspaceRows => {
                let stride = 1 + c.cfg["rank"].as_u64().unwrap() as usize;
                let d = c.snap[pi].data.len() / c.f;
                for (i, row) in base.grads[pi].chunks(d).enumerate() {
                    if i % stride == 0 {
                        assert!(
                            row.iter().all(|&g| g == 0.0),
                            "{label}: {name} centroid row {i} has a gradient"
                        );
                    }
                }
                let (k, s, g, e) = fd_tensor(
                    c.sae.as_mut(),
                    &c.snap,
                    &c.x,
                    &dead,
                    &base,
                    pi,
                    c.f,
                    &active,
                    &|i| i % stride != 0,
                    1.0,
                    &mut rng,
                    &label,
                );
                format!(
                    "FD on subspace rows: {k} checked, {s} kink-skipped, max|g| {g:.2e}, max err {e:.1e}; centroid rows asserted zero"
                )
            }
        };
        rows.push(Row {
            label: label.clone(),
            param: name,
            how,
        });
    }
}

/// JumpReLU threshold (§5.2): `∂L/∂u_i = s θ_i Σ_b (1/ε) K((π_{b,i} − θ_i)/ε) (−θ_i G_{b,i} − λ/B)`
/// with `θ = exp(s·u)`, `s = threshold_lr_scale`,
/// with `π = W_enc x + b_enc` (§5.1, no pre-encoder bias), `f = π·H(π − θ)`,
/// `G_{b,i} = d_i·2(x̂_b − x_b)/B`, all recomputed here in f64 from the parameters.
/// Returns the number of band entries.
fn check_jumprelu_ste(c: &Case, base: &Run, pi: usize) -> usize {
    let p = |name: &str| &c.snap.iter().find(|p| p.name == name).unwrap().data;
    let (w_enc, b_enc, w_dec, b_dec, t) = (
        p("W_enc"),
        p("b_enc"),
        p("W_dec"),
        p("b_dec"),
        p("scaled_log_threshold"),
    );
    let s = c.cfg["threshold_lr_scale"].as_f64().unwrap();
    let eps = c.cfg["bandwidth"].as_f64().unwrap();
    let lambda = c.cfg["l0_coefficient"].as_f64().unwrap();
    let (f, n) = (c.f, c.x.len() / D);
    let theta: Vec<f64> = t.iter().map(|&v| (s * v as f64).exp()).collect();
    let mut pre = vec![0.0f64; n * f];
    for b in 0..n {
        for i in 0..f {
            pre[b * f + i] = b_enc[i] as f64
                + (0..D)
                    .map(|j| w_enc[i * D + j] as f64 * c.x[b * D + j] as f64)
                    .sum::<f64>();
        }
    }
    let mut want = vec![0.0f64; f];
    let mut band = 0;
    for b in 0..n {
        let mut g = [0.0f64; D];
        for (j, gj) in g.iter_mut().enumerate() {
            let mut xh = b_dec[j] as f64;
            for i in 0..f {
                let v = pre[b * f + i];
                if v > theta[i] {
                    xh += v * w_dec[i * D + j] as f64;
                }
            }
            *gj = 2.0 * (xh - c.x[b * D + j] as f64) / n as f64;
        }
        for i in 0..f {
            let u = (pre[b * f + i] - theta[i]) / eps;
            if u.abs() < 0.5 {
                band += 1;
                let gi: f64 = (0..D).map(|j| w_dec[i * D + j] as f64 * g[j]).sum();
                want[i] += s * theta[i] * (-theta[i] * gi - lambda / n as f64) / eps;
            }
        }
    }
    assert!(
        band >= 10,
        "{}: only {band} entries in the STE band",
        c.label
    );
    let mut max_w = 0.0f64;
    for (i, (&got, &w)) in base.grads[pi].iter().zip(&want).enumerate() {
        let got = got as f64;
        assert!(
            (got - w).abs() <= 1e-3 * w.abs().max(1.0),
            "{}: scaled_log_threshold[{i}]: hand-written {got:.6e} vs spec STE {w:.6e}",
            c.label
        );
        max_w = max_w.max(w.abs());
    }
    assert!(max_w >= TEETH, "{}: STE gradients all tiny", c.label);
    band
}

/// AuxK (§3.3) with a dead mask. `e = sg(x − x̂)` makes the loss not a potential for the
/// parameters that move `x̂`, so:
/// 1. dead latents are pushed out of the main selection (their `b_enc` lowered until none is
///    active), so their `W_enc` rows, `b_enc` and `W_dec` rows move only `ê`: their
///    gradients are checked by finite differences of the loss with the mask on;
/// 2. live latents get no AuxK gradient (`e` is detached): their gradients with the mask on
///    must equal those with the mask off, which `check_case` compares with finite differences;
/// 3. `b_dec` enters the aux term only through `x̃ = x − b_dec` in `π`, so its AuxK part is
///    `−Σ_i (∂L_aux/∂b_enc_i) w_enc_i`: asserted from the `b_enc` gradients checked in 1.
///
/// The AuxK gradients are `α = 1/32` times a term normalised by the batch variance of `e`,
/// so they are ~1e-4: the tolerance floor is [`AUX_FLOOR`] instead of 1. That is sound here
/// because perturbing a dead latent leaves `x̂` (and so the MSE) bitwise unchanged: only the
/// small AuxK term moves, and its rounding noise is far below the floor.
fn check_auxk(c: &mut Case, dens: Density, rows: &mut Vec<Row>) {
    let f = c.f;
    let dead: Vec<bool> = (0..f).map(|i| i % 4 == 3).collect();
    let off = vec![false; f];
    let be = index(c.sae.as_ref(), "b_enc").unwrap();
    let we = index(c.sae.as_ref(), "W_enc").unwrap();
    let wd = index(c.sae.as_ref(), "W_dec").unwrap();
    let bd = index(c.sae.as_ref(), "b_dec").unwrap();
    let mut shift = 0.0f32;
    let base_snap = c.snap[be].data.clone();
    // AbsTopK selects by |π|: a lower b_enc does not push a latent out, a smaller one does,
    // so its dead latents' W_enc rows and b_enc are shrunk by 0.8^steps instead.
    let signed = c.kind == "abs_topk";
    let mut steps = 0;
    let (on, snap) = loop {
        let mut snap = c.snap.clone();
        if signed {
            let s = 0.8f32.powi(steps);
            for (i, v) in snap[be].data.iter_mut().enumerate() {
                *v = base_snap[i] * if dead[i] { s } else { 1.0 };
            }
            for (i, row) in snap[we].data.chunks_mut(D).enumerate() {
                if dead[i] {
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
            shift = s;
        } else {
            for (i, v) in snap[be].data.iter_mut().enumerate() {
                *v = base_snap[i] - if dead[i] { shift } else { 0.0 };
            }
        }
        let r = run(c.sae.as_mut(), &snap, &c.x, &dead, None);
        if !r.ws.codes.idx.iter().any(|&i| dead[i as usize]) {
            break (r, snap);
        }
        shift += 0.25;
        steps += 1;
        assert!(
            shift < 20.0 && steps < 60,
            "{}: dead latents stay active",
            c.label
        );
    };
    let label = format!(
        "{} AuxK, {} dead, b_enc {} {shift}",
        c.label,
        f / 4,
        if signed { "scale" } else { "shift" }
    );
    assert_path(&label, &on.ws, f, dens);
    let off_run = run(c.sae.as_mut(), &snap, &c.x, &off, None);
    let aux_active: BTreeSet<u32> = on.ws.aux.idx.iter().copied().collect();
    assert!(
        on.ws.aux.nnz() >= 10 && aux_active.len() >= 2,
        "{label}: AuxK selected too little"
    );
    assert!(on.loss > off_run.loss, "{label}: no AuxK term in the loss");
    assert_eq!(on.ws.codes, off_run.ws.codes, "{label}: main codes");
    assert!(aux_active.iter().all(|&i| dead[i as usize]));
    let mut rng = Rng::new(7 + f as u64);
    for pi in [we, be, wd] {
        // 1. dead latents by finite differences
        let (k, s, g, e) = fd_tensor(
            c.sae.as_mut(),
            &snap,
            &c.x,
            &dead,
            &on,
            pi,
            f,
            &aux_active,
            &|i| dead[i],
            AUX_FLOOR,
            &mut rng,
            &label,
        );
        // 2. live latents: no AuxK gradient
        let cols = snap[pi].data.len() / f;
        let mut max_diff = 0.0f32;
        for i in (0..f).filter(|&i| !dead[i]) {
            for j in i * cols..(i + 1) * cols {
                let (a, b) = (on.grads[pi][j], off_run.grads[pi][j]);
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{label}: {}[{j}] of a live latent: {a} with the dead mask vs {b} without",
                    snap[pi].name
                );
                max_diff = max_diff.max((a - b).abs());
            }
        }
        rows.push(Row {
            label: label.clone(),
            param: snap[pi].name,
            how: format!(
                "dead rows FD: {k} checked, {s} kink-skipped, max|g| {g:.2e}, max err {e:.1e}; live rows = mask-off gradient (FD-checked)"
            ),
        });
    }
    // 3. b_dec: AuxK part through x̃ only
    let d_be: Vec<f32> = on.grads[be]
        .iter()
        .zip(&off_run.grads[be])
        .map(|(a, b)| a - b)
        .collect();
    let w = &snap[we].data;
    let mut norm = 0.0f64;
    for j in 0..D {
        let want: f64 = -(0..f)
            .map(|i| d_be[i] as f64 * w[i * D + j] as f64)
            .sum::<f64>();
        let got = (on.grads[bd][j] - off_run.grads[bd][j]) as f64;
        // f32 rounding of the O(1) main part that both runs add in a different order
        let noise = 1e-6 * (on.grads[bd][j] as f64).abs().max(1.0);
        assert!(
            (got - want).abs() <= TOL * want.abs() + noise,
            "{label}: AuxK part of b_dec[{j}]: {got:.6e} vs −W_encᵀ ∂L/∂b_enc = {want:.6e}"
        );
        norm += want * want;
    }
    assert!(
        norm.sqrt() >= TEETH * AUX_FLOOR,
        "{label}: AuxK b_dec part tiny"
    );
    rows.push(Row {
        label,
        param: "b_dec",
        how: format!(
            "AuxK part = −W_encᵀ·(AuxK part of ∂b_enc) (chain rule through x̃, ‖·‖ = {:.2e}); main part FD-checked with the mask off",
            norm.sqrt()
        ),
    });
}

fn check_all(dens: Density) {
    let mut rows = Vec::new();
    let t0 = std::time::Instant::now();
    for arch in ArchConfig::examples() {
        let mut c = setup(&arch, dens);
        check_case(&mut c, dens, &mut rows);
        if matches!(c.kind, "topk" | "batchtopk" | "abs_topk") {
            check_auxk(&mut c, dens, &mut rows);
        }
    }
    for r in &rows {
        println!("| {} | {} | {} |", r.label, r.param, r.how);
    }
    println!("{dens:?}: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn sparse_codes_gradients_match_finite_differences() {
    check_all(Density::Sparse);
}

#[test]
fn dense_codes_gradients_match_finite_differences() {
    check_all(Density::Dense);
}
