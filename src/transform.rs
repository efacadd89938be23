//! The exact rewrite, start to end: decompose fused Skip*Norm ops, find the transformer, give every
//! weight its own initializer, fold the norms into RMSNorm form, and (optionally) rotate and slice
//! the stream with one basis per stream point.
use std::collections::BTreeMap;

use faer::{Mat, MatRef};

use crate::algebra;
use crate::error::{Error, Result};
use crate::fuse::{self, privatize_weights};
use crate::graph::{KeepInGraph, Model, TensorSink};
use crate::rotate;
use crate::structure::{self, Layout};

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

/// Which stream points share one basis. Between points of one basis the skip stays a plain Add;
/// between two bases it gets a `k_a × k_b` shortcut MatMul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BasisMode {
    /// One basis per stream point (the paper): a shortcut on every skip. The library's default;
    /// the command line's is [`BasisMode::Global`], which measured best per byte (bench/README.md).
    #[default]
    Point,
    /// A block's input and its middle point (after attention) share one basis: one shortcut per
    /// sequential block, on the MLP's skip. A parallel block (Phi, GPT-NeoX) has no middle point,
    /// so there `block` is `point`.
    Block,
    /// One basis for the whole stream, from one calibration pass over the unsliced model: no
    /// shortcut, except into the head's input where it keeps the full width D.
    Global,
}

impl std::fmt::Display for BasisMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BasisMode::Point => "point",
            BasisMode::Block => "block",
            BasisMode::Global => "global",
        })
    }
}

impl std::str::FromStr for BasisMode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "point" => Ok(BasisMode::Point),
            "block" => Ok(BasisMode::Block),
            "global" => Ok(BasisMode::Global),
            _ => Err(format!("expected point, block or global, got '{text}'")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Dimensions {
    /// Fraction of the stream width to remove.
    pub ratio: f64,
    /// The sliced width itself, instead of the one `ratio` gives (a size budget's solution).
    pub width: Option<usize>,
    /// Sliced widths are rounded down to a multiple of this.
    pub round_to: usize,
    /// Slice the last stream point too (changes the head's input width).
    pub slice_head: bool,
    pub basis: BasisMode,
}

impl Default for Dimensions {
    fn default() -> Self {
        Dimensions {
            ratio: 0.0,
            width: None,
            round_to: 8,
            slice_head: false,
            basis: BasisMode::default(),
        }
    }
}

impl Dimensions {
    /// `k = floor((1 − r)·D)` rounded down to a multiple of `round_to` (at least `round_to`, at
    /// most D); or the given `width`, at most D.
    pub fn sliced_width(&self, width: usize) -> usize {
        if let Some(k) = self.width {
            return k.min(width);
        }
        let k = ((1.0 - self.ratio) * width as f64).floor() as usize;
        let round = self.round_to.max(1);
        if k >= width {
            return width;
        }
        ((k / round) * round).clamp(round.min(width), width)
    }

    /// The width at every stream point of a layout.
    pub fn widths(&self, layout: &Layout) -> Vec<usize> {
        let points = layout.stream_points().len();
        (0..points)
            .map(|p| {
                if p + 1 == points && !self.slice_head {
                    layout.width
                } else {
                    self.sliced_width(layout.width)
                }
            })
            .collect()
    }

    /// The basis group of every stream point (see [`basis_groups`]).
    pub fn groups(&self, layout: &Layout) -> Vec<usize> {
        basis_groups(layout, self.basis, &self.widths(layout))
    }
}

/// `groups[p]` = the first point of the basis point p shares. A point joins the one before it when
/// the mode says so and both have the same width (a basis has one width).
pub fn basis_groups(layout: &Layout, mode: BasisMode, widths: &[usize]) -> Vec<usize> {
    let mut groups = vec![0];
    let mut first_of_pair = true;
    for (i, segment) in layout.segments.iter().enumerate() {
        let shares = match mode {
            BasisMode::Point => false,
            BasisMode::Block => !segment.is_parallel() && first_of_pair,
            BasisMode::Global => true,
        };
        if !segment.is_parallel() {
            first_of_pair = !first_of_pair;
        }
        groups.push(if shares && widths[i] == widths[i + 1] { groups[i] } else { i + 1 });
    }
    groups
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

/// Finds the transformer and rewrites its norms (no rotation yet): the model computes the same
/// function afterwards.
pub fn fuse(model: &mut Model) -> Result<Rewritten> {
    refuse_sliced(model)?;
    structure::refuse_quantized(&model.graph)?;
    if let Some((node, why)) = model.graph.malformed_node() {
        return Err(Error::Graph { node: node.label().to_string(), message: why });
    }
    let skip_norms_decomposed = fuse::skip::decompose_skip_norms_in_model(model)?;
    let tied_head = structure::detect(&model.graph)?.tied_head;
    let weight_copies = privatize_weights(&mut model.graph)?;
    let mut layout = structure::detect(&model.graph)?;
    layout.tied_head = tied_head || fuse::tie::head_reads_embedding(&model.graph, &layout);
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
        skip_norms_decomposed,
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
    let mut rewritten = fuse(model)?;
    let widths = dims.widths(&rewritten.layout);
    let groups = basis_groups(&rewritten.layout, dims.basis, &widths);
    let bases = bases(&rewritten.layout, orientation, &widths, &groups)?;
    let per_point = bases.per_point();
    rotate::rotate_and_slice(&mut model.graph, &rewritten.layout, &per_point, &groups, finished)?;
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

/// Records what was done in the model's metadata_props (replacing earlier onnx-slice entries).
pub fn record_in_metadata(
    model: &mut Model,
    rewritten: &Rewritten,
    dims: &Dimensions,
    orientation: &str,
) {
    model.metadata.retain(|(k, _)| !k.starts_with("onnx_slice."));
    let widths: Vec<String> = rewritten.widths.iter().map(usize::to_string).collect();
    let orientation = orientation.to_string();
    for (key, value) in [
        ("onnx_slice.version", env!("CARGO_PKG_VERSION").to_string()),
        ("onnx_slice.ratio", dims.ratio.to_string()),
        ("onnx_slice.stream_width", rewritten.layout.width.to_string()),
        ("onnx_slice.widths", widths.join(",")),
        ("onnx_slice.orientation", orientation),
        ("onnx_slice.basis", dims.basis.to_string()),
    ] {
        model.metadata.push((key.to_string(), value));
    }
    if rewritten.centered_embeddings {
        model.metadata.push(("onnx_slice.centered_embeddings".to_string(), "true".to_string()));
    }
}

/// The `onnx_slice.*` metadata of a model onnx-slice wrote (what sliced it, and how), keys without
/// the prefix; `None` for any other model.
pub fn sliced_by(model: &Model) -> Option<BTreeMap<String, String>> {
    let entries: BTreeMap<String, String> = model
        .metadata
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("onnx_slice.").map(|key| (key.to_string(), v.clone())))
        .collect();
    (!entries.is_empty()).then_some(entries)
}

/// One line for people: "onnx-slice 0.1.0 (orientation pca (…), ratio 0.25, widths 48,48,64, …)".
pub fn describe_slicing(entries: &BTreeMap<String, String>) -> String {
    let version = entries.get("version").map_or("?", String::as_str);
    let details: Vec<String> = entries
        .iter()
        .filter(|(k, _)| *k != "version")
        .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
        .collect();
    format!("onnx-slice {version} ({})", details.join(", "))
}

/// Refuses a model onnx-slice has already written: its norms are folded and its skip paths carry
/// shortcut matrices, a layout detection does not take as a transformer to rewrite. The original
/// model can be sliced at any ratio instead.
pub fn refuse_sliced(model: &Model) -> Result<()> {
    match sliced_by(model) {
        Some(entries) => Err(Error::AlreadySliced {
            model: model
                .source
                .as_ref()
                .map_or("the model".into(), |s| s.path.display().to_string()),
            by: describe_slicing(&entries),
        }),
        None => Ok(()),
    }
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
