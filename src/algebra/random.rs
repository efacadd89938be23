//! Haar-random orthogonal matrices that are bit-identical on every machine: portable Gaussian
//! numbers and the module's own Householder QR.
use faer::{Mat, MatRef};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A Haar-distributed (uniformly random) `d × d` orthogonal matrix: `Q` of the QR factorisation of
/// a standard Gaussian matrix, with the signs fixed so that `R` has a positive diagonal.
///
/// Bit-identical for a given seed on every machine and thread count: the Gaussian entries come
/// from ChaCha8 (`seed_from_u64`) through the Marsaglia polar method with a portable logarithm,
/// and the Householder QR is this module's own, with a fixed order of operations per column (no
/// FMA, no platform libm; faer's QR is documented as non-portable across platforms).
/// Cost ≈ (8/3)·d³ flops on all cores: about a second at d = 1024, tens of seconds at d = 4096.
pub fn random_orthogonal(d: usize, seed: u64) -> Mat<f64> {
    let q = haar_orthogonal(d, seed, worker_threads());
    MatRef::from_column_major_slice(&q, d, d).to_owned()
}

/// Columns per block of the QR: a block of columns stays in cache while the earlier reflectors
/// stream past it.
pub(super) const QR_BLOCK: usize = 64;
/// Fewer elements than this in a block of columns: not worth a thread.
pub(super) const PARALLEL_MIN: usize = 1 << 14;

pub(super) fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `d × d` Haar orthogonal matrix, column-major. The result does not depend on `threads`.
pub(super) fn haar_orthogonal(d: usize, seed: u64, threads: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut a = Vec::with_capacity(d * d + 1);
    while a.len() < d * d {
        let (x, y) = gaussian_pair(&mut rng);
        a.push(x);
        a.push(y);
    }
    a.truncate(d * d);
    let (tau, r_diag) = householder_qr(&mut a, d, threads);
    let mut q = form_q(&a, &tau, d, threads);
    // Q diag(sign R_jj) goes with R' = diag(sign R_jj) R, whose diagonal is positive.
    for (col, &r) in q.chunks_exact_mut(d.max(1)).zip(&r_diag) {
        if r < 0.0 {
            col.iter_mut().for_each(|x| *x = -*x);
        }
    }
    q
}

/// A uniform number in (-1, 1), from the top 53 bits of one ChaCha word (exact arithmetic).
pub(super) fn symmetric_unit(rng: &mut ChaCha8Rng) -> f64 {
    let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64); // [0, 1)
    2.0 * u - 1.0
}

/// Two independent standard normal numbers (Marsaglia's polar method: only +, ×, ÷, √ and
/// [`portable_ln`], all of which round the same way everywhere).
pub(super) fn gaussian_pair(rng: &mut ChaCha8Rng) -> (f64, f64) {
    loop {
        let u = symmetric_unit(rng);
        let v = symmetric_unit(rng);
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            let f = (-2.0 * portable_ln(s) / s).sqrt();
            return (u * f, v * f);
        }
    }
}

/// Natural logarithm of a positive normal number from basic arithmetic only (the platform's libm
/// `ln` may differ in the last bit between systems). Relative error ~1e-16.
pub(super) fn portable_ln(x: f64) -> f64 {
    debug_assert!(x.is_normal() && x > 0.0);
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52)); // [1, 2)
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh t, t = (m − 1)/(m + 1), |t| ≤ 0.172: 2 (t + t³/3 + t⁵/5 + …)
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut series = 0.0;
    for n in (0..14).rev() {
        series = series * t2 + 1.0 / (2 * n + 1) as f64;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * t * series
}

/// Σ a_i b_i with eight independent partial sums in a fixed order: vectorisable, and the same
/// bits whatever the vector width.
pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y ← H_r y`, `H_r = I − τ v vᵀ`, with `v` stored in `reflector[r + 1..]` below an implicit 1 at r.
pub(super) fn apply_reflector(reflector: &[f64], r: usize, tau: f64, y: &mut [f64]) {
    if tau == 0.0 {
        return;
    }
    let v = &reflector[r + 1..];
    let w = tau * (y[r] + dot(v, &y[r + 1..]));
    y[r] -= w;
    for (y, v) in y[r + 1..].iter_mut().zip(v) {
        *y -= w * v;
    }
}

/// Turns column `col` (index j) into a Householder reflector (LAPACK dlarfg): afterwards `col[j]`
/// holds `R_jj` and `col[j + 1..]` the reflector's tail. Returns τ.
pub(super) fn make_reflector(col: &mut [f64], j: usize) -> f64 {
    let alpha = col[j];
    let x = &mut col[j + 1..];
    let xnorm2 = dot(x, x);
    if xnorm2 == 0.0 {
        return 0.0;
    }
    let norm = (alpha * alpha + xnorm2).sqrt();
    let beta = if alpha >= 0.0 { -norm } else { norm };
    let scale = 1.0 / (alpha - beta);
    x.iter_mut().for_each(|v| *v *= scale);
    col[j] = beta;
    (beta - alpha) / beta
}

/// Runs `f(first column, columns)` on contiguous groups of the `n`-row columns in `cols`, one group
/// per thread. Each column is touched by one call only, so the result is the same for any split.
pub(super) fn for_column_groups(
    cols: &mut [f64],
    n: usize,
    threads: usize,
    f: impl Fn(usize, &mut [f64]) + Sync,
) {
    let ncols = cols.len() / n.max(1);
    let threads = threads.clamp(1, ncols.max(1));
    if threads == 1 || n * ncols < PARALLEL_MIN {
        f(0, cols);
        return;
    }
    let per = ncols.div_ceil(threads);
    std::thread::scope(|scope| {
        for (g, group) in cols.chunks_mut(per * n).enumerate() {
            let f = &f;
            scope.spawn(move || f(g * per, group));
        }
    });
}

/// Householder QR in place of the column-major `n × n` matrix `a` (left-looking by blocks of
/// columns). Returns (τ, diag R); the reflectors stay in `a` below the diagonal.
pub(super) fn householder_qr(a: &mut [f64], n: usize, threads: usize) -> (Vec<f64>, Vec<f64>) {
    let mut tau = vec![0.0; n];
    let mut r_diag = vec![0.0; n];
    for j0 in (0..n).step_by(QR_BLOCK) {
        let j1 = (j0 + QR_BLOCK).min(n);
        let (done, rest) = a.split_at_mut(j0 * n);
        let block = &mut rest[..(j1 - j0) * n];
        let done_tau = &tau[..j0];
        // The earlier reflectors H_0 … H_{j0−1}, in order, on the block's columns.
        for_column_groups(block, n, threads, |_, group| {
            for (r, reflector) in done.chunks_exact(n).enumerate() {
                for col in group.chunks_exact_mut(n) {
                    apply_reflector(reflector, r, done_tau[r], col);
                }
            }
        });
        // Factor the block itself.
        for j in j0..j1 {
            let (left, right) = block.split_at_mut((j - j0 + 1) * n);
            let col = &mut left[(j - j0) * n..];
            tau[j] = make_reflector(col, j);
            r_diag[j] = col[j];
            for later in right.chunks_exact_mut(n) {
                apply_reflector(col, j, tau[j], later);
            }
        }
    }
    (tau, r_diag)
}

/// `Q = H_0 H_1 ⋯ H_{n−1}` (column-major `n × n`) from the reflectors left in `a`.
pub(super) fn form_q(a: &[f64], tau: &[f64], n: usize, threads: usize) -> Vec<f64> {
    let mut q = vec![0.0; n * n];
    for (b, block) in q.chunks_mut(QR_BLOCK * n.max(1)).enumerate() {
        let c0 = b * QR_BLOCK;
        let c1 = c0 + block.len() / n;
        for_column_groups(block, n, threads, |first, group| {
            let g0 = c0 + first;
            for (i, col) in group.chunks_exact_mut(n).enumerate() {
                col[g0 + i] = 1.0;
            }
            // Column c is H_0 ⋯ H_c e_c (H_r e_c = e_c for r > c): H_r for r = c down to 0.
            for r in (0..c1).rev() {
                let reflector = &a[r * n..(r + 1) * n];
                for (i, col) in group.chunks_exact_mut(n).enumerate() {
                    if g0 + i >= r {
                        apply_reflector(reflector, r, tau[r], col);
                    }
                }
            }
        });
    }
    q
}
