//! Rotating and slicing the residual stream. Given a basis Q_p (D×k_p, orthonormal columns) at
//! every stream point: readers get `Q_aᵀ W`, writers `W Q_b`, embeddings `E Q_0`, the head
//! `Q_Lᵀ W`, and each skip path a MatMul by `Q_aᵀ Q_b` before its residual Add. Shape constants
//! applied to stream tensors get the new widths.
pub mod math;

use faer::Mat;

use crate::error::{Error, Result};
use crate::graph::{cleanup, toposort, Graph, Namer, Node, Tensor};
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
        // Every stream Reshape, also at points that keep the full width: their shapes may be
        // computed from a sliced point's tensor.
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

/// Points a Reshape of a stream tensor at a shape whose last entry is its point's width. The shape
/// is often computed at run time from the shape of ANOTHER stream tensor (an earlier point, of
/// another width), so the last entry is always set to the constant width. The shape constant (or
/// the Concat building it) may be shared with other Reshapes, even ones inside attention whose D
/// must stay: it is copied, never edited in place.
fn set_stream_width(graph: &mut Graph, namer: &mut Namer, reshape: &StreamReshape, width: usize, k: usize) -> Result<()> {
    let Some(i) = graph.node_index_producing(&reshape.output) else { return Ok(()) };
    let shape = graph.nodes[i].inputs.get(1).cloned().unwrap_or_default();
    let fail = |why: &str| Error::Pass { pass: PASS, node: graph.nodes[i].name.clone(), message: format!("cannot give this stream Reshape the width {k}: {why}") };
    let index = GraphIndex::new(graph);
    if let Some(values) = index.constant_i64(&shape) {
        return match resized_last(&values, width, k) {
            Some(values) => {
                let name = namer.fresh(&format!("{shape}_width{k}"));
                graph.initializers.push(Tensor::from_i64(name.clone(), vec![values.len() as i64], &values));
                graph.nodes[i].inputs[1] = name;
                Ok(())
            }
            None => Err(fail("its constant shape does not end with the stream width")),
        };
    }
    let Some(c) = index.producer_index(&shape).filter(|&c| graph.nodes[c].is("Concat")) else {
        replace_last_dim(graph, namer, i, &shape, k);
        return Ok(());
    };
    let last = graph.nodes[c].inputs.last().cloned().unwrap_or_default();
    let last_values = match index.constant_i64(&last) {
        Some(values) => resized_last(&values, width, k).ok_or_else(|| fail("the last piece of its shape is not the stream width"))?,
        None if index.producer(&last).is_some_and(|n| n.is("Unsqueeze")) => vec![k as i64],
        None => return Err(fail("the last piece of its shape is computed in a way onnx-slice does not follow")),
    };
    let new_last = namer.fresh(&format!("{last}_width{k}"));
    graph.initializers.push(Tensor::from_i64(new_last.clone(), vec![last_values.len() as i64], &last_values));
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

/// `Reshape(x, shape)` → `Reshape(x, Concat(shape[:-1], [k]))` for a shape computed at run time.
fn replace_last_dim(graph: &mut Graph, namer: &mut Namer, reshape: usize, shape: &str, k: usize) {
    let base = format!("{shape}_width{k}");
    let constants = [("starts", 0), ("ends", -1), ("axes", 0), ("last", k as i64)].map(|(what, v)| {
        let name = namer.fresh(&format!("{base}/{what}"));
        graph.initializers.push(Tensor::from_i64(name.clone(), vec![1], &[v]));
        name
    });
    let [starts, ends, axes, last] = constants;
    let leading = namer.fresh(&format!("{base}/leading"));
    let resized = namer.fresh(&base);
    let mut concat = Node::new("Concat", namer.fresh(&format!("{base}/Concat")), vec![leading.clone(), last], vec![resized.clone()]);
    concat.set_attr("axis", crate::graph::AttrValue::Int(0));
    graph.nodes.push(Node::new("Slice", namer.fresh(&format!("{base}/Slice")), vec![shape.into(), starts, ends, axes], vec![leading]));
    graph.nodes.push(concat);
    graph.nodes[reshape].inputs[1] = resized;
}

/// A shape whose last entry, the stream width D (or already k), becomes k.
fn resized_last(values: &[i64], width: usize, k: usize) -> Option<Vec<i64>> {
    let last = *values.last()?;
    if last != width as i64 && last != k as i64 {
        return None;
    }
    let mut values = values.to_vec();
    *values.last_mut()? = k as i64;
    Some(values)
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
