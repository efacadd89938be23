//! Splits ONNX Runtime's fused residual-add + norm ops back into an `Add` and a plain norm op, so
//! that the residual sum is an ordinary value (where a shortcut rotation can go) and the norm is
//! one that `pattern::norm` recognises.
//!
//! ```text
//!   input ─┐                                         input ─► [Add(bias)] ─┐
//!          SkipLayerNormalization(γ, β?, bias?) ─► y                       Add ─► sum ─► LayerNormalization(γ, β?) ─► y
//!   skip ──┘        └─► sum (output 3)               skip ─────────────────┘
//!
//!   SkipSimplifiedLayerNormalization(input, skip, γ, bias?)  →  same, with SimplifiedLayerNormalization(γ)
//! ```
//!
//! The sum keeps the name of output 3 and the norm the name of output 0, so every reader is
//! untouched. The bias Add sits next to `input`: ONNX Runtime's optimizer folds the bias of the
//! linear layer that produces `input` into the op, and decomposing puts it back with that layer.
use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::graph::{same_domain, AttrValue, Graph, Model, Namer, Node, OpsetImport};

const PASS: &str = "decompose-skip-norms";

/// ε of the Skip* ops when the attribute is absent (ONNX Runtime's schema default).
const SKIP_DEFAULT_EPSILON: f32 = 1e-12;

/// `LayerNormalization` entered the default domain in opset 17.
const LAYER_NORM_OPSET: i64 = 17;

/// From opset 13 to 17 the default domain only added ops and types, so raising an import in that
/// range keeps the meaning of every existing node; below 13 (Split, Squeeze, ReduceSum… took
/// their axes as inputs from 13 on) it would not.
const SAFE_OPSET_RAISE_FROM: i64 = 13;

/// The two fused ops, told apart by whether the norm subtracts the mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipNorm {
    /// com.microsoft SkipLayerNormalization: input, skip, gamma, beta?, bias?
    Layer,
    /// com.microsoft SkipSimplifiedLayerNormalization: input, skip, gamma, bias?
    Simplified,
}

impl SkipNorm {
    fn of(node: &Node) -> Option<Self> {
        if node.domain != "com.microsoft" {
            return None;
        }
        match node.op_type.as_str() {
            "SkipLayerNormalization" => Some(SkipNorm::Layer),
            "SkipSimplifiedLayerNormalization" => Some(SkipNorm::Simplified),
            _ => None,
        }
    }

    fn beta_input(self) -> Option<usize> {
        match self {
            SkipNorm::Layer => Some(3),
            SkipNorm::Simplified => None,
        }
    }

    /// Where the bias is, per the contrib schema. Note: ONNX Runtime's CPU kernel (current source)
    /// reads the bias of both ops from input 4, so it ignores a SkipSimplifiedLayerNormalization
    /// bias at input 3; we follow the schema (no fixture has such a bias).
    fn bias_input(self) -> usize {
        match self {
            SkipNorm::Layer => 4,
            SkipNorm::Simplified => 3,
        }
    }

    fn norm_op(self) -> &'static str {
        match self {
            SkipNorm::Layer => "LayerNormalization",
            SkipNorm::Simplified => "SimplifiedLayerNormalization",
        }
    }
}

/// Replaces every com.microsoft `SkipLayerNormalization` / `SkipSimplifiedLayerNormalization` by
/// `Add` nodes and a default-domain `LayerNormalization` / `SimplifiedLayerNormalization` (the
/// latter is an ONNX Runtime op in the default domain). Returns how many ops were replaced; on
/// error the graph is unchanged.
///
/// A `LayerNormalization` needs a default-domain opset import ≥ 17: use
/// [`decompose_skip_norms_in_model`] to have it checked and raised.
pub fn decompose_skip_norms(graph: &mut Graph) -> Result<usize> {
    if !graph.nodes.iter().any(|n| SkipNorm::of(n).is_some()) {
        return Ok(0);
    }
    let read = values_read(graph);
    let mut namer = Namer::new(graph);
    let mut nodes = Vec::with_capacity(graph.nodes.len() + 8);
    let mut replaced = 0;
    for node in &graph.nodes {
        match SkipNorm::of(node) {
            Some(form) => {
                nodes.extend(decompose(node, form, &read, &mut namer)?);
                replaced += 1;
            }
            None => nodes.push(node.clone()),
        }
    }
    graph.nodes = nodes;
    Ok(replaced)
}

/// [`decompose_skip_norms`], plus the default-domain opset import that `LayerNormalization`
/// needs (raised to 17 when lower; an error when it is below 13, where raising it would change
/// the meaning of other ops).
pub fn decompose_skip_norms_in_model(model: &mut Model) -> Result<usize> {
    let needs_layer_norm =
        model.graph.nodes.iter().any(|n| SkipNorm::of(n) == Some(SkipNorm::Layer));
    if needs_layer_norm {
        raise_default_opset(model)?;
    }
    decompose_skip_norms(&mut model.graph)
}

fn raise_default_opset(model: &mut Model) -> Result<()> {
    let Some(import) = model.opset_imports.iter_mut().find(|o| same_domain(&o.domain, "")) else {
        model.opset_imports.push(OpsetImport::new("", LAYER_NORM_OPSET));
        return Ok(());
    };
    if import.version >= LAYER_NORM_OPSET {
        return Ok(());
    }
    if import.version < SAFE_OPSET_RAISE_FROM {
        let node = model
            .graph
            .nodes
            .iter()
            .find(|n| SkipNorm::of(n) == Some(SkipNorm::Layer))
            .map(|n| n.name.clone());
        return Err(Error::Pass {
            pass: PASS,
            node: node.unwrap_or_default(),
            message: format!(
                "LayerNormalization needs opset {LAYER_NORM_OPSET}, and the model imports opset {}: too old to raise safely",
                import.version
            ),
        });
    }
    import.version = LAYER_NORM_OPSET;
    Ok(())
}

/// Every value some node reads (in subgraphs too) or the graph outputs.
fn values_read(graph: &Graph) -> HashSet<String> {
    let mut read: HashSet<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    add_reads(graph, &mut read);
    read
}

fn add_reads(graph: &Graph, read: &mut HashSet<String>) {
    for node in &graph.nodes {
        read.extend(node.inputs.iter().filter(|i| !i.is_empty()).cloned());
        for subgraph in node.subgraphs() {
            add_reads(subgraph, read);
            read.extend(subgraph.outputs.iter().map(|o| o.name.clone()));
        }
    }
}

/// The plain nodes computing what one fused op computed.
fn decompose(
    node: &Node,
    form: SkipNorm,
    read: &HashSet<String>,
    namer: &mut Namer,
) -> Result<Vec<Node>> {
    let fail = |message: String| Error::Pass { pass: PASS, node: node.name.clone(), message };
    let present = |i: usize| node.inputs.get(i).filter(|v| !v.is_empty()).cloned();
    let output = |i: usize| node.outputs.get(i).filter(|v| !v.is_empty()).cloned();

    let (input, skip, gamma) = match (present(0), present(1), present(2)) {
        (Some(input), Some(skip), Some(gamma)) => (input, skip, gamma),
        _ => return Err(fail(format!("{} needs input, skip and gamma", node.op_type))),
    };
    let normalized = output(0).ok_or_else(|| fail("no normalized output".into()))?;
    for (i, what) in [(1, "mean"), (2, "inv_std_var")] {
        if let Some(value) = output(i).filter(|v| read.contains(v)) {
            return Err(fail(format!("its {what} output '{value}' is used; only the normalized output and the sum can be rewritten")));
        }
    }
    let epsilon = node.attr_float("epsilon").unwrap_or(SKIP_DEFAULT_EPSILON);
    let base = if node.name.is_empty() { normalized.clone() } else { node.name.clone() };

    let mut nodes = Vec::with_capacity(3);
    let biased = match present(form.bias_input()) {
        Some(bias) => {
            let biased = namer.fresh(&format!("{base}/input_plus_bias"));
            nodes.push(Node::new(
                "Add",
                namer.fresh(&format!("{base}/bias_add")),
                vec![input, bias],
                vec![biased.clone()],
            ));
            biased
        }
        None => input,
    };
    let sum = output(3).unwrap_or_else(|| namer.fresh(&format!("{base}/residual_sum")));
    nodes.push(Node::new(
        "Add",
        namer.fresh(&format!("{base}/residual_add")),
        vec![biased, skip],
        vec![sum.clone()],
    ));

    let mut norm_inputs = vec![sum, gamma];
    if let Some(beta) = form.beta_input().and_then(present) {
        norm_inputs.push(beta);
    }
    let mut norm = Node::new(
        form.norm_op(),
        namer.fresh(&format!("{base}/norm")),
        norm_inputs,
        vec![normalized],
    );
    norm.set_attr("axis", AttrValue::Int(-1));
    norm.set_attr("epsilon", AttrValue::Float(epsilon));
    nodes.push(norm);
    Ok(nodes)
}
