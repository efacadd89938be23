//! Pieces every norm matcher uses: reading operands and constants safely (a malformed graph gives
//! "no match", never a panic), checking that a reduction runs over the last axis and that γ/β are
//! per-channel vectors, and finishing a match: which Casts and Constants belong to the norm, and
//! that nothing computed inside it is used outside.
use std::collections::BTreeSet;

use crate::graph::{DataType, Dim, Node};
use crate::pattern::{is_value_preserving, GraphIndex};

use super::{NormKind, NormMatch};

/// A match, or why there is none, in words (for `explain_norms`).
pub(super) type Matched<T> = Result<T, String>;

/// A node's name for messages (exporters may leave names empty).
pub(super) fn label(node: &Node) -> String {
    format!("'{}'", node.label())
}

/// The name identifying a node in a `NormMatch`: its name, or its first output when unnamed.
pub(super) fn anchor_name(node: &Node) -> String {
    node.label().to_string()
}

pub(super) fn require(condition: bool, why: impl FnOnce() -> String) -> Matched<()> {
    if condition {
        Ok(())
    } else {
        Err(why())
    }
}

/// Input `i` of a node, when present (ONNX writes an omitted optional input as "").
pub(super) fn input(node: &Node, i: usize) -> Option<&str> {
    node.inputs.get(i).map(String::as_str).filter(|v| !v.is_empty())
}

/// The first output of a node.
pub(super) fn output(node: &Node) -> Matched<&str> {
    node.outputs
        .first()
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{} has no output", label(node)))
}

/// The only node reading `value`. A value with several readers, or one that is a graph output, is
/// used outside the pattern and cannot be one of its intermediates.
pub(super) fn sole_reader(index: &GraphIndex, value: &str) -> Matched<usize> {
    if index.is_graph_output(value) {
        return Err(format!("'{value}' is a graph output"));
    }
    match index.consumer_indices(value) {
        [only] => Ok(*only),
        [] => Err(format!("nothing reads '{value}'")),
        many => Err(format!("'{value}' is read by {} nodes", many.len())),
    }
}

/// The only node reading `value`, which must be a default-domain `op`.
pub(super) fn sole_reader_of_type(index: &GraphIndex, value: &str, op: &str) -> Matched<usize> {
    let reader = sole_reader(index, value)?;
    let node = index.node(reader);
    require(node.is(op) && node.in_default_domain(), || {
        format!("'{value}' goes to {} {}, not {op}", node.op_type, label(node))
    })?;
    Ok(reader)
}

/// For a two-input commutative op (Add, Mul) reading `value`: its other operand, in either order.
pub(super) fn other_operand<'n>(node: &'n Node, value: &str) -> Option<&'n str> {
    match node.inputs.as_slice() {
        [a, b] if a == value => Some(b),
        [a, b] if b == value => Some(a),
        _ => None,
    }
}

/// A constant holding one number, from float or integer storage (exporters write the exponent
/// of a Pow either way).
pub(super) fn scalar(index: &GraphIndex, value: &str) -> Option<f64> {
    if let Some(v) = index.scalar_f32(value) {
        return Some(f64::from(v));
    }
    match index.constant_i64(value)?.as_slice() {
        [v] => Some(*v as f64),
        _ => None,
    }
}

/// ε must be a small non-negative number: a larger constant added to the variance is not a guard
/// against division by zero but a different computation.
pub(super) fn check_epsilon(epsilon: f32) -> Matched<f32> {
    require(epsilon.is_finite() && (0.0..0.1).contains(&epsilon), || {
        format!("ε = {epsilon} is outside [0, 0.1)")
    })?;
    Ok(epsilon)
}

/// ε stored as a scalar float constant (an initializer or a Constant node).
pub(super) fn epsilon_constant(index: &GraphIndex, value: &str) -> Matched<f32> {
    let epsilon = index
        .scalar_f32(value)
        .ok_or_else(|| format!("'{value}' added to the mean is not a scalar float constant"))?;
    check_epsilon(epsilon)
}

/// The shape the graph declares for `value` (graph input, value_info or graph output), if any.
fn declared_shape(index: &GraphIndex, value: &str) -> Option<Vec<Dim>> {
    let graph = index.graph;
    graph
        .inputs
        .iter()
        .chain(&graph.value_info)
        .chain(&graph.outputs)
        .find(|v| v.name == value)
        .and_then(|v| v.shape())
}

/// `axis` is the last axis of `value`: −1, or rank − 1 when the graph declares the rank.
pub(super) fn is_last_axis(index: &GraphIndex, value: &str, axis: i64) -> bool {
    axis == -1 || declared_shape(index, value).is_some_and(|shape| axis == shape.len() as i64 - 1)
}

/// A ReduceMean over the last axis only that keeps that axis (so that its result broadcasts back
/// over the row). Axes are an attribute before opset 18 and an input from opset 18 on.
pub(super) fn check_mean_over_last_axis(index: &GraphIndex, node: &Node) -> Matched<()> {
    let data = input(node, 0).ok_or_else(|| format!("{} has no data input", label(node)))?;
    let axes: Vec<i64> = match (node.attr_ints("axes"), input(node, 1)) {
        (Some(axes), _) => axes.to_vec(),
        (None, Some(axes)) => index
            .constant_i64(axes)
            .ok_or_else(|| format!("the axes of {} are not constant", label(node)))?,
        (None, None) => return Err(format!("{} averages over every axis", label(node))),
    };
    require(matches!(axes.as_slice(), [axis] if is_last_axis(index, data, *axis)), || {
        format!("{} averages over axes {axes:?}, not over the last axis only", label(node))
    })?;
    require(node.attr_int("keepdims").unwrap_or(1) == 1, || {
        format!("{} drops the averaged axis (keepdims = 0)", label(node))
    })
}

/// The length D of a per-channel vector (γ or β): a float constant whose dims are all 1 but the
/// last, so that it broadcasts along the rows of the normalized tensor.
pub(super) fn channel_vector(index: &GraphIndex, value: &str) -> Option<usize> {
    let (dtype, dims) = match index.initializer(value) {
        Some(t) => (t.dtype, t.dims.clone()),
        None => {
            let t = index.constant(value)?;
            (t.dtype, t.dims)
        }
    };
    let float = matches!(
        dtype,
        DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double
    );
    let (&last, leading) = dims.split_last()?;
    (float && last >= 2 && leading.iter().all(|&d| d == 1)).then_some(last as usize)
}

/// γ for a norm op, whose scale input is required to be a per-channel constant.
pub(super) fn check_channel_vector(index: &GraphIndex, value: &str, what: &str) -> Matched<()> {
    require(channel_vector(index, value).is_some(), || {
        format!("{what} '{value}' is not a constant vector along the last axis")
    })
}

/// γ and β have the same length D, and D is the last dim of the input wherever the graph
/// declares it.
fn check_width(
    index: &GraphIndex,
    input: &str,
    gamma: Option<&str>,
    beta: Option<&str>,
) -> Matched<()> {
    let widths: Vec<(&str, usize)> = gamma
        .iter()
        .chain(beta.iter())
        .filter_map(|&v| channel_vector(index, v).map(|d| (v, d)))
        .collect();
    if let [(first, d), rest @ ..] = widths.as_slice() {
        if let Some((other, e)) = rest.iter().find(|(_, e)| e != d) {
            return Err(format!("'{first}' has {d} channels but '{other}' has {e}"));
        }
        if let Some(Dim::Fixed(declared)) =
            declared_shape(index, input).and_then(|s| s.last().cloned())
        {
            require(declared == *d as i64, || {
                format!("'{input}' has {declared} channels but '{first}' has {d}")
            })?;
        }
    }
    Ok(())
}

/// What a matcher found before the common checks.
pub(super) struct Draft<'a> {
    pub kind: NormKind,
    /// The values the norm's first nodes read (they lead back to the stream).
    pub reads: Vec<&'a str>,
    pub output: &'a str,
    pub gamma: Option<&'a str>,
    pub beta: Option<&'a str>,
    pub epsilon: f32,
    pub nodes: BTreeSet<usize>,
    pub anchor: usize,
}

/// Completes a match: adds the Casts/Identities between the stream and the norm that serve only
/// the norm and the Constant nodes only the norm reads, checks that no value computed inside the
/// norm is used outside it and that the widths agree.
pub(super) fn finish(index: &GraphIndex, draft: Draft) -> Matched<NormMatch> {
    let mut nodes = draft.nodes;
    let input = stream_input(index, &draft.reads, &mut nodes)?;
    add_private_constants(index, &mut nodes);
    check_nothing_escapes(index, &nodes, draft.output)?;
    check_width(index, &input, draft.gamma, draft.beta)?;
    Ok(NormMatch {
        kind: draft.kind,
        input,
        output: draft.output.to_string(),
        gamma: draft.gamma.map(str::to_string),
        beta: draft.beta.map(str::to_string),
        epsilon: draft.epsilon,
        nodes: nodes.into_iter().collect(),
        anchor: anchor_name(index.node(draft.anchor)),
    })
}

/// The stream value a norm normalizes: `reads` traced back through value-preserving ops (Cast,
/// Identity). Such an op belongs to the norm only when the norm is all that reads it: LLaMA's
/// TorchScript export casts the stream once and feeds that Cast to both the norm and the
/// residual Add, so that Cast stays outside (and the norm's input is the value before it).
fn stream_input(
    index: &GraphIndex,
    reads: &[&str],
    nodes: &mut BTreeSet<usize>,
) -> Matched<String> {
    let mut sources = BTreeSet::new();
    for &read in reads {
        let mut value = read.to_string();
        while let Some(producer) = index.producer_index(&value) {
            let node = index.node(producer);
            match input(node, 0) {
                Some(from) if is_value_preserving(node) && only_read_by(index, &value, nodes) => {
                    nodes.insert(producer);
                    value = from.to_string();
                }
                _ => break,
            }
        }
        sources.insert(index.source_of(&value).to_string());
    }
    let mut sources = sources.into_iter();
    match (sources.next(), sources.next()) {
        (Some(input), None) => Ok(input),
        (Some(a), Some(b)) => Err(format!("it reads two different values, '{a}' and '{b}'")),
        (None, _) => Err("it reads nothing".into()),
    }
}

/// `value` is read, and only by `nodes` (and is not a graph output).
fn only_read_by(index: &GraphIndex, value: &str, nodes: &BTreeSet<usize>) -> bool {
    let readers = index.consumer_indices(value);
    !index.is_graph_output(value)
        && !readers.is_empty()
        && readers.iter().all(|r| nodes.contains(r))
}

/// Constant nodes (ε, exponent, axes, the 1 of 1/x) that only the norm reads belong to it.
fn add_private_constants(index: &GraphIndex, nodes: &mut BTreeSet<usize>) {
    let private: Vec<usize> = nodes
        .iter()
        .flat_map(|&i| index.node(i).inputs.iter())
        .filter_map(|value| index.producer_index(value))
        .filter(|&p| {
            let node = index.node(p);
            node.is("Constant") && node.outputs.iter().all(|o| only_read_by(index, o, nodes))
        })
        .collect();
    nodes.extend(private);
}

/// Every value computed inside the norm other than its output is read only inside the norm and
/// is not a graph output: otherwise replacing the norm would break its other readers.
fn check_nothing_escapes(index: &GraphIndex, nodes: &BTreeSet<usize>, output: &str) -> Matched<()> {
    for &i in nodes {
        for value in index.node(i).outputs.iter().filter(|v| !v.is_empty() && v.as_str() != output)
        {
            require(!index.is_graph_output(value), || {
                format!("its intermediate '{value}' is a graph output")
            })?;
            if let Some(&outside) =
                index.consumer_indices(value).iter().find(|r| !nodes.contains(r))
            {
                let reader = index.node(outside);
                return Err(format!(
                    "its intermediate '{value}' is also read by {} {}",
                    reader.op_type,
                    label(reader)
                ));
            }
        }
    }
    Ok(())
}
