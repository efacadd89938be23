//! The ONNX file format: loading with memory maps and external data, saving. The only module that
//! converts between the protobuf types (`crate::protobuf`) and the IR; the rest of the crate sees
//! `crate::graph`.
mod codec;
mod load;
mod save;
mod value_info;

pub use load::{load, load_from_bytes};
pub use save::{
    check_destination, check_save_target, save, save_with_data_file, to_bytes, DataStream,
    SaveOptions, Saved, Storage, DEFAULT_SIZE_THRESHOLD, PROTOBUF_LIMIT,
};

use crate::protobuf::onnx as proto;
use crate::protobuf::Opaque;
