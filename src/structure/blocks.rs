//! The blocks of a detected layout by what their linear layers do: attention (readers, writer) and
//! the MLP (readers, the activation the down projection reads, writer). Found from the dataflow
//! between a segment's readers and writers:
//!
//! ```text
//!  norm ─┬─ up/fc1 ─(+b)─┐                                   SwiGLU:  silu(gate)·up
//!        └─ gate ────────┴─ elementwise ops ─(Reshape)─► h ─ down/fc2 ─► residual Add
//! ```
//! A writer is the MLP's when everything between the readers and its input is elementwise
//! (activations, products, constant scalars or per-neuron vectors) or a reshape that keeps the last
//! axis, and nothing on that way is read from outside it. The other writer of a block (the only
//! one of an attention segment) is attention's.
use std::collections::{BTreeSet, HashSet};

use super::{Bias, Layout, Linear};
use crate::graph::{Graph, Node};
use crate::pattern::GraphIndex;

/// A linear layer of the layout: a reader of one of a segment's norms, or one of its writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearRef {
    Reader { segment: usize, branch: usize, index: usize },
    Writer { segment: usize, index: usize },
}

/// A block's attention: the linears reading its norm (q, k, v or a fused qkv) and its output
/// projection.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub segment: usize,
    pub readers: Vec<LinearRef>,
    pub writer: LinearRef,
}

/// A block's MLP: `h = act(u·W_up)` (or `silu(u·W_gate) ⊙ (u·W_up)`), `y = h·W_down + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    pub segment: usize,
    /// Up and gate (fc1): every linear whose output reaches the activation.
    pub readers: Vec<LinearRef>,
    /// The value the down projection reads: `h`, whose last axis is the MLP's `width`.
    pub activation: String,
    /// The down projection (fc2).
    pub writer: LinearRef,
    /// F, the intermediate width.
    pub width: usize,
    /// Constant per-neuron vectors (`[F]`) that elementwise ops on the way apply: biases fused
    /// into an activation op (FastGelu, BiasGelu) or added by a separate Add.
    pub neuron_constants: Vec<String>,
    /// Reshapes on the way whose shape's last entry is F (`[B·S, F]` ⇄ `[B, S, F]`).
    pub reshapes: Vec<String>,
    /// Every value of width F on the way (the readers' outputs to the activation): their declared
    /// shapes change with the neurons kept.
    pub values: Vec<String>,
}

/// One transformer block: one segment (parallel) or two (attention, then MLP).
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub segments: std::ops::Range<usize>,
    pub attention: Option<Attention>,
    /// The MLP, or why its writer's input was not recognized as one.
    pub mlp: Result<Mlp, String>,
}

impl Layout {
    pub fn linear(&self, at: LinearRef) -> &Linear {
        match at {
            LinearRef::Reader { segment, branch, index } => {
                &self.segments[segment].branches[branch].readers[index]
            }
            LinearRef::Writer { segment, index } => &self.segments[segment].writers[index],
        }
    }
}

/// The blocks of `layout` in `graph`: a parallel segment is a block, sequential segments pair up.
pub fn find_blocks(graph: &Graph, layout: &Layout) -> Vec<Block> {
    let index = GraphIndex::new(graph);
    let mut blocks = Vec::new();
    let mut s = 0;
    while s < layout.segments.len() {
        let paired = !layout.segments[s].is_parallel()
            && layout.segments.get(s + 1).is_some_and(|next| !next.is_parallel());
        let segments = s..if paired { s + 2 } else { s + 1 };
        blocks.push(block_of(&index, layout, segments.clone()));
        s = segments.end;
    }
    blocks
}

fn block_of(index: &GraphIndex<'_>, layout: &Layout, segments: std::ops::Range<usize>) -> Block {
    let mut found = Vec::new();
    let mut reasons = Vec::new();
    for segment in segments.clone() {
        for w in 0..layout.segments[segment].writers.len() {
            match mlp_behind(index, layout, LinearRef::Writer { segment, index: w }) {
                Ok(mlp) => found.push(mlp),
                Err(why) => reasons.push(why),
            }
        }
    }
    let mlp = match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(reasons.join("; ")),
        _ => Err("more than one writer of the block reads an MLP activation".into()),
    };
    let mlp_writer: Vec<LinearRef> = mlp.as_ref().map(|m| vec![m.writer]).unwrap_or_default();
    let attention = attention_of(layout, segments.clone(), &mlp_writer).map(|mut a| {
        if let Ok(m) = &mlp {
            a.readers.retain(|r| !m.readers.contains(r));
        }
        a
    });
    Block { segments, attention, mlp }
}

/// The writer that is not the MLP's, with the readers of its segment that the MLP does not use.
fn attention_of(
    layout: &Layout,
    segments: std::ops::Range<usize>,
    mlp_writers: &[LinearRef],
) -> Option<Attention> {
    let others: Vec<LinearRef> = segments
        .clone()
        .flat_map(|segment| {
            (0..layout.segments[segment].writers.len())
                .map(move |index| LinearRef::Writer { segment, index })
        })
        .filter(|w| !mlp_writers.contains(w))
        .collect();
    let [writer] = others.as_slice() else { return None };
    let LinearRef::Writer { segment, .. } = *writer else { return None };
    let readers = readers_of(layout, segment);
    Some(Attention { segment, readers, writer: *writer })
}

fn readers_of(layout: &Layout, segment: usize) -> Vec<LinearRef> {
    let mut out = Vec::new();
    for (branch, b) in layout.segments[segment].branches.iter().enumerate() {
        for index in 0..b.readers.len() {
            out.push(LinearRef::Reader { segment, branch, index });
        }
    }
    out
}

/// Elementwise ops an MLP's activation is made of (default domain, then com.microsoft's fused
/// activations). Every input that is not a constant comes from the MLP's readers.
fn is_elementwise(node: &Node) -> bool {
    let op = node.op_type.as_str();
    if node.in_default_domain() {
        return matches!(
            op,
            "Relu"
                | "LeakyRelu"
                | "Elu"
                | "Selu"
                | "Celu"
                | "Gelu"
                | "Sigmoid"
                | "HardSigmoid"
                | "HardSwish"
                | "Tanh"
                | "Erf"
                | "Exp"
                | "Softplus"
                | "Softsign"
                | "Mish"
                | "Neg"
                | "Abs"
                | "Sqrt"
                | "Reciprocal"
                | "Cast"
                | "Identity"
                | "Add"
                | "Sub"
                | "Mul"
                | "Div"
                | "Pow"
                | "Max"
                | "Min"
        );
    }
    node.domain == "com.microsoft"
        && matches!(op, "FastGelu" | "BiasGelu" | "Gelu" | "QuickGelu" | "BiasFastGelu")
}

/// The MLP whose down projection is `writer`, walking back from its input to the segment's
/// readers; or why it is not one.
fn mlp_behind(index: &GraphIndex<'_>, layout: &Layout, writer: LinearRef) -> Result<Mlp, String> {
    let LinearRef::Writer { segment, .. } = writer else {
        return Err("not a writer".into());
    };
    let down = layout.linear(writer);
    let down_node = index
        .producer(&down.output)
        .ok_or_else(|| format!("the writer '{}' has no node", down.output))?;
    let activation = down_node.inputs[0].clone();
    let width = down.in_features;
    let ends = reader_outputs(layout, segment);
    let mut readers = BTreeSet::new();
    let mut path: HashSet<usize> = HashSet::new();
    let mut neuron_constants = Vec::new();
    let mut reshapes = Vec::new();
    let mut frontier = vec![activation.clone()];
    let mut seen = HashSet::new();
    while let Some(value) = frontier.pop() {
        if !seen.insert(value.clone()) {
            continue;
        }
        if let Some(&(reader, _)) = ends.iter().find(|(_, out)| *out == value) {
            readers.insert(reader);
            continue;
        }
        let i = index
            .producer_index(&value)
            .ok_or_else(|| format!("'{value}' on the way to '{}' is a graph input", down.output))?;
        let node = index.node(i);
        path.insert(i);
        if node.is("Reshape") || node.is("Flatten") {
            if node.is("Reshape") {
                reshapes.push(node.outputs[0].clone());
            }
            frontier.push(node.inputs[0].clone());
            continue;
        }
        if !is_elementwise(node) {
            return Err(format!(
                "'{}' reads '{}' ({}), which is not an elementwise activation",
                down.output, value, node.op_type
            ));
        }
        for input in node.inputs.iter().filter(|i| !i.is_empty()) {
            match index.constant(input) {
                Some(t) if t.numel() == 1 => {}
                Some(t) if t.numel() == width as u64 && t.dims.last() == Some(&(width as i64)) => {
                    neuron_constants.push(input.clone());
                }
                Some(t) => {
                    return Err(format!(
                        "the constant '{input}' of {} '{}' has shape {:?}, neither a scalar nor one value per neuron",
                        node.op_type, node.name, t.dims
                    ))
                }
                None => frontier.push(input.clone()),
            }
        }
    }
    if readers.is_empty() {
        return Err(format!("no reader of the segment reaches '{}'", down.output));
    }
    let readers: Vec<LinearRef> = readers.into_iter().collect();
    if let Some(r) = readers.iter().find(|&&r| layout.linear(r).out_features != width) {
        return Err(format!(
            "the reader '{}' has {} outputs, the down projection '{}' {width} inputs",
            layout.linear(*r).output,
            layout.linear(*r).out_features,
            down.output
        ));
    }
    let values = check_contained(index, &path, &readers, layout, down_node)?;
    neuron_constants.sort();
    neuron_constants.dedup();
    Ok(Mlp { segment, readers, activation, writer, width, neuron_constants, reshapes, values })
}

/// Every reader's last output (after its bias Add), by reference.
fn reader_outputs(layout: &Layout, segment: usize) -> Vec<(LinearRef, String)> {
    readers_of(layout, segment)
        .into_iter()
        .map(|r| {
            let linear = layout.linear(r);
            let out = match &linear.bias {
                Some(Bias::AddNode { output, .. }) => output.clone(),
                _ => linear.output.clone(),
            };
            (r, out)
        })
        .collect()
}

/// Nothing but the MLP's own nodes (and its down projection) reads the values on its way: removing
/// a neuron must change nothing else. Returns those values.
fn check_contained(
    index: &GraphIndex<'_>,
    path: &HashSet<usize>,
    readers: &[LinearRef],
    layout: &Layout,
    down: &Node,
) -> Result<Vec<String>, String> {
    let mut values: Vec<String> =
        path.iter().flat_map(|&i| index.node(i).outputs.iter().cloned()).collect();
    for &r in readers {
        let linear = layout.linear(r);
        values.push(linear.output.clone());
        if let Some(Bias::AddNode { output, .. }) = &linear.bias {
            values.push(output.clone());
        }
    }
    let inside = |node: &Node| {
        std::ptr::eq(node, down)
            || path.iter().any(|&i| std::ptr::eq(index.node(i), node))
            || readers.iter().any(|&r| match &layout.linear(r).bias {
                Some(Bias::AddNode { output, .. }) => node.outputs.first() == Some(output),
                _ => false,
            })
    };
    for value in &values {
        if index.is_graph_output(value) {
            return Err(format!("'{value}' inside the MLP is a graph output"));
        }
        // A Shape reads the width, which changes with the neurons wherever it is used.
        if let Some(outside) = index.consumers(value).find(|n| !inside(n) && !n.is("Shape")) {
            return Err(format!(
                "'{value}' inside the MLP is also read by {} '{}'",
                outside.op_type,
                outside.label()
            ));
        }
    }
    values.sort();
    Ok(values)
}
