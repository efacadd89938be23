//! SliceGPT with PCA through ONNX Runtime on the tiny fixtures: at ratio 0 the calibrated,
//! rotated model computes the original logits; sliced models keep the interface; reruns are
//! byte-identical.
mod common;

use common::reference::*;
use common::*;
use indicatif::ProgressBar;
use onnx_slice::calibrate::data::{load_tokenizer, CalibrationSet};
use onnx_slice::calibrate::{slice_with_pca, CalibrationOptions};
use onnx_slice::graph::Model;
use onnx_slice::onnx;
use onnx_slice::runtime::ModelSession;
use onnx_slice::transform::Dimensions;

fn calibration_set(arch: &str) -> CalibrationSet {
    let tokenizer = load_tokenizer(&fixture(&format!("_hf/{arch}/tokenizer.json"))).unwrap();
    let text = onnx_slice::calibrate::data::default_calibration_text();
    let texts = vec![text[..20_000].to_string()];
    CalibrationSet::from_texts(&texts, &tokenizer, 6, 32, 0).unwrap()
}

fn calibrate(path: &std::path::Path, arch: &str, ratio: f64) -> Model {
    let mut model = onnx::load(path).unwrap();
    // Opset-23 dynamo exports run in ONNX Runtime at batch 1 only (an exporter bug, see
    // fixtures/README.md).
    let batch = if path.to_string_lossy().contains("dynamo23") { 1 } else { 4 };
    let options = CalibrationOptions {
        dims: Dimensions { ratio, ..Dimensions::default() },
        batch,
        session: cpu(),
        model_dir: path.parent().map(|p| p.to_path_buf()),
    };
    slice_with_pca(&mut model, &calibration_set(arch), &options, &ProgressBar::hidden()).unwrap_or_else(|e| panic!("{e}"));
    model
}

fn logits(model: &Model, dir: &std::path::Path, reference: &Reference) -> ndarray::ArrayD<f32> {
    runtime();
    let bytes = onnx::to_bytes(model).unwrap();
    let mut session = ModelSession::from_bytes(&bytes, Some(dir), &cpu()).unwrap_or_else(|e| panic!("{e}"));
    let inputs = reference.inputs_for(&session);
    run_logits(&mut session, &inputs)
}

#[test]
fn pca_rotation_at_ratio_zero_keeps_the_logits() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let dir = path.parent().unwrap();
        let expected = logits(&onnx::load(&path).unwrap(), dir, &reference);
        let result = std::panic::catch_unwind(|| logits(&calibrate(&path, &arch, 0.0), dir, &reference));
        match result {
            Ok(got) => {
                let diff = max_abs_diff(&got, &expected);
                if !(diff <= 1e-4) {
                    failures.push(format!("{arch}/{exporter}: max |Δlogits| = {diff}"));
                }
            }
            Err(e) => failures.push(format!("{arch}/{exporter}: {}", e.downcast_ref::<String>().cloned().unwrap_or_default())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
