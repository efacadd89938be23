//! Writing a model: inline or with external data, always atomically (temporary files, then
//! renames), never over the files the model was read from. The external data file can be written
//! while the model is still being rewritten ([`DataStream`]).
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use memmap2::MmapOptions;
use prost::Message;

use super::codec::model_to_proto;
use crate::error::{Error, Result};
use crate::files::{parent_folder, Staged};
use crate::graph::{check_types, DataType, ExternalSource, Model, Tensor, TensorData, TensorSink};

/// Protobuf cannot encode (and ONNX Runtime refuses to parse) a message of 2 GiB or more.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// Tensors smaller than this stay inline when writing external data (as onnx's own converter does).
pub const DEFAULT_SIZE_THRESHOLD: u64 = 1024;

/// Large tensors start at page-aligned offsets so that runtimes can map them directly.
const ALIGN_LARGE_AT: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Inline, unless the model would exceed protobuf's 2 GiB limit; then external data.
    Auto,
    Inline,
    External,
}

#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    pub storage: Storage,
    /// With external data, tensors of fewer bytes stay inline.
    pub size_threshold: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { storage: Storage::Auto, size_threshold: DEFAULT_SIZE_THRESHOLD }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Saved {
    pub path: PathBuf,
    pub model_bytes: u64,
    /// The external data file and its size, when one was written.
    pub data_file: Option<(PathBuf, u64)>,
}

/// Encodes a model with all data inline, for an in-memory ONNX Runtime session.
pub fn to_bytes(model: &Model) -> Result<Vec<u8>> {
    let proto = model_to_proto(model, &mut |_| Ok(None))?;
    let len = proto.encoded_len() as u64;
    if len > PROTOBUF_LIMIT {
        return Err(too_large(Path::new("<memory>"), len));
    }
    Ok(proto.encode_to_vec())
}

/// Writes `model` to `path`, after checking that its graph type-checks ([`check_types`]): an
/// invalid model is never written.
pub fn save(model: &Model, path: impl AsRef<Path>, options: &SaveOptions) -> Result<Saved> {
    let path = path.as_ref();
    save_with_data_file(model, path, &data_file_for(path)?, options)
}

/// As [`save`], with external data (when written) in `data_path` instead of `OUT.data`: the name
/// a client's loader expects (optimum's is `model.onnx_data`). `data_path` must be beside `path`.
pub fn save_with_data_file(
    model: &Model,
    path: &Path,
    data_path: &Path,
    options: &SaveOptions,
) -> Result<Saved> {
    DataStream::with_data_file(model, path, data_path, options)?.save(model)
}

/// The output of a model being rewritten, opened before the rewrite (docs/design.md §8). As a
/// [`TensorSink`] it writes each finished tensor to the output's external data file at once (a
/// temporary file until [`DataStream::save`]) and makes the tensor's bytes a read-only map of
/// what it wrote, so that the rewritten model is never held in memory. It streams when the
/// output will have external data: `Storage::External`, or `Storage::Auto` for an input over
/// protobuf's limit. `save` then appends the tensors that were not streamed and writes the
/// model; if the model turns out to fit inline (`Auto`), it is written inline, byte for byte as
/// [`save`] writes it, and the data file is dropped. Dropped without `save`, it leaves nothing.
pub struct DataStream {
    path: PathBuf,
    data_path: PathBuf,
    options: SaveOptions,
    streams: bool,
    data: Option<TempOutput>,
    /// Tensors in the data file: name → (offset, length, address of the bytes handed out).
    written: HashMap<String, (u64, u64, usize)>,
}

impl DataStream {
    /// Checks the destination as [`save`] does ([`check_save_target`]); creates no file yet.
    pub fn new(model: &Model, path: &Path, options: &SaveOptions) -> Result<Self> {
        Self::with_data_file(model, path, &data_file_for(path)?, options)
    }

    /// As [`DataStream::new`], with the external data in `data_path` (see [`save_with_data_file`]).
    pub fn with_data_file(
        model: &Model,
        path: &Path,
        data_path: &Path,
        options: &SaveOptions,
    ) -> Result<Self> {
        check_destination(path)?;
        if parent_folder(data_path) != parent_folder(path) {
            return Err(Error::Save {
                output: data_path.into(),
                message: format!(
                    "external data must be beside the model, in {}",
                    parent_folder(path).display()
                ),
            });
        }
        refuse_overwriting_sources(model, path, data_path)?;
        let streams = goes_to_external_data(model, options.storage)?;
        Ok(DataStream {
            path: path.to_path_buf(),
            data_path: data_path.to_path_buf(),
            options: *options,
            streams,
            data: None,
            written: HashMap::new(),
        })
    }

    /// Whether finished tensors go to the data file now (else they stay where they are).
    pub fn streams(&self) -> bool {
        self.streams
    }

    /// Writes the model as [`save`] does, reusing what was streamed.
    pub fn save(mut self, model: &Model) -> Result<Saved> {
        let path = self.path.clone();
        check_types(&model.graph)
            .map_err(|source| Error::IllTyped { output: path.clone(), source })?;
        let external = goes_to_external_data(model, self.options.storage)?;
        if external {
            self.save_external(model)
        } else {
            save_inline(model, &path)
        }
    }

    fn save_external(&mut self, model: &Model) -> Result<Saved> {
        let mut place = |t: &Tensor| -> Result<Option<Vec<(String, String)>>> {
            if !goes_external(t, self.options.size_threshold) {
                return Ok(None);
            }
            if let Some(source) = self.source_of(t) {
                return Ok(Some(source.entries.clone()));
            }
            let bytes = t.to_raw_bytes()?;
            let (offset, length) = self.append(&bytes)?;
            Ok(Some(self.entries(offset, length)?))
        };
        let proto = model_to_proto(model, &mut place)?;
        let len = proto.encoded_len() as u64;
        if len > PROTOBUF_LIMIT {
            return Err(too_large(&self.path, len));
        }
        let mut out = TempOutput::new(&self.path)?;
        out.write_message(&proto)?;
        let data_file = match self.data.take() {
            Some(data) if data.written > 0 => {
                let data_len = data.written;
                data.persist()?;
                Some((self.data_path.clone(), data_len))
            }
            _ => None,
        };
        out.persist()?;
        Ok(Saved { path: self.path.clone(), model_bytes: len, data_file })
    }

    /// The tensor's place in this stream's data file, if its bytes are the ones written there.
    fn source_of<'t>(&self, t: &'t Tensor) -> Option<&'t ExternalSource> {
        let TensorData::External { bytes, source } = &t.data else { return None };
        let &(offset, length, address) = self.written.get(&t.name)?;
        let same = offset == source.offset
            && length == bytes.len() as u64
            && address == bytes.as_ptr() as usize;
        same.then_some(source)
    }

    /// Writes `bytes` at the next offset the layout allows; returns (offset, length).
    fn append(&mut self, bytes: &[u8]) -> Result<(u64, u64)> {
        let data = match &mut self.data {
            Some(data) => data,
            None => self.data.insert(TempOutput::new(&self.data_path)?),
        };
        let offset = data.pad_to(alignment(bytes.len() as u64))?;
        data.write_all(bytes)?;
        Ok((offset, bytes.len() as u64))
    }

    fn entries(&self, offset: u64, length: u64) -> Result<Vec<(String, String)>> {
        Ok(vec![
            ("location".into(), file_name(&self.data_path)?),
            ("offset".into(), offset.to_string()),
            ("length".into(), length.to_string()),
        ])
    }

    /// A read-only map of bytes this stream wrote.
    fn map(&mut self, offset: u64, length: u64) -> Result<Bytes> {
        let data = self.data.as_mut().expect("append created the data file");
        let target = data.staged.target().to_path_buf();
        let file = data.staged.flushed_file().map_err(|e| Error::io(&target, e))?;
        // SAFETY: the temporary file is this process's own; the region is written and is never
        // written again (the stream only appends), and the map is read-only.
        let map = unsafe { MmapOptions::new().offset(offset).len(length as usize).map(file) }
            .map_err(|e| Error::io(&target, e))?;
        Ok(Bytes::from_owner(map))
    }
}

impl TensorSink for DataStream {
    fn finished(&mut self, tensor: &mut Tensor) -> Result<()> {
        if !self.streams
            || !goes_external(tensor, self.options.size_threshold)
            || self.source_of(tensor).is_some()
        {
            return Ok(());
        }
        let bytes = tensor.to_raw_bytes()?;
        let (offset, length) = self.append(&bytes)?;
        drop(bytes);
        let mapped = self.map(offset, length)?;
        self.written.insert(tensor.name.clone(), (offset, length, mapped.as_ptr() as usize));
        let entries = self.entries(offset, length)?;
        let location = file_name(&self.data_path)?;
        tensor.data = TensorData::External {
            bytes: mapped,
            source: ExternalSource { entries, location, offset, length },
        };
        Ok(())
    }

    fn stores_bytes(&self) -> bool {
        self.streams
    }
}

/// Whether `model` is written with external data: as asked, or for `Auto` when it would not fit
/// protobuf's limit inline.
fn goes_to_external_data(model: &Model, storage: Storage) -> Result<bool> {
    Ok(match storage {
        Storage::Inline => false,
        Storage::External => true,
        Storage::Auto => inline_size(model)? > PROTOBUF_LIMIT,
    })
}

fn inline_size(model: &Model) -> Result<u64> {
    // Cheap: tensor bytes are reference-counted slices, not copies.
    Ok(model_to_proto(model, &mut |_| Ok(None))?.encoded_len() as u64)
}

fn save_inline(model: &Model, path: &Path) -> Result<Saved> {
    let proto = model_to_proto(model, &mut |_| Ok(None))?;
    let len = proto.encoded_len() as u64;
    if len > PROTOBUF_LIMIT {
        return Err(too_large(path, len));
    }
    let mut out = TempOutput::new(path)?;
    out.write_message(&proto)?;
    out.persist()?;
    Ok(Saved { path: path.into(), model_bytes: len, data_file: None })
}

fn goes_external(t: &Tensor, threshold: u64) -> bool {
    t.dtype != DataType::String && t.dtype.byte_size().is_some() && t.byte_len() >= threshold.max(1)
}

fn alignment(len: u64) -> u64 {
    if len >= ALIGN_LARGE_AT {
        PAGE
    } else {
        1
    }
}

/// `model.onnx` → `model.onnx.data`, beside it.
fn data_file_for(path: &Path) -> Result<PathBuf> {
    let name = file_name(path)?;
    Ok(path.with_file_name(format!("{name}.data")))
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_string).ok_or_else(|| Error::Save {
        output: path.into(),
        message: "the path has no file name".into(),
    })
}

fn too_large(path: &Path, len: u64) -> Error {
    Error::Save {
        output: path.into(),
        message: format!("the model is {len} bytes inline, over protobuf's 2 GiB limit; write it with external data"),
    }
}

/// Everything [`save`] would refuse about `path` for this model, found before the model is
/// computed (a slicing run checks this before calibrating). Returns the external data file's path
/// (`OUT.data`), written only with external data.
pub fn check_save_target(model: &Model, path: &Path) -> Result<PathBuf> {
    check_destination(path)?;
    let data_path = data_file_for(path)?;
    refuse_overwriting_sources(model, path, &data_path)?;
    Ok(data_path)
}

/// `path` can receive a new file: it has a file name, is not a folder, and its folder exists.
/// (Any file: models, reports, rotations.)
pub fn check_destination(path: &Path) -> Result<()> {
    let refuse = |message: String| Err(Error::Save { output: path.into(), message });
    if path.as_os_str().is_empty() {
        return refuse("the path is empty".into());
    }
    if path.is_dir() {
        return refuse("it is a folder; give a file name inside it".into());
    }
    file_name(path)?;
    let folder = parent_folder(path);
    if !folder.exists() {
        return refuse(format!("its folder {} does not exist", folder.display()));
    }
    if !folder.is_dir() {
        return refuse(format!("{} is not a folder", folder.display()));
    }
    Ok(())
}

/// The output must not be (or write a data file over) any file the model was read from.
fn refuse_overwriting_sources(model: &Model, path: &Path, data_path: &Path) -> Result<()> {
    let Some(source) = &model.source else { return Ok(()) };
    let inputs = std::iter::once(&source.path).chain(&source.external_files);
    for input in inputs {
        for output in [path, data_path] {
            if same_file(input, output) {
                return Err(Error::Save {
                    output: output.into(),
                    message: format!(
                        "it is the input file {} (write to another path)",
                        input.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => ma.dev() == mb.dev() && ma.ino() == mb.ino(),
        _ => false,
    }
}

/// A staged output file that counts what it has written (for external data offsets).
struct TempOutput {
    staged: Staged,
    written: u64,
}

impl TempOutput {
    fn new(target: &Path) -> Result<Self> {
        Ok(TempOutput { staged: Staged::new(target)?, written: 0 })
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.staged.write_all(bytes).map_err(|e| Error::io(self.staged.target(), e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Encodes a message straight into the file: no second in-memory copy of a large model.
    fn write_message(&mut self, message: &impl Message) -> Result<()> {
        let mut sink =
            MessageSink { out: self, staged: Vec::with_capacity(SINK_STAGING), error: None };
        message.encode_raw(&mut sink);
        sink.flush();
        match sink.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Pads with zeros to a multiple of `align`; returns the new position.
    fn pad_to(&mut self, align: u64) -> Result<u64> {
        let pad = (align - self.written % align) % align;
        self.write_all(&vec![0u8; pad as usize])?;
        Ok(self.written)
    }

    fn persist(self) -> Result<()> {
        self.staged.commit()
    }
}

const SINK_STAGING: usize = 64 * 1024;

/// A `BufMut` over a `TempOutput`: small protobuf fields are staged, tensor bytes are written
/// through directly. Write errors are kept and reported once encoding is over (BufMut cannot fail).
struct MessageSink<'a> {
    out: &'a mut TempOutput,
    staged: Vec<u8>,
    error: Option<Error>,
}

impl MessageSink<'_> {
    fn flush(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        self.write_through(&staged);
        self.staged = staged;
        self.staged.clear();
    }

    fn write_through(&mut self, bytes: &[u8]) {
        if self.error.is_none() && !bytes.is_empty() {
            if let Err(e) = self.out.write_all(bytes) {
                self.error = Some(e);
            }
        }
    }
}

// SAFETY: `chunk_mut` hands out the staging vector's spare capacity (never empty: it is flushed
// when full) and `advance_mut` only extends the length over bytes the caller initialised there.
unsafe impl bytes::BufMut for MessageSink<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.staged.len() + cnt;
        // SAFETY: the caller initialised `cnt` bytes of the spare capacity returned by chunk_mut.
        unsafe { self.staged.set_len(len) };
        if self.staged.len() == self.staged.capacity() {
            self.flush();
        }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.staged.len() == self.staged.capacity() {
            self.flush();
        }
        bytes::buf::UninitSlice::uninit(self.staged.spare_capacity_mut())
    }

    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            self.put_slice(chunk);
            src.advance(n);
        }
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() < SINK_STAGING {
            if self.staged.len() + src.len() > self.staged.capacity() {
                self.flush();
            }
            self.staged.extend_from_slice(src);
            return;
        }
        self.flush();
        self.write_through(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{DataType, KeepInGraph, Tensor, TensorSink};

    fn fixture(arch: &str) -> Model {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        super::super::load(dir.join(arch).join("optimum/model.onnx")).unwrap()
    }

    /// A rewrite that streams: every float matrix doubled, each handed to `sink` when made.
    fn double_matrices(model: &mut Model, sink: &mut dyn TensorSink) {
        let names: Vec<String> = model
            .graph
            .initializers
            .iter()
            .filter(|t| t.dtype == DataType::Float && t.dims.len() == 2)
            .map(|t| t.name.clone())
            .collect();
        for name in names {
            let t = model.graph.initializer(&name).unwrap();
            let values: Vec<f32> = t.to_f32().unwrap().iter().map(|v| v * 2.0).collect();
            let mut doubled = Tensor::from_f32(name, t.dims.clone(), &values);
            sink.finished(&mut doubled).unwrap();
            model.graph.set_initializer(doubled);
        }
    }

    /// `Storage::Auto` streams for inputs over protobuf's limit; when the output fits inline after
    /// all, it is written inline from the streamed maps, byte for byte as without a stream, and
    /// the streamed data file is dropped.
    #[test]
    fn a_streamed_model_that_fits_inline_is_written_as_save_writes_it() {
        for arch in ["llama", "gpt2", "phi"] {
            let dir = tempfile::tempdir().unwrap();
            let mut held = fixture(arch);
            double_matrices(&mut held, &mut KeepInGraph);
            let expected = dir.path().join("held.onnx");
            save(&held, &expected, &SaveOptions::default()).unwrap();

            let mut model = fixture(arch);
            let path = dir.path().join("streamed.onnx");
            let mut stream = DataStream::new(&model, &path, &SaveOptions::default()).unwrap();
            assert!(!stream.streams(), "a small input is not streamed");
            stream.streams = true; // as for an input over the limit
            double_matrices(&mut model, &mut stream);
            assert!(
                stream.data.as_ref().is_some_and(|d| d.written > 0),
                "{arch}: nothing streamed"
            );
            let saved = stream.save(&model).unwrap();
            assert!(saved.data_file.is_none());
            assert_eq!(std::fs::read(&expected).unwrap(), std::fs::read(&path).unwrap(), "{arch}");
            let files = std::fs::read_dir(dir.path()).unwrap().count();
            assert_eq!(files, 2, "{arch}: the streamed data file was left behind");
        }
    }
}
