//! One segment of the stream as a model of its own: its input stream point becomes a graph input,
//! its output stream point the only graph output, and everything not needed for that is dropped.
//! Running these one after the other costs about one forward pass of the whole model.
use crate::error::{Error, Result};
use crate::graph::{
    cleanup, toposort, AttrValue, DataType, Graph, Model, Namer, Node, Tensor, ValueInfo,
};
use crate::structure::Layout;

const PASS: &str = "calibrate";

/// Where the stream is cut at one point, and the rank of the tensor there (2 where an exporter
/// flattened the stream to `[B·S, D]`), known once the segment ending there has run.
#[derive(Debug, Clone)]
pub struct Cut {
    pub value: String,
    pub rank: Option<usize>,
    /// The stream's element type ([`crate::algebra::created_dtype`]).
    pub dtype: DataType,
}

/// The model computing stream point `point + 1` from point `point` (or, for `point == None`,
/// point 0 from the model's inputs). `widths[q]` is the current width of the stream at point q
/// and `cuts[q]` where the stream is cut there. `unpadded`: no calibration token is padding.
pub fn segment_model(
    mut sub: Model,
    layout: &Layout,
    point: Option<usize>,
    widths: &[usize],
    cuts: &[Cut],
    unpadded: bool,
) -> Result<Model> {
    let graph = &mut sub.graph;
    if unpadded {
        bypass_softmax_nan_guards(graph);
    }
    // Declared shapes go stale as points are sliced one by one; ONNX Runtime infers them.
    graph.value_info.clear();
    let output = &cuts[point.map_or(0, |p| p + 1)];
    graph.outputs = vec![ValueInfo::tensor_of_rank_unknown(&output.value, output.dtype)];
    if let Some(p) = point {
        let input = &cuts[p].value;
        let upstream: Vec<(String, Option<usize>, usize)> =
            std::iter::once((layout.embeddings[0].output.clone(), cuts[0].rank, widths[0]))
                .chain((0..p).map(|q| (cuts[q].value.clone(), cuts[q].rank, widths[q])))
                .filter(|(v, _, _)| v != input)
                .collect();
        cut_at(graph, input, cuts[p].dtype);
        detach_upstream_shapes(graph, layout, &upstream);
    }
    cleanup(graph);
    drop_unused_inputs(graph);
    check_self_contained(graph, layout, point)?;
    toposort(graph)?;
    Ok(sub)
}

/// Where the stream is cut at every point: the point's value before any reshape or cast the
/// exporter applied to it (right after the residual Add). Exporters take `Shape()` of that
/// earliest form for later reshapes (OPT), so it must be the segment boundary. Rotation never
/// renames these values, so they are found once.
pub fn stream_cuts(graph: &Graph, layout: &Layout) -> Vec<String> {
    let index = crate::pattern::GraphIndex::new(graph);
    layout
        .stream_points()
        .iter()
        .map(|point| {
            let mut value = point.to_string();
            while let Some(node) = index.producer(&value) {
                if !crate::pattern::is_stream_transparent(node) {
                    break;
                }
                value = node.inputs[0].clone();
            }
            value
        })
        .collect()
}

/// Exporters guard attention with `Where(IsNaN(p), 0, p)` after the softmax, for query rows whose
/// keys are all masked. Without padding every query attends at least to itself, so `p` has no NaN
/// and the guard returns `p` bit for bit; it is skipped because it streams the whole `[B, H, S, S]`
/// tensor twice (about a tenth of the calibration runs on SmolLM2).
fn bypass_softmax_nan_guards(graph: &mut Graph) {
    let index = crate::pattern::GraphIndex::new(graph);
    let mut renames = std::collections::HashMap::new();
    for node in graph.nodes.iter().filter(|n| n.is("Where") && n.inputs.len() == 3) {
        let guarded = &node.inputs[2];
        let is_nan_of_guarded = index
            .producer(&node.inputs[0])
            .is_some_and(|n| n.is("IsNaN") && n.inputs.first() == Some(guarded));
        let from_softmax = index.producer(guarded).is_some_and(|n| n.is("Softmax"));
        if is_nan_of_guarded && from_softmax {
            renames.insert(node.outputs[0].clone(), guarded.clone());
        }
    }
    for input in graph.nodes.iter_mut().flat_map(|n| n.inputs.iter_mut()) {
        if let Some(guarded) = renames.get(input) {
            *input = guarded.clone();
        }
    }
}

/// `value` stops being computed and becomes a graph input.
fn cut_at(graph: &mut Graph, value: &str, dtype: DataType) {
    for node in &mut graph.nodes {
        for out in node.outputs.iter_mut().filter(|o| *o == value) {
            *out = format!("{value}.upstream");
        }
    }
    graph.inputs.push(ValueInfo::tensor_of_rank_unknown(value, dtype));
}

/// Exporters take `Shape()` of earlier stream tensors (the token embeddings for attention masks,
/// an earlier block's output for reshapes). Keeping those would pull earlier segments (and the
/// embedding table) into this one, so each becomes what it is: the token ids' shape `[B, S]` (or
/// `[B·S]` for a flattened stream) followed by that point's width.
fn detach_upstream_shapes(
    graph: &mut Graph,
    layout: &Layout,
    upstream: &[(String, Option<usize>, usize)],
) {
    let Some(ids) = layout.embeddings[0].gather(graph).and_then(|g| g.inputs.get(1).cloned())
    else {
        return;
    };
    let mut namer = Namer::new(graph);
    let mut leading: [Option<String>; 2] = [None, None];
    for i in 0..graph.nodes.len() {
        let node = &graph.nodes[i];
        let whole_shape = node.attr_int("start").unwrap_or(0) == 0 && node.attr("end").is_none();
        if !node.is("Shape") || !whole_shape {
            continue;
        }
        let Some((_, rank, width)) =
            upstream.iter().find(|(v, _, _)| node.inputs.first() == Some(v))
        else {
            continue;
        };
        let flat = match rank {
            Some(3) => 0,
            Some(2) => 1,
            _ => continue,
        };
        let lead = match &leading[flat] {
            Some(l) => l.clone(),
            None => {
                let l = leading_dims(graph, &mut namer, &ids, flat == 1);
                leading[flat] = Some(l.clone());
                l
            }
        };
        let width_name = namer.fresh("onnx_slice.calibration.width");
        graph.initializers.push(Tensor::from_i64(width_name.clone(), vec![1], &[*width as i64]));
        let output = graph.nodes[i].outputs[0].clone();
        let mut concat =
            Node::new("Concat", graph.nodes[i].name.clone(), vec![lead, width_name], vec![output]);
        concat.set_attr("axis", AttrValue::Int(0));
        graph.nodes[i] = concat;
    }
}

/// `Shape(ids)` = `[B, S]`, or `[B·S]` for a flattened stream.
fn leading_dims(graph: &mut Graph, namer: &mut Namer, ids: &str, flat: bool) -> String {
    let shape = namer.fresh("onnx_slice/calibration/ids_shape");
    graph.nodes.push(Node::new(
        "Shape",
        namer.fresh("onnx_slice/calibration/IdsShape"),
        vec![ids.into()],
        vec![shape.clone()],
    ));
    if !flat {
        return shape;
    }
    let mut constant = |v: i64| {
        let name = namer.fresh("onnx_slice.calibration.index");
        graph.initializers.push(Tensor::from_i64(name.clone(), vec![1], &[v]));
        name
    };
    let (zero, one, two) = (constant(0), constant(1), constant(2));
    let batch = namer.fresh("onnx_slice/calibration/batch");
    let seq = namer.fresh("onnx_slice/calibration/seq");
    let tokens = namer.fresh("onnx_slice/calibration/tokens");
    graph.nodes.push(Node::new(
        "Slice",
        namer.fresh("onnx_slice/calibration/SliceB"),
        vec![shape.clone(), zero.clone(), one.clone(), zero.clone()],
        vec![batch.clone()],
    ));
    graph.nodes.push(Node::new(
        "Slice",
        namer.fresh("onnx_slice/calibration/SliceS"),
        vec![shape, one, two, zero],
        vec![seq.clone()],
    ));
    graph.nodes.push(Node::new(
        "Mul",
        namer.fresh("onnx_slice/calibration/Tokens"),
        vec![batch, seq],
        vec![tokens.clone()],
    ));
    tokens
}

fn drop_unused_inputs(graph: &mut Graph) {
    let used: std::collections::HashSet<&str> =
        graph.nodes.iter().flat_map(|n| n.inputs.iter().map(String::as_str)).collect();
    let outputs: std::collections::HashSet<&str> =
        graph.outputs.iter().map(|o| o.name.as_str()).collect();
    let keep: Vec<bool> = graph
        .inputs
        .iter()
        .map(|v| used.contains(v.name.as_str()) || outputs.contains(v.name.as_str()))
        .collect();
    let mut keep = keep.into_iter();
    graph.inputs.retain(|_| keep.next().unwrap_or(true));
}

/// A segment must not need the work of earlier segments (that would make calibration quadratic
/// in depth, and feed it unsliced activations).
fn check_self_contained(graph: &Graph, layout: &Layout, point: Option<usize>) -> Result<()> {
    let Some(p) = point else { return Ok(()) };
    let present: std::collections::HashSet<&str> =
        graph.nodes.iter().flat_map(|n| n.outputs.iter().map(String::as_str)).collect();
    for (i, segment) in layout.segments.iter().enumerate().filter(|(i, _)| *i != p) {
        if let Some(linear) = segment
            .writers
            .iter()
            .chain(segment.branches.iter().flat_map(|b| b.readers.iter()))
            .find(|l| present.contains(l.output.as_str()))
        {
            return Err(Error::Pass {
                pass: PASS,
                node: linear.node_name.clone(),
                message: format!("segment {p} of the stream depends on the linear layer '{}' of segment {i}; onnx-slice cannot run the segments separately", linear.output),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scores → Softmax → Where(IsNaN(p), 0, p) → MatMul(·, v)`, as the exporters write attention.
    fn guarded_attention() -> Graph {
        let node = |op: &str, inputs: &[&str], output: &str| {
            Node::new(
                op,
                output.to_uppercase(),
                inputs.iter().map(|s| s.to_string()).collect(),
                vec![output.into()],
            )
        };
        Graph {
            nodes: vec![
                node("Softmax", &["scores"], "p"),
                node("IsNaN", &["p"], "nan"),
                node("Where", &["nan", "zero", "p"], "guarded"),
                node("MatMul", &["guarded", "v"], "out"),
            ],
            initializers: vec![Tensor::from_f32("zero", vec![], &[0.0])],
            inputs: vec![
                ValueInfo::tensor_of_rank_unknown("scores", DataType::Float),
                ValueInfo::tensor_of_rank_unknown("v", DataType::Float),
            ],
            outputs: vec![ValueInfo::tensor_of_rank_unknown("out", DataType::Float)],
            ..Default::default()
        }
    }

    #[test]
    fn softmax_nan_guard_is_bypassed_and_dropped() {
        let mut graph = guarded_attention();
        bypass_softmax_nan_guards(&mut graph);
        cleanup(&mut graph);
        let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Softmax", "MatMul"]);
        assert_eq!(graph.nodes[1].inputs, ["p", "v"]);
    }

    #[test]
    fn guard_of_something_else_than_a_softmax_stays() {
        let mut graph = guarded_attention();
        graph.nodes[0].op_type = "Div".into();
        bypass_softmax_nan_guards(&mut graph);
        cleanup(&mut graph);
        assert_eq!(graph.nodes.len(), 4);
        assert_eq!(graph.nodes[3].inputs, ["guarded", "v"]);
    }
}
