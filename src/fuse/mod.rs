//! Rewrites of normalization layers: every norm becomes a weightless RMSNorm of the original
//! width D (γ and β folded into the linear layers that read it; for LayerNorm models the mean
//! subtraction baked into everything that writes to the stream). The function is unchanged and
//! the norm now commutes with any rotation of the stream (docs/design.md §1).
pub mod skip;
pub mod tie;
mod weights;

pub use tie::{EMBEDDING_ADAPTER_NODE, HEAD_ADAPTER_NODE};
pub use weights::privatize_weights;

use std::collections::HashSet;

use crate::algebra;
use crate::error::{Error, Result};
use crate::graph::{cleanup, toposort, AttrValue, DataType, Graph, Namer, Node, Tensor};
use crate::pattern::norm::{NormKind, NormMatch};
use crate::pattern::GraphIndex;
use crate::structure::{Bias, Layout, Linear};

const PASS: &str = "fuse-norms";

/// ReduceMean takes its axes as an input from opset 18 on (an attribute before).
const REDUCE_MEAN_AXES_INPUT_OPSET: i64 = 18;

/// Folds every norm of `layout` into its readers and replaces it by [`rms_norm`] nodes of width D
/// (unit gain, the norm's own ε); slicing changes their gain and ε ([`set_norm_width`]).
/// `opset` is the model's default-domain opset.
pub fn fuse_norms(graph: &mut Graph, layout: &Layout, opset: i64) -> Result<()> {
    let mut namer = Namer::new(graph);
    let mut remove: HashSet<usize> = HashSet::new();
    let mut new_nodes = Vec::new();
    let stream = algebra::created_dtype(algebra::stream_dtype(graph, layout));
    let dtype = algebra::accumulation_dtype(stream);
    let two = namer.fresh("onnx_slice.norm.two");
    graph.initializers.push(algebra::scalar_to_tensor(&two, 2.0, dtype));
    let gain = namer.fresh(&format!("onnx_slice.norm.gain{}", layout.width));
    graph.initializers.push(gain_tensor(&gain, layout.width, layout.width, stream));
    let axes = (opset >= REDUCE_MEAN_AXES_INPUT_OPSET).then(|| namer.fresh("onnx_slice.norm.axes"));
    if let Some(axes) = &axes {
        graph.initializers.push(Tensor::from_i64(axes.clone(), vec![1], &[-1]));
    }
    for (i, branch) in layout.branches().enumerate() {
        let (gamma, beta) = norm_parameters(graph, &branch.norm)?;
        for reader in &branch.readers {
            fold_into_reader(graph, &mut namer, reader, gamma.as_deref(), beta.as_deref())?;
        }
        remove.extend(branch.norm.nodes.iter().copied());
        let eps = namer.fresh(&format!("onnx_slice.norm{i}.eps"));
        graph.initializers.push(algebra::scalar_to_tensor(&eps, branch.norm.epsilon as f64, dtype));
        let prefix = namer.fresh(&format!("onnx_slice/norm{i}"));
        let (x, y) = (&branch.norm.input, &branch.norm.output);
        let constants = NormConstants { two: &two, eps: &eps, gain: &gain, axes: axes.as_deref() };
        new_nodes.extend(rms_norm(&prefix, x, y, &constants, (dtype, stream)));
    }
    if layout.norm_kind == NormKind::LayerNorm {
        center_stream_writers(graph, layout)?;
    }
    let mut i = 0;
    graph.nodes.retain(|_| {
        i += 1;
        !remove.contains(&(i - 1))
    });
    graph.nodes.extend(new_nodes);
    cleanup(graph);
    toposort(graph)
}

/// The names of the constants one [`rms_norm`] reads.
pub struct NormConstants<'a> {
    /// The exponent 2 of the square (a float scalar).
    pub two: &'a str,
    pub eps: &'a str,
    /// A 1-D vector as wide as the stream the norm reads ([`gain_tensor`]).
    pub gain: &'a str,
    /// The axes `[-1]` as an input (opset ≥ 18); `None`: as an attribute.
    pub axes: Option<&'a str>,
}

/// `y = x / sqrt(mean(x²) + ε) · g` over the last axis, in the op pattern ONNX Runtime's optimizer
/// fuses into one SimplifiedLayerNormalization (Pow, ReduceMean, Add with ε as its second input,
/// Sqrt, Div of the same x, Mul by a 1-D constant), so that a rewritten model keeps the fused norms
/// the dense one had. The rewrite needs an RMS over the ORIGINAL width D on a stream of width k:
/// `x / sqrt(Σx²/D + ε) = sqrt(D/k) · x / sqrt(Σx²/k + ε·D/k)`, so at width k the gain is
/// `sqrt(D/k)` and ε becomes `ε·D/k` ([`set_norm_width`]; docs/design.md §1, "Norm width").
/// `(accumulate, output)` are [`algebra::accumulation_dtype`] and the stream's type; when they
/// differ (a float16 or bfloat16 stream), x is cast up first and cast back before the gain.
///
/// ```text
/// x ─(Cast)─ Pow(·,2) ─ ReduceMean(-1) ─ Add(ε) ─ Sqrt ─┐
/// x ─(Cast)──────────────────────────────────────────── Div ─(Cast)─ Mul(g) ─► y
/// ```
pub fn rms_norm(
    prefix: &str,
    x: &str,
    y: &str,
    constants: &NormConstants<'_>,
    (accumulate, output): (DataType, DataType),
) -> Vec<Node> {
    let v = |s: &str| format!("{prefix}/{s}");
    let cast =
        |name: &str, from: &str, to: &str, dtype: DataType| Node::cast(v(name), from, to, dtype);
    let mut nodes = Vec::new();
    let x = if accumulate == output {
        x.to_string()
    } else {
        nodes.push(cast("CastUp", x, &v("x"), accumulate));
        v("x")
    };
    let mut mean = Node::new("ReduceMean", v("ReduceMean"), vec![v("sq")], vec![v("mean")]);
    match constants.axes {
        Some(axes) => mean.inputs.push(axes.into()),
        None => mean.set_attr("axes", AttrValue::Ints(vec![-1])),
    }
    mean.set_attr("keepdims", AttrValue::Int(1));
    nodes.extend([
        Node::new("Pow", v("Pow"), vec![x.clone(), constants.two.into()], vec![v("sq")]),
        mean,
        Node::new("Add", v("AddEps"), vec![v("mean"), constants.eps.into()], vec![v("var")]),
        Node::new("Sqrt", v("Sqrt"), vec![v("var")], vec![v("rms")]),
        Node::new("Div", v("Div"), vec![x, v("rms")], vec![v("normalized")]),
    ]);
    let normalized = if accumulate == output {
        v("normalized")
    } else {
        nodes.push(cast("CastBack", &v("normalized"), &v("normalized_out"), output));
        v("normalized_out")
    };
    nodes.push(Node::new(
        "Mul",
        v("Gain"),
        vec![normalized, constants.gain.into()],
        vec![y.into()],
    ));
    nodes
}

/// The gain of [`rms_norm`] on a stream of width `k` out of `width`: `k` times `sqrt(width/k)`.
pub fn gain_tensor(name: &str, k: usize, width: usize, dtype: DataType) -> Tensor {
    algebra::filled_vector(name, (width as f64 / k as f64).sqrt(), k, dtype)
}

/// The Add of ε and the Mul by the gain of the [`rms_norm`] that writes `output`.
fn width_nodes(graph: &Graph, output: &str) -> Option<(usize, usize)> {
    let producer = |value: &str, op: &str| {
        graph.node_index_producing(value).filter(|&i| graph.nodes[i].is(op))
    };
    let binary = |i: usize| graph.nodes[i].inputs.len() == 2;
    let gain = producer(output, "Mul").filter(|&i| binary(i))?;
    let normalized = graph.nodes[gain].inputs.first()?;
    let div = match producer(normalized, "Cast") {
        Some(cast) => producer(graph.nodes[cast].inputs.first()?, "Div")?,
        None => producer(normalized, "Div")?,
    };
    let sqrt = producer(graph.nodes[div].inputs.get(1)?, "Sqrt")?;
    let add = producer(graph.nodes[sqrt].inputs.first()?, "Add").filter(|&i| binary(i))?;
    Some((add, gain))
}

/// The gain initializer the rewritten norm writing `output` reads (its name and width).
pub fn norm_gain(graph: &Graph, output: &str) -> Option<(String, usize)> {
    let (_, gain) = width_nodes(graph, output)?;
    let name = graph.nodes[gain].inputs.get(1)?;
    let tensor = graph.initializer(name)?;
    Some((name.clone(), tensor.numel() as usize))
}

/// Gives the rewritten `norm` the constants of a stream of width `k` out of `width`: ε·D/k (ε the
/// input model's) and `gain`, the name of a [`gain_tensor`] of width k.
pub fn set_norm_width(
    graph: &mut Graph,
    norm: &NormMatch,
    width: usize,
    k: usize,
    gain: &str,
) -> Result<()> {
    let fail = |message: &str| Error::Pass {
        pass: PASS,
        node: norm.anchor.clone(),
        message: message.into(),
    };
    let (add, mul) = width_nodes(graph, &norm.output)
        .ok_or_else(|| fail("the rewritten norm is not the one fuse_norms wrote"))?;
    let eps = graph.nodes[add].inputs[1].clone();
    let dtype = graph.initializer(&eps).map(|t| t.dtype).ok_or_else(|| fail("its ε is gone"))?;
    let scaled = norm.epsilon as f64 * width as f64 / k as f64;
    graph.set_initializer(algebra::scalar_to_tensor(&eps, scaled, dtype));
    graph.nodes[mul].inputs[1] = gain.into();
    Ok(())
}

/// A norm's γ and β, each absent when the norm has none.
type ScaleShift = (Option<Vec<f32>>, Option<Vec<f32>>);

fn norm_parameters(graph: &Graph, norm: &NormMatch) -> Result<ScaleShift> {
    let index = GraphIndex::new(graph);
    let read = |name: &Option<String>, what: &str| -> Result<Option<Vec<f32>>> {
        match name {
            None => Ok(None),
            Some(n) => index.constant_f32(n).map(Some).ok_or_else(|| Error::Pass {
                pass: PASS,
                node: norm.anchor.clone(),
                message: format!("the norm's {what} '{n}' is not a readable float constant"),
            }),
        }
    };
    Ok((read(&norm.gamma, "scale")?, read(&norm.beta, "shift")?))
}

fn initializer<'g>(graph: &'g Graph, name: &str, linear: &Linear) -> Result<&'g Tensor> {
    graph.initializer(name).ok_or_else(|| Error::Pass {
        pass: PASS,
        node: linear.node_name.clone(),
        message: format!("weight '{name}' is not an initializer"),
    })
}

/// `(γ∘n + β) W + b  =  n (diag(γ) W) + (β W + b)`
fn fold_into_reader(
    graph: &mut Graph,
    namer: &mut Namer,
    reader: &Linear,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
) -> Result<()> {
    let weight = initializer(graph, &reader.weight, reader)?.clone();
    if let Some(beta) = beta.filter(|b| b.iter().any(|&v| v != 0.0)) {
        let bias = bias_initializer(graph, reader).cloned();
        let mut folded = algebra::fold_norm_shift(&weight, reader.layout, beta, bias.as_ref())?;
        match bias {
            Some(b) => {
                folded.name = b.name.clone();
                graph.set_initializer(folded);
            }
            None => add_bias(graph, namer, reader, folded),
        }
    }
    if let Some(gamma) = gamma {
        let mut scaled = algebra::fold_norm_scale(&weight, reader.layout, gamma)?;
        scaled.name = weight.name.clone();
        graph.set_initializer(scaled);
    }
    Ok(())
}

fn bias_initializer<'g>(graph: &'g Graph, linear: &Linear) -> Option<&'g Tensor> {
    match &linear.bias {
        Some(Bias::GemmC(name)) | Some(Bias::AddNode { initializer: name, .. }) => {
            graph.initializer(name)
        }
        None => None,
    }
}

/// Gives a linear layer a bias: Gemm's C input, or an Add after a MatMul (which takes over the
/// MatMul's output name, so every reader of the layer stays as it was).
pub fn add_bias(graph: &mut Graph, namer: &mut Namer, linear: &Linear, mut bias: Tensor) {
    bias.name = namer.fresh(&format!("{}.bias", linear.weight));
    let Some(i) = graph.node_index_producing(&linear.output) else { return };
    if graph.nodes[i].is("Gemm") {
        graph.nodes[i].inputs.truncate(2);
        graph.nodes[i].inputs.push(bias.name.clone());
    } else {
        let unbiased = namer.fresh(&format!("{}.unbiased", linear.output));
        graph.nodes[i].outputs[0] = unbiased.clone();
        let name = namer.fresh(&format!("{}/AddBias", linear.node_name));
        graph.nodes.push(Node::new(
            "Add",
            name,
            vec![unbiased, bias.name.clone()],
            vec![linear.output.clone()],
        ));
    }
    graph.initializers.push(bias);
}

/// Subtracts from every row of the token and position tables its mean (of a tied table's adapter:
/// `E A M` with `A M` centred row by row).
pub fn center_embeddings(graph: &mut Graph, layout: &Layout) -> Result<()> {
    for embedding in &layout.embeddings {
        let name = embedding.adapter.as_ref().unwrap_or(&embedding.table);
        let table = graph.initializer(name).cloned().ok_or_else(|| Error::Pass {
            pass: PASS,
            node: embedding.output.clone(),
            message: format!("embedding table '{name}' is not an initializer"),
        })?;
        graph.set_initializer(algebra::center_rows(&table)?);
    }
    Ok(())
}

/// Multiplies everything written to the stream by `M = I − (1/D) 1 1ᵀ`: the stream becomes
/// zero-mean, and LayerNorm equals RMSNorm on it.
fn center_stream_writers(graph: &mut Graph, layout: &Layout) -> Result<()> {
    center_embeddings(graph, layout)?;
    for writer in layout.segments.iter().flat_map(|s| s.writers.iter()) {
        let weight = initializer(graph, &writer.weight, writer)?;
        let centered = algebra::center_out_axis(weight, writer.layout)?;
        graph.set_initializer(centered);
        if let Some(bias) = bias_initializer(graph, writer) {
            let centered = algebra::center_bias(bias)?;
            graph.set_initializer(centered);
        }
    }
    Ok(())
}
