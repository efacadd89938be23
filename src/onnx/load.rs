//! Reading a model file: memory-mapped, zero-copy, with external data resolved relative to it.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use memmap2::Mmap;
use prost::Message;

use super::codec::model_from_proto;
use super::proto;
use crate::error::{Error, Result};
use crate::graph::{ExternalSource, Model, Source};

/// Loads a model. Tensor bytes (inline or external) stay in read-only memory maps of the files.
pub fn load(path: impl AsRef<Path>) -> Result<Model> {
    let path = path.as_ref();
    let bytes = map_file(path)?;
    let proto = decode_model(path, bytes)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut data_files = DataFiles { model: path.to_path_buf(), dir, mapped: HashMap::new() };
    let mut model = model_from_proto(proto, &mut |name, source, expected| {
        data_files.slice(name, source, expected)
    })?;
    let mut external_files: Vec<PathBuf> =
        data_files.mapped.into_keys().map(|location| data_files.dir.join(location)).collect();
    external_files.sort();
    model.source = Some(Source { path: path.to_path_buf(), external_files });
    Ok(model)
}

/// Decodes a model from bytes in memory (no external data allowed).
pub fn load_from_bytes(bytes: Bytes) -> Result<Model> {
    let origin = PathBuf::from("<memory>");
    let proto = decode_model(&origin, bytes)?;
    model_from_proto(proto, &mut |name, source, _| {
        Err(Error::ExternalData {
            model: origin.clone(),
            tensor: name.into(),
            location: source.location.clone(),
            message: "a model decoded from memory cannot refer to external data".into(),
        })
    })
}

fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
    // A folder opens like a file on Unix; only the memory map would fail, with a bare OS error.
    if metadata.is_dir() {
        return Err(Error::NotOnnx {
            path: path.into(),
            message: "it is a folder; give the model's .onnx file".into(),
        });
    }
    let len = metadata.len();
    if len == 0 {
        return Err(Error::NotOnnx { path: path.into(), message: "the file is empty".into() });
    }
    // SAFETY: the map is read-only; the tool never writes to its inputs. A file changed by another
    // process while we run would be read inconsistently, which no file reader can prevent.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::from_owner(mmap))
}

fn decode_model(path: &Path, bytes: Bytes) -> Result<proto::ModelProto> {
    let not_onnx = |message: String| Error::NotOnnx { path: path.into(), message };
    let model = proto::ModelProto::decode(bytes).map_err(|e| {
        not_onnx(format!(
            "protobuf decoding failed ({e}); the file is truncated or not an ONNX model"
        ))
    })?;
    // Many byte strings decode as an empty protobuf message; a model always has these two.
    if model.ir_version.is_none() {
        return Err(not_onnx("no ir_version field".into()));
    }
    if model.graph.is_none() {
        return Err(not_onnx("no graph".into()));
    }
    Ok(model)
}

/// External data files of one model, each mapped once.
struct DataFiles {
    model: PathBuf,
    dir: PathBuf,
    mapped: HashMap<String, Bytes>,
}

impl DataFiles {
    fn slice(
        &mut self,
        tensor: &str,
        source: &ExternalSource,
        expected: Option<u64>,
    ) -> Result<Bytes> {
        let fail = |message: String| Error::ExternalData {
            model: self.model.clone(),
            tensor: tensor.into(),
            location: source.location.clone(),
            message,
        };
        check_location(&source.location).map_err(|m| fail(m.into()))?;
        let file = match self.mapped.get(&source.location) {
            Some(file) => file.clone(),
            None => {
                let path = self.dir.join(&source.location);
                let file = map_data_file(&path)
                    .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
                self.mapped.insert(source.location.clone(), file.clone());
                file
            }
        };
        let length = match (source.length, expected) {
            (u64::MAX, Some(expected)) => expected,
            (u64::MAX, None) => file.len() as u64 - source.offset.min(file.len() as u64),
            (length, Some(expected)) if length != expected => {
                return Err(fail(format!(
                    "length {length} does not match the tensor's size, {expected} bytes"
                )))
            }
            (length, _) => length,
        };
        let end =
            source.offset.checked_add(length).filter(|&end| end <= file.len() as u64).ok_or_else(
                || {
                    fail(format!(
                        "offset {} + length {length} is past the end of the file ({} bytes)",
                        source.offset,
                        file.len()
                    ))
                },
            )?;
        Ok(file.slice(source.offset as usize..end as usize))
    }
}

/// External data must stay beside the model (as the ONNX checker requires): no absolute paths and
/// no way out through "..".
fn check_location(location: &str) -> std::result::Result<(), &'static str> {
    let path = Path::new(location);
    if location.is_empty() {
        return Err("the location is empty");
    }
    if path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err("the location must be a relative path inside the model's folder");
    }
    Ok(())
}

fn map_data_file(path: &Path) -> std::io::Result<Bytes> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: as in `map_file`.
    let mmap = unsafe { Mmap::map(&file) }?;
    Ok(Bytes::from_owner(mmap))
}
