//! The arithmetic of keeping an MLP's neurons (docs/design.md §9), in f64. With `h` the
//! activation the down projection reads (`F` wide) and `C = Σ hᵀh`, `m = Σ h` over the `n`
//! calibration tokens:
//!
//! - which neurons stay: the `k` of largest ridge leverage `diag(C (C + λI)⁻¹)`,
//!   λ = [`LEVERAGE_DAMPING`]·mean(diag C) ([`leverage`]);
//! - the down projection refit by least squares with an intercept, so that the kept neurons best
//!   reproduce the full output `h·W + b` on the calibration tokens: on the centred moments
//!   `C_c = C − m mᵀ/n`, `W' = (C_c[S,S] + μI)⁻¹ (C_c W)[S,:]` with
//!   μ = [`REFIT_DAMPING`]·mean(diag C_c[S,S]), and `b' = b + m̄ᵀW − m̄_Sᵀ W'` (the mean of the
//!   removed neurons' contribution moves into the bias) ([`refit`]);
//! - the error of keeping the first `k` neurons of an order, for every `k` at once
//!   ([`error_curve`]): with `L` the Cholesky factor of `C_c` in that order and `Z = L⁻¹ (C_c W)`
//!   in that order, keeping the first `k` leaves `tr(Wᵀ C_c W) − Σ_{i≤k} ‖Z_i‖²` (Gram–Schmidt in
//!   that order), undamped but for what makes a singular `C` factorable.
//!
//! Memory: `C` is `F × F` (0.97 GB at LLaMA-2-7B's F = 11008); the leverage factors one copy of
//! it, and the fits work in `C` itself (centred, then permuted or compacted, then factored in
//! place), beside `W` and `C·W` (`F × D` each).
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Mat, MatMut, MatRef, Par};

use crate::error::{Error, Result};

/// λ of the leverage scores, relative to the mean of C's diagonal.
pub const LEVERAGE_DAMPING: f64 = 1e-2;
/// μ of the refit, relative to the mean of the kept neurons' (centred) diagonal.
pub const REFIT_DAMPING: f64 = 1e-3;
/// μ of the error curve's factorization: only enough to factor a singular Gram matrix (copies
/// of neurons), so that the curve is the undamped least-squares error.
const CURVE_DAMPING: f64 = 1e-9;
/// Columns of the identity solved at a time for the diagonal of an inverse.
const BLOCK: usize = 256;

const PASS: &str = "neurons";

/// The moments of one MLP's activation over the calibration tokens.
pub struct Statistics {
    /// `C = Σ hᵀh` (`F × F`, symmetric, both triangles).
    pub gram: Mat<f64>,
    /// `m = Σ h`.
    pub sum: Vec<f64>,
    /// `n`, the tokens summed.
    pub tokens: f64,
}

/// The refit down projection: `weight` is `k × out` (logical `[in, out]`), `bias` `out` long.
pub struct Refit {
    pub weight: Mat<f64>,
    pub bias: Vec<f64>,
    /// `‖h·W + b − (h_S·W' + b')‖² / ‖h·W + b‖²` over the calibration tokens.
    pub relative_error: f64,
}

fn failed(what: &str, why: impl std::fmt::Display) -> Error {
    Error::Pass { pass: PASS, node: what.to_string(), message: why.to_string() }
}

fn par() -> Par {
    faer::get_global_parallelism()
}

fn mean_diagonal(m: MatRef<'_, f64>) -> f64 {
    let n = m.nrows().max(1);
    (0..m.nrows()).map(|i| m[(i, i)]).sum::<f64>() / n as f64
}

/// Overwrites the lower triangle (diagonal included) of a symmetric positive definite `a` with
/// its Cholesky factor L (`a = L Lᵀ`); the strict upper triangle is left as it was.
fn factor_in_place(a: MatMut<'_, f64>, what: &str) -> Result<()> {
    let n = a.nrows();
    let mut buffer = MemBuffer::new(cholesky_in_place_scratch::<f64>(n, par(), Default::default()));
    let stack = MemStack::new(&mut buffer);
    cholesky_in_place(a, Default::default(), par(), stack, Default::default())
        .map(|_| ())
        .map_err(|e| failed(what, format!("the Gram matrix is not positive definite ({e:?})")))
}

/// Ridge leverage of every neuron, `diag(C (C + λI)⁻¹) = 1 − λ·diag((C + λI)⁻¹)`: how much of
/// neuron i's activation the others cannot explain, softened by λ so that rare neurons do not win.
/// `C + λI` is factored in one copy of `C` (faer's factorization uses both triangles);
/// `diag(A⁻¹)_i = ‖L⁻¹ e_i‖²` is solved a block of columns at a time.
pub fn leverage(stats: &Statistics, what: &str) -> Result<Vec<f64>> {
    let f = stats.gram.nrows();
    let mut a = stats.gram.clone();
    let lambda = LEVERAGE_DAMPING * mean_diagonal(a.as_ref()).max(f64::MIN_POSITIVE);
    for i in 0..f {
        a[(i, i)] += lambda;
    }
    factor_in_place(a.as_mut(), what)?;
    let mut inverse_diagonal = vec![0.0; f];
    for start in (0..f).step_by(BLOCK) {
        let width = BLOCK.min(f - start);
        // Column i of L⁻¹ is zero above row i: only the trailing system is solved.
        let l = a.as_ref().submatrix(start, start, f - start, f - start);
        let mut x = Mat::<f64>::zeros(f - start, width);
        for j in 0..width {
            x[(j, j)] = 1.0;
        }
        solve_lower_triangular_in_place(l, x.as_mut(), par());
        for j in 0..width {
            inverse_diagonal[start + j] = (0..f - start).map(|r| x[(r, j)] * x[(r, j)]).sum();
        }
    }
    Ok(inverse_diagonal.iter().map(|d| 1.0 - lambda * d).collect())
}

/// The indices of the `k` largest scores, in increasing index order (ties: the lower index).
pub fn top(scores: &[f64], k: usize) -> Vec<usize> {
    let mut kept: Vec<usize> = order(scores).into_iter().take(k).collect();
    kept.sort_unstable();
    kept
}

/// Every neuron, by decreasing score (ties: the lower index first).
pub fn order(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// The full MLP's output as the fits need it, from the centred moments: `C_c·W` (`F × out`),
/// the centred energy `tr(Wᵀ C_c W)`, the energy `‖h·W + 1·bᵀ‖²` and the mean output.
struct Target {
    cw: Mat<f64>,
    centred_energy: f64,
    energy: f64,
    mean_output: Vec<f64>,
}

/// Centres `stats.gram` in place (`C_c = C − m mᵀ/n`) and computes the [`Target`].
fn centre(stats: &mut Statistics, w: MatRef<'_, f64>, b: &[f64]) -> Target {
    let (f, n) = (stats.gram.nrows(), stats.tokens.max(1.0));
    let mean: Vec<f64> = stats.sum.iter().map(|s| s / n).collect();
    let mean_output: Vec<f64> =
        (0..w.ncols()).map(|o| b[o] + (0..f).map(|i| mean[i] * w[(i, o)]).sum::<f64>()).collect();
    for (j, mean_j) in mean.iter().enumerate() {
        for i in 0..f {
            stats.gram[(i, j)] -= stats.sum[i] * mean_j;
        }
    }
    let cw = stats.gram.as_ref() * w;
    let centred_energy: f64 = (0..f)
        .flat_map(|i| (0..w.ncols()).map(move |o| (i, o)))
        .map(|(i, o)| w[(i, o)] * cw[(i, o)])
        .sum();
    let energy = centred_energy + n * mean_output.iter().map(|y| y * y).sum::<f64>();
    Target { cw, centred_energy, energy, mean_output }
}

/// Reorders the rows and the columns of the square `a` by `order` in place (`a ← P a Pᵀ`, row i
/// of the result is row `order[i]` before), following the permutation's cycles.
fn permute_symmetric(a: &mut Mat<f64>, order: &[usize]) {
    let n = a.nrows();
    let mut done = vec![false; n];
    let mut buffer = vec![0.0; n];
    for start in 0..n {
        if done[start] {
            continue;
        }
        // Row `start` takes row order[start], which takes row order[order[start]], ...
        (0..n).for_each(|c| buffer[c] = a[(start, c)]);
        let mut at = start;
        loop {
            done[at] = true;
            let from = order[at];
            if from == start {
                (0..n).for_each(|c| a[(at, c)] = buffer[c]);
                break;
            }
            (0..n).for_each(|c| a[(at, c)] = a[(from, c)]);
            at = from;
        }
    }
    done.iter_mut().for_each(|d| *d = false);
    for start in 0..n {
        if done[start] {
            continue;
        }
        (0..n).for_each(|r| buffer[r] = a[(r, start)]);
        let mut at = start;
        loop {
            done[at] = true;
            let from = order[at];
            if from == start {
                (0..n).for_each(|r| a[(r, at)] = buffer[r]);
                break;
            }
            (0..n).for_each(|r| a[(r, at)] = a[(r, from)]);
            at = from;
        }
    }
}

/// The least-squares down projection (and bias) for the neurons `keep` (increasing), from `w`
/// (`F × out`, logical `[in, out]`) and `b` (zeros when the layer has none). Takes the
/// statistics: their matrix becomes the system's.
pub fn refit(
    mut stats: Statistics,
    w: MatRef<'_, f64>,
    b: &[f64],
    keep: &[usize],
    what: &str,
) -> Result<Refit> {
    let target = centre(&mut stats, w, b);
    let k = keep.len();
    // C_c[S, S] into the top-left corner (keep is increasing: each entry moves up and left).
    let gram = &mut stats.gram;
    for (r, &i) in keep.iter().enumerate() {
        for (c, &j) in keep.iter().enumerate() {
            gram[(r, c)] = gram[(i, j)];
        }
    }
    let mu = REFIT_DAMPING * (0..k).map(|i| gram[(i, i)]).sum::<f64>().max(f64::MIN_POSITIVE)
        / k.max(1) as f64;
    for i in 0..k {
        gram[(i, i)] += mu;
    }
    factor_in_place(gram.as_mut().submatrix_mut(0, 0, k, k), what)?;
    let cross = Mat::from_fn(k, w.ncols(), |r, o| target.cw[(keep[r], o)]);
    let mut weight = cross.clone();
    let l = gram.as_ref().submatrix(0, 0, k, k);
    solve_lower_triangular_in_place(l, weight.as_mut(), par());
    solve_upper_triangular_in_place(l.transpose(), weight.as_mut(), par());
    // ‖Y − Ŷ‖² = E_c − 2 tr(W'ᵀ X) + tr(W'ᵀ C_SS W'), and (C_SS + μI) W' = X gives
    // tr(W'ᵀ C_SS W') = tr(W'ᵀ X) − μ ‖W'‖².
    let dot = |a: &Mat<f64>, b: &Mat<f64>| -> f64 {
        (0..a.nrows())
            .flat_map(|i| (0..a.ncols()).map(move |o| (i, o)))
            .map(|(i, o)| a[(i, o)] * b[(i, o)])
            .sum()
    };
    let error = target.centred_energy - dot(&weight, &cross) - mu * dot(&weight, &weight);
    let relative_error = if target.energy > 0.0 { (error / target.energy).max(0.0) } else { 0.0 };
    let n = stats.tokens.max(1.0);
    let bias = (0..w.ncols())
        .map(|o| {
            target.mean_output[o]
                - keep
                    .iter()
                    .enumerate()
                    .map(|(r, &i)| stats.sum[i] / n * weight[(r, o)])
                    .sum::<f64>()
        })
        .collect();
    Ok(Refit { weight, bias, relative_error })
}

/// `E(k)` for `k = 0..=F`: the least-squares error of the refit (with its intercept) when the
/// first `k` neurons of `order` are kept, from one Cholesky factorization in that order. Takes the
/// statistics, as [`refit`] does.
pub fn error_curve(
    mut stats: Statistics,
    w: MatRef<'_, f64>,
    b: &[f64],
    order: &[usize],
    what: &str,
) -> Result<Vec<f64>> {
    let target = centre(&mut stats, w, b);
    let gram = &mut stats.gram;
    permute_symmetric(gram, order);
    let mu = CURVE_DAMPING * mean_diagonal(gram.as_ref()).max(f64::MIN_POSITIVE);
    for i in 0..gram.nrows() {
        gram[(i, i)] += mu;
    }
    factor_in_place(gram.as_mut(), what)?;
    // With C_c = L Lᵀ (in this order) and X = C_c W, the coordinates of the target in the
    // orthonormal basis Gram–Schmidt builds in this order are Z = L⁻¹ X: row i is what the i-th
    // neuron of the order adds.
    let mut z = Mat::from_fn(order.len(), w.ncols(), |r, o| target.cw[(order[r], o)]);
    drop(target.cw);
    solve_lower_triangular_in_place(gram.as_ref(), z.as_mut(), par());
    let mut curve = Vec::with_capacity(order.len() + 1);
    let mut left = target.centred_energy;
    curve.push(left.max(0.0));
    for i in 0..z.nrows() {
        left -= (0..z.ncols()).map(|o| z[(i, o)] * z[(i, o)]).sum::<f64>();
        curve.push(left.max(0.0));
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activations of `f` neurons over `n` tokens, two of them copies of others.
    fn activations(n: usize, f: usize) -> Mat<f64> {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.3
        };
        let mut h = Mat::from_fn(n, f, |_, _| next());
        for t in 0..n {
            h[(t, f - 1)] = h[(t, 0)];
            h[(t, f - 2)] = 2.0 * h[(t, 1)];
        }
        h
    }

    fn statistics(h: &Mat<f64>) -> Statistics {
        let gram = h.transpose() * h;
        let sum = (0..h.ncols()).map(|j| (0..h.nrows()).map(|t| h[(t, j)]).sum()).collect();
        Statistics { gram, sum, tokens: h.nrows() as f64 }
    }

    fn weights(f: usize, out: usize) -> Mat<f64> {
        Mat::from_fn(f, out, |i, o| ((i * 7 + o * 3) % 11) as f64 / 11.0 - 0.4)
    }

    /// Neurons that copy others carry no information of their own: the refit without them
    /// reproduces the full output (the copies' weights move onto their originals).
    #[test]
    fn removing_copies_of_kept_neurons_loses_nothing() {
        let (n, f, out) = (200, 8, 5);
        let h = activations(n, f);
        let stats = statistics(&h);
        let w = weights(f, out);
        let b = vec![0.1; out];
        let keep: Vec<usize> = (0..f - 2).collect();
        let fit = refit(stats, w.as_ref(), &b, &keep, "test").unwrap();
        assert!(fit.relative_error < 1e-5, "{}", fit.relative_error);
        let full = &h * &w;
        let kept = Mat::from_fn(n, keep.len(), |t, j| h[(t, keep[j])]);
        let approx = &kept * &fit.weight;
        for t in 0..n {
            for o in 0..out {
                let want = full[(t, o)] + b[o];
                let got = approx[(t, o)] + fit.bias[o];
                assert!((want - got).abs() < 2e-3, "token {t}, output {o}: {want} vs {got}");
            }
        }
    }

    /// The leverage of a neuron that is an exact copy of another is shared between the two: both
    /// score below the neurons that are alone.
    #[test]
    fn copies_score_lower_leverage_than_unique_neurons() {
        let h = activations(300, 8);
        let scores = leverage(&statistics(&h), "test").unwrap();
        let unique = scores[2..6].iter().cloned().fold(f64::INFINITY, f64::min);
        for copy in [0, 7] {
            assert!(scores[copy] < unique, "{scores:?}");
        }
        assert_eq!(top(&scores, 3).len(), 3);
    }

    /// The curve's error at k is the refit's error for the first k neurons of the order (within
    /// the damping's share), and keeping every neuron leaves (almost) nothing.
    #[test]
    fn the_error_curve_matches_refits() {
        let (n, f, out) = (150, 7, 4);
        let h = activations(n, f);
        let w = weights(f, out);
        let b = vec![0.0; out];
        let order = vec![3, 1, 4, 0, 6, 2, 5];
        let energy = centre(&mut statistics(&h), w.as_ref(), &b).energy;
        let curve = error_curve(statistics(&h), w.as_ref(), &b, &order, "test").unwrap();
        assert_eq!(curve.len(), f + 1);
        for k in 1..=f {
            let mut keep = order[..k].to_vec();
            keep.sort_unstable();
            let fit = refit(statistics(&h), w.as_ref(), &b, &keep, "test").unwrap();
            let from_curve = curve[k] / energy;
            // The refit is damped (μ steadies its weights), the curve all but undamped: the
            // curve's error is the least possible, the refit's within a hair of it.
            let exact = fit.relative_error;
            assert!(
                from_curve <= exact * (1.0 + 1e-9) + 1e-12 && exact <= from_curve * 1.01 + 1e-4,
                "k = {k}: curve {from_curve}, refit {}",
                fit.relative_error
            );
        }
        assert!(curve[f] / energy < 1e-3);
        assert!(curve.windows(2).all(|w| w[1] <= w[0] + 1e-9));
    }

    #[test]
    fn the_symmetric_permutation_reorders_rows_and_columns() {
        let n = 6;
        let a = Mat::from_fn(n, n, |i, j| (10 * i + j) as f64);
        let order = [3, 0, 5, 1, 2, 4];
        let mut p = a.clone();
        permute_symmetric(&mut p, &order);
        for i in 0..n {
            for j in 0..n {
                assert_eq!(p[(i, j)], a[(order[i], order[j])], "({i}, {j})");
            }
        }
    }
}
