//! What a segment model computes besides its output stream, so that the work that grows with the
//! calibration tokens runs where the segment runs (the GPU under CUDA) and only small results come
//! back: the Gram matrix `XᵀX` of a value's rows and their sum, in the execution provider's GEMM
//! (float32 for the stream's covariance, double for an MLP's activations; the host adds each
//! batch's `d × d` result into its f64 sum), and the projection `y ← yQ` of an input stream that
//! SliceGPT sliced on the host side of the cut.
use faer::MatRef;

use crate::graph::{AttrValue, DataType, Graph, Namer, Node, Tensor, ValueInfo};

/// The graph input that weighs each flattened token row: 1 for a real token, 0 for padding
/// (`[rows, 1]`, float32). Present only when some calibration token is padding.
pub const REAL_ROWS: &str = "onnx_slice.calibration.real_rows";

/// The outputs [`emit_moments`] added.
pub struct EmittedMoments {
    /// `Σ xᵀx` over the batch's real rows, `[width, width]`, in the precision asked for.
    pub gram: String,
    /// `Σ x` over the batch's real rows, `[width]`, when asked for.
    pub sum: Option<String>,
}

/// What [`emit_moments`] computes, and how.
pub struct MomentsRequest<'a> {
    pub value: &'a str,
    /// The value's last axis.
    pub width: usize,
    /// The value's element type.
    pub dtype: DataType,
    /// The element type of the products and sums: float32 (SliceGPT's covariance: float32 GEMMs
    /// lose nothing measurable there) or double (a refit's Gram matrix, whose centring cancels
    /// its leading digits).
    pub precision: DataType,
    /// Padding rows are left out through [`REAL_ROWS`].
    pub masked: bool,
    pub with_sum: bool,
}

/// Adds to `graph` outputs with the moments of a value's rows; `opset` is the model's
/// default-domain opset.
pub fn emit_moments(graph: &mut Graph, request: &MomentsRequest<'_>, opset: i64) -> EmittedMoments {
    let MomentsRequest { value, width, dtype, precision, masked, with_sum } = *request;
    let mut namer = Namer::new(graph);
    let mut fresh = |base: &str| namer.fresh(&format!("onnx_slice/calibration/{value}/{base}"));
    let (shape, rows, wide, kept, transposed, gram) = (
        fresh("shape"),
        fresh("rows"),
        fresh("rows_f32"),
        fresh("real"),
        fresh("rows_t"),
        fresh("gram"),
    );
    graph.initializers.push(Tensor::from_i64(shape.clone(), vec![2], &[-1, width as i64]));
    graph.nodes.push(Node::new(
        "Reshape",
        fresh("Reshape"),
        vec![value.into(), shape],
        vec![rows.clone()],
    ));
    let mut x = rows;
    if dtype != precision {
        let mut cast = Node::new("Cast", fresh("Cast"), vec![x], vec![wide.clone()]);
        cast.set_attr("to", AttrValue::Int(precision.code() as i64));
        graph.nodes.push(cast);
        x = wide;
    }
    if masked {
        let mut weights = REAL_ROWS.to_string();
        if precision != DataType::Float {
            weights = fresh("real_rows");
            let mut cast =
                Node::new("Cast", fresh("CastRows"), vec![REAL_ROWS.into()], vec![weights.clone()]);
            cast.set_attr("to", AttrValue::Int(precision.code() as i64));
            graph.nodes.push(cast);
        }
        graph.nodes.push(Node::new("Mul", fresh("Mask"), vec![x, weights], vec![kept.clone()]));
        x = kept;
        if !graph.inputs.iter().any(|i| i.name == REAL_ROWS) {
            graph.inputs.push(ValueInfo::tensor_of_rank_unknown(REAL_ROWS, DataType::Float));
        }
    }
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
    graph.outputs.push(ValueInfo::tensor_of_rank_unknown(&gram, precision));
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
        graph.outputs.push(ValueInfo::tensor_of_rank_unknown(&sum, precision));
        sum
    });
    EmittedMoments { gram, sum }
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
    let cast = |from: String, to: String, dtype: DataType, name: String| {
        let mut node = Node::new("Cast", name, vec![from], vec![to]);
        node.set_attr("to", AttrValue::Int(dtype.code() as i64));
        node
    };
    if dtype == DataType::Float {
        graph.nodes.push(Node::new(
            "MatMul",
            fresh("Project"),
            vec![unprojected.clone(), matrix],
            vec![input.into()],
        ));
    } else {
        let (wide, product) = (fresh("wide"), fresh("product"));
        graph.nodes.push(cast(unprojected.clone(), wide.clone(), DataType::Float, fresh("Widen")));
        graph.nodes.push(Node::new(
            "MatMul",
            fresh("Project"),
            vec![wide, matrix],
            vec![product.clone()],
        ));
        graph.nodes.push(cast(product, input.into(), dtype, fresh("Round")));
    }
    unprojected
}
