//! Normalization layers over the last axis, in every form the exporters produce, recognised by
//! structure and constant values (never by names).
//!
//! | form | matcher | exporters (fixtures) |
//! |---|---|---|
//! | `LayerNormalization` op | `ops::layer_normalization` | TorchScript 17, optimum, dynamo, ortopt, genai (phi) |
//! | `RMSNormalization` op | `ops::rms_normalization` | dynamo opset 23 (llama, qwen2) |
//! | `SimplifiedLayerNormalization` op | `ops::rms_normalization` | ortopt, genai (llama, qwen2) |
//! | decomposed LayerNorm | `decomposed::from_square` | TorchScript 14 (gpt2, opt, phi, gpt_neox) |
//! | decomposed RMSNorm | `decomposed::from_square` | TorchScript 14/17, optimum (`Div(1,·)`), dynamo (`Reciprocal`) |
//!
//! ONNX Runtime's fused `SkipLayerNormalization` / `SkipSimplifiedLayerNormalization` (residual
//! add + norm in one op) are not matched: `crate::fuse::skip::decompose_skip_norms` turns them
//! into an `Add` and one of the ops above first.
mod decomposed;
mod ops;
mod parts;

use super::GraphIndex;
use parts::{label, Matched};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// (x − mean) / sqrt(var + eps) · γ + β
    LayerNorm,
    /// x / sqrt(mean(x²) + eps) · γ
    RmsNorm,
}

/// One normalization layer found in the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct NormMatch {
    pub kind: NormKind,
    /// The value normalized (the stream value, before any Cast the norm applies).
    pub input: String,
    /// The normalized value after γ (and β): what the following linear layers read.
    pub output: String,
    /// γ (initializer or Constant output name); `None` when the norm has no scale.
    pub gamma: Option<String>,
    /// β; `None` when absent.
    pub beta: Option<String>,
    pub epsilon: f32,
    /// Indices of every node that belongs to the norm (what a rewrite removes).
    pub nodes: Vec<usize>,
    /// Name of the node that identifies the norm in messages (its main op).
    pub anchor: String,
}

/// Every normalization layer over the last axis in the graph, in graph order (of the node that
/// writes each norm's output).
pub fn find_norms(index: &GraphIndex) -> Vec<NormMatch> {
    let mut found: Vec<NormMatch> =
        candidates(index).into_iter().filter_map(|(_, result)| result.ok()).collect();
    found.sort_by_key(|m| index.producer_index(&m.output));
    found
}

/// For each node that starts a norm-like pattern but is not a norm, why not: one line per
/// candidate, `<op> '<node>': <reason>`. Candidates are the norm ops, the fused Skip* norms, and
/// every `Pow` whose result is averaged by a `ReduceMean` (the variance or mean square of a
/// decomposed norm).
pub fn explain_norms(index: &GraphIndex) -> Vec<String> {
    candidates(index)
        .into_iter()
        .filter_map(|(i, result)| {
            result
                .err()
                .map(|why| format!("{} {}: {why}", index.node(i).op_type, label(index.node(i))))
        })
        .collect()
}

/// Every candidate node with the outcome of matching a norm from it.
fn candidates(index: &GraphIndex) -> Vec<(usize, Matched<NormMatch>)> {
    (0..index.graph.nodes.len())
        .filter_map(|i| match_from(index, i).map(|result| (i, result)))
        .collect()
}

/// `None` when node `i` cannot start a norm at all.
fn match_from(index: &GraphIndex, i: usize) -> Option<Matched<NormMatch>> {
    let node = index.node(i);
    let default_domain = node.in_default_domain();
    match node.op_type.as_str() {
        "LayerNormalization" if default_domain => Some(ops::layer_normalization(index, i)),
        "RMSNormalization" | "SimplifiedLayerNormalization" if default_domain => {
            Some(ops::rms_normalization(index, i))
        }
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization"
            if node.domain == "com.microsoft" =>
        {
            Some(Err("residual add fused into the norm: run decompose_skip_norms first".into()))
        }
        "Pow" if default_domain && decomposed::feeds_a_mean(index, node) => {
            Some(decomposed::from_square(index, i))
        }
        _ => None,
    }
}
