//! ONNX Runtime, as onnx-slice uses it: load the library once, build sessions on the CPU or
//! CUDA execution provider, and run them with named [`TensorValue`]s.
//!
//! ```no_run
//! use onnx_slice::runtime::{init_runtime, Ep, ModelSession, SessionConfig, TensorValue};
//! # fn main() -> Result<(), onnx_slice::runtime::RuntimeError> {
//! init_runtime(None)?; // --ort-lib, else ORT_DYLIB_PATH, else the setup-ort.sh location
//! let config = SessionConfig { ep: Ep::Auto, ..SessionConfig::default() };
//! let mut session = ModelSession::from_file("model.onnx".as_ref(), &config)?;
//! if session.ep().fell_back() {
//!     eprintln!("{}", session.ep()); // "CUDA unavailable (reason), using CPU"
//! }
//! let ids = TensorValue::from(ndarray::arr2(&[[1i64, 2, 3]]));
//! let outputs = session.run(&[("input_ids", &ids)])?;
//! # Ok(()) }
//! ```
//!
//! No `ort` type appears in this module's API, so the rest of the crate does not depend on
//! `ort`'s release-candidate interface.

mod ep;
mod library;
pub mod npy;
mod session;
mod tensor;

pub use crate::error::{LibrarySource, RuntimeError, SessionStep};
pub use ep::{ActiveEp, Ep, EpChoice};
pub use library::{
    choose_library, default_library_path, init_runtime, loaded_library, loaded_version,
    locate_library, set_log_level, LibraryLocation, LibrarySearchEnv, LogLevel, SharedArena,
    ORT_VERSION,
};
pub use session::{
    save_optimized, BoundOutputs, Feed, ModelSession, Placement, RunOutputs, SessionConfig,
};
pub use tensor::{DeviceTensor, Dim, ElementType, TensorInfo, TensorValue};
