//! The residual-path products a sliced model carries, in the form quantizers handle: the skip into
//! the head's unsliced input is a zero Pad (no product, no weight) where the opset allows, else the
//! matrix `[I 0]`; every MatMul that carries the stream itself is named in the report and the
//! metadata for a quantizer's `nodes_to_exclude`.
mod common;

use std::path::Path;

use common::cli::onnx_slice;
use common::reference::{logits_of, max_abs_diff, Reference};
use common::{fixture, scratch};
use onnx_slice::graph::{Model, Node, Tensor};
use onnx_slice::onnx;

const FAMILIES: [&str; 6] = ["gpt2", "opt", "llama", "qwen2", "phi", "gpt_neox"];

/// Slices `model` into `out` with `args`, calibrating on the fixtures' text; returns the report.
fn slice(model: &Path, out: &Path, args: &[&str]) -> serde_json::Value {
    let report = out.with_extension("json");
    let mut all: Vec<&std::ffi::OsStr> = vec![model.as_os_str(), "-o".as_ref(), out.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let calib = fixture("calibration.txt");
    all.extend([std::ffi::OsStr::new("--calib"), calib.as_os_str()]);
    all.extend([std::ffi::OsStr::new("--report"), report.as_os_str()]);
    all.extend(
        ["--calib-samples", "4", "--calib-seqlen", "32", "--quiet"].map(std::ffi::OsStr::new),
    );
    let run = onnx_slice(all);
    assert_eq!(run.code, Some(0), "{}: {}", model.display(), run.stderr);
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

fn shortcut_nodes(model: &Model) -> Vec<&Node> {
    model.graph.nodes.iter().filter(|n| n.name.starts_with("onnx_slice/shortcut")).collect()
}

/// `model` (stream width `d`) with its Pad skips replaced by MatMuls of `[I 0]`: what a Pad must
/// compute.
fn pads_as_matmuls(model: &Model, d: usize) -> Model {
    let mut model = model.clone();
    let pads: Vec<usize> =
        (0..model.graph.nodes.len()).filter(|&i| model.graph.nodes[i].op_type == "Pad").collect();
    assert!(!pads.is_empty(), "no Pad in the model");
    for (n, i) in pads.into_iter().enumerate() {
        let pads = model.graph.initializer(&model.graph.nodes[i].inputs[1]).unwrap();
        let k = d - pads.to_i64().unwrap()[1] as usize;
        let mut s = vec![0f32; k * d];
        (0..k).for_each(|j| s[j * d + j] = 1.0);
        let name = format!("test.identity_extension{n}");
        model.graph.initializers.push(Tensor::from_f32(&name, vec![k as i64, d as i64], &s));
        let node = &mut model.graph.nodes[i];
        node.op_type = "MatMul".into();
        node.inputs = vec![node.inputs[0].clone(), name];
    }
    model
}

#[test]
fn the_skip_into_the_unsliced_head_input_is_a_zero_pad_that_computes_i_0() {
    let dir = scratch();
    for arch in FAMILIES {
        let reference = Reference::for_exporter(arch, "optimum");
        let out = dir.path().join(format!("{arch}.onnx"));
        let report =
            slice(&fixture(&format!("{arch}/optimum/model.onnx")), &out, &["--ratio", "0.25"]);
        assert_eq!(report["shortcut_parameters"], 0, "{arch}: {report}");
        let sliced = onnx::load(&out).unwrap();
        let skips = shortcut_nodes(&sliced);
        assert!(
            skips.len() == 1 && skips[0].op_type == "Pad",
            "{arch}: the global basis should leave one Pad skip, found {:?}",
            skips.iter().map(|n| (&n.name, &n.op_type)).collect::<Vec<_>>()
        );
        let padded = logits_of(&sliced, dir.path(), &reference);
        let d = report["stream_width"].as_u64().unwrap() as usize;
        let multiplied = logits_of(&pads_as_matmuls(&sliced, d), dir.path(), &reference);
        let scale = multiplied.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&padded, &multiplied);
        assert!(diff <= 1e-5 * scale.max(1.0), "{arch}: Pad and [I 0] differ by {diff}");
    }
}

#[test]
fn an_opset_without_pad_axes_gets_the_exact_matrix_i_0() {
    let dir = scratch();
    let out = dir.path().join("llama-ts14.onnx");
    let ids = dir.path().join("ids.npy");
    let data: Vec<u8> = (0..4 * 32).flat_map(|i: i64| (3 + i % 50).to_le_bytes()).collect();
    common::write_npy(&ids, "<i8", &[4, 32], &data);
    let model = fixture("llama/ts14/model.onnx");
    let report = out.with_extension("json");
    let run = onnx_slice([
        model.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--ratio".as_ref(),
        "0.25".as_ref(),
        "--calib-ids".as_ref(),
        ids.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
        "--quiet".as_ref(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let sliced = onnx::load(&out).unwrap();
    let skips = shortcut_nodes(&sliced);
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0].op_type, "MatMul");
    let matrix = sliced.graph.initializer(&skips[0].inputs[1]).unwrap();
    let (k, d) = (matrix.dims[0] as usize, matrix.dims[1] as usize);
    let values = matrix.to_f32().unwrap();
    for i in 0..k {
        for j in 0..d {
            assert_eq!(values[i * d + j], if i == j { 1.0 } else { 0.0 }, "[{i},{j}]");
        }
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["shortcut_parameters"], k * d);
    let excluded: Vec<&str> = report["quantize_exclude"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"].as_str().unwrap())
        .collect();
    assert!(excluded.contains(&skips[0].name.as_str()), "{excluded:?}");
}

/// The report's `quantize_exclude` and the metadata's list name the same nodes: every MatMul on a
/// skip path and every tied-table adapter, and nothing else.
#[test]
fn every_matmul_on_the_stream_itself_is_named_for_the_quantizer() {
    let dir = scratch();
    for (arch, args) in [
        ("gpt2", &["--ratio", "0.25", "--basis", "block"][..]),
        ("llama", &["--ratio", "0.25", "--basis", "point"][..]),
        ("qwen2", &["--target-size", "80%", "--method", "combined"][..]),
        ("phi", &["--target-size", "80%"][..]),
    ] {
        let out = dir.path().join(format!("{arch}.onnx"));
        let report = slice(&fixture(&format!("{arch}/optimum/model.onnx")), &out, args);
        let sliced = onnx::load(&out).unwrap();
        let mut expected: Vec<&str> = sliced
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "MatMul")
            .filter(|n| {
                n.name.starts_with("onnx_slice/shortcut")
                    || n.name.starts_with("onnx_slice/EmbeddingAdapter")
                    || n.name.starts_with("onnx_slice/HeadAdapter")
            })
            .map(|n| n.name.as_str())
            .collect();
        expected.sort_unstable();
        let mut reported: Vec<&str> = report["quantize_exclude"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"].as_str().unwrap())
            .collect();
        reported.sort_unstable();
        assert_eq!(reported, expected, "{arch} {args:?}");
        let metadata = sliced.metadata.iter().find(|(k, _)| k == "onnx_slice.quantize_exclude");
        match metadata {
            None => assert!(expected.is_empty(), "{arch} {args:?}: no metadata entry"),
            Some((_, list)) => {
                let mut listed: Vec<String> = serde_json::from_str(list).unwrap();
                listed.sort_unstable();
                assert_eq!(listed, expected, "{arch} {args:?}");
            }
        }
        let method = report["method"].as_str().unwrap();
        if method == "neurons" {
            assert!(expected.is_empty(), "{arch}: neurons adds no stream MatMul: {expected:?}");
        }
        if args.contains(&"block") || args.contains(&"point") {
            assert!(
                expected.iter().any(|n| n.starts_with("onnx_slice/shortcut")),
                "{arch} {args:?}: shortcuts expected"
            );
        }
    }
}
