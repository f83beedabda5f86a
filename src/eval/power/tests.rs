//! The diagnostics against brute force on tiny random problems (`jsae_pamsgd.md` §2.1, §2.5).

use super::*;
use crate::sae::export::LoadedSae;
use crate::util::rng::Rng;

/// A site: `(latent, sign, p, c)`, value `⟨p, x⟩ + c`.
type Site = (u32, f64, Vec<f64>, f64);

fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| s * rng.normal() as f32).collect()
}

/// A `topk` or `abs_topk` file with random weights and a nonzero `b_dec`.
fn folded(arch: &str, d: usize, f: usize, k: usize, seed: u64) -> Folded {
    let mut rng = Rng::new(seed);
    Folded {
        architecture: arch.into(),
        d_in: d,
        d_sae: f,
        w_enc: randn(&mut rng, f * d, 1.0),
        w_dec: randn(&mut rng, f * d, 1.0),
        b_dec: randn(&mut rng, d, 0.3),
        per_latent: vec![("b_enc".into(), randn(&mut rng, f, 0.5))],
        apply_b_dec_to_input: true,
        k: Some(k),
        extra_cfg: vec![],
        saepipe_arch: arch.into(),
    }
}

/// The sites of the power diagram in input space: `(latent, sign, p, c)` with site value
/// `⟨p, x⟩ + c` (= σ·a_latent(x)); m of them, or 2m for AbsTopK.
fn sites(t: &Folded, signed: bool) -> Vec<Site> {
    let d = t.d_in;
    let mut out = Vec::new();
    for i in 0..t.d_sae {
        let w: Vec<f64> = t.w_enc[i * d..(i + 1) * d]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let wb: f64 = w.iter().zip(&t.b_dec).map(|(a, &b)| a * b as f64).sum();
        let c = t.per("b_enc")[i] as f64 - wb;
        out.push((i as u32, 1.0, w.clone(), c));
        if signed {
            out.push((i as u32, -1.0, w.iter().map(|v| -v).collect(), -c));
        }
    }
    out
}

fn value_at(site: &Site, x: &[f64]) -> f64 {
    site.2.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + site.3
}

/// Power distance `‖x − p‖² − (‖p‖² + 2c)` (= ‖x‖² − 2·value).
fn power_distance(site: &Site, x: &[f64]) -> f64 {
    let d2: f64 = site.2.iter().zip(x).map(|(p, v)| (v - p) * (v - p)).sum();
    let r2: f64 = site.2.iter().map(|p| p * p).sum::<f64>() + 2.0 * site.3;
    d2 - r2
}

fn combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn rec(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            rec(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(0, n, k, &mut Vec::new(), &mut out);
    out
}

/// One token through [`encode`]: its sorted candidates and its codes.
fn encode_one(t: &Folded, spec: PowerSpec, r: usize, x: &[f32]) -> (Vec<u32>, Vec<f32>, Codes) {
    let mut ws = Workspace::default();
    encode(t, spec, r, x, 1, &mut ws);
    let (ix, vs) = ws.aux.row(0);
    (ix.to_vec(), vs.to_vec(), ws.codes.clone())
}

/// The selected sites `(latent, sign)` of a token, sorted.
fn selection(ix: &[u32], vs: &[f32], k: usize, signed: bool) -> Vec<(u32, i8)> {
    let mut s: Vec<(u32, i8)> = ix[..k]
        .iter()
        .zip(vs)
        .map(|(&i, &v)| (i, if signed && v < 0.0 { -1 } else { 1 }))
        .collect();
    s.sort();
    s
}

#[test]
fn the_selection_is_the_k_power_nearest_sites() {
    for (arch, f, k) in [("topk", 7, 3), ("abs_topk", 6, 2), ("abs_topk", 5, 3)] {
        let d = 4;
        let t = folded(arch, d, f, k, 11);
        let spec = PowerSpec::of(&t).unwrap();
        let all = sites(&t, spec.signed);
        let loaded = LoadedSae {
            t: t.clone(),
            hook_name: String::new(),
        };
        let mut rng = Rng::new(5);
        let mut checked = 0;
        for _ in 0..60 {
            let x = randn(&mut rng, d, 1.5);
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let (ix, vs, codes) = encode_one(&t, spec, 2, &x);
            if margin(&vs, k, spec.signed).unwrap() < 1e-3 {
                continue; // a near-tie: f32 and f64 may order it differently
            }
            // every K-subset of the sites whose farthest member is nearer than the nearest
            // non-member: the K-th-order power cell containing x
            let pd: Vec<f64> = all.iter().map(|s| power_distance(s, &xd)).collect();
            let cells: Vec<Vec<(u32, i8)>> = combinations(all.len(), k)
                .into_iter()
                .filter(|c| {
                    let inner = c.iter().map(|&i| pd[i]).fold(f64::NEG_INFINITY, f64::max);
                    (0..all.len())
                        .filter(|i| !c.contains(i))
                        .all(|j| inner <= pd[j])
                })
                .map(|c| {
                    let mut s: Vec<(u32, i8)> =
                        c.iter().map(|&i| (all[i].0, all[i].1 as i8)).collect();
                    s.sort();
                    s
                })
                .collect();
            assert_eq!(cells.len(), 1, "{arch}: x lies in exactly one cell");
            assert_eq!(cells[0], selection(&ix, &vs, k, spec.signed), "{arch}");
            // and the codes are those of the loaded file's own encode: the selection, signed
            // (AbsTopK) or ReLU'd (TopK)
            let mut ws = Workspace::default();
            loaded.encode(&x, 1, &mut ws);
            assert_eq!(
                ws.codes, codes,
                "{arch}: power::encode codes = LoadedSae::encode"
            );
            let want: Vec<(u32, i8)> = cells[0]
                .iter()
                .copied()
                .filter(|&(i, _)| spec.signed || vs[ix.iter().position(|&j| j == i).unwrap()] > 0.0)
                .collect();
            let mut got: Vec<(u32, i8)> = codes
                .idx
                .iter()
                .zip(&codes.val)
                .map(|(&i, &v)| (i, if v < 0.0 { -1 } else { 1 }))
                .collect();
            got.sort();
            assert_eq!(got, want, "{arch}: codes");
            checked += 1;
        }
        assert!(checked >= 40, "{arch}: only {checked} tokens checked");
    }
}

/// Brute-force facet distance over the given competitor sites.
fn brute_facet(
    all: &[Site],
    sel: &[(u32, i8)],
    competitor: &dyn Fn(&Site) -> bool,
    x: &[f64],
) -> (f64, usize, usize) {
    let inside = |s: &Site| sel.contains(&(s.0, s.1 as i8));
    let mut best = (f64::INFINITY, 0, 0);
    for (a, sa) in all.iter().enumerate().filter(|(_, s)| inside(s)) {
        for (b, sb) in all
            .iter()
            .enumerate()
            .filter(|(_, s)| !inside(s) && competitor(s))
        {
            let num = value_at(sa, x) - value_at(sb, x);
            let den: f64 =
                sa.2.iter()
                    .zip(&sb.2)
                    .map(|(p, q)| (p - q) * (p - q))
                    .sum::<f64>()
                    .sqrt();
            if num / den < best.0 {
                best = (num / den, a, b);
            }
        }
    }
    best
}

#[test]
fn margin_and_facet_distance_match_brute_force_and_the_set_flips_at_the_facet() {
    for (arch, f, k) in [("topk", 9, 3), ("abs_topk", 8, 3), ("topk", 6, 1)] {
        let d = 5;
        let t = folded(arch, d, f, k, 3);
        let spec = PowerSpec::of(&t).unwrap();
        let signed = spec.signed;
        let all = sites(&t, signed);
        let mut norms = Vec::new();
        c::row_norms(&t.w_enc, d, &mut norms);
        let max_norm = norms.iter().copied().fold(0.0, f32::max);
        let mut rng = Rng::new(8);
        let mut flips = 0;
        for _ in 0..40 {
            let x = randn(&mut rng, d, 1.5);
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            // all m − K competitors
            let (ix, vs, _) = encode_one(&t, spec, f - k, &x);
            assert_eq!(ix.len(), f);
            let sel = selection(&ix, &vs, k, signed);
            // margin: K-th minus (K+1)-th site value, by sorting in f64
            let mut vals: Vec<f64> = all.iter().map(|s| value_at(s, &xd)).collect();
            vals.sort_by(|a, b| b.total_cmp(a));
            let m = margin(&vs, k, signed).unwrap();
            assert!(
                (m - (vals[k - 1] - vals[k])).abs() < 1e-4,
                "{arch}: margin {m}"
            );
            if m < 1e-3 {
                continue;
            }
            let got = facet_distance((&ix, &vs), k, signed, &t.w_enc, d, &norms, max_norm).unwrap();
            let (want, a, b) = brute_facet(&all, &sel, &|_| true, &xd);
            assert!(
                (got - want).abs() <= 1e-4 * want.max(1.0),
                "{arch}: facet distance {got} vs brute force {want}"
            );
            // move x towards the nearest facet: inside before it, another cell after it
            let (pa, pb) = (&all[a].2, &all[b].2);
            let den: f64 = pa
                .iter()
                .zip(pb)
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f64>()
                .sqrt();
            let moved = |s: f64| -> Vec<f32> {
                x.iter()
                    .zip(pa.iter().zip(pb))
                    .map(|(&v, (p, q))| (v as f64 - s * want * (p - q) / den) as f32)
                    .collect()
            };
            let (bi, bv, _) = encode_one(&t, spec, f - k, &moved(0.97));
            assert_eq!(
                selection(&bi, &bv, k, signed),
                sel,
                "{arch}: left the cell early"
            );
            let (ai, av, _) = encode_one(&t, spec, f - k, &moved(1.03));
            assert_ne!(
                selection(&ai, &av, k, signed),
                sel,
                "{arch}: no flip at the facet"
            );
            flips += 1;
            // with only R = 1 next candidate: exactly the brute force over those competitors,
            // never below the true distance
            let (ix1, vs1, _) = encode_one(&t, spec, 1, &x);
            let next = ix1[k];
            let near =
                facet_distance((&ix1, &vs1), k, signed, &t.w_enc, d, &norms, max_norm).unwrap();
            let in_sel = |s: &Site| sel.iter().any(|&(i, _)| i == s.0);
            let (want1, _, _) = brute_facet(&all, &sel, &|s| s.0 == next || in_sel(s), &xd);
            assert!(
                near >= want - 1e-6,
                "{arch}: R = 1 below the exact distance"
            );
            assert!(
                (near - want1).abs() <= 1e-4 * want1.max(1.0),
                "{arch}: R = 1: {near} vs brute force over the next candidate {want1}"
            );
        }
        assert!(flips >= 25, "{arch}: only {flips} tokens checked");
    }
}

#[test]
fn local_pca_optimum_is_the_sum_of_the_trailing_eigenvalues() {
    // ±a e1, ±b e2, ±c e3 (plus an offset): mean 0, Cov = diag(a², b², c²)/3.
    let (a, b, cc) = (3.0f64, 2.0f64, 0.5f64);
    let off = [1.0f64, -2.0, 0.5];
    let mut pts = Vec::new();
    for (axis, s) in [(0, a), (1, b), (2, cc)] {
        for sign in [1.0, -1.0] {
            let mut p = off;
            p[axis] += sign * s;
            pts.push(p);
        }
    }
    let d = 3;
    let mut sum = vec![0.0; d];
    let mut sc = vec![0.0; d * (d + 1) / 2];
    for p in &pts {
        let mut at = 0;
        for i in 0..d {
            sum[i] += p[i];
            for j in i..d {
                sc[at] += p[i] * p[j];
                at += 1;
            }
        }
    }
    let n = pts.len() as u64;
    let ev = |k| local_pca_optimum(&sum, &sc, n, d, k);
    assert!((ev(1) - (b * b + cc * cc) / 3.0).abs() < 1e-9, "{}", ev(1));
    assert!((ev(2) - cc * cc / 3.0).abs() < 1e-9, "{}", ev(2));
    assert_eq!(ev(3), 0.0);
}

#[test]
fn stats_count_sets_and_run_the_affine_pass() {
    let (d, f, k, n) = (3, 4, 1, 400);
    let t = folded("topk", d, f, k, 2);
    let spec = PowerSpec::of(&t).unwrap();
    let cfg = PowerConfig {
        candidates: 2,
        min_cell_tokens: Some(20),
    };
    let mut rng = Rng::new(4);
    let x = randn(&mut rng, n * d, 1.0);
    let mut st = PowerStats::new(&t, spec, cfg);
    let mut ws = Workspace::default();
    encode(&t, spec, st.candidates(), &x, n, &mut ws);
    // a "reconstruction" that is exact on every token: the SAE side of the gap is 0
    st.update(&x, &x, &ws.aux, &t.w_enc);
    assert!(st.begin_affine());
    st.affine_update(&x[..(n / 2) * d], &t.b_dec);
    st.affine_update(&x[(n / 2) * d..], &t.b_dec);
    let v = st.finish(1.0);
    let n_sets = v.pd_n_active_sets.unwrap();
    // K = 1: the active sets are the top-1 cells
    assert_eq!(Some(n_sets), v.pd_n_top1_cells);
    assert!((1.0..=f as f64).contains(&n_sets));
    assert!(v.pd_eff_active_sets.unwrap() <= n_sets + 1e-9);
    assert!(v.pd_top_set_share.unwrap() >= 1.0 / n_sets);
    assert!(v.pd_margin_mean.unwrap() > 0.0 && v.pd_facet_dist_mean.unwrap() > 0.0);
    assert_eq!(v.pd_affine_sae_mse, Some(0.0));
    assert!(v.pd_affine_pca_mse.unwrap() > 0.0);
    assert_eq!(v.pd_affine_ratio, Some(0.0));
    let frac = v.pd_affine_tokens_frac.unwrap();
    assert!(frac > 0.0 && frac <= 1.0);
    // an architecture without a diagram
    assert_eq!(PowerSpec::of(&folded("jumprelu", d, f, k, 2)), None);
}
