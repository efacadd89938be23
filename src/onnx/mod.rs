//! The ONNX file format: protobuf types (generated, checked in), loading with memory maps and
//! external data, saving. Protobuf types do not leave this module; the rest of the crate sees
//! `crate::graph`.
mod codec;
mod load;
#[allow(clippy::all, missing_docs, rustdoc::all)]
#[rustfmt::skip]
pub(crate) mod proto;
mod save;
mod value_info;

pub use load::{load, load_from_bytes};
pub use save::{
    check_destination, check_save_target, save, to_bytes, DataStream, SaveOptions, Saved, Storage,
    DEFAULT_SIZE_THRESHOLD, PROTOBUF_LIMIT,
};

/// The part of a protobuf message that the IR does not model, carried along unchanged.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Opaque<T>(pub(in crate::onnx) T);
