//! Keeping an MLP's neurons in the graph: the up/gate (fc1) weights keep the columns of the kept
//! neurons (and their biases and per-neuron constants the same entries), the reshapes on the way
//! get the new width, and the down projection (fc2) gets the refit weight and bias. Declared shapes
//! of the values on the way are dropped (ONNX Runtime infers them again).
use faer::Mat;

use crate::algebra;
use crate::error::{Error, Result};
use crate::graph::{AttrValue, Graph, Namer, Tensor, TensorSink};
use crate::structure::{Bias, Layout, Linear, Mlp, WeightLayout};

use super::fit::Refit;

const PASS: &str = "neurons";

fn failed(node: &str, message: impl Into<String>) -> Error {
    Error::Pass { pass: PASS, node: node.to_string(), message: message.into() }
}

/// Rewrites the MLP `mlp` of `layout` to keep the neurons `keep` (increasing), with `refit`'s down
/// projection. A down projection without a bias gets `refit`'s when `add_bias` says so (the mean
/// of the removed neurons' contribution moves there). Every tensor made goes to `finished`.
pub fn keep_neurons(
    graph: &mut Graph,
    layout: &Layout,
    mlp: &Mlp,
    keep: &[usize],
    refit: &Refit,
    add_bias: bool,
    finished: &mut dyn TensorSink,
) -> Result<()> {
    let mut namer = Namer::new(graph);
    for &r in &mlp.readers {
        let reader = layout.linear(r);
        check_private(graph, reader)?;
        let weight = initializer(graph, &reader.weight, reader)?;
        let axis = if stored_in_out(reader) { 1 } else { 0 };
        let kept = keep_along(weight, axis, keep)?;
        set_final(graph, kept, finished)?;
        if let Some(bias) = bias_name(reader) {
            let kept = keep_along(initializer(graph, bias, reader)?, LAST_AXIS, keep)?;
            set_final(graph, kept, finished)?;
        }
    }
    for constant in &mlp.neuron_constants {
        keep_constant(graph, constant, keep)?;
    }
    for reshape in &mlp.reshapes {
        crate::rotate::set_reshape_width(graph, &mut namer, reshape, mlp.width, keep.len())?;
    }
    let writer = layout.linear(mlp.writer);
    check_private(graph, writer)?;
    let weight = initializer(graph, &writer.weight, writer)?;
    let dtype = weight.dtype;
    let logical = refit.weight.as_ref();
    let stored =
        if stored_in_out(writer) { logical.to_owned() } else { logical.transpose().to_owned() };
    let mut new = algebra::mat_to_tensor(weight.name.clone(), stored.as_ref(), weight.dtype);
    new.rest = weight.rest.clone();
    set_final(graph, new, finished)?;
    let bias = Mat::from_fn(1, refit.bias.len(), |_, o| refit.bias[o]);
    match bias_name(writer) {
        Some(name) => {
            let old = initializer(graph, name, writer)?;
            let mut new = algebra::mat_to_tensor(name.to_string(), bias.as_ref(), old.dtype);
            new.dims = old.dims.clone();
            set_final(graph, new, finished)?;
        }
        None if add_bias => {
            let mut new = algebra::mat_to_tensor("bias", bias.as_ref(), dtype);
            new.dims = vec![refit.bias.len() as i64];
            crate::fuse::add_bias(graph, &mut namer, writer, new);
        }
        None => {}
    }
    graph.value_info.retain(|v| !mlp.values.contains(&v.name));
    Ok(())
}

/// [`keep_along`]'s axis for "the last one".
const LAST_AXIS: usize = usize::MAX;

/// Whether a linear's stored weight is `[in, out]` (its columns are its outputs).
fn stored_in_out(linear: &Linear) -> bool {
    (linear.layout == WeightLayout::InOut) != linear.through_transpose.is_some()
}

fn bias_name(linear: &Linear) -> Option<&str> {
    match &linear.bias {
        Some(Bias::GemmC(name) | Bias::AddNode { initializer: name, .. }) => Some(name),
        None => None,
    }
}

fn initializer<'g>(graph: &'g Graph, name: &str, linear: &Linear) -> Result<&'g Tensor> {
    graph
        .initializer(name)
        .ok_or_else(|| failed(&linear.node_name, format!("'{name}' is not an initializer")))
}

/// A weight the MLP shares with another node would change that node too.
fn check_private(graph: &Graph, linear: &Linear) -> Result<()> {
    let read_as = linear.through_transpose.as_deref().unwrap_or(&linear.weight);
    let uses = graph.use_count(read_as);
    let source_uses = graph.use_count(&linear.weight);
    if uses > 1 || (linear.through_transpose.is_some() && source_uses > 1) {
        return Err(failed(
            &linear.node_name,
            format!("its weight '{}' is shared with other nodes; onnx-slice cannot remove neurons from it", linear.weight),
        ));
    }
    Ok(())
}

/// Puts a finished tensor in the graph, through the sink.
fn set_final(graph: &mut Graph, mut tensor: Tensor, finished: &mut dyn TensorSink) -> Result<()> {
    finished.finished(&mut tensor)?;
    graph.set_initializer(tensor);
    Ok(())
}

/// A per-neuron constant (an initializer or a Constant node's value) keeps the kept entries of its
/// last axis. It must be read only by the MLP's nodes (checked when the MLP was found).
fn keep_constant(graph: &mut Graph, name: &str, keep: &[usize]) -> Result<()> {
    if let Some(t) = graph.initializer(name) {
        let kept = keep_along(t, LAST_AXIS, keep)?;
        graph.set_initializer(kept);
        return Ok(());
    }
    let node = graph
        .nodes
        .iter_mut()
        .find(|n| n.is("Constant") && n.outputs.first().map(String::as_str) == Some(name))
        .ok_or_else(|| {
            failed(name, "the per-neuron constant is neither an initializer nor a Constant")
        })?;
    let Some(AttrValue::Tensor(value)) = node.attributes.first().map(|a| &a.value) else {
        return Err(failed(name, "the Constant does not hold a tensor"));
    };
    let kept = keep_along(value, LAST_AXIS, keep)?;
    node.attributes[0].value = AttrValue::Tensor(Box::new(kept));
    Ok(())
}

/// `t` with only the entries `keep` along `axis` (0 or 1 of a matrix, or [`LAST_AXIS`]), byte for
/// byte, under its own name.
fn keep_along(t: &Tensor, axis: usize, keep: &[usize]) -> Result<Tensor> {
    let size = t
        .dtype
        .byte_size()
        .ok_or_else(|| failed(&t.name, "an element type without a fixed size"))?;
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let axis = if axis == LAST_AXIS { dims.len().saturating_sub(1) } else { axis };
    let Some(&width) = dims.get(axis) else {
        return Err(failed(&t.name, format!("no axis {axis} in dims {:?}", t.dims)));
    };
    if keep.iter().any(|&i| i >= width) {
        return Err(failed(&t.name, format!("a kept neuron beyond the {width} of axis {axis}")));
    }
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product::<usize>() * size;
    let raw = t.to_raw_bytes()?;
    if raw.len() != outer * width * inner {
        return Err(failed(
            &t.name,
            format!(
                "holds {} bytes, its dims {:?} need {}",
                raw.len(),
                t.dims,
                outer * width * inner
            ),
        ));
    }
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        let block = &raw[o * width * inner..(o + 1) * width * inner];
        for &i in keep {
            out.extend_from_slice(&block[i * inner..(i + 1) * inner]);
        }
    }
    let mut new_dims = t.dims.clone();
    new_dims[axis] = keep.len() as i64;
    let bytes = crate::files::park(out)?;
    let mut kept = Tensor::from_raw(t.name.clone(), t.dtype, new_dims, bytes);
    kept.rest = t.rest.clone();
    Ok(kept)
}
