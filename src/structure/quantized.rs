//! Quantized models are refused by name: their weights are integers with per-block or per-channel
//! scales, and a rotation mixes every input channel into every other, so the rotated weights
//! could not be stored in the same quantized form without a new (lossy) quantization. The remedy
//! is the other order: slice the float model, then quantize the sliced one.
pub use crate::error::{QuantizedForm, QuantizedModel};
use crate::graph::Graph;

impl QuantizedForm {
    pub(super) fn of(op: &str) -> Option<Self> {
        match op {
            "MatMulInteger"
            | "DynamicQuantizeLinear"
            | "DynamicQuantizeMatMul"
            | "MatMulIntegerToFloat"
            | "ConvInteger" => Some(Self::DynamicInt8),
            "QuantizeLinear" | "DequantizeLinear" => Some(Self::Qdq),
            "MatMulNBits" | "GatherBlockQuantized" | "MatMulBnb4" => Some(Self::BlockNBits),
            op if op.starts_with("QLinear") || op.starts_with("QGemm") => Some(Self::QOperator),
            _ => None,
        }
    }
}

/// Refuses a quantized graph, naming its form, its first node of that form, and the remedy.
pub fn refuse_quantized(graph: &Graph) -> Result<(), QuantizedModel> {
    let quantized: Vec<_> = graph
        .nodes
        .iter()
        .filter_map(|n| QuantizedForm::of(&n.op_type).map(|form| (n, form)))
        .collect();
    let Some(&(first, form)) = quantized.iter().min_by_key(|(_, form)| *form) else {
        return Ok(());
    };
    Err(QuantizedModel {
        form,
        node: first.label().to_string(),
        op: first.op_type.clone(),
        count: quantized.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Node;

    fn graph(ops: &[&str]) -> Graph {
        let nodes = ops
            .iter()
            .enumerate()
            .map(|(i, op)| Node::new(op, format!("n{i}"), vec![], vec![format!("v{i}")]))
            .collect();
        Graph { nodes, ..Default::default() }
    }

    #[test]
    fn float_graphs_pass_and_each_form_is_named() {
        assert_eq!(refuse_quantized(&graph(&["Gather", "MatMul", "Add", "Cast"])), Ok(()));
        for (ops, form, op) in [
            (
                &["DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"][..],
                QuantizedForm::DynamicInt8,
                "DynamicQuantizeLinear",
            ),
            (
                &["QuantizeLinear", "DequantizeLinear", "MatMul"][..],
                QuantizedForm::Qdq,
                "QuantizeLinear",
            ),
            (
                &["DequantizeLinear", "GatherBlockQuantized", "MatMulNBits"][..],
                QuantizedForm::BlockNBits,
                "GatherBlockQuantized",
            ),
            (&["QLinearMatMul"][..], QuantizedForm::QOperator, "QLinearMatMul"),
        ] {
            let err = refuse_quantized(&graph(ops)).unwrap_err();
            let node = format!("n{}", ops.iter().position(|o| *o == op).unwrap());
            let count = ops.iter().filter(|o| QuantizedForm::of(o).is_some()).count();
            assert_eq!(
                (err.form, err.op.as_str(), err.node.clone(), err.count),
                (form, op, node, count)
            );
            assert!(err.to_string().contains(form.remedy()), "{err}");
        }
    }
}
