//! Reading and writing models exactly: byte-identical round trips on every fixture, external data
//! both ways, and refusal of anything that would damage an input.
mod common;

use std::path::Path;

use common::*;
use onnx_slice::onnx::{self, SaveOptions, Storage};

fn save_as(model: &onnx_slice::graph::Model, path: &Path, storage: Storage) -> onnx::Saved {
    onnx::save(model, path, &SaveOptions { storage, ..Default::default() })
        .unwrap_or_else(|e| panic!("saving {}: {e}", path.display()))
}

#[test]
fn unchanged_inline_models_are_written_back_byte_for_byte() {
    let dir = scratch();
    for (arch, exporter, path) in all_models().into_iter().filter(|(_, _, p)| !has_external_data(p))
    {
        let model = onnx::load(&path).unwrap_or_else(|e| panic!("{arch}/{exporter}: {e}"));
        let out = dir.path().join(format!("{arch}_{exporter}.onnx"));
        save_as(&model, &out, Storage::Inline);
        assert!(
            read(&out) == read(&path),
            "{arch}/{exporter}: re-saved file differs from the original"
        );
    }
}

#[test]
fn inline_to_external_to_inline_is_byte_identical() {
    let dir = scratch();
    for (arch, exporter, path) in all_models().into_iter().filter(|(_, _, p)| !has_external_data(p))
    {
        let external = dir.path().join(format!("{arch}_{exporter}_ext.onnx"));
        let saved = save_as(&onnx::load(&path).unwrap(), &external, Storage::External);
        let (data_file, data_len) = saved.data_file.expect("a data file");
        assert!(data_len > 0 && data_file.exists());
        let reloaded = onnx::load(&external).unwrap();
        assert!(
            reloaded.graph.initializers.iter().any(|t| t.is_external()),
            "{arch}/{exporter}: nothing went external"
        );
        let back = dir.path().join(format!("{arch}_{exporter}_back.onnx"));
        save_as(&reloaded, &back, Storage::Inline);
        assert!(
            read(&back) == read(&path),
            "{arch}/{exporter}: inline → external → inline changed the file"
        );
    }
}

#[test]
fn external_data_fixtures_convert_to_inline_and_back() {
    let dir = scratch();
    for (arch, exporter, path) in all_models().into_iter().filter(|(_, _, p)| has_external_data(p))
    {
        let original = onnx::load(&path).unwrap();
        assert!(original.graph.initializers.iter().any(|t| t.is_external()));
        let inline = dir.path().join(format!("{arch}_{exporter}_inline.onnx"));
        save_as(&original, &inline, Storage::Inline);
        let external = dir.path().join(format!("{arch}_{exporter}_ext.onnx"));
        save_as(&onnx::load(&inline).unwrap(), &external, Storage::External);
        let inline_again = dir.path().join(format!("{arch}_{exporter}_inline2.onnx"));
        save_as(&onnx::load(&external).unwrap(), &inline_again, Storage::Inline);
        assert!(
            read(&inline) == read(&inline_again),
            "{arch}/{exporter}: external → inline is not stable"
        );
        let reloaded = onnx::load(&inline_again).unwrap();
        for (a, b) in original.graph.initializers.iter().zip(&reloaded.graph.initializers) {
            assert_eq!(a.name, b.name);
            assert_eq!(
                a.to_raw_bytes().unwrap(),
                b.to_raw_bytes().unwrap(),
                "{arch}/{exporter}: tensor {}",
                a.name
            );
        }
    }
}

#[test]
fn external_data_keeps_small_tensors_inline_and_aligns_large_ones() {
    let dir = scratch();
    let model = onnx::load(fixture("gpt2/ts14/model.onnx")).unwrap();
    let out = dir.path().join("m.onnx");
    onnx::save(&model, &out, &SaveOptions { storage: Storage::External, size_threshold: 4096 })
        .unwrap();
    let reloaded = onnx::load(&out).unwrap();
    for t in &reloaded.graph.initializers {
        assert_eq!(
            t.is_external(),
            t.byte_len() >= 4096,
            "tensor {} ({} bytes)",
            t.name,
            t.byte_len()
        );
    }
    assert_eq!(reloaded.source.unwrap().external_files, vec![dir.path().join("m.onnx.data")]);
}

#[test]
fn parameter_count_is_the_sum_of_initializer_elements() {
    for (arch, exporter, path) in all_models() {
        let model = onnx::load(&path).unwrap();
        let expected: u64 =
            model.graph.initializers.iter().map(|t| t.dims.iter().product::<i64>() as u64).sum();
        let summary = onnx_slice::inspect::summarize(&model);
        assert_eq!(summary.parameter_count, expected, "{arch}/{exporter}");
        assert!(
            summary.parameter_count > 100_000,
            "{arch}/{exporter}: {}",
            summary.parameter_count
        );
    }
}

#[test]
fn tensors_read_as_numbers_agree_across_storage_forms() {
    let model = onnx::load(fixture("llama/genai/model.onnx")).unwrap();
    let external = model.graph.initializers.iter().find(|t| t.is_external()).unwrap();
    let values = external.to_f32().unwrap();
    assert_eq!(values.len() as u64, external.numel());
    let as_raw = onnx_slice::graph::Tensor::from_raw(
        "x",
        external.dtype,
        external.dims.clone(),
        external.to_raw_bytes().unwrap(),
    );
    assert_eq!(as_raw.to_f32().unwrap(), values);
}
