//! Norms exported as elementwise ops: TorchScript opset 14 LayerNorm, and RMSNorm from
//! TorchScript, optimum and dynamo (no ONNX op before opset 23). A match starts at the `Pow(·, 2)`
//! that squares the row and is confirmed by everything around it.
use std::collections::BTreeSet;

use super::parts::{
    channel_vector, check_mean_over_last_axis, epsilon_constant, finish, input, label,
    other_operand, output, require, scalar, sole_reader, sole_reader_of_type, Draft, Matched,
};
use super::{NormKind, NormMatch};
use crate::graph::Node;
use crate::pattern::{is_value_preserving, GraphIndex};

/// A `Pow` whose result a `ReduceMean` averages: how every decomposed variance or mean square
/// starts (and the only `Pow`s worth explaining).
pub(super) fn feeds_a_mean(index: &GraphIndex, pow: &Node) -> bool {
    pow.outputs
        .first()
        .is_some_and(|squares| index.consumers(squares).any(|reader| reader.is("ReduceMean")))
}

/// Decomposed LayerNorm (TorchScript opset 14):
///
/// ```text
///   x ──┬────────────────► Sub ──┬─► Pow(2) ─► ReduceMean ─► Add(ε) ─► Sqrt ─┐
///       └─► ReduceMean ──────┘   └─────────────────────────────────────────► Div ─► Mul(γ) ─► Add(β) ─► y
/// ```
///
/// Decomposed RMSNorm (TorchScript 14/17 and optimum: `Div(1, ·)`; dynamo: `Reciprocal`):
///
/// ```text
///   x ─► [Cast] ──┬─► Pow(2) ─► ReduceMean ─► Add(ε) ─► Sqrt ─► Div(1, ·) ─┐
///                 └──────────────────────────────────────────────────────► Mul ─► [Cast] ─► Mul(γ) ─► y
///   dynamo:   … ─► Sqrt ─► Reciprocal ─► Mul ─► Mul(γ)
/// ```
///
/// Add and Mul operands come in either order. γ (and β) are optional: a norm whose scale was
/// already folded away ends at the normalized row.
pub(super) fn from_square(index: &GraphIndex, pow_index: usize) -> Matched<NormMatch> {
    let pow = index.node(pow_index);
    let squared = input(pow, 0).ok_or("it has no base")?;
    check_squares(index, pow)?;
    let squares = output(pow)?;
    let mean_index = sole_reader_of_type(index, squares, "ReduceMean")?;
    let mean = index.node(mean_index);
    require(input(mean, 0) == Some(squares), || {
        format!("the squares are the axes of {}, not its data", label(mean))
    })?;
    check_mean_over_last_axis(index, mean)?;
    let scaling = divide_by_root(index, output(mean)?)?;
    require(index.source_of(scaling.numerator) == index.source_of(squared), || {
        format!("it squares '{squared}' but divides '{}'", scaling.numerator)
    })?;

    let mut nodes = BTreeSet::from([pow_index, mean_index]);
    nodes.extend(&scaling.nodes);
    let (kind, reads) = match centring(index, squared) {
        Some(centring) => {
            nodes.extend([centring.sub, centring.mean]);
            (NormKind::LayerNorm, vec![centring.x, centring.averaged])
        }
        None => (NormKind::RmsNorm, vec![squared, scaling.numerator]),
    };
    let tail = affine_tail(index, scaling.normalized, kind);
    nodes.extend(&tail.nodes);
    let draft = Draft {
        kind,
        reads,
        output: tail.output,
        gamma: tail.gamma,
        beta: tail.beta,
        epsilon: scaling.epsilon,
        nodes,
        anchor: pow_index,
    };
    finish(index, draft)
}

/// The exponent is the constant 2 (float or integer storage).
fn check_squares(index: &GraphIndex, pow: &Node) -> Matched<()> {
    let exponent =
        input(pow, 1).and_then(|e| scalar(index, e)).ok_or("its exponent is not a constant")?;
    require(exponent == 2.0, || format!("its exponent is {exponent}, not 2"))
}

/// How the row is divided by the root of its mean square (or variance).
struct Scaling<'g> {
    epsilon: f32,
    /// What is divided: the row (RMSNorm) or the centred row (LayerNorm).
    numerator: &'g str,
    normalized: &'g str,
    nodes: Vec<usize>,
}

/// From the mean square (or variance) `m` to the normalized row, after `Add(m, ε)`:
///
/// ```text
///   Sqrt ─► Div(x, ·)                x / sqrt(m + ε)
///   Sqrt ─► Div(1, ·) ─► Mul(x, ·)   x · (1 / sqrt(m + ε))
///   Sqrt ─► Reciprocal ─► Mul(x, ·)
///   Pow(·, −0.5) ─► Mul(x, ·)
/// ```
fn divide_by_root<'g>(index: &GraphIndex<'g>, mean: &str) -> Matched<Scaling<'g>> {
    let add_index = sole_reader_of_type(index, mean, "Add")?;
    let add = index.node(add_index);
    let epsilon =
        epsilon_constant(index, other_operand(add, mean).ok_or("the mean is added to itself")?)?;
    let guarded = output(add)?;
    let root_index = sole_reader(index, guarded)?;
    let root = index.node(root_index);
    let mut nodes = vec![add_index, root_index];
    let inverse = match root.op_type.as_str() {
        "Sqrt" if root.in_default_domain() => {
            let sqrt = output(root)?;
            let user_index = sole_reader(index, sqrt)?;
            let user = index.node(user_index);
            nodes.push(user_index);
            match user.op_type.as_str() {
                "Div" if input(user, 1) == Some(sqrt) => {
                    let numerator = input(user, 0).ok_or("the division has no numerator")?;
                    if scalar(index, numerator) != Some(1.0) {
                        return Ok(Scaling {
                            epsilon,
                            numerator,
                            normalized: output(user)?,
                            nodes,
                        });
                    }
                    output(user)?
                }
                "Reciprocal" => output(user)?,
                _ => {
                    return Err(format!(
                        "the root goes to {} {}, not a division",
                        user.op_type,
                        label(user)
                    ))
                }
            }
        }
        "Pow"
            if input(root, 0) == Some(guarded)
                && input(root, 1).and_then(|e| scalar(index, e)) == Some(-0.5) =>
        {
            output(root)?
        }
        _ => return Err(format!("'{guarded}' goes to {} {}, not Sqrt", root.op_type, label(root))),
    };
    let mul_index = sole_reader_of_type(index, inverse, "Mul")?;
    let mul = index.node(mul_index);
    let numerator = other_operand(mul, inverse).ok_or("the inverse root multiplies itself")?;
    nodes.push(mul_index);
    Ok(Scaling { epsilon, numerator, normalized: output(mul)?, nodes })
}

/// `Sub(x, ReduceMean(x))` over the last axis: the centring that makes a LayerNorm.
struct Centring<'g> {
    sub: usize,
    mean: usize,
    /// The row as the Sub reads it.
    x: &'g str,
    /// The row as the ReduceMean reads it (the same numbers, maybe through another Cast).
    averaged: &'g str,
}

fn centring<'g>(index: &GraphIndex<'g>, centred: &str) -> Option<Centring<'g>> {
    let sub = index.producer_index(centred)?;
    let sub_node = index.node(sub);
    if !(sub_node.is("Sub") && sub_node.in_default_domain()) {
        return None;
    }
    let x = input(sub_node, 0)?;
    let mean = index.producer_index(input(sub_node, 1)?)?;
    let mean_node = index.node(mean);
    if !mean_node.is("ReduceMean") || check_mean_over_last_axis(index, mean_node).is_err() {
        return None;
    }
    let averaged = input(mean_node, 0)?;
    (index.source_of(x) == index.source_of(averaged)).then_some(Centring { sub, mean, x, averaged })
}

/// The scale and shift after the normalized row.
struct Tail<'g> {
    output: &'g str,
    gamma: Option<&'g str>,
    beta: Option<&'g str>,
    nodes: Vec<usize>,
}

/// After the normalized row: value-preserving Casts, then `Mul(γ)` and, for LayerNorm, `Add(β)`,
/// each taken only when its other operand is a per-channel constant. Casts with no γ after them
/// stay outside the norm.
fn affine_tail<'g>(index: &GraphIndex<'g>, normalized: &'g str, kind: NormKind) -> Tail<'g> {
    let mut tail = Tail { output: normalized, gamma: None, beta: None, nodes: Vec::new() };
    let (casts, cast) = follow_casts(index, normalized);
    let Some((mul, gamma, scaled)) = per_channel_step(index, cast, "Mul") else {
        return tail;
    };
    tail.nodes = casts;
    tail.nodes.push(mul);
    tail.gamma = Some(gamma);
    tail.output = scaled;
    if kind == NormKind::LayerNorm {
        if let Some((add, beta, shifted)) = per_channel_step(index, scaled, "Add") {
            tail.nodes.push(add);
            tail.beta = Some(beta);
            tail.output = shifted;
        }
    }
    tail
}

/// The chain of value-preserving ops that alone read `value`, and the value at its end.
fn follow_casts<'g>(index: &GraphIndex<'g>, value: &'g str) -> (Vec<usize>, &'g str) {
    let mut chain = Vec::new();
    let mut value = value;
    while let Ok(reader) = sole_reader(index, value) {
        let node = index.node(reader);
        match output(node) {
            Ok(next) if is_value_preserving(node) => {
                chain.push(reader);
                value = next;
            }
            _ => break,
        }
    }
    (chain, value)
}

/// The only reader of `value`, when it is `op(value, c)` with a per-channel constant c:
/// (node, c, result).
fn per_channel_step<'g>(
    index: &GraphIndex<'g>,
    value: &str,
    op: &str,
) -> Option<(usize, &'g str, &'g str)> {
    let reader = sole_reader_of_type(index, value, op).ok()?;
    let node = index.node(reader);
    let constant = other_operand(node, value)?;
    channel_vector(index, constant)?;
    Some((reader, constant, output(node).ok()?))
}
