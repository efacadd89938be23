//! Element-type checking: the types of a graph's values, propagated from its inputs, initializers
//! and constants through the standard ONNX operators, and the operators' type constraints checked
//! on them (MatMul of float16 by float32, say, which ONNX Runtime refuses to load). Operators
//! outside the table (other domains, control flow) take their outputs' declared types, or none;
//! a constraint with an input of unknown type is not checked, so the check never refuses a graph
//! for what it does not know.
use std::collections::HashMap;

use super::{AttrValue, DataType, Graph, Node};
use crate::error::TypeError;

/// How an operator types its outputs: which inputs must share one type `T`, and what its outputs
/// are.
enum Rule {
    /// The listed inputs (`None`: all) share `T`; every output is `T`.
    Same(Option<&'static [usize]>),
    /// The listed inputs share a type; every output is `DataType`.
    Compare(&'static [usize], DataType),
    /// Every output has input `usize`'s type (no constraint checked).
    Like(usize),
    /// Every output has this type.
    Fixed(DataType),
    /// Cast: the `to` attribute.
    CastTo,
    /// Constant and ConstantOfShape: their value attribute's type (ConstantOfShape: float32 without).
    Constant,
}

fn rule(node: &Node) -> Option<Rule> {
    if !node.in_default_domain() {
        return None;
    }
    Some(match node.op_type.as_str() {
        "Add" | "Sub" | "Mul" | "Div" | "MatMul" | "Sum" | "Max" | "Min" | "Mean" | "Mod"
        | "Concat" | "Gemm" | "PRelu" => Rule::Same(None),
        "Where" => Rule::Same(Some(&[1, 2])),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" => {
            Rule::Compare(&[0, 1], DataType::Bool)
        }
        "And" | "Or" | "Xor" | "Not" | "IsNaN" | "IsInf" => Rule::Fixed(DataType::Bool),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Rule::Fixed(DataType::Int64),
        "Cast" => Rule::CastTo,
        "CastLike" => Rule::Like(1),
        "Constant" | "ConstantOfShape" => Rule::Constant,
        "Sqrt" | "Reciprocal" | "Neg" | "Abs" | "Exp" | "Log" | "Relu" | "Tanh" | "Sigmoid"
        | "Erf" | "Softmax" | "LogSoftmax" | "Identity" | "Reshape" | "Transpose" | "Squeeze"
        | "Unsqueeze" | "Slice" | "Expand" | "Flatten" | "Tile" | "Gather" | "GatherElements"
        | "GatherND" | "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd"
        | "ReduceSumSquare" | "ReduceL2" | "Split" | "Pad" | "Gelu" | "Trilu" | "CumSum"
        | "Range" | "Pow" | "Clip" | "Floor" | "Ceil" | "Round" | "Sin" | "Cos" | "Elu"
        | "LeakyRelu" | "Softplus" | "HardSigmoid" | "ScatterND" | "ScatterElements"
        | "Dropout" | "LayerNormalization" | "RMSNormalization" => Rule::Like(0),
        _ => return None,
    })
}

/// The element type of every value whose type the graph determines.
pub fn value_types(graph: &Graph) -> HashMap<String, DataType> {
    let mut types: HashMap<String, DataType> = HashMap::new();
    for v in graph.inputs.iter().chain(&graph.value_info) {
        if let Some(t) = v.elem_type() {
            types.insert(v.name.clone(), t);
        }
    }
    types.extend(graph.initializers.iter().map(|t| (t.name.clone(), t.dtype)));
    // Nodes normally come sorted; a few passes cover graphs that are not.
    for _ in 0..3 {
        let before = types.len();
        for node in &graph.nodes {
            for (output, t) in node.outputs.iter().zip(output_types(node, &types)) {
                if let (false, Some(t)) = (output.is_empty(), t) {
                    types.insert(output.clone(), t);
                }
            }
        }
        if types.len() == before {
            break;
        }
    }
    types
}

/// Checks every node's type constraints and every declared output and value_info type against
/// the computed types.
pub fn check_types(graph: &Graph) -> Result<(), TypeError> {
    let types = value_types(graph);
    for node in &graph.nodes {
        check_node(node, &types)?;
        for (output, t) in node.outputs.iter().zip(output_types(node, &types)) {
            let declared = graph
                .outputs
                .iter()
                .chain(&graph.value_info)
                .find(|v| &v.name == output)
                .and_then(|v| v.elem_type());
            if let (Some(declared), Some(t)) = (declared, t) {
                if declared != t {
                    return Err(error(
                        node,
                        format!(
                            "output '{output}' is declared {} but computed as {}",
                            declared.name(),
                            t.name()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn error(node: &Node, message: String) -> TypeError {
    TypeError { node: node.label().to_string(), op: node.op_type.clone(), message }
}

fn check_node(node: &Node, types: &HashMap<String, DataType>) -> Result<(), TypeError> {
    let group: Vec<usize> = match rule(node) {
        Some(Rule::Same(None)) => (0..node.inputs.len()).collect(),
        Some(Rule::Same(Some(inputs)) | Rule::Compare(inputs, _)) => inputs.to_vec(),
        _ => return Ok(()),
    };
    let typed: Vec<(&str, DataType)> = group
        .iter()
        .filter_map(|&i| node.inputs.get(i).filter(|v| !v.is_empty()))
        .filter_map(|v| types.get(v).map(|&t| (v.as_str(), t)))
        .collect();
    if let Some((first, t)) = typed.first() {
        if let Some((other, u)) = typed.iter().find(|(_, u)| u != t) {
            return Err(error(
                node,
                format!(
                    "inputs '{first}' ({}) and '{other}' ({}) must have the same element type",
                    t.name(),
                    u.name()
                ),
            ));
        }
    }
    Ok(())
}

fn output_types(node: &Node, types: &HashMap<String, DataType>) -> Vec<Option<DataType>> {
    let input = |i: usize| node.inputs.get(i).and_then(|v| types.get(v)).copied();
    let t = match rule(node) {
        None => None,
        Some(Rule::Same(None)) => (0..node.inputs.len()).find_map(input),
        Some(Rule::Same(Some(inputs))) => inputs.iter().find_map(|&i| input(i)),
        Some(Rule::Compare(_, t) | Rule::Fixed(t)) => Some(t),
        Some(Rule::Like(i)) => input(i),
        Some(Rule::CastTo) => node.attr_int("to").map(|c| DataType::from_code(c as i32)),
        Some(Rule::Constant) => constant_type(node),
    };
    let mut out = vec![t; node.outputs.len()];
    // Dropout's mask and LayerNormalization's statistics are not of the data's type.
    if matches!(node.op_type.as_str(), "Dropout" | "LayerNormalization") {
        out.iter_mut().skip(1).for_each(|o| *o = None);
    }
    out
}

fn constant_type(node: &Node) -> Option<DataType> {
    for attr in &node.attributes {
        match (&attr.value, attr.name.as_str()) {
            (AttrValue::Tensor(t), "value") => return Some(t.dtype),
            (_, "value_float" | "value_floats") => return Some(DataType::Float),
            (_, "value_int" | "value_ints") => return Some(DataType::Int64),
            (_, "value_string" | "value_strings") => return Some(DataType::String),
            _ => {}
        }
    }
    node.is("ConstantOfShape").then_some(DataType::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Tensor, ValueInfo};

    fn graph(weight: DataType) -> Graph {
        let w = Tensor::from_raw(
            "w",
            weight,
            vec![2, 2],
            vec![0u8; 2 * 2 * weight.byte_size().unwrap()].into(),
        );
        let mut cast = Node::new("Cast", "cast", vec!["x".into()], vec!["h".into()]);
        cast.set_attr("to", AttrValue::Int(DataType::Float16.code() as i64));
        Graph {
            nodes: vec![
                cast,
                Node::new("MatMul", "mm", vec!["h".into(), "w".into()], vec!["y".into()]),
            ],
            initializers: vec![w],
            inputs: vec![ValueInfo::tensor_of_rank_unknown("x", DataType::Float)],
            outputs: vec![ValueInfo::tensor_of_rank_unknown("y", DataType::Float16)],
            ..Default::default()
        }
    }

    #[test]
    fn types_propagate_and_constraints_hold() {
        let g = graph(DataType::Float16);
        assert_eq!(check_types(&g), Ok(()));
        assert_eq!(value_types(&g)["y"], DataType::Float16);
    }

    #[test]
    fn a_mixed_matmul_is_refused_with_its_node() {
        let err = check_types(&graph(DataType::Float)).unwrap_err();
        assert_eq!((err.node.as_str(), err.op.as_str()), ("mm", "MatMul"));
        assert!(err.message.contains("'h' (float16) and 'w' (float32)"), "{err}");
    }

    #[test]
    fn a_wrong_declared_output_is_refused_and_unknown_ops_are_not_judged() {
        let mut g = graph(DataType::Float16);
        g.outputs = vec![ValueInfo::tensor_of_rank_unknown("y", DataType::Float)];
        assert!(check_types(&g)
            .unwrap_err()
            .message
            .contains("declared float32 but computed as float16"));
        let mut g = graph(DataType::Float);
        g.nodes[0].domain = "com.microsoft".into();
        g.outputs = vec![ValueInfo::untyped("y")];
        assert_eq!(check_types(&g), Ok(()), "the Cast of another domain types nothing");
    }
}
