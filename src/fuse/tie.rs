//! A tied head stays tied (docs/design.md §1, "Tied embeddings"): one `[V, D]` table E serves the embedding
//! and the head, and the rotations they need are carried by two small matrices instead of a
//! rotated copy of E:
//!
//! ```text
//! ids ─ Gather(E) ─ MatMul(A_e) ─► stream                         A_e: D × k_0 (starts as I)
//! stream ─ final norm ─ MatMul(A_h) ─ MatMul(Transpose(E)) ─► logits   A_h: k_L × D (starts as I;
//!                                                                       γ folds into it, β is its bias)
//! ```
//! The head's layout reader becomes A_h and the embedding's table A_e, so that folding, centring,
//! rotating and slicing treat them like any other reader and writer.
use faer::Mat;

use crate::algebra;
use crate::error::{Error, Result};
use crate::graph::{Graph, Namer, Node};
use crate::structure::{Layout, Linear, WeightLayout};

const PASS: &str = "tie-head";

/// Whether the (single) head computes `x Eᵀ` with the token table E, reading E itself or an equal
/// copy (TorchScript exports keep a transposed duplicate). Call after
/// [`super::privatize_weights`], which gives every reader its own initializer.
pub fn head_reads_embedding(graph: &Graph, layout: &Layout) -> bool {
    let [head] = layout.head.readers.as_slice() else { return false };
    let Some(token) = layout
        .embeddings
        .first()
        .filter(|t| t.through_transpose.is_none() && head.through_transpose.is_none())
    else {
        return false;
    };
    let (Some(table), Some(weight)) =
        (graph.initializer(&token.table), graph.initializer(&head.weight))
    else {
        return false;
    };
    let Some(size) =
        table.dtype.byte_size().filter(|_| table.dtype == weight.dtype && table.dims.len() == 2)
    else {
        return false;
    };
    let (v, d) = (table.dims[0] as usize, table.dims[1] as usize);
    if head.in_features != d || head.out_features != v {
        return false;
    }
    let (Ok(e), Ok(w)) = (table.to_raw_bytes(), weight.to_raw_bytes()) else { return false };
    if e.len() != v * d * size || w.len() != e.len() {
        return false;
    }
    match head.layout {
        WeightLayout::OutIn => e == w,
        WeightLayout::InOut => (0..v).all(|r| {
            (0..d).all(|c| e[(r * d + c) * size..][..size] == w[(c * v + r) * size..][..size])
        }),
    }
}

/// Name of the MatMul that applies the tied table's adapter after the token Gather.
pub const EMBEDDING_ADAPTER_NODE: &str = "onnx_slice/EmbeddingAdapter";
/// Name of the MatMul that applies the head's adapter before the tied head.
pub const HEAD_ADAPTER_NODE: &str = "onnx_slice/HeadAdapter";

/// Makes the head read the token table through `Transpose(E)` (or E itself for a Gemm with
/// transB=1) after a `D × D` identity adapter, and puts an identity adapter after the token Gather.
/// `layout` is updated: the embedding has its adapter, the head's only reader is the head adapter.
pub fn share_table(graph: &mut Graph, layout: &mut Layout) -> Result<()> {
    let mut namer = Namer::new(graph);
    let d = layout.width;
    let identity = Mat::<f64>::identity(d, d);
    let dtype = algebra::created_dtype(algebra::stream_dtype(graph, layout));
    let fail = |node: &str, message: &str| Error::Pass {
        pass: PASS,
        node: node.into(),
        message: message.into(),
    };
    let token = &mut layout.embeddings[0];
    let gather = graph
        .node_index_producing(&token.output)
        .ok_or_else(|| fail(&token.output, "the token embedding's Gather is gone"))?;
    let gathered = namer.fresh(&format!("{}.rows", token.output));
    graph.nodes[gather].outputs[0] = gathered.clone();
    let adapter = namer.fresh("onnx_slice.embedding_adapter");
    graph.initializers.push(algebra::mat_to_tensor(adapter.clone(), identity.as_ref(), dtype));
    let name = namer.fresh(EMBEDDING_ADAPTER_NODE);
    graph.nodes.push(Node::new(
        "MatMul",
        name,
        vec![gathered, adapter.clone()],
        vec![token.output.clone()],
    ));
    token.adapter = Some(adapter);
    let table = token.table.clone();

    let head = layout.head.readers[0].clone();
    let node = graph
        .node_index_producing(&head.output)
        .ok_or_else(|| fail(&head.output, "the head's MatMul is gone"))?;
    let weight = match head.layout {
        WeightLayout::OutIn => table,
        WeightLayout::InOut => {
            let transposed = namer.fresh(&format!("{table}.transposed"));
            let mut transpose = Node::new(
                "Transpose",
                namer.fresh("onnx_slice/HeadTranspose"),
                vec![table],
                vec![transposed.clone()],
            );
            transpose.set_attr("perm", crate::graph::AttrValue::Ints(vec![1, 0]));
            graph.nodes.push(transpose);
            transposed
        }
    };
    let input = graph.nodes[node].inputs[0].clone();
    let adapted = namer.fresh(&format!("{input}.adapted"));
    graph.nodes[node].inputs[0] = adapted.clone();
    graph.nodes[node].inputs[1] = weight;
    let adapter = namer.fresh("onnx_slice.head_adapter");
    graph.initializers.push(algebra::mat_to_tensor(adapter.clone(), identity.as_ref(), dtype));
    let node_name = namer.fresh(HEAD_ADAPTER_NODE);
    graph.nodes.push(Node::new(
        "MatMul",
        node_name.clone(),
        vec![input, adapter.clone()],
        vec![adapted.clone()],
    ));
    layout.head.readers = vec![Linear {
        node_name,
        output: adapted,
        weight: adapter,
        layout: WeightLayout::InOut,
        through_transpose: None,
        bias: None,
        in_features: d,
        out_features: d,
    }];
    // The head's old weight and anything only it read are left for the rewrite's final cleanup,
    // which keeps the analysis' node indices valid until the norms are folded.
    Ok(())
}
