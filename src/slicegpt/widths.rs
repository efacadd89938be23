//! SliceGPT's widths under a size budget: one width everywhere, the widest that fits
//! ([`solve`]), or a width per stream point from the spectra of the unsliced model
//! ([`allocate`]); both against the size model's exact prediction ([`predict`]).
use crate::error::{Error, Result};
use crate::size::{Budget, Plan, Prediction};

use super::dims::{basis_groups, Dimensions};

/// Parameters and bytes of the output for these dimensions.
pub fn predict(plan: &Plan, dims: &Dimensions) -> Prediction {
    let widths = dims.widths(&plan.layout);
    let groups = basis_groups(&plan.layout, dims.basis, &widths);
    plan.predict_widths(widths, &groups)
}

/// Widths allocated to the stream points from their spectra under `budget`: each point keeps
/// the smallest width (a multiple of `round_to`) whose leading eigenvalues hold the share τ of
/// its energy, with the largest τ that fits. `spectra[p]` holds the eigenvalues of point p's
/// basis, decreasing; points that share a basis share a spectrum, hence a width. The head's
/// input keeps D unless `dims.slice_head`.
pub fn allocate(
    plan: &Plan,
    dims: &Dimensions,
    budget: &Budget,
    spectra: &[Vec<f64>],
) -> Result<Vec<usize>> {
    let (d, round, last) =
        (plan.layout.width, dims.round_to.max(1), spectra.len().saturating_sub(1));
    let widths_for = |tau: f64| -> Vec<usize> {
        spectra
            .iter()
            .enumerate()
            .map(|(p, spectrum)| {
                if p == last && !dims.slice_head {
                    return d;
                }
                let total: f64 = spectrum.iter().sum();
                let mut held = 0.0;
                let k = spectrum.iter().position(|v| {
                    held += v;
                    held >= tau * total
                });
                (k.map_or(d, |i| i + 1).div_ceil(round) * round).clamp(round.min(d), d)
            })
            .collect()
    };
    let limit = budget.limit(plan.before);
    let size = |widths: &[usize]| {
        budget.measure(
            plan.predict_widths(widths.to_vec(), &basis_groups(&plan.layout, dims.basis, widths))
                .after,
        )
    };
    let narrowest = widths_for(0.0);
    if size(&narrowest) > limit {
        return Err(Error::Budget {
            message: format!(
                "no stream width fits the target of {limit} {}: the narrowest widths give {}",
                budget.unit(),
                size(&narrowest)
            ),
        });
    }
    let (mut fitting, mut over) = (0.0, 1.0);
    for _ in 0..40 {
        let tau = (fitting + over) / 2.0;
        if size(&widths_for(tau)) <= limit {
            fitting = tau;
        } else {
            over = tau;
        }
    }
    Ok(widths_for(fitting))
}

/// The widest uniform slicing (a multiple of `dims.round_to`) whose output fits `budget`, or
/// [`Error::Budget`] when even the narrowest does not.
pub fn solve(plan: &Plan, dims: &Dimensions, budget: &Budget) -> Result<Dimensions> {
    let round = dims.round_to.max(1);
    let limit = budget.limit(plan.before);
    let candidate = |k: usize| Dimensions { width: Some(k), ..*dims };
    let fits = |k: usize| budget.measure(predict(plan, &candidate(k)).after) <= limit;
    let full = plan.layout.width;
    let mut widths: Vec<usize> = (1..=full / round).map(|m| m * round).collect();
    if widths.last() != Some(&full) {
        widths.push(full);
    }
    // Size grows with k: the first that does not fit bounds the search.
    let fitting = widths.partition_point(|&k| fits(k));
    match fitting {
        0 => {
            let smallest = predict(plan, &candidate(widths[0])).after;
            Err(Error::Budget {
                message: format!(
                    "no stream width fits the target of {limit} {}: the narrowest ({}) gives {} (at --round-to {round}, basis {}{})",
                    budget.unit(),
                    widths[0],
                    budget.measure(smallest),
                    dims.basis,
                    if dims.slice_head { ", head sliced" } else { "; --slice-head would shrink it further" }
                ),
            })
        }
        n => Ok(candidate(widths[n - 1])),
    }
}
