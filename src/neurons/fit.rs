//! The arithmetic of keeping an MLP's neurons (docs/design.md §9), in f64. With `h` the
//! activation the down projection reads (`F` wide) and `C = Σ hᵀh`, `m = Σ h` over the `n`
//! calibration tokens:
//!
//! - which neurons stay: the `k` of largest ridge leverage `diag(C (C + λI)⁻¹)`,
//!   λ = [`LEVERAGE_DAMPING`]·mean(diag C) ([`leverage`]);
//! - the down projection refit by least squares so that the kept neurons best reproduce the
//!   full output `h·W + b` on the calibration tokens: with `h̃ = [h_S, 1]`,
//!   `[W'; b'] = (h̃ᵀh̃ + μ)⁻¹ h̃ᵀ (h·W + 1·bᵀ)`, μ = [`REFIT_DAMPING`]·mean(diag C_SS) on the neurons
//!   (not on the constant), so the mean of the removed neurons moves into the bias ([`refit`]);
//! - the error of keeping the first `k` neurons of an order, for every `k` at once ([`error_curve`]):
//!   with `L` the Cholesky factor of the augmented Gram matrix in that order and `Z = Lᵀ·[b; W]`,
//!   keeping the first `k` leaves `Σ_{i>k} ‖Z_i‖²` (Gram–Schmidt in that order), undamped but for
//!   what makes a singular `C` factorable.
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::{Mat, MatRef, Side};

use crate::error::{Error, Result};

/// λ of the leverage scores, relative to the mean of C's diagonal.
pub const LEVERAGE_DAMPING: f64 = 1e-2;
/// μ of the refit, relative to the mean of the kept neurons' diagonal.
pub const REFIT_DAMPING: f64 = 1e-3;
/// μ of the error curve's factorization: only enough to factor a singular Gram matrix (copies
/// of neurons), so that the curve is the undamped least-squares error.
const CURVE_DAMPING: f64 = 1e-9;

const PASS: &str = "neurons";

/// The moments of one MLP's activation over the calibration tokens.
pub struct Statistics {
    /// `C = Σ hᵀh` (`F × F`, symmetric).
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

fn mean_diagonal(m: MatRef<'_, f64>) -> f64 {
    let n = m.nrows().max(1);
    (0..m.nrows()).map(|i| m[(i, i)]).sum::<f64>() / n as f64
}

/// Ridge leverage of every neuron, `diag(C (C + λI)⁻¹) = 1 − λ·diag((C + λI)⁻¹)`: how much of
/// neuron i's activation the others cannot explain, softened by λ so that rare neurons do not win.
pub fn leverage(stats: &Statistics, what: &str) -> Result<Vec<f64>> {
    let f = stats.gram.nrows();
    let lambda = LEVERAGE_DAMPING * mean_diagonal(stats.gram.as_ref()).max(f64::MIN_POSITIVE);
    let damped = Mat::from_fn(f, f, |i, j| stats.gram[(i, j)] + if i == j { lambda } else { 0.0 });
    let llt = damped.llt(Side::Lower).map_err(|e| failed(what, format!("leverage: {e:?}")))?;
    let inverse = llt.inverse();
    Ok((0..f).map(|i| 1.0 - lambda * inverse[(i, i)]).collect())
}

/// The indices of the `k` largest scores, in increasing index order (ties: the lower index).
pub fn top(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(k).collect();
    kept.sort_unstable();
    kept
}

/// Every neuron, by decreasing score (ties: the lower index first).
pub fn order(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// The augmented Gram matrix `h̃ᵀh̃` of `[1, h_S]` (the constant first) and the cross term
/// `h̃ᵀ(h·W + 1·bᵀ)`, for the neurons `keep`, with μ added to the neurons' diagonal.
fn normal_equations(
    stats: &Statistics,
    w: MatRef<'_, f64>,
    b: &[f64],
    keep: &[usize],
    damping: f64,
) -> (Mat<f64>, Mat<f64>, f64) {
    let (k, out) = (keep.len(), w.ncols());
    let mu = damping
        * (keep.iter().map(|&i| stats.gram[(i, i)]).sum::<f64>() / k.max(1) as f64)
            .max(f64::MIN_POSITIVE);
    let n = stats.tokens;
    let gram = Mat::from_fn(k + 1, k + 1, |i, j| match (i, j) {
        (0, 0) => n,
        (0, j) => stats.sum[keep[j - 1]],
        (i, 0) => stats.sum[keep[i - 1]],
        (i, j) => stats.gram[(keep[i - 1], keep[j - 1])] + if i == j { mu } else { 0.0 },
    });
    // h̃ᵀ h W: rows of C (and m) at the kept neurons times W; plus h̃ᵀ 1 bᵀ.
    let mut rows = Mat::<f64>::zeros(k + 1, w.nrows());
    for j in 0..w.nrows() {
        rows[(0, j)] = stats.sum[j];
        for (r, &i) in keep.iter().enumerate() {
            rows[(r + 1, j)] = stats.gram[(i, j)];
        }
    }
    let mut cross = &rows * w;
    for o in 0..out {
        cross[(0, o)] += n * b[o];
        for (r, &i) in keep.iter().enumerate() {
            cross[(r + 1, o)] += stats.sum[i] * b[o];
        }
    }
    (gram, cross, mu)
}

/// `‖h·W + 1·bᵀ‖²` over the tokens: `tr(Wᵀ C W) + 2 mᵀ W b + n ‖b‖²`.
fn output_energy(stats: &Statistics, w: MatRef<'_, f64>, b: &[f64]) -> f64 {
    let cw = stats.gram.as_ref() * w;
    let mut energy = 0.0;
    for i in 0..w.nrows() {
        for o in 0..w.ncols() {
            energy += w[(i, o)] * cw[(i, o)];
        }
    }
    let mw: Vec<f64> =
        (0..w.ncols()).map(|o| (0..w.nrows()).map(|i| stats.sum[i] * w[(i, o)]).sum()).collect();
    energy += 2.0 * mw.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    energy + stats.tokens * b.iter().map(|x| x * x).sum::<f64>()
}

/// The least-squares down projection (and bias) for the neurons `keep`, from `w` (`F × out`,
/// logical `[in, out]`) and `b` (zeros when the layer has none).
pub fn refit(
    stats: &Statistics,
    w: MatRef<'_, f64>,
    b: &[f64],
    keep: &[usize],
    what: &str,
) -> Result<Refit> {
    let (gram, cross, mu) = normal_equations(stats, w, b, keep, REFIT_DAMPING);
    let llt = gram.llt(Side::Lower).map_err(|e| failed(what, format!("refit: {e:?}")))?;
    let mut solution = cross.clone();
    llt.solve_in_place(solution.as_mut());
    // ‖Y − h̃S‖² = ‖Y‖² − 2 tr(Sᵀ X) + tr(Sᵀ G S), with G undamped (the damping only steadies S).
    let mut undamped = gram;
    for i in 1..=keep.len() {
        undamped[(i, i)] -= mu;
    }
    let fitted = &undamped * &solution;
    let dot = |a: &Mat<f64>, b: &Mat<f64>| -> f64 {
        (0..a.nrows()).flat_map(|i| (0..a.ncols()).map(move |o| a[(i, o)] * b[(i, o)])).sum()
    };
    let energy = output_energy(stats, w, b);
    let error = energy - 2.0 * dot(&solution, &cross) + dot(&solution, &fitted);
    let relative_error = if energy > 0.0 { (error / energy).max(0.0) } else { 0.0 };
    let bias = (0..w.ncols()).map(|o| solution[(0, o)]).collect();
    let weight = solution.subrows(1, keep.len()).to_owned();
    Ok(Refit { weight, bias, relative_error })
}

/// `E(k)` for `k = 0..=F`: the least-squares error of the refit when the first `k` neurons of
/// `order` are kept (with the bias), from one Cholesky factorization in that order.
pub fn error_curve(
    stats: &Statistics,
    w: MatRef<'_, f64>,
    b: &[f64],
    order: &[usize],
    what: &str,
) -> Result<Vec<f64>> {
    let (gram, cross, _) = normal_equations(stats, w, b, order, CURVE_DAMPING);
    let llt = gram.llt(Side::Lower).map_err(|e| failed(what, format!("error curve: {e:?}")))?;
    // With G = L Lᵀ and the target's Gram rows X = h̃ᵀ Y, the coordinates of Y's projection in
    // the orthonormal basis Gram–Schmidt builds in this order are Z = L⁻¹ X.
    let mut z = cross;
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        llt.L(),
        z.as_mut(),
        faer::get_global_parallelism(),
    );
    let gained: Vec<f64> =
        (0..z.nrows()).map(|i| (0..z.ncols()).map(|o| z[(i, o)] * z[(i, o)]).sum()).collect();
    let energy = output_energy(stats, w, b);
    // E(k) keeps the constant (row 0) and the first k neurons (rows 1..=k).
    let mut curve = Vec::with_capacity(order.len() + 1);
    let mut left = energy - gained[0];
    curve.push(left.max(0.0));
    for g in &gained[1..] {
        left -= g;
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
        let fit = refit(&stats, w.as_ref(), &b, &keep, "test").unwrap();
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
        let stats = statistics(&h);
        let w = weights(f, out);
        let b = vec![0.0; out];
        let order = vec![3, 1, 4, 0, 6, 2, 5];
        let curve = error_curve(&stats, w.as_ref(), &b, &order, "test").unwrap();
        let energy = output_energy(&stats, w.as_ref(), &b);
        assert_eq!(curve.len(), f + 1);
        for k in 1..=f {
            let mut keep = order[..k].to_vec();
            keep.sort_unstable();
            let fit = refit(&stats, w.as_ref(), &b, &keep, "test").unwrap();
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
}
