//! ONNX Runtime sessions over a model file or model bytes, run with named tensors.
//!
//! External data: ONNX Runtime reads `model.onnx.data`-style files relative to the model's
//! directory. A session built from a file knows that directory; one built from bytes does not
//! (ONNX Runtime then looks relative to the current directory), so [`ModelSession::from_bytes`]
//! takes the directory and passes it on through the session option
//! `session.model_external_initializers_file_folder_path`.

use std::borrow::Cow;
use std::ffi::CString;
use std::path::Path;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{
    HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue, SessionOutputs,
};
use ort::AsPointer;

use super::ep::{cuda_provider, ActiveEp, Ep, EpChoice};
use super::library::environment;
use super::tensor::{
    output_tensor, owned_input, session_input, tensor_info, DeviceTensor, OutputError, TensorInfo,
    TensorValue,
};
use crate::error::{RuntimeError, SessionStep};

/// How to build a session.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    pub ep: Ep,
    /// Threads used inside one operator; `None` keeps ONNX Runtime's default (one per core).
    pub intra_threads: Option<usize>,
    /// CPU memory comes from the environment's shared arena while a [`super::SharedArena`] is
    /// held (otherwise from the session's own).
    pub shared_arena: bool,
}

/// A loaded model, ready to run.
pub struct ModelSession {
    session: Session,
    label: String,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    ep: EpChoice,
}

/// Where the model comes from.
#[derive(Clone, Copy)]
enum ModelSource<'a> {
    File(&'a Path),
    Bytes { bytes: &'a [u8], external_data_dir: Option<&'a Path> },
}

/// The outputs of one run, by name, in the order they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutputs {
    entries: Vec<(String, TensorValue)>,
}

impl RunOutputs {
    pub fn get(&self, name: &str) -> Option<&TensorValue> {
        self.entries.iter().find(|(entry, _)| entry == name).map(|(_, value)| value)
    }

    /// Takes one output out by name.
    pub fn remove(&mut self, name: &str) -> Option<TensorValue> {
        let index = self.entries.iter().position(|(entry, _)| entry == name)?;
        Some(self.entries.remove(index).1)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(name, _)| name.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorValue)> {
        self.entries.iter().map(|(name, value)| (name.as_str(), value))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn into_vec(self) -> Vec<(String, TensorValue)> {
        self.entries
    }
}

/// An input of [`ModelSession::run_bound`]: a host tensor, or one an earlier run kept where it ran.
#[derive(Clone, Copy)]
pub enum Feed<'a> {
    Host(&'a TensorValue),
    Kept(&'a DeviceTensor),
}

/// Where [`ModelSession::run_bound`] leaves an output.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// Copied to the host, as a [`TensorValue`].
    Host,
    /// Kept where the session ran (the GPU's memory under CUDA), as a [`DeviceTensor`].
    Device,
    /// Kept in host memory as a [`DeviceTensor`], for the host to read without another copy.
    HostKept,
}

/// What [`ModelSession::run_bound`] returns: the host outputs by name, the kept ones in order.
pub struct BoundOutputs {
    pub host: RunOutputs,
    pub kept: Vec<DeviceTensor>,
}

impl ModelSession {
    /// Loads a model file; its external data, if any, is read from the file's directory.
    pub fn from_file(path: &Path, config: &SessionConfig) -> Result<Self, RuntimeError> {
        Self::build(ModelSource::File(path), path.display().to_string(), config)
    }

    /// Loads a model from bytes. `external_data_dir` is where its external data files are
    /// (normally the directory of the `.onnx` file the bytes came from); without it ONNX Runtime
    /// looks in the current directory.
    pub fn from_bytes(
        bytes: &[u8],
        external_data_dir: Option<&Path>,
        config: &SessionConfig,
    ) -> Result<Self, RuntimeError> {
        let label = match external_data_dir {
            Some(dir) => format!("in-memory model (external data in {})", dir.display()),
            None => "in-memory model".to_string(),
        };
        Self::build(ModelSource::Bytes { bytes, external_data_dir }, label, config)
    }

    /// What the session was built for: a file path or "in-memory model".
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// The execution provider in use, and why CUDA was skipped when `auto` fell back.
    pub fn ep(&self) -> &EpChoice {
        &self.ep
    }

    /// Runs the model and returns all of its outputs, in the model's order.
    pub fn run(&mut self, inputs: &[(&str, &TensorValue)]) -> Result<RunOutputs, RuntimeError> {
        let all: Vec<String> = self.outputs.iter().map(|output| output.name.clone()).collect();
        self.run_outputs(inputs, &all)
    }

    /// Runs the model and returns the named outputs, in the order given.
    pub fn run_for(
        &mut self,
        inputs: &[(&str, &TensorValue)],
        outputs: &[&str],
    ) -> Result<RunOutputs, RuntimeError> {
        let wanted: Vec<String> = outputs.iter().map(ToString::to_string).collect();
        self.run_outputs(inputs, &wanted)
    }

    fn run_outputs(
        &mut self,
        inputs: &[(&str, &TensorValue)],
        wanted: &[String],
    ) -> Result<RunOutputs, RuntimeError> {
        self.check_input_names(inputs.iter().map(|&(name, _)| name))?;
        self.check_output_names(wanted)?;
        let values = self.session_inputs(inputs)?;
        let options = self.run_options(wanted)?;
        let label = &self.label;
        let outputs = self
            .session
            .run_with_options(values, &options)
            .map_err(|error| run_error(label, inputs, &error))?;
        wanted
            .iter()
            .map(|name| output_by_name(label, &outputs, name).map(|tensor| (name.clone(), tensor)))
            .collect::<Result<_, _>>()
            .map(|entries| RunOutputs { entries })
    }

    /// Runs the model through an I/O binding: inputs may be tensors an earlier run kept on the
    /// device, and each wanted output is copied to the host or kept where `placement` says, so a
    /// chain of runs passes its tensors along without a host round trip. A kept tensor holds the
    /// allocator it came from (with a session's own arena, the whole arena: share one, see
    /// [`super::SharedArena`]).
    pub fn run_bound(
        &mut self,
        inputs: &[(&str, Feed<'_>)],
        outputs: &[(&str, Placement)],
    ) -> Result<BoundOutputs, RuntimeError> {
        self.check_input_names(inputs.iter().map(|&(name, _)| name))?;
        let wanted: Vec<String> = outputs.iter().map(|(name, _)| name.to_string()).collect();
        self.check_output_names(&wanted)?;
        let bind_error =
            |error: ort::Error| self.error(SessionStep::PrepareInputs, error.to_string());
        let mut binding = self.session.create_binding().map_err(bind_error)?;
        for &(name, feed) in inputs {
            match feed {
                Feed::Host(value) => {
                    let owned = owned_input(value).map_err(bind_error)?;
                    binding.bind_input(name, &owned)
                }
                Feed::Kept(tensor) => binding.bind_input(name, &tensor.value),
            }
            .map_err(bind_error)?;
        }
        let host = host_memory().map_err(bind_error)?;
        let device = match self.ep.active {
            ActiveEp::Cpu => host.clone(),
            ActiveEp::Cuda => MemoryInfo::new(
                AllocationDevice::CUDA,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )
            .map_err(bind_error)?,
        };
        for &(name, placement) in outputs {
            let memory = if placement == Placement::Device { &device } else { &host };
            binding.bind_output_to_device(name, memory).map_err(bind_error)?;
        }
        let label = &self.label;
        let mut values = self
            .session
            .run_binding(&binding)
            .map_err(|error| session_error(label, SessionStep::Run, error.to_string()))?;
        let mut result =
            BoundOutputs { host: RunOutputs { entries: Vec::new() }, kept: Vec::new() };
        for &(name, placement) in outputs {
            let value = values.remove(name).ok_or_else(|| {
                session_error(
                    label,
                    SessionStep::ReadOutputs,
                    format!("ONNX Runtime returned no `{name}`"),
                )
            })?;
            if placement == Placement::Host {
                let tensor = owned_output(label, &value, name)?;
                result.host.entries.push((name.to_string(), tensor));
            } else {
                result.kept.push(DeviceTensor { value });
            }
        }
        Ok(result)
    }

    fn check_input_names<'n>(
        &self,
        mut names: impl Iterator<Item = &'n str>,
    ) -> Result<(), RuntimeError> {
        let known = |name: &str| self.inputs.iter().any(|input| input.name == name);
        match names.find(|name| !known(name)) {
            Some(name) => Err(RuntimeError::UnknownInput {
                model: self.label.clone(),
                name: name.to_string(),
                expected: self.inputs.iter().map(|input| input.name.clone()).collect(),
            }),
            None => Ok(()),
        }
    }

    fn check_output_names(&self, wanted: &[String]) -> Result<(), RuntimeError> {
        let known = |name: &str| self.outputs.iter().any(|output| output.name == name);
        match wanted.iter().find(|name| !known(name)) {
            Some(name) => Err(RuntimeError::UnknownOutput {
                model: self.label.clone(),
                name: name.clone(),
                available: self.outputs.iter().map(|output| output.name.clone()).collect(),
            }),
            None => Ok(()),
        }
    }

    fn session_inputs<'v>(
        &self,
        inputs: &[(&'v str, &'v TensorValue)],
    ) -> Result<Vec<(Cow<'v, str>, SessionInputValue<'v>)>, RuntimeError> {
        inputs
            .iter()
            .map(|&(name, value)| {
                session_input(value).map(|input| (Cow::Borrowed(name), input)).map_err(|error| {
                    self.error(
                        SessionStep::PrepareInputs,
                        format!("input `{name}` ({}): {error}", value.describe()),
                    )
                })
            })
            .collect()
    }

    fn run_options(
        &self,
        wanted: &[String],
    ) -> Result<RunOptions<HasSelectedOutputs>, RuntimeError> {
        let selector = wanted
            .iter()
            .fold(OutputSelector::no_default(), |selector, name| selector.with(name.as_str()));
        RunOptions::new()
            .map(|options| options.with_outputs(selector))
            .map_err(|error| self.error(SessionStep::Run, error.to_string()))
    }

    fn error(&self, step: SessionStep, reason: String) -> RuntimeError {
        session_error(&self.label, step, reason)
    }

    fn build(
        source: ModelSource<'_>,
        label: String,
        config: &SessionConfig,
    ) -> Result<Self, RuntimeError> {
        let (session, ep) = match config.ep {
            Ep::Cpu => (commit(source, &label, config, false)?, EpChoice::cpu()),
            Ep::Cuda => (commit(source, &label, config, true)?, EpChoice::cuda()),
            Ep::Auto => commit_preferring_cuda(source, &label, config)?,
        };
        let inputs =
            session.inputs().iter().map(|input| tensor_info(input.name(), input.dtype())).collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|output| tensor_info(output.name(), output.dtype()))
            .collect();
        Ok(Self { session, label, inputs, outputs, ep })
    }
}

/// Writes to `out` the graph ONNX Runtime's CPU provider runs for the model at `model`: after its
/// optimizer's fusions (level 2, "extended": fused norms, attention, GELU and MatMul variants; the
/// level-3 layout changes are left out, they only concern convolutions). What a rewrite does to
/// those fusions is seen by comparing the operators of two such files.
pub fn save_optimized(model: &Path, out: &Path) -> Result<(), RuntimeError> {
    let label = model.display().to_string();
    let configure_error = |error: ort::Error<SessionBuilder>| {
        session_error(&label, SessionStep::Configure, error.to_string())
    };
    let mut builder = Session::builder(&environment()?)
        .map_err(|error| session_error(&label, SessionStep::Configure, error.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level2)
        .map_err(configure_error)?
        .with_optimized_model_path(out)
        .map_err(configure_error)?;
    builder
        .commit_from_file(model)
        .map(drop)
        .map_err(|error| session_error(&label, SessionStep::Load, error.to_string()))
}

/// Builds on CUDA when that works; otherwise on the CPU, keeping CUDA's error as the reason.
///
/// Any CUDA failure falls back, including ones at model load (a missing GPU shows up only
/// there). A model that is itself broken fails on the CPU too, and that error is returned.
fn commit_preferring_cuda(
    source: ModelSource<'_>,
    label: &str,
    config: &SessionConfig,
) -> Result<(Session, EpChoice), RuntimeError> {
    match commit(source, label, config, true) {
        Ok(session) => Ok((session, EpChoice::cuda())),
        Err(cuda_error) => {
            let session = commit(source, label, config, false)?;
            Ok((session, EpChoice::cpu_because(cuda_failure_reason(cuda_error))))
        }
    }
}

fn cuda_failure_reason(error: RuntimeError) -> String {
    match error {
        RuntimeError::CudaUnavailable { reason } => reason,
        other => sentence_fragment(&other.to_string()),
    }
}

fn commit(
    source: ModelSource<'_>,
    label: &str,
    config: &SessionConfig,
    use_cuda: bool,
) -> Result<Session, RuntimeError> {
    let mut builder = configured_builder(source, label, config, use_cuda)?;
    let committed = match source {
        ModelSource::File(path) => builder.commit_from_file(path),
        ModelSource::Bytes { bytes, .. } => builder.commit_from_memory(bytes),
    };
    committed.map_err(|error| session_error(label, SessionStep::Load, error.to_string()))
}

fn configured_builder(
    source: ModelSource<'_>,
    label: &str,
    config: &SessionConfig,
    use_cuda: bool,
) -> Result<SessionBuilder, RuntimeError> {
    let configure_error = |error: ort::Error<SessionBuilder>| {
        session_error(label, SessionStep::Configure, error.to_string())
    };
    let mut builder = Session::builder(&environment()?)
        .map_err(|error| session_error(label, SessionStep::Configure, error.to_string()))?;
    if let Some(threads) = config.intra_threads {
        builder = builder.with_intra_threads(threads).map_err(configure_error)?;
    }
    if let ModelSource::Bytes { external_data_dir: Some(dir), .. } = source {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        set_external_data_dir(&mut builder, &dir)
            .map_err(|reason| session_error(label, SessionStep::Configure, reason))?;
    }
    // Between runs onnx-slice computes on the same cores (covariances, projections); ONNX
    // Runtime's workers would otherwise spin there and take them (SmolLM2 calibration: PCA
    // 13.0 s → 9.4 s on 2 cores).
    set_config_entry(&mut builder, SPINNING_STOP_KEY, c"1")
        .map_err(|reason| session_error(label, SessionStep::Configure, reason))?;
    if config.shared_arena {
        set_config_entry(&mut builder, c"session.use_env_allocators", c"1")
            .map_err(|reason| session_error(label, SessionStep::Configure, reason))?;
    }
    if use_cuda {
        builder = builder.with_execution_providers([cuda_provider()?]).map_err(|error| {
            RuntimeError::CudaUnavailable { reason: sentence_fragment(&error.to_string()) }
        })?;
    }
    Ok(builder)
}

const EXTERNAL_DATA_DIR_KEY: &std::ffi::CStr =
    c"session.model_external_initializers_file_folder_path";
const SPINNING_STOP_KEY: &std::ffi::CStr = c"session.force_spinning_stop";

fn set_external_data_dir(builder: &mut SessionBuilder, dir: &Path) -> Result<(), String> {
    let dir_text = dir.to_str().ok_or_else(|| {
        format!("the external data directory {} is not valid UTF-8", dir.display())
    })?;
    let value = CString::new(dir_text).map_err(|_| {
        format!("the external data directory {} contains a NUL byte", dir.display())
    })?;
    set_config_entry(builder, EXTERNAL_DATA_DIR_KEY, &value)
}

// `ort` keeps its generic config-entry setter private, so entries go through the C API.
fn set_config_entry(
    builder: &mut SessionBuilder,
    key: &std::ffi::CStr,
    value: &std::ffi::CStr,
) -> Result<(), String> {
    // SAFETY: the builder owns live session options; both strings are NUL-terminated and live
    // across the call, and ONNX Runtime copies them.
    let status = unsafe {
        (ort::api().AddSessionConfigEntry)(builder.ptr_mut(), key.as_ptr(), value.as_ptr())
    };
    // SAFETY: `status` was just returned by an ONNX Runtime API call.
    unsafe { ort::Error::result_from_status(status) }.map_err(|error| error.to_string())
}

fn host_memory() -> ort::Result<MemoryInfo<'static>> {
    MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
}

fn output_by_name(
    label: &str,
    outputs: &SessionOutputs<'_>,
    name: &str,
) -> Result<TensorValue, RuntimeError> {
    let value = outputs.get(name).ok_or_else(|| {
        session_error(label, SessionStep::ReadOutputs, format!("ONNX Runtime returned no `{name}`"))
    })?;
    owned_output(label, value, name)
}

fn owned_output(
    label: &str,
    value: &ort::value::DynValue,
    name: &str,
) -> Result<TensorValue, RuntimeError> {
    output_tensor(value).map_err(|error| match error {
        OutputError::Unsupported(element_type) => RuntimeError::UnsupportedOutputType {
            model: label.to_string(),
            output: name.to_string(),
            element_type,
        },
        OutputError::Ort(reason) => {
            session_error(label, SessionStep::ReadOutputs, format!("output `{name}`: {reason}"))
        }
    })
}

// ONNX Runtime's messages end in a full stop; ours embed them mid-sentence.
fn sentence_fragment(message: &str) -> String {
    message.trim_end().trim_end_matches('.').to_string()
}

fn session_error(label: &str, step: SessionStep, reason: String) -> RuntimeError {
    RuntimeError::Session { model: label.to_string(), step, reason }
}

fn run_error(label: &str, inputs: &[(&str, &TensorValue)], error: &ort::Error) -> RuntimeError {
    let fed: Vec<String> =
        inputs.iter().map(|(name, value)| format!("{name} {}", value.describe())).collect();
    session_error(label, SessionStep::Run, format!("{error} (inputs given: {})", fed.join(", ")))
}
