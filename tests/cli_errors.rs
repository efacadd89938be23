//! Bad input never panics, never leaves an output file behind, never changes the input: the binary
//! prints a plain error and exits non-zero.
mod common;

use std::path::{Path, PathBuf};

use common::cli::{onnx_slice, snapshot};
use common::*;

/// Runs `convert INPUT -o OUTPUT` (and `inspect INPUT`) and checks the promises for bad input:
/// exit code 1 for a model that cannot be read, 2 for a command line that cannot work.
fn assert_refused(input: &Path, output: &Path, expected_message: &str) {
    let files_before = snapshot(input.parent().unwrap());
    let convert = onnx_slice([Path::new("convert"), input, Path::new("-o"), output]);
    let expected_code = if input == output { 2 } else { 1 };
    assert_eq!(convert.code, Some(expected_code), "convert: stderr: {}", convert.stderr);
    assert!(convert.stderr.starts_with("error: "), "convert: {}", convert.stderr);
    assert!(
        convert.stderr.contains(expected_message),
        "expected {expected_message:?} in: {}",
        convert.stderr
    );
    assert!(!convert.stderr.contains("panicked"), "{}", convert.stderr);
    if output != input {
        assert!(!output.exists(), "an output file was left behind");
    }
    assert_eq!(snapshot(input.parent().unwrap()), files_before, "the input folder changed");

    if input != output {
        let inspect = onnx_slice([Path::new("inspect"), input]);
        assert_eq!(inspect.code, Some(1), "inspect: stderr: {}", inspect.stderr);
        assert!(inspect.stderr.contains(expected_message), "inspect: {}", inspect.stderr);
    }
}

fn copy_fixture(rel: &str, dir: &Path) -> PathBuf {
    let src = fixture(rel);
    let dst = dir.join("model.onnx");
    std::fs::copy(&src, &dst).unwrap();
    dst
}

#[test]
fn truncated_file() {
    let inputs = scratch();
    let outputs = scratch();
    let model = copy_fixture("gpt2/ts14/model.onnx", inputs.path());
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&model, &outputs.path().join("out.onnx"), "not a readable ONNX model");
}

#[test]
fn file_that_is_not_onnx() {
    let inputs = scratch();
    let outputs = scratch();
    let text = inputs.path().join("notes.onnx");
    std::fs::write(&text, "This is a text file, not a model.\n").unwrap();
    assert_refused(&text, &outputs.path().join("out.onnx"), "not a readable ONNX model");
}

#[test]
fn empty_file() {
    let inputs = scratch();
    let outputs = scratch();
    let empty = inputs.path().join("empty.onnx");
    std::fs::write(&empty, "").unwrap();
    assert_refused(&empty, &outputs.path().join("out.onnx"), "the file is empty");
}

#[test]
fn missing_input_file() {
    let outputs = scratch();
    let missing = outputs.path().join("nothing-here.onnx");
    let run = onnx_slice([
        Path::new("convert"),
        &missing,
        Path::new("-o"),
        &outputs.path().join("out.onnx"),
    ]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("no such file"), "{}", run.stderr);
}

#[test]
fn missing_external_data_file() {
    let inputs = scratch();
    let outputs = scratch();
    let model = copy_fixture("llama/genai/model.onnx", inputs.path());
    assert_refused(&model, &outputs.path().join("out.onnx"), "cannot read");
}

#[test]
fn external_data_offset_past_the_end() {
    let inputs = scratch();
    let outputs = scratch();
    let model = copy_fixture("llama/genai/model.onnx", inputs.path());
    let data = std::fs::read(fixture("llama/genai/model.onnx.data")).unwrap();
    std::fs::write(inputs.path().join("model.onnx.data"), &data[..data.len() / 2]).unwrap();
    assert_refused(&model, &outputs.path().join("out.onnx"), "past the end of the file");
}

#[test]
fn output_path_equal_to_input_path() {
    let inputs = scratch();
    let model = copy_fixture("gpt2/ts14/model.onnx", inputs.path());
    assert_refused(&model, &model, "is the input file");
}

#[test]
fn output_data_file_would_overwrite_the_input_data_file() {
    let inputs = scratch();
    // An input whose tensors live in "out.onnx.data": exactly where `-o out.onnx` would put its own.
    let staged = inputs.path().join("out.onnx");
    let options = onnx_slice::onnx::SaveOptions {
        storage: onnx_slice::onnx::Storage::External,
        ..Default::default()
    };
    onnx_slice::onnx::save(
        &onnx_slice::onnx::load(fixture("llama/genai/model.onnx")).unwrap(),
        &staged,
        &options,
    )
    .unwrap();
    let model = inputs.path().join("model.onnx");
    std::fs::rename(&staged, &model).unwrap();
    let before = snapshot(inputs.path());
    let run = onnx_slice([
        Path::new("convert"),
        &model,
        Path::new("-o"),
        &staged,
        Path::new("--external-data"),
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("it is the input file"), "{}", run.stderr);
    assert!(!staged.exists());
    assert_eq!(snapshot(inputs.path()), before);
}
