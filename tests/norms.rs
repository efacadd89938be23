//! Norm detection (`pattern::norm`) on every fixture, checked against the Hugging Face
//! checkpoints, and the decomposition of ONNX Runtime's fused Skip* norms (`fuse::skip`).
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::reference::{as_named, cpu, max_abs_diff, open, run_logits, runtime, Reference};
use onnx_slice::fuse::skip::{decompose_skip_norms, decompose_skip_norms_in_model};
use onnx_slice::graph::{AttrValue, Graph, Model, Node, Tensor, ValueInfo};
use onnx_slice::pattern::norm::{explain_norms, find_norms, NormKind, NormMatch};
use onnx_slice::pattern::GraphIndex;
use onnx_slice::runtime::ModelSession;
use safetensors::{Dtype, SafeTensors};

// ---------------------------------------------------------------------------------------------
// What the fixtures must contain, from the Hugging Face checkpoint they were exported from.

/// A float vector compared bit for bit.
type Bits = Vec<u32>;

struct Expected {
    count: usize,
    kind: NormKind,
    epsilon: f32,
    hidden: usize,
    /// Sorted multisets of the norm weights and biases of the checkpoint.
    gammas: Vec<Bits>,
    betas: Vec<Bits>,
}

fn config(arch: &str) -> serde_json::Value {
    let path = common::fixture(&format!("_hf/{arch}/config.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn config_number(config: &serde_json::Value, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| config[*k].as_f64())
}

fn expected(arch: &str, exporter: &str) -> Expected {
    let config = config(arch);
    let layers = config_number(&config, &["num_hidden_layers", "n_layer"]).unwrap() as usize;
    let hidden = config_number(&config, &["hidden_size", "n_embd"]).unwrap() as usize;
    // OPT's config names no epsilon: its nn.LayerNorm uses torch's default 1e-5.
    let mut epsilon =
        config_number(&config, &["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"])
            .unwrap_or(1e-5) as f32;
    if arch == "phi" && exporter == "genai" {
        // onnxruntime-genai's builder ignores Phi's layer_norm_eps (1e-5) and writes 1e-6 into
        // every norm: the exported model really computes with 1e-6 (hence its ~2e-3 logit
        // difference to torch in meta.json).
        epsilon = 1e-6;
    }
    let parallel_single_norm = arch == "phi";
    let (gammas, betas) = checkpoint_norm_vectors(arch);
    Expected {
        count: if parallel_single_norm { layers + 1 } else { 2 * layers + 1 },
        kind: if matches!(arch, "llama" | "qwen2") {
            NormKind::RmsNorm
        } else {
            NormKind::LayerNorm
        },
        epsilon,
        hidden,
        gammas,
        betas,
    }
}

/// The norm weights and biases of the checkpoint. Only the test knows Hugging Face names: the
/// detection under test never looks at names.
fn checkpoint_norm_vectors(arch: &str) -> (Vec<Bits>, Vec<Bits>) {
    let bytes = common::read(&common::fixture(&format!("_hf/{arch}/model.safetensors")));
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let (mut gammas, mut betas) = (Vec::new(), Vec::new());
    for (name, view) in tensors.tensors() {
        let is_norm = name.contains("norm") || name.contains(".ln_");
        if !is_norm || view.shape().len() != 1 || view.dtype() != Dtype::F32 {
            continue;
        }
        let bits: Bits = view
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if name.ends_with(".weight") {
            gammas.push(bits);
        } else if name.ends_with(".bias") {
            betas.push(bits);
        }
    }
    gammas.sort();
    betas.sort();
    (gammas, betas)
}

fn bits_of(index: &GraphIndex, value: &Option<String>) -> Option<Bits> {
    let values = index.constant_f32(value.as_deref()?)?;
    Some(values.iter().map(|v| v.to_bits()).collect())
}

/// The model with its Skip* norms decomposed.
fn load_decomposed(path: &Path) -> Model {
    let mut model =
        onnx_slice::onnx::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decompose_skip_norms_in_model(&mut model).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    model
}

fn count_skip_ops(graph: &Graph) -> usize {
    graph
        .nodes
        .iter()
        .filter(|n| n.domain == "com.microsoft" && n.op_type.starts_with("Skip"))
        .count()
}

/// `value` reaches a MatMul or Gemm, directly or through layout-only ops.
fn feeds_a_linear(index: &GraphIndex, value: &str) -> bool {
    let mut queue = vec![value.to_string()];
    let mut seen = BTreeSet::new();
    while let Some(value) = queue.pop() {
        if !seen.insert(value.clone()) {
            continue;
        }
        for reader in index.consumers(&value) {
            match reader.op_type.as_str() {
                "MatMul" | "Gemm" => return true,
                "Reshape" | "Cast" | "Identity" | "Flatten" => {
                    queue.push(reader.outputs[0].clone())
                }
                _ => {}
            }
        }
    }
    false
}

/// Everything wrong with the norms found in one model, as lines.
fn check_norms(index: &GraphIndex, norms: &[NormMatch], expected: &Expected) -> Vec<String> {
    let mut problems = Vec::new();
    if norms.len() != expected.count {
        problems.push(format!(
            "found {} norms, expected {}; unmatched: {:?}",
            norms.len(),
            expected.count,
            explain_norms(index)
        ));
    }
    for norm in norms {
        if norm.kind != expected.kind {
            problems.push(format!(
                "{}: kind {:?}, expected {:?}",
                norm.anchor, norm.kind, expected.kind
            ));
        }
        if norm.epsilon != expected.epsilon {
            problems.push(format!(
                "{}: ε = {:e}, expected {:e}",
                norm.anchor, norm.epsilon, expected.epsilon
            ));
        }
        if !feeds_a_linear(index, &norm.output) {
            problems
                .push(format!("{}: output '{}' reaches no MatMul/Gemm", norm.anchor, norm.output));
        }
    }
    let mut gammas: Vec<Bits> = norms.iter().filter_map(|n| bits_of(index, &n.gamma)).collect();
    let mut betas: Vec<Bits> = norms.iter().filter_map(|n| bits_of(index, &n.beta)).collect();
    gammas.sort();
    betas.sort();
    if gammas != expected.gammas {
        problems.push(format!(
            "γ vectors differ from the checkpoint's ({} found, {} expected)",
            gammas.len(),
            expected.gammas.len()
        ));
    }
    if betas != expected.betas {
        problems.push(format!(
            "β vectors differ from the checkpoint's ({} found, {} expected)",
            betas.len(),
            expected.betas.len()
        ));
    }
    let mut owner = std::collections::BTreeMap::new();
    for norm in norms {
        for &i in &norm.nodes {
            if let Some(other) = owner.insert(i, norm.anchor.clone()) {
                problems.push(format!("node {i} belongs to both {other} and {}", norm.anchor));
            }
        }
    }
    problems
}

#[test]
fn every_fixture_has_its_norms_with_the_checkpoint_weights() {
    let mut problems = Vec::new();
    for (arch, exporter, path) in common::all_models() {
        let model = load_decomposed(&path);
        let index = GraphIndex::new(&model.graph);
        let norms = find_norms(&index);
        let mut found = check_norms(&index, &norms, &expected(&arch, &exporter));
        if count_skip_ops(&model.graph) > 0 {
            found.push("Skip* ops remain after decompose_skip_norms".into());
        }
        problems.extend(found.into_iter().map(|p| format!("{arch}/{exporter}: {p}")));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Each norm's input, read back from ONNX Runtime on the reference inputs, is a tensor whose last
/// dim is the model width D: the norm reads the residual stream.
#[test]
fn every_norm_reads_a_stream_value_of_the_model_width() {
    runtime();
    let mut problems = Vec::new();
    for (arch, exporter, path) in common::all_models() {
        let mut model = load_decomposed(&path);
        let hidden = expected(&arch, &exporter).hidden;
        let inputs: Vec<String> =
            find_norms(&GraphIndex::new(&model.graph)).into_iter().map(|n| n.input).collect();
        for input in &inputs {
            model.graph.expose_output(input);
        }
        let bytes = onnx_slice::onnx::to_bytes(&model).unwrap();
        let mut session = ModelSession::from_bytes(&bytes, path.parent(), &cpu())
            .unwrap_or_else(|e| panic!("{arch}/{exporter}: {e}"));
        let feeds = Reference::for_exporter(&arch, &exporter).inputs_for(&session);
        let wanted: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let outputs = session
            .run_for(&as_named(&feeds), &wanted)
            .unwrap_or_else(|e| panic!("{arch}/{exporter}: {e}"));
        for input in &inputs {
            let shape = outputs.get(input).map(|t| t.shape().to_vec()).unwrap_or_default();
            if shape.last() != Some(&hidden) {
                problems.push(format!("{arch}/{exporter}: norm input '{input}' has shape {shape:?}, expected last dim {hidden}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Decomposing the fused norms of the onnxruntime-optimizer and genai exports keeps the logits.
#[test]
fn decomposing_skip_norms_keeps_the_logits() {
    let mut checked = 0;
    for (arch, exporter, path) in common::all_models() {
        if exporter != "ortopt_l1" && exporter != "genai" {
            continue;
        }
        let reference = Reference::for_exporter(&arch, &exporter);
        let mut original = open(&path, &cpu());
        let feeds = reference.inputs_for(&original);
        let before = run_logits(&mut original, &feeds);

        let mut model = onnx_slice::onnx::load(&path).unwrap();
        let fused = count_skip_ops(&model.graph);
        let replaced = decompose_skip_norms_in_model(&mut model).unwrap();
        assert_eq!(replaced, fused, "{arch}/{exporter}: replaced count");
        assert_eq!(count_skip_ops(&model.graph), 0, "{arch}/{exporter}: Skip* ops remain");

        let bytes = onnx_slice::onnx::to_bytes(&model).unwrap();
        let mut decomposed = ModelSession::from_bytes(&bytes, path.parent(), &cpu())
            .unwrap_or_else(|e| panic!("{arch}/{exporter}: {e}"));
        let after = run_logits(&mut decomposed, &feeds);
        let diff = max_abs_diff(&before, &after);
        assert!(
            diff <= 1e-5,
            "{arch}/{exporter}: logits moved by {diff} ({fused} Skip* ops decomposed)"
        );
        checked += 1;
    }
    assert_eq!(checked, 9, "expected 6 ortopt_l1 and 3 genai fixtures");
}

// ---------------------------------------------------------------------------------------------
// Hand-built graphs: the forms and the near misses.

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn node(op: &str, inputs: &[&str], output: &str) -> Node {
    Node::new(op, format!("{op}:{output}"), strings(inputs), strings(&[output]))
}

fn mean_over_last_axis(input: &str, output: &str) -> Node {
    let mut mean = node("ReduceMean", &[input], output);
    mean.set_attr("axes", AttrValue::Ints(vec![-1]));
    mean
}

const WIDTH: usize = 4;
const GAMMA: [f32; WIDTH] = [1.5, -0.5, 2.0, 0.25];
const BETA: [f32; WIDTH] = [0.1, 0.2, -0.3, 0.4];

/// A graph x → `norm nodes` → MatMul → out, with the constants the norms use.
fn graph_with(norm_nodes: Vec<Node>, norm_output: &str, extra_outputs: &[&str]) -> Graph {
    let mut graph = Graph::new("norm");
    graph.inputs.push(ValueInfo::untyped("x"));
    graph.initializers = vec![
        Tensor::from_f32("two", vec![], &[2.0]),
        Tensor::from_f32("three", vec![], &[3.0]),
        Tensor::from_f32("minus_half", vec![], &[-0.5]),
        Tensor::from_f32("one", vec![], &[1.0]),
        Tensor::from_f32("eps", vec![], &[1e-5]),
        Tensor::from_f32("gamma", vec![WIDTH as i64], &GAMMA),
        Tensor::from_f32("beta", vec![WIDTH as i64], &BETA),
        Tensor::from_f32("w", vec![WIDTH as i64, 2], &[0.0; 2 * WIDTH]),
    ];
    graph.nodes = norm_nodes;
    graph.nodes.push(node("MatMul", &[norm_output, "w"], "out"));
    graph.outputs = std::iter::once("out")
        .chain(extra_outputs.iter().copied())
        .map(ValueInfo::untyped)
        .collect();
    graph
}

/// TorchScript opset-14 LayerNorm, with the given exponent on the Pow.
fn decomposed_layer_norm(exponent: &str) -> Vec<Node> {
    vec![
        mean_over_last_axis("x", "mean"),
        node("Sub", &["x", "mean"], "centred"),
        node("Pow", &["centred", exponent], "squares"),
        mean_over_last_axis("squares", "variance"),
        node("Add", &["variance", "eps"], "guarded"),
        node("Sqrt", &["guarded"], "std"),
        node("Div", &["centred", "std"], "normalized"),
        node("Mul", &["normalized", "gamma"], "scaled"),
        node("Add", &["scaled", "beta"], "y"),
    ]
}

fn norms_of(graph: &Graph) -> Vec<NormMatch> {
    find_norms(&GraphIndex::new(graph))
}

#[test]
fn decomposed_layer_norm_is_found_whole() {
    let graph = graph_with(decomposed_layer_norm("two"), "y", &[]);
    let norms = norms_of(&graph);
    assert_eq!(norms.len(), 1, "{:?}", explain_norms(&GraphIndex::new(&graph)));
    let norm = &norms[0];
    assert_eq!(norm.kind, NormKind::LayerNorm);
    assert_eq!((norm.input.as_str(), norm.output.as_str()), ("x", "y"));
    assert_eq!((norm.gamma.as_deref(), norm.beta.as_deref()), (Some("gamma"), Some("beta")));
    assert_eq!(norm.epsilon, 1e-5);
    assert_eq!(norm.nodes, (0..9).collect::<Vec<_>>(), "every node but the MatMul");
}

#[test]
fn almost_layer_norm_cubing_the_row_is_not_a_norm() {
    let graph = graph_with(decomposed_layer_norm("three"), "y", &[]);
    assert!(norms_of(&graph).is_empty());
    let why = explain_norms(&GraphIndex::new(&graph));
    assert!(why.iter().any(|line| line.contains("exponent is 3")), "{why:?}");
}

#[test]
fn decomposed_norm_whose_intermediate_is_a_graph_output_is_not_a_norm() {
    let graph = graph_with(decomposed_layer_norm("two"), "y", &["std"]);
    assert!(norms_of(&graph).is_empty());
    let why = explain_norms(&GraphIndex::new(&graph));
    assert!(why.iter().any(|line| line.contains("'std' is a graph output")), "{why:?}");
}

#[test]
fn decomposed_norm_whose_intermediate_has_another_reader_is_not_a_norm() {
    let mut nodes = decomposed_layer_norm("two");
    nodes.push(node("Relu", &["centred"], "elsewhere"));
    let graph = graph_with(nodes, "y", &["elsewhere"]);
    assert!(norms_of(&graph).is_empty());
}

/// RMSNorm with commuted operands and each way of dividing by the root.
#[test]
fn decomposed_rms_norm_in_every_division_form_and_operand_order() {
    let forms: [(&str, Vec<Node>); 4] = [
        (
            "Div(1, ·)",
            vec![node("Sqrt", &["guarded"], "root"), node("Div", &["one", "root"], "inverse")],
        ),
        (
            "Reciprocal",
            vec![node("Sqrt", &["guarded"], "root"), node("Reciprocal", &["root"], "inverse")],
        ),
        ("Pow(−0.5)", vec![node("Pow", &["guarded", "minus_half"], "inverse")]),
        (
            "Div(x, ·)",
            vec![node("Sqrt", &["guarded"], "root"), node("Div", &["x", "root"], "normalized")],
        ),
    ];
    for (form, root_nodes) in forms {
        let divides_directly = root_nodes.iter().any(|n| n.outputs[0] == "normalized");
        let mut nodes = vec![
            node("Pow", &["x", "two"], "squares"),
            mean_over_last_axis("squares", "mean_square"),
            node("Add", &["eps", "mean_square"], "guarded"),
        ];
        nodes.extend(root_nodes);
        if !divides_directly {
            nodes.push(node("Mul", &["inverse", "x"], "normalized"));
        }
        nodes.push(node("Mul", &["gamma", "normalized"], "y"));
        let graph = graph_with(nodes, "y", &[]);
        let norms = norms_of(&graph);
        assert_eq!(norms.len(), 1, "{form}: {:?}", explain_norms(&GraphIndex::new(&graph)));
        assert_eq!(norms[0].kind, NormKind::RmsNorm, "{form}");
        assert_eq!(
            (norms[0].input.as_str(), norms[0].output.as_str(), norms[0].gamma.as_deref()),
            ("x", "y", Some("gamma")),
            "{form}"
        );
        assert_eq!(norms[0].beta, None, "{form}: an RMSNorm takes no β");
    }
}

fn cast_to_float(input: &str, output: &str) -> Node {
    let mut cast = node("Cast", &[input], output);
    cast.set_attr("to", AttrValue::Int(1));
    cast
}

/// LLaMA's TorchScript export: the Cast of the stream feeds the norm and the residual Add. The
/// Cast stays outside the norm, whose input is the value before it.
#[test]
fn a_cast_the_residual_add_also_reads_stays_outside_the_norm() {
    let nodes = vec![
        cast_to_float("x", "x32"),
        node("Pow", &["x32", "two"], "squares"),
        mean_over_last_axis("squares", "mean_square"),
        node("Add", &["mean_square", "eps"], "guarded"),
        node("Sqrt", &["guarded"], "root"),
        node("Div", &["one", "root"], "inverse"),
        node("Mul", &["x32", "inverse"], "normalized32"),
        cast_to_float("normalized32", "normalized"),
        node("Mul", &["gamma", "normalized"], "y"),
        node("Add", &["x32", "out"], "residual"),
    ];
    let mut graph = graph_with(nodes, "y", &["residual"]);
    // The residual Add reads the MatMul's output: keep the node order topological.
    let residual = graph.nodes.remove(9);
    graph.nodes.push(residual);
    let norms = norms_of(&graph);
    assert_eq!(norms.len(), 1, "{:?}", explain_norms(&GraphIndex::new(&graph)));
    assert_eq!(norms[0].input, "x");
    assert_eq!(
        norms[0].nodes,
        (1..9).collect::<Vec<_>>(),
        "the first Cast is shared, the second belongs to the norm"
    );

    // Without the residual reader the Cast serves only the norm and belongs to it.
    let mut alone = graph.clone();
    alone.nodes.pop();
    alone.outputs.pop();
    let norms = norms_of(&alone);
    assert_eq!(norms[0].input, "x");
    assert_eq!(norms[0].nodes, (0..9).collect::<Vec<_>>());
}

#[test]
fn norm_ops_are_found_and_their_axis_and_scale_checked() {
    let mut layer_norm =
        Node::new("LayerNormalization", "ln", strings(&["x", "gamma", "beta"]), strings(&["y"]));
    layer_norm.set_attr("epsilon", AttrValue::Float(1e-6));
    let rms = Node::new("RMSNormalization", "rms", strings(&["x", "gamma"]), strings(&["y"]));
    let simplified =
        Node::new("SimplifiedLayerNormalization", "sln", strings(&["x", "gamma"]), strings(&["y"]));
    for (op, kind, epsilon) in [
        (layer_norm.clone(), NormKind::LayerNorm, 1e-6),
        (rms, NormKind::RmsNorm, 1e-5),
        (simplified, NormKind::RmsNorm, 1e-5),
    ] {
        let norms = norms_of(&graph_with(vec![op.clone()], "y", &[]));
        assert_eq!(norms.len(), 1, "{}", op.op_type);
        assert_eq!(
            (norms[0].kind, norms[0].epsilon, norms[0].anchor.as_str()),
            (kind, epsilon, op.name.as_str())
        );
    }
    let mut first_axis = layer_norm.clone();
    first_axis.set_attr("axis", AttrValue::Int(1));
    assert!(
        norms_of(&graph_with(vec![first_axis], "y", &[])).is_empty(),
        "axis 1 of an unknown rank is not the last"
    );
    let mut computed_scale = layer_norm;
    computed_scale.inputs[1] = "x".into();
    assert!(
        norms_of(&graph_with(vec![computed_scale], "y", &[])).is_empty(),
        "γ must be a constant"
    );
}

#[test]
fn a_malformed_graph_gives_no_match_and_no_panic() {
    let nodes = vec![
        Node::new("Cast", "no input", vec![], strings(&["c"])),
        node("Pow", &["c"], "squares"),
        Node::new("ReduceMean", "no data", vec![], strings(&["m"])),
        node("Pow", &["c", "two"], "squares2"),
        node("ReduceMean", &["squares2"], "all"),
        Node::new("LayerNormalization", "bare", vec![], vec![]),
        Node::new("Pow", "no output", strings(&["x", "two"]), vec![]),
        node("Sqrt", &["all"], "y"),
    ];
    let graph = graph_with(nodes, "y", &[]);
    assert!(norms_of(&graph).is_empty());
    assert!(!explain_norms(&GraphIndex::new(&graph)).is_empty());

    // A well-formed norm reading a float Cast that has no input: the walk back to the stream
    // stops there.
    let mut inputless_cast = cast_to_float("x", "c");
    inputless_cast.inputs.clear();
    let nodes = vec![
        inputless_cast,
        node("Pow", &["c", "two"], "squares"),
        mean_over_last_axis("squares", "mean_square"),
        node("Add", &["mean_square", "eps"], "guarded"),
        node("Sqrt", &["guarded"], "root"),
        node("Reciprocal", &["root"], "inverse"),
        node("Mul", &["c", "inverse"], "normalized"),
        node("Mul", &["normalized", "gamma"], "y"),
    ];
    let norms = norms_of(&graph_with(nodes, "y", &[]));
    assert_eq!(norms.iter().map(|n| n.input.as_str()).collect::<Vec<_>>(), ["c"]);
}

// ---------------------------------------------------------------------------------------------
// Skip* decomposition on hand-built graphs.

fn skip_graph(op: &str, inputs: &[&str], outputs: &[&str], extra_outputs: &[&str]) -> Graph {
    let mut skip = Node::new(op, "fused", strings(inputs), strings(outputs));
    skip.domain = "com.microsoft".into();
    skip.set_attr("epsilon", AttrValue::Float(1e-6));
    let mut graph = graph_with(vec![skip], outputs[0], extra_outputs);
    graph.inputs.push(ValueInfo::untyped("s"));
    graph.initializers.push(Tensor::from_f32("bias", vec![WIDTH as i64], &BETA));
    graph
}

#[test]
fn skip_layer_norm_becomes_bias_add_residual_add_and_layer_norm() {
    let mut graph = skip_graph(
        "SkipLayerNormalization",
        &["x", "s", "gamma", "beta", "bias"],
        &["y", "", "", "sum"],
        &["sum"],
    );
    assert_eq!(decompose_skip_norms(&mut graph).unwrap(), 1);
    let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Add", "Add", "LayerNormalization", "MatMul"]);
    let (bias_add, residual_add, norm) = (&graph.nodes[0], &graph.nodes[1], &graph.nodes[2]);
    assert_eq!(
        bias_add.inputs,
        strings(&["x", "bias"]),
        "the bias goes with the input (the linear layer's output)"
    );
    assert_eq!(residual_add.inputs, vec![bias_add.outputs[0].clone(), "s".into()]);
    assert_eq!(residual_add.outputs, strings(&["sum"]), "the sum keeps the name of output 3");
    assert_eq!(norm.inputs, strings(&["sum", "gamma", "beta"]));
    assert_eq!(norm.outputs, strings(&["y"]));
    assert_eq!(
        (norm.domain.as_str(), norm.attr_int("axis"), norm.attr_float("epsilon")),
        ("", Some(-1), Some(1e-6))
    );

    let norms = norms_of(&graph);
    assert_eq!(norms.len(), 1);
    assert_eq!((norms[0].input.as_str(), norms[0].kind), ("sum", NormKind::LayerNorm));
}

#[test]
fn skip_simplified_layer_norm_without_sum_output_gets_a_fresh_sum() {
    let mut graph =
        skip_graph("SkipSimplifiedLayerNormalization", &["x", "s", "gamma"], &["y"], &[]);
    assert_eq!(decompose_skip_norms(&mut graph).unwrap(), 1);
    let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Add", "SimplifiedLayerNormalization", "MatMul"]);
    assert_eq!(graph.nodes[0].inputs, strings(&["x", "s"]));
    assert_eq!(graph.nodes[1].inputs, vec![graph.nodes[0].outputs[0].clone(), "gamma".into()]);
    assert_eq!(norms_of(&graph).len(), 1);
}

#[test]
fn a_used_mean_output_is_an_error_naming_the_node() {
    let mut graph =
        skip_graph("SkipLayerNormalization", &["x", "s", "gamma"], &["y", "mean"], &["mean"]);
    let before = graph.clone();
    let error = decompose_skip_norms(&mut graph).unwrap_err();
    assert!(
        matches!(&error, onnx_slice::Error::Pass { pass: "decompose-skip-norms", node, .. } if node == "fused"),
        "{error}"
    );
    assert_eq!(graph, before, "the graph is left as it was");
}

#[test]
fn decomposing_raises_an_old_opset_for_layer_normalization() {
    let graph = skip_graph("SkipLayerNormalization", &["x", "s", "gamma"], &["y"], &[]);
    let mut model = Model::new(&[("", 14), ("com.microsoft", 1)], graph.clone());
    assert_eq!(decompose_skip_norms_in_model(&mut model).unwrap(), 1);
    assert_eq!(model.opset_version(""), Some(17));

    let mut ancient = Model::new(&[("", 11), ("com.microsoft", 1)], graph);
    assert!(
        decompose_skip_norms_in_model(&mut ancient).is_err(),
        "opset 11 → 17 would change Split/Squeeze/…"
    );
}

// ---------------------------------------------------------------------------------------------
// The rewritten norm (`fuse::rms_norm`) on a sliced stream.

/// The norm `fuse_norms` writes, given the constants of width `k` out of `d` by `set_norm_width`
/// (opset 18: ReduceMean's axes as an input), computes through ONNX Runtime the RMS over the
/// ORIGINAL width d of a k-wide x: `x / sqrt(Σx²/d + ε)`. ε is made comparable with the mean
/// square so that a wrong ε·d/k shows as much as a wrong gain √(d/k).
#[test]
fn the_sliced_norm_is_the_rms_over_the_original_width() {
    use onnx_slice::fuse::{gain_tensor, rms_norm, set_norm_width, NormConstants};
    use onnx_slice::graph::{DataType, Dim};
    use onnx_slice::runtime::TensorValue;

    let (d, epsilon) = (16usize, 0.02f32);
    for k in [16usize, 8, 4] {
        let mut graph = Graph::new("norm");
        graph.inputs.push(ValueInfo::tensor(
            "x",
            DataType::Float,
            &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(k as i64)],
        ));
        graph.outputs.push(ValueInfo::untyped("y"));
        graph.initializers.extend([
            Tensor::from_f32("two", vec![], &[2.0]),
            Tensor::from_f32("eps", vec![], &[epsilon]),
            Tensor::from_i64("axes", vec![1], &[-1]),
            gain_tensor("gain_d", d, d, DataType::Float),
            gain_tensor("gain_k", k, d, DataType::Float),
        ]);
        let constants =
            NormConstants { two: "two", eps: "eps", gain: "gain_d", axes: Some("axes") };
        graph.nodes = rms_norm("n", "x", "y", &constants, (DataType::Float, DataType::Float));
        let norm = NormMatch {
            kind: NormKind::RmsNorm,
            input: "x".into(),
            output: "y".into(),
            gamma: None,
            beta: None,
            epsilon,
            nodes: vec![],
            anchor: "n".into(),
        };
        set_norm_width(&mut graph, &norm, d, k, "gain_k").unwrap();
        let model = Model::new(&[("", 18)], graph);

        let x: Vec<f32> = (0..6 * k).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.02).collect();
        let input = ndarray::ArrayD::from_shape_vec(vec![2, 3, k], x.clone()).unwrap();
        runtime();
        let bytes = onnx_slice::onnx::to_bytes(&model).unwrap();
        let mut session = ModelSession::from_bytes(&bytes, None, &cpu()).unwrap();
        let value = TensorValue::from(input);
        let mut outputs = session.run(&[("x", &value)]).unwrap();
        let got = outputs.remove("y").unwrap().into_f32().unwrap();
        let mut worst = 0.0f64;
        for (row, out) in x.chunks(k).zip(got.as_slice().unwrap().chunks(k)) {
            let mean_square_over_d =
                row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let rms = (mean_square_over_d + epsilon as f64).sqrt();
            for (&v, &o) in row.iter().zip(out) {
                worst = worst.max((o as f64 - v as f64 / rms).abs());
            }
        }
        assert!(worst <= 1e-5, "k = {k}: the norm is {worst:.2e} from x / sqrt(Σx²/D + ε)");
    }
}
