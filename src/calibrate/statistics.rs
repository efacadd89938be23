//! What a segment model computes besides its output stream, so that the work that grows with the
//! calibration tokens runs where the segment runs (the GPU under CUDA) and only the sums come back,
//! once per segment:
//! - the Gram matrix `XᵀX` of a value's rows (and their sum), in the execution provider's GEMM
//!   (float32 for the stream's covariance, double for an MLP's activations), added in double to the
//!   sums of the batches before, which the graph takes as inputs and returns (they stay on the
//!   device from one batch to the next);
//! - the projection `y ← yQ` of an input stream that SliceGPT sliced between two segments.
use faer::MatRef;

use crate::graph::{AttrValue, DataType, Graph, Namer, Node, Tensor, ValueInfo};

/// The graph input that weighs each flattened token row: 1 for a real token, 0 for padding
/// (`[rows, 1]`, float32). Present only when some calibration token is padding.
pub const REAL_ROWS: &str = "onnx_slice.calibration.real_rows";

/// The running sums [`emit_moments`] added: each a graph input (the sum over the batches before,
/// double; a `[1, 1]` or `[1]` zero broadcasts for the first batch) and the graph output that adds
/// this batch to it.
pub struct EmittedMoments {
    /// `Σ xᵀx` over the real rows, `[width, width]`.
    pub gram: RunningSum,
    /// `Σ x` over the real rows, `[width]`, when asked for.
    pub sum: Option<RunningSum>,
}

/// A sum carried from batch to batch: `output = input + this batch's part`.
pub struct RunningSum {
    pub input: String,
    pub output: String,
    /// The rank of the sum (the first batch's zero has this rank, every size 1).
    pub rank: usize,
}

/// What [`emit_moments`] computes, and how.
pub struct MomentsRequest<'a> {
    pub value: &'a str,
    /// The value's last axis.
    pub width: usize,
    /// The value's element type.
    pub dtype: DataType,
    /// The element type of a batch's products: float32 (SliceGPT's covariance: a batch's float32
    /// GEMM loses nothing measurable there) or double (a refit's Gram matrix, whose centring
    /// cancels its leading digits). Sums over batches are double either way.
    pub precision: DataType,
    /// Padding rows are left out through [`REAL_ROWS`].
    pub masked: bool,
    pub with_sum: bool,
}

/// Adds to `graph` the running moments of a value's rows; `opset` is the model's default-domain
/// opset.
pub fn emit_moments(graph: &mut Graph, request: &MomentsRequest<'_>, opset: i64) -> EmittedMoments {
    let MomentsRequest { value, width, dtype, precision, masked, with_sum } = *request;
    let mut namer = Namer::new(graph);
    let mut fresh = |base: &str| namer.fresh(&format!("onnx_slice/calibration/{value}/{base}"));
    let shape = fresh("shape");
    graph.initializers.push(Tensor::from_i64(shape.clone(), vec![2], &[-1, width as i64]));
    let rows = fresh("rows");
    graph.nodes.push(Node::new(
        "Reshape",
        fresh("Reshape"),
        vec![value.into(), shape],
        vec![rows.clone()],
    ));
    let mut x = rows;
    if dtype != precision {
        let wide = fresh("rows_wide");
        graph.nodes.push(Node::cast(fresh("Cast"), &x, &wide, precision));
        x = wide;
    }
    if masked {
        let mut weights = REAL_ROWS.to_string();
        if precision != DataType::Float {
            weights = fresh("real_rows");
            graph.nodes.push(Node::cast(fresh("CastRows"), REAL_ROWS, &weights, precision));
        }
        let kept = fresh("real");
        graph.nodes.push(Node::new("Mul", fresh("Mask"), vec![x, weights], vec![kept.clone()]));
        x = kept;
        if !graph.inputs.iter().any(|i| i.name == REAL_ROWS) {
            graph.inputs.push(ValueInfo::tensor_of_rank_unknown(REAL_ROWS, DataType::Float));
        }
    }
    let gram = fresh("gram");
    // Gemm reads its first operand transposed in place; before opset 11 it needs a third input.
    if opset >= 11 {
        let mut product =
            Node::new("Gemm", fresh("Gram"), vec![x.clone(), x.clone()], vec![gram.clone()]);
        product.set_attr("transA", AttrValue::Int(1));
        graph.nodes.push(product);
    } else {
        let transposed = fresh("rows_t");
        let mut transpose =
            Node::new("Transpose", fresh("Transpose"), vec![x.clone()], vec![transposed.clone()]);
        transpose.set_attr("perm", AttrValue::Ints(vec![1, 0]));
        graph.nodes.push(transpose);
        graph.nodes.push(Node::new(
            "MatMul",
            fresh("Gram"),
            vec![transposed, x.clone()],
            vec![gram.clone()],
        ));
    }
    let gram = running_sum(graph, &mut fresh, gram, precision, 2, "gram");
    let sum = with_sum.then(|| {
        let sum = fresh("sum");
        let mut reduce = Node::new("ReduceSum", fresh("Sum"), vec![x], vec![sum.clone()]);
        reduce.set_attr("keepdims", AttrValue::Int(0));
        // The axes moved from an attribute to an input at opset 13.
        if opset >= 13 {
            let axes = fresh("axes");
            graph.initializers.push(Tensor::from_i64(axes.clone(), vec![1], &[0]));
            reduce.inputs.push(axes);
        } else {
            reduce.set_attr("axes", AttrValue::Ints(vec![0]));
        }
        graph.nodes.push(reduce);
        running_sum(graph, &mut fresh, sum, precision, 1, "sum")
    });
    EmittedMoments { gram, sum }
}

/// `output = input + part` in double, with `input` and `output` declared as the graph's.
fn running_sum(
    graph: &mut Graph,
    fresh: &mut impl FnMut(&str) -> String,
    part: String,
    precision: DataType,
    rank: usize,
    name: &str,
) -> RunningSum {
    let mut part = part;
    if precision != DataType::Double {
        let wide = fresh(&format!("{name}_double"));
        graph.nodes.push(Node::cast(fresh("Widen"), &part, &wide, DataType::Double));
        part = wide;
    }
    let (input, output) = (fresh(&format!("{name}_before")), fresh(&format!("{name}_after")));
    graph.nodes.push(Node::new(
        "Add",
        fresh("Accumulate"),
        vec![input.clone(), part],
        vec![output.clone()],
    ));
    graph.inputs.push(ValueInfo::tensor_of_rank_unknown(&input, DataType::Double));
    graph.outputs.push(ValueInfo::tensor_of_rank_unknown(&output, DataType::Double));
    RunningSum { input, output, rank }
}

/// Makes the graph input `input` (a stream of `q.nrows()` features) `input·Q` before anything reads
/// it: the graph then takes the stream as the previous segment left it. The product is float32
/// (a float16 or bfloat16 stream is widened, projected and rounded back, as the host did it).
/// Returns the name of the input that replaces `input`.
pub fn project_input(
    graph: &mut Graph,
    input: &str,
    q: MatRef<'_, f64>,
    dtype: DataType,
) -> String {
    let mut namer = Namer::new(graph);
    let mut fresh = |base: &str| namer.fresh(&format!("onnx_slice/calibration/{input}/{base}"));
    let (unprojected, matrix) = (fresh("unprojected"), fresh("projection"));
    let values: Vec<f32> =
        (0..q.nrows()).flat_map(|i| (0..q.ncols()).map(move |j| q[(i, j)] as f32)).collect();
    graph.initializers.push(Tensor::from_f32(
        matrix.clone(),
        vec![q.nrows() as i64, q.ncols() as i64],
        &values,
    ));
    for declared in graph.inputs.iter_mut().filter(|i| i.name == input) {
        declared.name = unprojected.clone();
    }
    if dtype == DataType::Float {
        graph.nodes.push(Node::new(
            "MatMul",
            fresh("Project"),
            vec![unprojected.clone(), matrix],
            vec![input.into()],
        ));
    } else {
        let (wide, product) = (fresh("wide"), fresh("product"));
        graph.nodes.push(Node::cast(fresh("Widen"), &unprojected, &wide, DataType::Float));
        graph.nodes.push(Node::new(
            "MatMul",
            fresh("Project"),
            vec![wide, matrix],
            vec![product.clone()],
        ));
        graph.nodes.push(Node::cast(fresh("Round"), &product, input, dtype));
    }
    unprojected
}
