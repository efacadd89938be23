//! The model understood once, before any method works on it: what onnx-slice refuses (a model it
//! wrote itself, a quantized model, a malformed graph), the fused `Skip*Normalization` ops
//! decomposed into their Add and norm (the one change analysis makes to the model, an exact one),
//! and the transformer's layout with the roles of every block's linear layers (`structure`).
//! Planning, calibration and every method read this one [`Analysis`]; nothing detects again.
use crate::error::{Error, Result};
use crate::graph::Model;
use crate::structure::{self, Layout};

/// What analysis found in a model.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub layout: Layout,
    /// The head computes `x·Eᵀ` with the token embedding table E: it reads E itself, or an exact
    /// copy of it (TorchScript exports keep a transposed duplicate).
    pub tied_head: bool,
    /// How many `Skip*Normalization` ops were decomposed in the model.
    pub skip_norms_decomposed: usize,
}

/// Refuses what onnx-slice cannot compress, decomposes the model's `Skip*Normalization` ops (in
/// place: the model computes the same function) and finds the transformer in it.
pub fn analyze(model: &mut Model) -> Result<Analysis> {
    refuse_compressed(model)?;
    structure::refuse_quantized(&model.graph)?;
    if let Some((node, why)) = model.graph.malformed_node() {
        return Err(Error::Graph { node: node.label().to_string(), message: why });
    }
    let skip_norms_decomposed = crate::fuse::skip::decompose_skip_norms_in_model(model)?;
    let layout = structure::detect(&model.graph)?;
    let tied_head =
        layout.tied_head || crate::fuse::tie::head_reads_embedding(&model.graph, &layout);
    Ok(Analysis { layout, tied_head, skip_norms_decomposed })
}

/// Refuses a model onnx-slice has already written: a sliced one has folded norms and shortcut
/// matrices that detection does not take as a transformer to rewrite, and compressing a compressed
/// model twice compounds the error; the original model can be compressed to any size instead.
pub fn refuse_compressed(model: &Model) -> Result<()> {
    match crate::provenance::sliced_by(model) {
        Some(entries) => Err(Error::AlreadySliced {
            model: model
                .source
                .as_ref()
                .map_or("the model".into(), |s| s.path.display().to_string()),
            by: crate::provenance::describe_slicing(&entries),
        }),
        None => Ok(()),
    }
}
