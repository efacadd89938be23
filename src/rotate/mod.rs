//! Rotating and slicing the residual stream. Given a basis Q_p (D×k_p, orthonormal columns) at
//! every stream point: readers get `Q_aᵀ W`, writers `W Q_b`, embeddings `E Q_0`, the head
//! `Q_Lᵀ W`, and each skip path a MatMul by `Q_aᵀ Q_b` before its residual Add. Shape constants
//! applied to stream tensors get the new widths.
pub mod math;

use faer::Mat;

use crate::error::{Error, Result};
use crate::graph::{cleanup, toposort, DataType, Graph, Namer, Node, Tensor};
use crate::pattern::GraphIndex;
use crate::structure::{Bias, Layout, Linear, StreamReshape};

const PASS: &str = "rotate";

/// Rotates (and, where a basis has fewer than D columns, slices) a fused model.
pub fn rotate_and_slice(graph: &mut Graph, layout: &Layout, bases: &[Mat<f64>]) -> Result<()> {
    let points = layout.stream_points().len();
    if bases.len() != points || bases.iter().any(|q| q.nrows() != layout.width || q.ncols() == 0 || q.ncols() > layout.width) {
        return Err(Error::Pass {
            pass: PASS,
            node: "(graph)".into(),
            message: format!("expected {points} bases of {} rows and at most as many columns", layout.width),
        });
    }
    let mut namer = Namer::new(graph);
    for embedding in &layout.embeddings {
        let table = weight(graph, &embedding.table, &embedding.output)?;
        graph.set_initializer(named(math::rotate_table(table, bases[0].as_ref())?, &embedding.table));
    }
    for (i, segment) in layout.segments.iter().enumerate() {
        let (from, to) = (&bases[i], &bases[i + 1]);
        for reader in segment.branches.iter().flat_map(|b| b.readers.iter()) {
            rotate_reader(graph, reader, from)?;
        }
        for writer in &segment.writers {
            rotate_writer(graph, writer, to)?;
        }
        let first_add = &segment.residual_adds[0];
        insert_shortcut(graph, &mut namer, i, &first_add.output, first_add.skip_input, math::shortcut(from.as_ref(), to.as_ref()))?;
    }
    let last = &bases[points - 1];
    for reader in &layout.head.readers {
        rotate_reader(graph, reader, last)?;
    }
    let widths: Vec<usize> = bases.iter().map(|q| q.ncols()).collect();
    if widths.iter().any(|&k| k != layout.width) {
        for reshape in &layout.stream_reshapes {
            set_stream_width(graph, &mut namer, reshape, layout.width, widths[reshape.point])?;
        }
        forget_stream_shapes(graph, layout);
    }
    cleanup(graph);
    toposort(graph)
}

fn weight<'g>(graph: &'g Graph, name: &str, node: &str) -> Result<&'g Tensor> {
    graph.initializer(name).ok_or_else(|| Error::Pass { pass: PASS, node: node.into(), message: format!("'{name}' is not an initializer") })
}

fn named(mut t: Tensor, name: &str) -> Tensor {
    t.name = name.into();
    t
}

fn rotate_reader(graph: &mut Graph, reader: &Linear, q: &Mat<f64>) -> Result<()> {
    let w = weight(graph, &reader.weight, &reader.node_name)?;
    graph.set_initializer(named(math::rotate_reader(w, reader.layout, q.as_ref())?, &reader.weight));
    Ok(())
}

fn rotate_writer(graph: &mut Graph, writer: &Linear, q: &Mat<f64>) -> Result<()> {
    let w = weight(graph, &writer.weight, &writer.node_name)?;
    graph.set_initializer(named(math::rotate_writer(w, writer.layout, q.as_ref())?, &writer.weight));
    if let Some(Bias::GemmC(b) | Bias::AddNode { initializer: b, .. }) = &writer.bias {
        let bias = weight(graph, b, &writer.node_name)?;
        graph.set_initializer(named(math::rotate_bias(bias, q.as_ref())?, b));
    }
    Ok(())
}

/// `Add(skip, branch)` becomes `Add(MatMul(skip, S), branch)`.
fn insert_shortcut(graph: &mut Graph, namer: &mut Namer, segment: usize, add_output: &str, skip_input: usize, s: Mat<f64>) -> Result<()> {
    let add = graph.node_index_producing(add_output).ok_or_else(|| Error::Pass {
        pass: PASS,
        node: add_output.into(),
        message: "the residual Add is gone".into(),
    })?;
    let matrix = namer.fresh(&format!("onnx_slice.shortcut{segment}"));
    let rotated = namer.fresh(&format!("onnx_slice/shortcut{segment}/output"));
    let skip = graph.nodes[add].inputs[skip_input].clone();
    graph.initializers.push(math::mat_to_tensor(matrix.clone(), s.as_ref()));
    let name = namer.fresh(&format!("onnx_slice/shortcut{segment}"));
    graph.nodes.push(Node::new("MatMul", name, vec![skip, matrix], vec![rotated.clone()]));
    graph.nodes[add].inputs[skip_input] = rotated;
    Ok(())
}

/// Points a Reshape of a stream tensor at a shape whose last entry is the sliced width. The
/// shape constant (or the Concat building it) may be shared with other Reshapes, even with ones
/// inside attention whose D must stay: it is copied, never edited in place.
fn set_stream_width(graph: &mut Graph, namer: &mut Namer, reshape: &StreamReshape, width: usize, k: usize) -> Result<()> {
    let Some(i) = graph.node_index_producing(&reshape.output) else { return Ok(()) };
    let shape = graph.nodes[i].inputs.get(1).cloned().unwrap_or_default();
    if let Some(new_shape) = resized_constant(graph, namer, &shape, width, k) {
        graph.nodes[i].inputs[1] = new_shape;
        return Ok(());
    }
    let concat = GraphIndex::new(graph).producer_index(&shape).filter(|&c| graph.nodes[c].is("Concat"));
    let Some(c) = concat else { return Ok(()) };
    let Some(last) = graph.nodes[c].inputs.last().cloned() else { return Ok(()) };
    let Some(new_last) = resized_constant(graph, namer, &last, width, k) else { return Ok(()) };
    let mut copy = graph.nodes[c].clone();
    copy.name = namer.fresh(&format!("{}_width{k}", copy.name));
    copy.outputs = vec![namer.fresh(&format!("{shape}_width{k}"))];
    if let Some(slot) = copy.inputs.last_mut() {
        *slot = new_last;
    }
    graph.nodes[i].inputs[1] = copy.outputs[0].clone();
    graph.nodes.push(copy);
    Ok(())
}

/// A copy of an integer shape constant whose last entry D becomes k; `None` when it is not a
/// constant or its last entry is not D (-1 and 0 need no change).
fn resized_constant(graph: &mut Graph, namer: &mut Namer, name: &str, width: usize, k: usize) -> Option<String> {
    let tensor = GraphIndex::new(graph).constant(name).filter(|t| t.dtype == DataType::Int64)?;
    let mut values = tensor.to_i64().ok()?;
    if values.last() != Some(&(width as i64)) {
        return None;
    }
    *values.last_mut()? = k as i64;
    let new_name = namer.fresh(&format!("{name}_width{k}"));
    graph.initializers.push(Tensor::from_i64(new_name.clone(), tensor.dims.clone(), &values));
    Some(new_name)
}

/// Declared shapes of stream tensors are wrong once the stream is sliced: drop them (ONNX
/// Runtime infers them again).
fn forget_stream_shapes(graph: &mut Graph, layout: &Layout) {
    let mut values: std::collections::HashSet<&str> = layout.stream_values.iter().map(String::as_str).collect();
    for segment in &layout.segments {
        values.extend(segment.stream_values.iter().map(String::as_str));
        values.insert(&segment.input);
        values.insert(&segment.output);
    }
    values.extend(layout.stream_reshapes.iter().map(|r| r.output.as_str()));
    graph.value_info.retain(|v| !values.contains(v.name.as_str()));
}
