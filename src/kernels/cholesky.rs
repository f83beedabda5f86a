//! Blocked Cholesky factorisation and solve in f64 on the `gemm` crate: the dense linear
//! algebra of PAM-SGD's closed-form decoder step (`jsae_pamsgd.md` §2.2).

use rayon::prelude::*;

/// Block size of the Cholesky factorisation and the triangular solves.
const NB: usize = 64;

/// In-place lower Cholesky factor of the SPD matrix `a: [m, m]` (row-major; the strict
/// upper triangle is left as scratch). `Err(j)`: the pivot at `j` was not positive.
pub fn cholesky(a: &mut [f64], m: usize) -> Result<(), usize> {
    assert_eq!(a.len(), m * m, "invariant: a is [m, m]");
    let mut j0 = 0;
    while j0 < m {
        let j1 = (j0 + NB).min(m);
        // 1. diagonal block, unblocked
        for j in j0..j1 {
            let mut s = a[j * m + j];
            for k in j0..j {
                s -= a[j * m + k] * a[j * m + k];
            }
            if !(s > 0.0 && s.is_finite()) {
                return Err(j);
            }
            let l = s.sqrt();
            a[j * m + j] = l;
            for i in j + 1..j1 {
                let mut v = a[i * m + j];
                for k in j0..j {
                    v -= a[i * m + k] * a[j * m + k];
                }
                a[i * m + j] = v / l;
            }
        }
        if j1 == m {
            break;
        }
        // 2. panel below the diagonal block: L_ij = A_ij L_jj⁻ᵀ, parallel over rows
        let (top, below) = a.split_at_mut(j1 * m);
        let diag = &top[..];
        below.par_chunks_mut(m).for_each(|row| {
            for j in j0..j1 {
                let (done, cur) = row.split_at_mut(j);
                let dj = &diag[j * m..j * m + j];
                let mut v = cur[0];
                for (a, b) in done[j0..].iter().zip(&dj[j0..]) {
                    v -= a * b;
                }
                cur[0] = v / diag[j * m + j];
            }
        });
        // 3. trailing update A22 −= L21 L21ᵀ
        let rest = m - j1;
        let w = j1 - j0;
        let base = a.as_mut_ptr();
        // SAFETY: dst is the block a[j1.., j1..]; lhs and rhs read the block a[j1.., j0..j1],
        // which is disjoint from dst; all strides stay within the m×m buffer.
        unsafe {
            let dst = base.add(j1 * m + j1);
            let p = base.add(j1 * m + j0) as *const f64;
            gemm::gemm(
                rest,
                rest,
                w,
                dst,
                1,
                m as isize,
                true,
                p,
                1,
                m as isize,
                p,
                m as isize,
                1,
                1.0,
                -1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        j0 = j1;
    }
    Ok(())
}

/// Solve `L Lᵀ X = R` in place for `r: [m, d]` with the factor from [`cholesky`].
pub fn chol_solve(l: &[f64], m: usize, r: &mut [f64], d: usize) {
    // forward: L Y = R
    let mut j0 = 0;
    while j0 < m {
        let j1 = (j0 + NB).min(m);
        if j0 > 0 {
            let (done, cur) = r.split_at_mut(j0 * d);
            // SAFETY: dst = r[j0..j1, :], lhs = l[j0..j1, 0..j0], rhs = r[0..j0, :] (disjoint).
            unsafe {
                gemm::gemm(
                    j1 - j0,
                    d,
                    j0,
                    cur.as_mut_ptr(),
                    1,
                    d as isize,
                    true,
                    l.as_ptr().add(j0 * m),
                    1,
                    m as isize,
                    done.as_ptr(),
                    1,
                    d as isize,
                    1.0,
                    -1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        for i in j0..j1 {
            let (prev, cur) = r.split_at_mut(i * d);
            let row = &mut cur[..d];
            for k in j0..i {
                let c = l[i * m + k];
                let src = &prev[k * d..(k + 1) * d];
                row.iter_mut().zip(src).for_each(|(a, b)| *a -= c * b);
            }
            let inv = 1.0 / l[i * m + i];
            row.iter_mut().for_each(|v| *v *= inv);
        }
        j0 = j1;
    }
    // backward: Lᵀ X = Y
    let nblocks = m.div_ceil(NB);
    for bi in (0..nblocks).rev() {
        let j0 = bi * NB;
        let j1 = (j0 + NB).min(m);
        if j1 < m {
            let (head, done) = r.split_at_mut(j1 * d);
            // SAFETY: dst = r[j0..j1, :]; lhs(a, b) = l[j1 + b, j0 + a] (Lᵀ block);
            // rhs = r[j1.., :] (disjoint from dst).
            unsafe {
                gemm::gemm(
                    j1 - j0,
                    d,
                    m - j1,
                    head.as_mut_ptr().add(j0 * d),
                    1,
                    d as isize,
                    true,
                    l.as_ptr().add(j1 * m + j0),
                    m as isize,
                    1,
                    done.as_ptr(),
                    1,
                    d as isize,
                    1.0,
                    -1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        for i in (j0..j1).rev() {
            let (head, tail) = r.split_at_mut((i + 1) * d);
            let row = &mut head[i * d..];
            for k in i + 1..j1 {
                let c = l[k * m + i];
                let src = &tail[(k - i - 1) * d..(k - i) * d];
                row.iter_mut().zip(src).for_each(|(a, b)| *a -= c * b);
            }
            let inv = 1.0 / l[i * m + i];
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn cholesky_solves_spd_systems_across_block_boundaries() {
        let mut rng = Rng::new(1);
        for &m in &[1usize, 5, 64, 130] {
            let d = 3;
            let b: Vec<f64> = (0..m * m).map(|_| rng.normal()).collect();
            // A = BBᵀ + m I
            let mut a = vec![0.0; m * m];
            for i in 0..m {
                for j in 0..m {
                    a[i * m + j] = (0..m).map(|k| b[i * m + k] * b[j * m + k]).sum::<f64>();
                }
                a[i * m + i] += m as f64;
            }
            let x: Vec<f64> = (0..m * d).map(|_| rng.normal()).collect();
            let mut r = vec![0.0; m * d];
            for i in 0..m {
                for j in 0..d {
                    r[i * d + j] = (0..m).map(|k| a[i * m + k] * x[k * d + j]).sum::<f64>();
                }
            }
            let mut l = a.clone();
            cholesky(&mut l, m).unwrap();
            chol_solve(&l, m, &mut r, d);
            let err = r
                .iter()
                .zip(&x)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-8, "m = {m}: max error {err}");
        }
        let mut not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky(&mut not_pd, 2), Err(1));
    }
}
