//! Every weight gets an initializer of its own, in the layout its node reads it, because after
//! rotation readers of one weight differ. A tied head and its embedding become two initializers
//! here; [`super::tie`] then makes them one table again, with the rotations in small adapters.
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::graph::{Graph, Namer, Tensor};
use crate::pattern::is_matrix_transpose;

/// (op, index of the weight input) for the nodes whose weights the rewrite edits.
fn weight_input(op: &str) -> Option<usize> {
    match op {
        "MatMul" | "Gemm" => Some(1),
        "Gather" => Some(0),
        _ => None,
    }
}

/// Replaces `Transpose(W, perm=[1,0])` feeding a weight input by a transposed copy of W, and gives
/// each extra reader of a shared 2-D weight its own copy. Returns how many copies were made.
/// Nodes that no longer feed anything (those Transposes) are left for the rewrite's final cleanup:
/// removing them here would shift the node indices the analysis recorded (`NormMatch::nodes`).
pub fn privatize_weights(graph: &mut Graph) -> Result<usize> {
    let mut namer = Namer::new(graph);
    let mut copies = 0;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..graph.nodes.len() {
        let Some(slot) =
            weight_input(&graph.nodes[i].op_type).filter(|_| graph.nodes[i].in_default_domain())
        else {
            continue;
        };
        let Some(value) = graph.nodes[i].inputs.get(slot).cloned() else { continue };
        if let Some(source) = transposed_initializer(graph, &value) {
            let transposed =
                transpose_2d(&source, namer.fresh(&format!("{}.transposed", source.name)))?;
            graph.nodes[i].inputs[slot] = transposed.name.clone();
            graph.initializers.push(transposed);
            copies += 1;
            continue;
        }
        let Some(weight) = graph.initializer(&value).filter(|t| t.dims.len() == 2).cloned() else {
            continue;
        };
        let uses = seen.entry(value.clone()).or_insert(0);
        *uses += 1;
        if *uses > 1 {
            let mut copy = weight;
            copy.name = namer.fresh(&format!("{value}.copy"));
            graph.nodes[i].inputs[slot] = copy.name.clone();
            graph.initializers.push(copy);
            copies += 1;
        }
    }
    Ok(copies)
}

fn transposed_initializer(graph: &Graph, value: &str) -> Option<Tensor> {
    let node = graph.nodes.iter().find(|n| n.outputs.first().map(String::as_str) == Some(value))?;
    if !is_matrix_transpose(node) {
        return None;
    }
    graph.initializer(node.inputs.first()?).filter(|t| t.dims.len() == 2).cloned()
}

/// Transposes a 2-D tensor of any fixed-size element type, byte for byte.
fn transpose_2d(t: &Tensor, name: String) -> Result<Tensor> {
    let size = t.dtype.byte_size().ok_or_else(|| Error::Tensor {
        tensor: t.name.clone(),
        message: "cannot transpose this element type".into(),
    })?;
    let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
    let src = t.to_raw_bytes()?;
    if src.len() != rows * cols * size {
        return Err(Error::Tensor {
            tensor: t.name.clone(),
            message: format!("holds {} bytes, expected {}", src.len(), rows * cols * size),
        });
    }
    let mut out = vec![0u8; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * size;
            let to = (c * rows + r) * size;
            out[to..to + size].copy_from_slice(&src[from..from + size]);
        }
    }
    let bytes = crate::files::park(out)?;
    Ok(Tensor::from_raw(name, t.dtype, vec![cols as i64, rows as i64], bytes))
}
