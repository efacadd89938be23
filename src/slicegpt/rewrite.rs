//! SliceGPT's exact rewrite of an analysed model: every weight gets its own initializer, the norms
//! are folded into RMSNorm form (docs/design.md §1), and the stream can be rotated and sliced with
//! a basis per group of stream points, here with a basis that needs no calibration.
use faer::{Mat, MatRef};

use crate::algebra;
use crate::analysis::{self, Analysis};
use crate::error::{Error, Result};
use crate::fuse::{self, privatize_weights};
use crate::graph::{KeepInGraph, Model, TensorSink};
use crate::rotate;
use crate::structure::Layout;

use super::dims::{basis_groups, Dimensions};

/// How the basis at each stream point is chosen (without calibration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// Keep the stream as it is (only the norms are rewritten).
    Identity,
    /// A different Haar-random orthogonal matrix at each point (each basis group), from `seed`:
    /// the command line's `--orientation random-basis`. Not the reference's or Olive's "random"
    /// (PCA, then a random rotation inside the kept subspace).
    Random { seed: u64 },
}

/// What the rewrite found and did.
#[derive(Debug, Clone)]
pub struct Rewritten {
    pub layout: Layout,
    pub widths: Vec<usize>,
    /// The basis group of every stream point ([`basis_groups`]): a shortcut sits between groups.
    pub groups: Vec<usize>,
    pub weight_copies: usize,
    pub skip_norms_decomposed: usize,
    /// [`center_embeddings`] changed the model.
    pub centered_embeddings: bool,
}

/// Analyses the model and rewrites its norms (no rotation yet): the model computes the same
/// function afterwards. [`fuse_analysed`] for a model already analysed.
pub fn fuse(model: &mut Model) -> Result<Rewritten> {
    let analysis = analysis::analyze(model)?;
    fuse_analysed(model, &analysis)
}

/// Rewrites the norms of an analysed model: every weight its own initializer (the layout follows
/// the new names), a tied head tied through adapters, every norm folded into its readers.
pub fn fuse_analysed(model: &mut Model, analysis: &Analysis) -> Result<Rewritten> {
    let weight_copies = privatize_weights(&mut model.graph)?;
    let mut layout = analysis.layout.clone();
    layout.follow_weights(&model.graph);
    layout.tied_head =
        analysis.layout.tied_head || fuse::tie::head_reads_embedding(&model.graph, &layout);
    if layout.tied_head {
        fuse::tie::share_table(&mut model.graph, &mut layout)?;
    }
    let opset = model.opset_version("").unwrap_or(1);
    fuse::fuse_norms(&mut model.graph, &layout, opset)?;
    let widths = vec![layout.width; layout.stream_points().len()];
    let groups = (0..widths.len()).collect();
    Ok(Rewritten {
        layout,
        widths,
        groups,
        weight_copies,
        skip_norms_decomposed: analysis.skip_norms_decomposed,
        centered_embeddings: false,
    })
}

/// The reference implementation's mean subtraction from every embedding row, which it applies to
/// every model. For LayerNorm models [`fuse`] has done it already, exactly; for RMSNorm models it
/// changes the function a little (SmolLM2-135M: perplexity 37.285 → 37.351), so it is not the
/// default. But the stream then has no component along the all-ones direction, and at high ratios
/// PCA slicing matches the reference (SmolLM2 at 0.3: 302.4 → 298.8; reference 298.8). Call after
/// [`fuse`] (a tied table is centred through its adapter, the head keeps reading it as it was);
/// `rewritten.centered_embeddings` says whether the model changed.
pub fn center_embeddings(model: &mut Model, rewritten: &mut Rewritten) -> Result<()> {
    if rewritten.layout.norm_kind == crate::pattern::norm::NormKind::RmsNorm {
        fuse::center_embeddings(&mut model.graph, &rewritten.layout)?;
        rewritten.centered_embeddings = true;
    }
    Ok(())
}

/// Fuses, then rotates every stream point by its basis and keeps the first k columns.
pub fn rotate(model: &mut Model, orientation: Orientation, dims: &Dimensions) -> Result<Rewritten> {
    rotate_streaming(model, orientation, dims, &mut KeepInGraph)
}

/// [`rotate`], handing every rotated tensor to `finished` as soon as it is made (the output's
/// data file: docs/design.md §8).
pub fn rotate_streaming(
    model: &mut Model,
    orientation: Orientation,
    dims: &Dimensions,
    finished: &mut dyn TensorSink,
) -> Result<Rewritten> {
    let analysis = analysis::analyze(model)?;
    rotate_analysed(model, &analysis, orientation, dims, finished)
}

/// [`rotate_streaming`] of an analysed model.
pub fn rotate_analysed(
    model: &mut Model,
    analysis: &Analysis,
    orientation: Orientation,
    dims: &Dimensions,
    finished: &mut dyn TensorSink,
) -> Result<Rewritten> {
    let mut rewritten = fuse_analysed(model, analysis)?;
    let widths = dims.widths(&rewritten.layout);
    let groups = basis_groups(&rewritten.layout, dims.basis, &widths);
    let bases = bases(&rewritten.layout, orientation, &widths, &groups)?;
    let per_point = bases.per_point();
    let skips = rotate::SkipForm::for_model(model);
    rotate::rotate_and_slice(
        &mut model.graph,
        &rewritten.layout,
        &per_point,
        &groups,
        skips,
        finished,
    )?;
    rewritten.widths = widths;
    rewritten.groups = groups;
    Ok(rewritten)
}

fn bases(
    layout: &Layout,
    orientation: Orientation,
    widths: &[usize],
    groups: &[usize],
) -> Result<GroupBases> {
    let d = layout.width;
    if widths.iter().any(|&k| k == 0 || k > d) {
        return Err(Error::Pass {
            pass: "rotate",
            node: "(graph)".into(),
            message: format!("widths {widths:?} do not fit D = {d}"),
        });
    }
    GroupBases::new(groups, |group| {
        let q = match orientation {
            Orientation::Identity => Mat::<f64>::identity(d, d),
            Orientation::Random { seed } => {
                algebra::random_orthogonal(d, seed.wrapping_add(group as u64))
            }
        };
        Ok(q.subcols(0, widths[group]).to_owned())
    })
}

/// One matrix per basis group, read by every point of the group. A copy per point would hold
/// gigabytes: LLaMA-2-7B has 65 stream points and one D × k basis is 100 MB in f64 there.
pub struct GroupBases {
    matrices: Vec<Mat<f64>>,
    /// Point → its group's matrix.
    of_point: Vec<usize>,
}

impl GroupBases {
    /// `make(group)` gives the matrix of a group ([`basis_groups`]: named by its first point,
    /// whose width every point of the group has); it is called once per group.
    pub fn new(groups: &[usize], mut make: impl FnMut(usize) -> Result<Mat<f64>>) -> Result<Self> {
        let (mut matrices, mut of_point) = (Vec::new(), Vec::with_capacity(groups.len()));
        for (p, &group) in groups.iter().enumerate() {
            if p == 0 || group != groups[p - 1] {
                matrices.push(make(group)?);
            }
            of_point.push(matrices.len() - 1);
        }
        Ok(GroupBases { matrices, of_point })
    }

    /// Every point's matrix, in point order.
    pub fn per_point(&self) -> Vec<MatRef<'_, f64>> {
        self.of_point.iter().map(|&i| self.matrices[i].as_ref()).collect()
    }
}

impl std::fmt::Display for Orientation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Orientation::Identity => write!(f, "identity"),
            Orientation::Random { seed } => write!(f, "random-basis (seed {seed})"),
        }
    }
}

/// What SliceGPT records in the model's metadata (`onnx_slice.*`, after the version).
pub fn metadata_entries(
    rewritten: &Rewritten,
    dims: &Dimensions,
    orientation: &str,
) -> Vec<(String, String)> {
    let widths: Vec<String> = rewritten.widths.iter().map(usize::to_string).collect();
    let mut entries: Vec<(String, String)> = [
        ("method", "slicegpt".to_string()),
        ("ratio", dims.ratio.to_string()),
        ("stream_width", rewritten.layout.width.to_string()),
        ("widths", widths.join(",")),
        ("orientation", orientation.to_string()),
        ("basis", dims.basis.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if rewritten.centered_embeddings {
        entries.push(("centered_embeddings".to_string(), "true".to_string()));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_bases_make_one_matrix_per_group_that_its_points_share() {
        let groups = [0, 0, 0, 3, 4, 4];
        let mut made = Vec::new();
        let bases = GroupBases::new(&groups, |group| {
            made.push(group);
            Ok(Mat::<f64>::identity(4, group + 1))
        })
        .unwrap();
        assert_eq!(made, [0, 3, 4]);
        let widths: Vec<usize> = bases.per_point().iter().map(|q| q.ncols()).collect();
        assert_eq!(widths, [1, 1, 1, 4, 5, 5]);
        let per_point = bases.per_point();
        assert_eq!(per_point[0].as_ptr(), per_point[2].as_ptr());
        assert_ne!(per_point[2].as_ptr(), per_point[3].as_ptr());
    }
}
