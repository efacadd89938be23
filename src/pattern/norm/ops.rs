//! Norms exported as one op.
use std::collections::BTreeSet;

use super::parts::{
    check_channel_vector, check_epsilon, finish, input, is_last_axis, label, output, require,
    Draft, Matched,
};
use super::{NormKind, NormMatch};
use crate::pattern::GraphIndex;

/// ε when the op does not say: 1e-5 for LayerNormalization, RMSNormalization and ONNX Runtime's
/// SimplifiedLayerNormalization alike.
const DEFAULT_EPSILON: f32 = 1e-5;

/// `LayerNormalization` (ONNX opset 17): TorchScript opset 17, optimum, dynamo, ortopt, genai.
///
/// ```text
///   x ─► LayerNormalization(scale γ, bias β?; axis −1, epsilon) ─► y
/// ```
pub(super) fn layer_normalization(index: &GraphIndex, i: usize) -> Matched<NormMatch> {
    single_op(index, i, NormKind::LayerNorm)
}

/// `RMSNormalization` (ONNX opset 23: dynamo opset 23) and ONNX Runtime's
/// `SimplifiedLayerNormalization` (default domain: ortopt, genai), both x / sqrt(mean(x²) + ε) · γ.
///
/// ```text
///   x ─► RMSNormalization(scale γ; axis −1, epsilon) ─► y
///   x ─► SimplifiedLayerNormalization(scale γ; axis −1, epsilon) ─► y
/// ```
pub(super) fn rms_normalization(index: &GraphIndex, i: usize) -> Matched<NormMatch> {
    single_op(index, i, NormKind::RmsNorm)
}

fn single_op(index: &GraphIndex, i: usize, kind: NormKind) -> Matched<NormMatch> {
    let node = index.node(i);
    let x = input(node, 0).ok_or_else(|| format!("{} has no input", label(node)))?;
    let y = output(node)?;
    // These ops normalize over axes [axis, rank): only axis −1 is "the last axis only".
    let axis = node.attr_int("axis").unwrap_or(-1);
    require(is_last_axis(index, x, axis), || {
        format!("it normalizes from axis {axis}, not over the last axis only")
    })?;
    let gamma = input(node, 1).ok_or("it has no scale input")?;
    check_channel_vector(index, gamma, "scale")?;
    let beta = match kind {
        NormKind::LayerNorm => input(node, 2),
        NormKind::RmsNorm => None,
    };
    if let Some(beta) = beta {
        check_channel_vector(index, beta, "bias")?;
    }
    let epsilon = check_epsilon(node.attr_float("epsilon").unwrap_or(DEFAULT_EPSILON))?;
    finish(
        index,
        Draft {
            kind,
            reads: vec![x],
            output: y,
            gamma: Some(gamma),
            beta,
            epsilon,
            nodes: BTreeSet::from([i]),
            anchor: i,
        },
    )
}
