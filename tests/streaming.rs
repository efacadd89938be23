//! The output written while the model is rewritten (docs/design.md §8): every tensor the rotation
//! finishes goes to the output's external data file at once, and the model holds a read-only map
//! of it instead of the tensor. Checked on every fixture against the model rewritten in memory and
//! saved at the end: the same logits in ONNX Runtime, a valid data file, the same bytes for inline
//! outputs, and nothing left behind on failure.
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::reference::*;
use common::*;
use onnx_slice::graph::{DataType, Model, TensorData};
use onnx_slice::onnx::{self, DataStream, SaveOptions, Storage, DEFAULT_SIZE_THRESHOLD};
use onnx_slice::slicegpt::{self as transform, BasisMode, Dimensions, FixedBasis as Orientation};

fn options(storage: Storage) -> SaveOptions {
    SaveOptions { storage, ..Default::default() }
}

/// The rewrite with its finished tensors streamed to `out`'s data file, not yet saved.
fn rotate_streamed(
    input: &Path,
    out: &Path,
    storage: Storage,
    orientation: Orientation,
    dims: &Dimensions,
) -> (Model, DataStream) {
    let mut model = onnx::load(input).unwrap();
    let mut stream = DataStream::new(&model, out, &options(storage)).unwrap();
    transform::rotate_streaming(&mut model, orientation, dims, &mut stream)
        .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
    (model, stream)
}

/// The rewrite in memory, saved at the end (the way without a stream).
fn rotate_held(
    input: &Path,
    out: &Path,
    storage: Storage,
    orientation: Orientation,
    dims: &Dimensions,
) {
    let mut model = onnx::load(input).unwrap();
    transform::rotate(&mut model, orientation, dims).unwrap();
    onnx::save(&model, out, &options(storage)).unwrap();
}

fn settings() -> [(Orientation, Dimensions); 2] {
    let sliced = Dimensions { ratio: 0.25, basis: BasisMode::Point, ..Default::default() };
    [(Orientation::Identity, Dimensions::default()), (Orientation::Random { seed: 3 }, sliced)]
}

/// Every matrix the rotation made (its bytes differ from the fused model's tensor of that name, or
/// that has none) is in the stream's data file, read through a map of it, before the save. (What
/// the norm fusion makes and the rotation leaves, such as a tied table's transposed copy, is
/// parked in a scratch file instead when large; see `files::park`.)
fn rotated_matrices_are_streamed(input: &Path, model: &Model, data_file: &str) -> Vec<String> {
    let mut fused = onnx::load(input).unwrap();
    transform::fuse(&mut fused).unwrap();
    let before: HashMap<&str, &onnx_slice::graph::Tensor> =
        fused.graph.initializers.iter().map(|t| (t.name.as_str(), t)).collect();
    model
        .graph
        .initializers
        .iter()
        .filter(|t| t.dims.len() == 2 && t.byte_len() >= DEFAULT_SIZE_THRESHOLD)
        .filter(|t| before.get(t.name.as_str()).and_then(|b| b.raw_bytes()) != t.raw_bytes())
        .filter(|t| !matches!(&t.data, TensorData::External { source, .. } if source.location == data_file))
        .map(|t| t.name.clone())
        .collect()
}

/// The data file holds each external tensor once, in bounds, without overlaps, with 4 KiB
/// alignment from 1 MiB on and nothing but alignment padding between tensors; tensors under the
/// threshold are inline.
fn check_layout(model_path: &Path) -> Result<(), String> {
    let model = onnx::load(model_path).map_err(|e| e.to_string())?;
    let data = model_path
        .with_file_name(format!("{}.data", model_path.file_name().unwrap().to_string_lossy()));
    let size = std::fs::metadata(&data).map_err(|e| format!("{}: {e}", data.display()))?.len();
    let mut regions = Vec::new();
    for t in &model.graph.initializers {
        let big = t.dtype != DataType::String && t.byte_len() >= DEFAULT_SIZE_THRESHOLD;
        match &t.data {
            TensorData::External { source, .. } if big => {
                regions.push((source.offset, source.length, t.name.clone()))
            }
            TensorData::External { .. } => return Err(format!("{} is small but external", t.name)),
            _ if big => return Err(format!("{} ({} bytes) is inline", t.name, t.byte_len())),
            _ => {}
        }
    }
    regions.sort();
    let mut end = 0;
    for (offset, length, name) in &regions {
        if *offset < end {
            return Err(format!(
                "{name} at {offset} overlaps the tensor before it (ends at {end})"
            ));
        }
        if *length >= 1 << 20 && offset % 4096 != 0 {
            return Err(format!("{name} ({length} bytes) at {offset}: not 4 KiB aligned"));
        }
        if offset - end >= 4096 {
            return Err(format!("{} unreferenced bytes before {name}", offset - end));
        }
        end = offset + length;
    }
    if end != size {
        return Err(format!("the data file has {size} bytes, its tensors end at {end}"));
    }
    Ok(())
}

#[test]
fn streamed_external_data_gives_the_logits_of_the_model_saved_at_the_end() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let original = onnx::load(&path).unwrap();
        let expected = logits_of(&original, path.parent().unwrap(), &reference);
        for (i, (orientation, dims)) in settings().into_iter().enumerate() {
            let dir = scratch();
            let (held, streamed) = (dir.path().join("held.onnx"), dir.path().join("streamed.onnx"));
            rotate_held(&path, &held, Storage::External, orientation, &dims);
            let (model, stream) =
                rotate_streamed(&path, &streamed, Storage::External, orientation, &dims);
            let mut wrong = rotated_matrices_are_streamed(&path, &model, "streamed.onnx.data");
            wrong.truncate(3);
            if !wrong.is_empty() {
                failures.push(format!("{arch}/{exporter} #{i}: held in memory: {wrong:?}"));
            }
            stream.save(&model).unwrap();
            if let Err(why) = check_layout(&streamed) {
                failures.push(format!("{arch}/{exporter} #{i}: data file: {why}"));
            }
            let logits = |p: &Path| {
                let mut session = open(p, &cpu());
                let inputs = reference.inputs_for(&session);
                run_logits(&mut session, &inputs)
            };
            let (got, before) = (logits(&streamed), logits(&held));
            let diff = max_abs_diff(&got, &before);
            if diff != 0.0 {
                failures.push(format!(
                    "{arch}/{exporter} #{i}: max |Δlogits| = {diff} against the held model"
                ));
            }
            let exact = max_abs_diff(&got, &expected);
            if orientation == Orientation::Identity && (exact.is_nan() || exact > 1e-4) {
                failures.push(format!(
                    "{arch}/{exporter} at ratio 0: max |Δlogits| = {exact} against the input"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_inline_output_is_byte_for_byte_the_one_saved_at_the_end() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        for (i, (orientation, dims)) in settings().into_iter().enumerate() {
            let dir = scratch();
            let (held, streamed) = (dir.path().join("held.onnx"), dir.path().join("streamed.onnx"));
            rotate_held(&path, &held, Storage::Auto, orientation, &dims);
            let (model, stream) =
                rotate_streamed(&path, &streamed, Storage::Auto, orientation, &dims);
            stream.save(&model).unwrap();
            if read(&held) != read(&streamed) {
                failures.push(format!("{arch}/{exporter} #{i}"));
            }
            let files: Vec<_> =
                std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
            if files.len() != 2 {
                failures.push(format!("{arch}/{exporter} #{i}: the folder holds {files:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "outputs that differ:\n{}", failures.join("\n"));
}

fn folder_is_empty(dir: &Path) -> Result<(), String> {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("left behind: {left:?}"))
    }
}

#[test]
fn a_stream_that_is_not_saved_leaves_nothing() {
    let path = fixture("llama/optimum/model.onnx");
    let dir = scratch();
    let (orientation, dims) = settings()[1];
    let (model, stream) =
        rotate_streamed(&path, &dir.path().join("out.onnx"), Storage::External, orientation, &dims);
    assert!(model.graph.initializers.iter().any(|t| t.is_external()), "nothing was streamed");
    drop(stream);
    folder_is_empty(dir.path()).unwrap();
}

#[test]
fn a_model_that_fails_its_type_check_after_streaming_writes_nothing() {
    let path = fixture("llama/optimum/model.onnx");
    let dir = scratch();
    let (orientation, dims) = settings()[1];
    let (mut model, stream) =
        rotate_streamed(&path, &dir.path().join("out.onnx"), Storage::External, orientation, &dims);
    let streamed = model.graph.initializers.iter_mut().find(|t| t.is_external()).unwrap();
    streamed.dtype = DataType::Double;
    let error = stream.save(&model).expect_err("an ill-typed model is refused");
    assert!(error.to_string().contains("type"), "{error}");
    folder_is_empty(dir.path()).unwrap();
}

#[test]
fn streamed_tensors_are_maps_of_the_output_data_file_not_memory() {
    let path = fixture("llama/optimum/model.onnx");
    let dir = scratch();
    let (orientation, dims) = settings()[1];
    let (model, _stream) =
        rotate_streamed(&path, &dir.path().join("out.onnx"), Storage::External, orientation, &dims);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut streamed = 0;
    for t in &model.graph.initializers {
        let TensorData::External { bytes, source } = &t.data else { continue };
        assert_eq!(source.location, "out.onnx.data");
        let address = bytes.as_ptr() as usize;
        let mapping = maps
            .lines()
            .find(|line| {
                let range = line.split_whitespace().next().unwrap_or("");
                let (start, end) = range.split_once('-').unwrap_or(("0", "0"));
                let (start, end) = (
                    usize::from_str_radix(start, 16).unwrap(),
                    usize::from_str_radix(end, 16).unwrap(),
                );
                (start..end).contains(&address)
            })
            .unwrap_or_else(|| panic!("{}: no mapping holds its bytes", t.name));
        // The data file is staged as .out.onnx.data.XXXX.part until the save renames it.
        assert!(mapping.contains(".out.onnx.data."), "{}: its bytes are in {mapping}", t.name);
        streamed += 1;
    }
    assert!(streamed > 0);
}
