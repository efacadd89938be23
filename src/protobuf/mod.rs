//! The ONNX protobuf schema: prost types generated from `proto/onnx.proto` by
//! `scripts/gen-proto.sh`, checked in. It sits below both `graph` and `onnx`: the IR carries the
//! fields it does not model inside [`Opaque`] (so that an unchanged model is written back byte for
//! byte), and only `onnx`'s codec opens them.
#[allow(clippy::all, missing_docs, rustdoc::all)]
#[rustfmt::skip]
pub(crate) mod onnx;

/// The part of a protobuf message that the IR does not model, carried along unchanged. Only
/// `crate::onnx` reads or builds the value inside (tests/architecture.rs checks this).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Opaque<T>(pub(crate) T);
