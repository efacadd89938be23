//! For TensorRT users: every operator the rewrite adds to a graph is one TensorRT's ONNX parser
//! supports (its published list, `tests/data/tensorrt-operators.txt`), and the rewrite adds no
//! dynamic shape: the graph's inputs and outputs are declared as before, and no node it adds
//! computes or consumes a shape. Every fixture (all exporters and architectures, float32, float16
//! and bfloat16), every basis mode.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

use common::{all_models, scratch};
use onnx_slice::graph::{Graph, Node};
use onnx_slice::slicegpt::BasisMode;
use onnx_slice::slicegpt::Orientation;
use onnx_slice::Options;

/// Operators whose outputs depend on a tensor's shape, or that take a shape as an input: a graph
/// with one of them where it had none would have a new dynamic shape for TensorRT to resolve.
const SHAPE_OPERATORS: [&str; 11] = [
    "Shape",
    "Size",
    "Reshape",
    "Expand",
    "ConstantOfShape",
    "Range",
    "Tile",
    "NonZero",
    "Slice",
    "Squeeze",
    "Unsqueeze",
];

/// Operators whose `axes` TensorRT wants as an initializer (the list's restrictions column).
const AXES_FROM_INITIALIZER: [&str; 2] = ["ReduceSum", "ReduceMean"];

fn tensorrt_operators() -> BTreeSet<String> {
    let path = common::fixtures_dir().join("../tests/data/tensorrt-operators.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let names: BTreeSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert!(names.len() > 100 && names.contains("MatMul"), "{} operators read", names.len());
    names
}

fn operator_counts(graph: &Graph) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for node in &graph.nodes {
        let domain = if node.domain == "ai.onnx" { String::new() } else { node.domain.clone() };
        *counts.entry((domain, node.op_type.clone())).or_insert(0) += 1;
    }
    counts
}

/// The nodes of `after` that `before` does not have (by name; the rewrite names every node it
/// creates, and keeps the names of those it changes).
fn new_nodes<'a>(before: &Graph, after: &'a Graph) -> Vec<&'a Node> {
    let old: HashSet<&str> = before.nodes.iter().map(|n| n.name.as_str()).collect();
    after.nodes.iter().filter(|n| n.name.is_empty() || !old.contains(n.name.as_str())).collect()
}

/// The one shape edit the rewrite needs. An export that reshapes a block's output to the stream's
/// shape as read at run time, `Reshape(y, Shape(x))` (OPT through ONNX Runtime's optimizer),
/// gets that shape's last entry replaced by the sliced width, `Concat(Slice(Shape(x), 0, -1),
/// [k])`: `y` and `x` may have different widths once sliced. The Slice reads a shape the input
/// graph already read, with constant starts, ends and axes, so no shape becomes dynamic that
/// was not before.
fn edits_a_shape_already_read(before: &Graph, after: &Graph, node: &Node) -> bool {
    let reads_shape = |name: &String| {
        before.nodes.iter().any(|n| n.op_type == "Shape" && n.outputs.contains(name))
    };
    node.op_type == "Slice"
        && node.inputs.first().is_some_and(reads_shape)
        && node.inputs[1..].iter().all(|input| input.is_empty() || is_constant(after, input))
}

/// `name` is a constant: an initializer or the output of a Constant node.
fn is_constant(graph: &Graph, name: &str) -> bool {
    graph.initializer(name).is_some()
        || graph
            .nodes
            .iter()
            .any(|n| n.op_type == "Constant" && n.outputs.iter().any(|o| o == name))
}

/// Every fixture: all exporters and architectures in float32, and their float16 and bfloat16
/// forms (whose rewritten norms cast to float32 and back).
fn fixtures() -> Vec<(String, String, PathBuf)> {
    let mut models = all_models();
    let lowp = common::fixtures_dir().join("lowp");
    for arch in common::ARCHS {
        let Ok(entries) = std::fs::read_dir(lowp.join(arch)) else { continue };
        let mut found: Vec<(String, String, PathBuf)> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|form| form.ends_with("_fp16") || form.ends_with("_bf16"))
            .map(|form| {
                (arch.to_string(), form.clone(), lowp.join(arch).join(form).join("model.onnx"))
            })
            .collect();
        found.sort();
        models.extend(found);
    }
    models
}

#[test]
fn every_operator_the_rewrite_adds_is_one_tensorrt_parses_and_no_shape_becomes_dynamic() {
    let supported = tensorrt_operators();
    let out = scratch();
    let mut failures = Vec::new();
    let mut added_everywhere = BTreeSet::new();
    let mut shape_edits = BTreeSet::new();
    let mut cases = 0;
    for (arch, exporter, path) in fixtures() {
        let before = onnx_slice::onnx::load(&path).unwrap();
        for basis in [BasisMode::Point, BasisMode::Block, BasisMode::Global] {
            let case = format!("{arch}/{exporter} --basis {basis}");
            let output = out.path().join(format!("{arch}-{exporter}-{basis}.onnx"));
            let options = Options::slicegpt(onnx_slice::slicegpt::SliceGpt {
                ratio: 0.25,
                basis,
                orientation: Orientation::RandomBasis { seed: 5 },
                ..Default::default()
            });
            onnx_slice::slice(&path, &output, &options).unwrap_or_else(|e| panic!("{case}: {e}"));
            let after = onnx_slice::onnx::load(&output).unwrap();
            cases += 1;

            let counts_before = operator_counts(&before.graph);
            for ((domain, op), count) in operator_counts(&after.graph) {
                let had = counts_before.get(&(domain.clone(), op.clone())).copied().unwrap_or(0);
                if count <= had {
                    continue;
                }
                added_everywhere.insert(op.clone());
                if !domain.is_empty() || !supported.contains(&op) {
                    failures.push(format!(
                        "{case}: adds {} × {domain}:{op}, not in TensorRT's list",
                        count - had
                    ));
                }
            }
            for node in new_nodes(&before.graph, &after.graph) {
                if edits_a_shape_already_read(&before.graph, &after.graph, node) {
                    shape_edits.insert(format!("{arch}/{exporter}"));
                } else if SHAPE_OPERATORS.contains(&node.op_type.as_str()) {
                    failures.push(format!("{case}: new node {} is a {}", node.name, node.op_type));
                }
                let axes_input = node.inputs.get(1).filter(|axes| !axes.is_empty());
                if AXES_FROM_INITIALIZER.contains(&node.op_type.as_str())
                    && axes_input.is_some_and(|axes| !is_constant(&after.graph, axes))
                {
                    failures.push(format!(
                        "{case}: new node {} ({}) computes its axes",
                        node.name, node.op_type
                    ));
                }
            }
            if before.graph.inputs != after.graph.inputs {
                failures.push(format!("{case}: the graph's inputs changed"));
            }
            if before.graph.outputs != after.graph.outputs {
                failures.push(format!("{case}: the graph's outputs changed"));
            }
        }
    }
    eprintln!(
        "{cases} slicings; operators the rewrite adds: {added_everywhere:?}; shapes read at run \
         time and edited: {shape_edits:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The check saw the rewrite at work: it adds the norms' and shortcuts' operators.
    for op in ["MatMul", "ReduceMean"] {
        assert!(added_everywhere.contains(op), "{op} never added: {added_everywhere:?}");
    }
}
