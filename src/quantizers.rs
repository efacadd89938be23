//! What a written model tells the quantizer that runs after onnx-slice (ONNX Runtime's
//! `quantize_dynamic`, `MatMulNBitsQuantizer`; bench/quantize.sh measured why): the MatMuls the
//! rewrite added on the residual stream itself. A quantizer gives their input one scale per
//! tensor (int8) or their weight one per block (int4); the stream's few massive channels then set
//! that scale and the rest of the stream loses its resolution, and every later block reads the
//! damage. The dense model has no such product, so these nodes are best left in float (their
//! weights are a few percent of the model). The list goes to the report and to the model's
//! metadata (`onnx_slice.quantize_exclude`), so a pipeline reads it from either.
use serde::Serialize;

use crate::fuse::{EMBEDDING_ADAPTER_NODE, HEAD_ADAPTER_NODE};
use crate::graph::Graph;
use crate::rotate::SHORTCUT_NODE;

/// Metadata key (after `onnx_slice.`) of the JSON list of node names.
pub const METADATA_KEY: &str = "quantize_exclude";

/// A node to pass to a quantizer's `nodes_to_exclude`, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FloatNode {
    pub node: String,
    pub reason: &'static str,
}

/// The MatMuls of `graph` that read or write the residual stream with a matrix the rewrite made:
/// shortcuts between bases, and the tied table's embedding and head adapters.
pub fn float_nodes(graph: &Graph) -> Vec<FloatNode> {
    graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "MatMul")
        .filter_map(|n| {
            let reason = if n.name.starts_with(SHORTCUT_NODE) {
                "a shortcut: the residual stream itself through a change of basis"
            } else if n.name.starts_with(EMBEDDING_ADAPTER_NODE) {
                "the embedding adapter: writes the whole residual stream"
            } else if n.name.starts_with(HEAD_ADAPTER_NODE) {
                "the head adapter: reads the whole residual stream"
            } else {
                return None;
            };
            Some(FloatNode { node: n.name.clone(), reason })
        })
        .collect()
}

/// Parameters of the shortcut matrices in `graph` (a skip written as a Pad has none).
pub fn shortcut_parameters(graph: &Graph) -> u64 {
    graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "MatMul" && n.name.starts_with(SHORTCUT_NODE))
        .filter_map(|n| n.inputs.get(1).and_then(|w| graph.initializer(w)))
        .map(|t| t.numel())
        .sum()
}

/// The metadata entry for `nodes` (none when there is nothing to exclude).
pub fn metadata_entry(nodes: &[FloatNode]) -> Option<(String, String)> {
    if nodes.is_empty() {
        return None;
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    let list = serde_json::to_string(&names).expect("a list of strings serializes");
    Some((METADATA_KEY.to_string(), list))
}
