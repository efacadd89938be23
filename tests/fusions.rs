//! ONNX Runtime's fused kernels survive the rewrite (docs/design.md §1, "Norm width"). For every
//! fixture, the graph ONNX Runtime's CPU provider runs after its optimizer
//! (`runtime::save_optimized`) is compared between the input model and the model sliced at ratio
//! 0.25 (random rotation) with the `point` and `global` bases:
//!
//! 1. every rewritten norm runs as one fused op: no `onnx_slice/norm*` node is left but the
//!    (Skip)SimplifiedLayerNormalization ONNX Runtime names after the node it fused last (it keeps
//!    the names of the nodes it does not fuse, as the shortcut MatMuls show);
//! 2. every fused op of the input's optimized graph (the com.microsoft ones: FusedMatMul, FastGelu,
//!    QuickGelu, attention, …) is there as often in the sliced one, except two residual-Add
//!    fusions ONNX Runtime cannot redo on plain ops: an Add fused into a LayerNormalization
//!    (`SkipLayerNormalization`; ONNX Runtime fuses Adds into LayerNormalization only, and the
//!    rewrite turns every LayerNorm into an RMS norm), and the input's own com.microsoft
//!    `Skip*Normalization` ops, whose residual sum has a second reader (the next skip), which
//!    ONNX Runtime's fusion does not take.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::reference::runtime;
use common::{all_models, scratch};
use onnx_slice::graph::Model;
use onnx_slice::onnx::{self, SaveOptions};
use onnx_slice::pattern::norm::NormKind;
use onnx_slice::slicegpt::{self as transform, BasisMode, Dimensions, FixedBasis as Orientation};

const MS_DOMAIN: &str = "com.microsoft";

/// The graph ONNX Runtime runs for the model at `path` (written beside it).
fn optimized(path: &Path) -> Model {
    let out = path.with_file_name("optimized.onnx");
    onnx_slice::runtime::save_optimized(path, &out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    onnx::load(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()))
}

/// How many nodes of each com.microsoft op type a graph has.
fn fused_ops(model: &Model) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for node in model.graph.nodes.iter().filter(|n| n.domain == MS_DOMAIN) {
        *counts.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    counts
}

/// Copies a fixture's model file and its external data into `dir` (the optimized model is written
/// beside the model and refers to the same data file).
fn copy_model(model: &Path, dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(model.parent().unwrap()).unwrap().map(Result::unwrap) {
        if entry.file_name().to_string_lossy().starts_with("model.onnx") {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    dir.join("model.onnx")
}

/// Why a dense fusion may be missing from the sliced model (see the module's point 2).
fn may_lose(op: &str, norm_kind: NormKind, input_has_skip_norms: bool) -> bool {
    match op {
        "SkipLayerNormalization" => norm_kind == NormKind::LayerNorm || input_has_skip_norms,
        "SkipSimplifiedLayerNormalization" => input_has_skip_norms,
        _ => false,
    }
}

fn describe(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(op, n)| format!("{op} {n}")).collect::<Vec<_>>().join(", ")
}

#[test]
fn sliced_models_keep_onnx_runtime_fusions() {
    runtime();
    let dir = scratch();
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let name = format!("{arch}/{exporter}");
        let input = onnx::load(&path).unwrap();
        let input_has_skip_norms = input
            .graph
            .nodes
            .iter()
            .any(|n| n.domain == MS_DOMAIN && n.op_type.starts_with("Skip"));
        let dense = fused_ops(&optimized(&copy_model(&path, &dir.path().join(&name))));
        for basis in [BasisMode::Point, BasisMode::Global] {
            let what = format!("{name} --basis {basis}");
            let mut model = input.clone();
            let dims = Dimensions { ratio: 0.25, basis, ..Dimensions::default() };
            let rewritten =
                match transform::rotate(&mut model, Orientation::Random { seed: 3 }, &dims) {
                    Ok(rewritten) => rewritten,
                    Err(e) => {
                        failures.push(format!("{what}: {e}"));
                        continue;
                    }
                };
            let sliced_path = dir.path().join(&name).join(format!("sliced_{basis}/model.onnx"));
            std::fs::create_dir_all(sliced_path.parent().unwrap()).unwrap();
            onnx::save(&model, &sliced_path, &SaveOptions::default()).unwrap();
            let run = optimized(&sliced_path);
            let unfused: Vec<&str> = run
                .graph
                .nodes
                .iter()
                .filter(|n| {
                    n.name.starts_with("onnx_slice/norm")
                        && !n.op_type.ends_with("SimplifiedLayerNormalization")
                })
                .map(|n| n.name.as_str())
                .collect();
            // The check above relies on ONNX Runtime keeping the names of the nodes it leaves
            // alone: the point basis's shortcut MatMuls must still be found by theirs.
            let shortcuts = run
                .graph
                .nodes
                .iter()
                .filter(|n| n.name.starts_with("onnx_slice/shortcut"))
                .count();
            if basis == BasisMode::Point && shortcuts == 0 {
                failures
                    .push(format!("{what}: no onnx_slice/shortcut* node in the optimized graph"));
            }
            if !unfused.is_empty() {
                failures.push(format!("{what}: norm nodes ONNX Runtime did not fuse: {unfused:?}"));
            }
            let sliced = fused_ops(&run);
            for (op, &n) in &dense {
                let got = sliced.get(op).copied().unwrap_or(0);
                if got < n && !may_lose(op, rewritten.layout.norm_kind, input_has_skip_norms) {
                    failures.push(format!("{what}: {op} fused {n}× in the input, {got}× sliced"));
                }
            }
            if basis == BasisMode::Point {
                println!(
                    "{name}: input {{{}}}, sliced {{{}}}",
                    describe(&dense),
                    describe(&sliced)
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
