//! The exact rewrite on every fixture: fusing the norms, and fusing + rotating by random
//! orthogonal matrices, leave the logits unchanged (ONNX Runtime, original vs rewritten model);
//! slicing gives a valid, smaller model with the same interface.
mod common;

use common::reference::*;
use common::*;
use onnx_slice::graph::Model;
use onnx_slice::onnx;
use onnx_slice::runtime::ModelSession;
use onnx_slice::transform::{self, Dimensions, Orientation};

const TOLERANCE: f32 = 1e-4;

fn session_for(model: &Model, dir: &std::path::Path) -> ModelSession {
    runtime();
    let bytes = onnx::to_bytes(model).unwrap_or_else(|e| panic!("{e}"));
    ModelSession::from_bytes(&bytes, Some(dir), &cpu()).unwrap_or_else(|e| panic!("{e}"))
}

fn logits_of(model: &Model, dir: &std::path::Path, reference: &Reference) -> ndarray::ArrayD<f32> {
    let mut session = session_for(model, dir);
    let inputs = reference.inputs_for(&session);
    run_logits(&mut session, &inputs)
}

fn check_all(what: &str, rewrite: impl Fn(&mut Model)) {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let original = onnx::load(&path).unwrap();
        let dir = path.parent().unwrap();
        let expected = logits_of(&original, dir, &reference);
        let mut rewritten = original.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rewrite(&mut rewritten);
            logits_of(&rewritten, dir, &reference)
        }));
        match result {
            Ok(got) => {
                let diff = max_abs_diff(&got, &expected);
                if diff.is_nan() || diff > TOLERANCE {
                    failures.push(format!("{arch}/{exporter}: max |Δlogits| = {diff}"));
                }
            }
            Err(e) => failures.push(format!("{arch}/{exporter}: {}", e.downcast_ref::<String>().cloned().unwrap_or_default())),
        }
    }
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
}

#[test]
fn fusing_the_norms_keeps_the_logits() {
    check_all("fused", |m| {
        transform::fuse(m).unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn fusing_and_rotating_by_random_orthogonal_matrices_keeps_the_logits() {
    check_all("rotated", |m| {
        transform::rotate(m, Orientation::Random { seed: 7 }, &Dimensions::default()).unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn sliced_models_run_with_the_same_output_shapes() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let original = onnx::load(&path).unwrap();
        let dir = path.parent().unwrap();
        let expected = logits_of(&original, dir, &reference);
        let mut sliced = original.clone();
        let dims = Dimensions { ratio: 0.25, ..Dimensions::default() };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            transform::rotate(&mut sliced, Orientation::Random { seed: 3 }, &dims).unwrap_or_else(|e| panic!("{e}"));
            logits_of(&sliced, dir, &reference)
        }));
        match result {
            Ok(got) if got.shape() == expected.shape() => {}
            Ok(got) => failures.push(format!("{arch}/{exporter}: logits {:?}, expected {:?}", got.shape(), expected.shape())),
            Err(e) => failures.push(format!("{arch}/{exporter}: {}", e.downcast_ref::<String>().cloned().unwrap_or_default())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
