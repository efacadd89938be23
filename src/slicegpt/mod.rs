//! SliceGPT (Ashkboos et al., ICLR 2024) as a [`Method`]: the residual stream is rotated into a
//! basis and cut to its first k coordinates, so every weight that reads or writes it loses rows or
//! columns (docs/design.md §1–3). The bases come from PCA of calibration activations
//! ([`calibrated`]) or, for a model of the sliced shape only, from no data at all ([`rewrite`]).
pub mod calibrated;
pub mod dims;
pub mod rewrite;
pub mod widths;

use std::path::PathBuf;
use std::sync::Arc;

pub use calibrated::{
    slice_with_pca, slice_with_pca_streaming, Allocation, Calibrated, PcaOptions,
};
pub use dims::{basis_groups, BasisMode, Dimensions};
pub use rewrite::{
    center_embeddings, fuse, fuse_analysed, rotate, rotate_analysed, rotate_streaming, GroupBases,
    Orientation as FixedBasis, Rewritten,
};

use crate::analysis::Analysis;
use crate::error::{Error, Result};
use crate::method::{Applied, Method, Work};
use crate::size::{Budget, Plan, Prediction};

/// How the basis at each stream point is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Orientation {
    /// SliceGPT: the principal components of calibration activations (through ONNX Runtime).
    #[default]
    Pca,
    /// A random orthogonal basis at every point, from `seed`, without calibration: a model of the
    /// sliced shape and size for checking a deployment, whose outputs mean nothing. Not the
    /// reference's or Olive's "random" (PCA, then a random rotation inside the kept subspace).
    RandomBasis { seed: u64 },
    /// The stream as it is (only the norms are rewritten), cut to its first k coordinates.
    Identity,
}

impl Orientation {
    /// The fixed basis of an orientation that needs no calibration; `None` for PCA.
    pub fn uncalibrated(self) -> Option<FixedBasis> {
        match self {
            Orientation::Pca => None,
            Orientation::RandomBasis { seed } => Some(FixedBasis::Random { seed }),
            Orientation::Identity => Some(FixedBasis::Identity),
        }
    }
}

/// SliceGPT's options (the command line's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceGpt {
    /// Fraction of the residual stream width to remove (0 ≤ ratio < 1). Ignored with a target.
    pub ratio: f64,
    /// Slice the last stream point too (changes the head's input width).
    pub slice_head: bool,
    /// Which stream points share a basis.
    pub basis: BasisMode,
    pub orientation: Orientation,
    /// With a target and PCA: each stream point's width from the spectra of the unsliced model.
    pub allocate_widths: bool,
    /// Subtract every embedding row's mean before calibrating, as the reference does
    /// ([`rewrite::center_embeddings`]). PCA only.
    pub center_embeddings: bool,
    /// Write every basis and its eigenvalues to this .safetensors file (PCA only).
    pub save_rotations: Option<PathBuf>,
}

impl Default for SliceGpt {
    fn default() -> Self {
        SliceGpt {
            ratio: 0.0,
            slice_head: false,
            basis: BasisMode::Global,
            orientation: Orientation::Pca,
            allocate_widths: false,
            center_embeddings: false,
            save_rotations: None,
        }
    }
}

/// What SliceGPT decided before calibrating: the dimensions (a target's solved width), and the size
/// model with the budget when the widths are allocated point by point.
pub struct SlicePlan {
    pub dims: Dimensions,
    allocation: Option<Allocation>,
}

impl SliceGpt {
    fn dimensions(&self, round_to: usize) -> Dimensions {
        Dimensions {
            ratio: self.ratio,
            round_to,
            slice_head: self.slice_head,
            basis: self.basis,
            width: None,
        }
    }
}

fn invalid(option: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid { option, message: message.into() }
}

impl Method for SliceGpt {
    type Plan = SlicePlan;

    fn name(&self) -> &'static str {
        "slicegpt"
    }

    fn check(&self, budget: Option<&Budget>) -> Result<()> {
        if !(0.0..1.0).contains(&self.ratio) {
            return Err(invalid(
                "ratio",
                format!("must be at least 0 and less than 1, got {}", self.ratio),
            ));
        }
        let pca = self.orientation == Orientation::Pca;
        if self.center_embeddings && !pca {
            return Err(invalid("center_embeddings", "applies to PCA slicing only"));
        }
        if self.allocate_widths && (budget.is_none() || !pca) {
            return Err(invalid("allocate_widths", "needs a size target and PCA calibration"));
        }
        Ok(())
    }

    fn calibrates(&self) -> bool {
        self.orientation == Orientation::Pca
    }

    fn plan(
        &self,
        sizes: &Plan,
        _analysis: &Analysis,
        budget: Option<&Budget>,
        round_to: usize,
    ) -> Result<(SlicePlan, Prediction)> {
        let dims = self.dimensions(round_to);
        let dims = match budget {
            Some(budget) => widths::solve(sizes, &dims, budget)?,
            None => dims,
        };
        let prediction = widths::predict(sizes, &dims);
        let allocation = budget
            .filter(|_| self.allocate_widths)
            .map(|&budget| Allocation { plan: sizes.clone(), budget });
        Ok((SlicePlan { dims, allocation }, prediction))
    }

    fn apply(&self, plan: SlicePlan, work: Work<'_>) -> Result<Applied> {
        let SlicePlan { dims, allocation } = plan;
        let input = work.input;
        let (rewritten, orientation, calibration) =
            match (self.orientation.uncalibrated(), work.calibration) {
                (None, Some(set)) => {
                    let options = PcaOptions {
                        dims,
                        settings: work.settings,
                        center_embeddings: self.center_embeddings,
                        allocation,
                        keep_bases: self.save_rotations.is_some(),
                    };
                    let calibrated = slice_with_pca_streaming(
                        work.model,
                        work.analysis,
                        &set,
                        &options,
                        work.progress,
                        work.finished,
                    )
                    .map_err(|e| in_context(e, format!("slicing {}", input.display())))?;
                    work.progress.finish_and_clear();
                    if let Some(path) = &self.save_rotations {
                        save_rotations(path, &calibrated)?;
                    }
                    let description = format!("pca ({} calibration tokens)", calibrated.run.tokens);
                    (calibrated.rewritten, description, Some(calibrated.run))
                }
                (Some(basis), _) => {
                    let rewritten =
                        rotate_analysed(work.model, work.analysis, basis, &dims, work.finished)
                            .map_err(|e| in_context(e, format!("rewriting {}", input.display())))?;
                    (rewritten, basis.to_string(), None)
                }
                (None, None) => {
                    return Err(invalid("calibration", "PCA slicing needs calibration data"))
                }
            };
        Ok(Applied {
            stream_width: rewritten.layout.width,
            widths: rewritten.widths.clone(),
            groups: rewritten.groups.clone(),
            blocks: rewritten.layout.block_count(),
            ratio: dims.ratio,
            slice_head: dims.slice_head,
            basis: Some(dims.basis.to_string()),
            metadata: rewrite::metadata_entries(&rewritten, &dims, &orientation),
            orientation,
            centered_embeddings: rewritten.centered_embeddings,
            calibration,
            mlp_widths: None,
        })
    }
}

fn save_rotations(path: &std::path::Path, calibrated: &Calibrated) -> Result<()> {
    let points: Vec<(String, &crate::pca::Basis, usize)> = calibrated
        .bases
        .iter()
        .zip(&calibrated.rewritten.widths)
        .enumerate()
        .map(|(p, (basis, &k)): (usize, (&Arc<crate::pca::Basis>, &usize))| {
            (format!("point{p}"), &**basis, k)
        })
        .collect();
    crate::pca::save_rotations(path, &points)
}

/// An error with what was being done when it happened ([`Error::root`] is the error itself).
fn in_context(error: Error, doing: String) -> Error {
    Error::Context { doing, source: Box::new(error) }
}
