//! The ONNX Runtime layer against real exports: logits match the torch reference, external data
//! loads from a file and from bytes, execution provider choice, tensor types, and errors.
//!
//! These tests need libonnxruntime (scripts/setup-ort.sh); without it they fail and say so.

mod common;

use std::path::Path;

use common::reference::*;
use common::{fixture, ARCHS};
use onnx_slice::graph::{DataType, Dim as GraphDim, Graph, Model, Node, ValueInfo};
use onnx_slice::onnx;
use onnx_slice::runtime::npy::Npz;
use onnx_slice::runtime::{
    choose_library, default_library_path, init_runtime, loaded_library, locate_library, ActiveEp,
    Dim, ElementType, Ep, Feed, LibrarySearchEnv, LibrarySource, ModelSession, Placement,
    RuntimeError, SessionConfig, SharedArena, TensorValue,
};

const LOGITS_TOLERANCE: f32 = 1e-4;
// Every exporter whose models take no KV-cache inputs.
const EXPORTERS_WITHOUT_KV_CACHE: [&str; 6] =
    ["ts14", "ts17", "optimum", "dynamo", "dynamo23", "ortopt_l1"];

fn logits_diff_to_reference(arch: &str, exporter: &str, config: &SessionConfig) -> f32 {
    let mut session = open(&fixture(&format!("{arch}/{exporter}/model.onnx")), config);
    let reference = Reference::for_exporter(arch, exporter);
    let inputs = reference.inputs_for(&session);
    let logits = run_logits(&mut session, &inputs);
    max_abs_diff(&logits, &reference.logits)
}

#[test]
fn logits_match_torch_for_every_exporter_without_kv_cache() {
    let mut failures = Vec::new();
    for arch in ARCHS {
        for exporter in EXPORTERS_WITHOUT_KV_CACHE {
            let diff = logits_diff_to_reference(arch, exporter, &cpu());
            if diff.is_nan() || diff > LOGITS_TOLERANCE {
                failures.push(format!("{arch}/{exporter}: max |logits - torch| = {diff}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn external_data_loads_from_a_file_and_from_bytes_with_its_directory() {
    let path = fixture("llama/genai/model.onnx");
    let reference = Reference::load("llama");

    let dir = path.parent().unwrap_or_else(|| panic!("{} has no directory", path.display()));
    let mut from_file = open(&path, &cpu());
    let inputs = reference.inputs_for(&from_file);
    let file_logits = run_logits(&mut from_file, &inputs);
    assert!(max_abs_diff(&file_logits, &reference.logits) <= LOGITS_TOLERANCE);

    let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{error}"));
    let mut from_bytes = ModelSession::from_bytes(&bytes, Some(dir), &cpu())
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(run_logits(&mut from_bytes, &inputs), file_logits);
}

#[test]
fn in_memory_model_with_external_data_but_no_directory_fails_clearly() {
    runtime();
    let path = fixture("llama/genai/model.onnx");
    let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{error}"));
    let error = ModelSession::from_bytes(&bytes, None, &cpu())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("loading the model") && error.contains("model.onnx.data"), "{error}");
}

#[test]
fn session_describes_inputs_and_outputs() {
    let session = open(&fixture("gpt2/optimum/model.onnx"), &cpu());
    let described: Vec<String> = session.inputs().iter().map(ToString::to_string).collect();
    assert_eq!(
        described,
        [
            "input_ids: i64[batch_size,sequence_length]",
            "attention_mask: i64[batch_size,sequence_length]",
            "position_ids: i64[batch_size,sequence_length]"
        ]
    );
    let logits = &session.outputs()[0];
    assert_eq!((logits.name.as_str(), &logits.element_type), ("logits", &ElementType::F32));
    assert_eq!(logits.dims.last(), Some(&Dim::Fixed(1000)));
}

#[test]
fn intra_op_threads_are_configurable() {
    let config = SessionConfig { ep: Ep::Cpu, intra_threads: Some(1), shared_arena: false };
    assert!(logits_diff_to_reference("gpt2", "ts14", &config) <= LOGITS_TOLERANCE);
}

fn cuda_provider_library_present() -> bool {
    loaded_library()
        .and_then(Path::parent)
        .is_some_and(|dir| dir.join("libonnxruntime_providers_cuda.so").exists())
}

#[test]
fn cuda_ep_is_an_error_when_cuda_cannot_be_used() {
    runtime();
    let result = ModelSession::from_file(
        &fixture("gpt2/ts14/model.onnx"),
        &SessionConfig { ep: Ep::Cuda, intra_threads: None, shared_arena: false },
    );
    match result {
        Ok(session) => {
            assert!(
                cuda_provider_library_present(),
                "CUDA EP registered without its provider library"
            );
            assert_eq!(session.ep().active, ActiveEp::Cuda);
        }
        Err(error) => {
            let message = error.to_string();
            assert!(matches!(error, RuntimeError::CudaUnavailable { .. }), "{message}");
            assert!(
                message.contains("CUDA execution provider is unavailable")
                    && message.contains("--ep cpu"),
                "{message}"
            );
        }
    }
}

#[test]
fn auto_ep_falls_back_to_cpu_and_says_why() {
    let config = SessionConfig { ep: Ep::Auto, intra_threads: None, shared_arena: false };
    let session = open(&fixture("gpt2/ts14/model.onnx"), &config);
    let choice = session.ep();
    if !cuda_provider_library_present() {
        assert_eq!(choice.active, ActiveEp::Cpu);
        let message = choice.to_string();
        assert!(
            message.starts_with("CUDA unavailable (") && message.ends_with("), using CPU"),
            "{message}"
        );
    }
    drop(session);
    assert!(logits_diff_to_reference("gpt2", "ts14", &config) <= LOGITS_TOLERANCE);
}

#[test]
fn ep_names_parse_and_print() {
    for (text, ep) in [("cpu", Ep::Cpu), ("CUDA", Ep::Cuda), ("auto", Ep::Auto)] {
        assert_eq!(text.parse::<Ep>().ok(), Some(ep));
        assert_eq!(ep.to_string(), text.to_lowercase());
    }
    let error = "tpu".parse::<Ep>().err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(error, "unknown execution provider `tpu`: expected one of cpu, cuda, auto");
}

/// A model of Identity nodes, `<name>` to `<name>_out`, over one input of each element type.
fn identity_model_bytes() -> Vec<u8> {
    let types = [
        ("f32", DataType::Float),
        ("f16", DataType::Float16),
        ("i64", DataType::Int64),
        ("i32", DataType::Int32),
        ("bool", DataType::Bool),
    ];
    let mut graph = Graph::new("identities");
    let n = [GraphDim::Symbolic("n".into())];
    for (name, dtype) in types {
        let output = format!("{name}_out");
        graph.nodes.push(Node::new("Identity", name, vec![name.into()], vec![output.clone()]));
        graph.inputs.push(ValueInfo::tensor(name, dtype, &n));
        graph.outputs.push(ValueInfo::tensor(output, dtype, &n));
    }
    onnx::to_bytes(&Model::new(&[("", 17)], graph)).unwrap_or_else(|error| panic!("{error}"))
}

fn identity_session() -> ModelSession {
    runtime();
    ModelSession::from_bytes(&identity_model_bytes(), None, &cpu())
        .unwrap_or_else(|error| panic!("{error}"))
}

/// One value per input of the identity model.
fn identity_inputs() -> Vec<(&'static str, TensorValue)> {
    vec![
        ("f32", TensorValue::from(ndarray::arr1(&[1.5f32, -2.0]))),
        (
            "f16",
            TensorValue::from(ndarray::arr1(&[
                half::f16::from_f32(0.5),
                half::f16::from_f32(-3.25),
            ])),
        ),
        ("i64", TensorValue::from(ndarray::arr1(&[i64::MAX, -1]))),
        ("i32", TensorValue::from(ndarray::arr1(&[7i32, i32::MIN]))),
        ("bool", TensorValue::from(ndarray::arr1(&[true, false]))),
    ]
}

fn borrowed<'a>(values: &'a [(&'a str, TensorValue)]) -> Vec<(&'a str, &'a TensorValue)> {
    values.iter().map(|(name, value)| (*name, value)).collect()
}

#[test]
fn every_tensor_type_round_trips_through_a_model_built_in_memory() {
    let mut session = identity_session();
    assert_eq!(session.inputs()[1].dims, [Dim::Symbolic("n".into())]);
    let values = identity_inputs();
    let outputs = session.run(&borrowed(&values)).unwrap_or_else(|error| panic!("{error}"));
    let names: Vec<&str> = outputs.names().collect();
    assert_eq!(names, ["f32_out", "f16_out", "i64_out", "i32_out", "bool_out"]);
    for (name, value) in &values {
        assert_eq!(outputs.get(&format!("{name}_out")), Some(value), "{name}");
    }
}

#[test]
fn non_contiguous_inputs_are_fed_in_logical_order() {
    let mut session = identity_session();
    let mut every_other = ndarray::arr1(&[1i64, 2, 3, 4]);
    every_other.slice_collapse(ndarray::s![..;2]);
    assert!(!every_other.is_standard_layout());
    let mut values = identity_inputs();
    values[2].1 = TensorValue::from(every_other);
    let mut outputs =
        session.run_for(&borrowed(&values), &["i64_out"]).unwrap_or_else(|error| panic!("{error}"));
    let fed = outputs.remove("i64_out").and_then(|v| v.into_i64().ok());
    assert_eq!(fed, Some(ndarray::arr1(&[1i64, 3]).into_dyn()));
}

#[test]
fn selected_outputs_come_back_in_the_order_asked() {
    let mut session = identity_session();
    let values = identity_inputs();
    let outputs = session
        .run_for(&borrowed(&values), &["bool_out", "i64_out"])
        .unwrap_or_else(|error| panic!("{error}"));
    let names: Vec<&str> = outputs.names().collect();
    assert_eq!(names, ["bool_out", "i64_out"]);
}

#[test]
fn unknown_names_are_reported_with_the_known_ones() {
    let mut session = identity_session();
    let ids = TensorValue::from(ndarray::arr1(&[1i64]));
    let error = session.run(&[("ids", &ids)]).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(
        error,
        "in-memory model has no input named `ids`; its inputs are: f32, f16, i64, i32, bool"
    );
    let error = session
        .run_for(&[("i64", &ids)], &["logits"])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with("in-memory model has no output named `logits`; its outputs are: f32_out"),
        "{error}"
    );
}

#[test]
fn run_errors_name_the_model_the_step_and_the_inputs() {
    let path = fixture("gpt2/ts14/model.onnx");
    let mut session = open(&path, &cpu());
    let wrong_type = TensorValue::from(ndarray::arr2(&[[1i32, 2]]));
    let error =
        session.run(&[("input_ids", &wrong_type)]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.starts_with(&format!("running the model failed for {}", path.display())),
        "{error}"
    );
    assert!(error.contains("input_ids i32[1,2]"), "{error}");
}

#[test]
fn reference_npz_lists_its_arrays() {
    let npz = Npz::read(&fixture("gpt2/reference.npz")).unwrap_or_else(|error| panic!("{error}"));
    let names: Vec<&str> = npz.names().collect();
    assert_eq!(names[..4], ["input_ids", "attention_mask", "position_ids", "logits"]);
    assert_eq!(npz.get("logits").map(|a| a.shape().to_vec()), Some(vec![2, 7, 1000]));
    assert_eq!(npz.get("input_ids").map(|a| a.dtype_name()), Some("int64"));
}

fn search_env(
    ort: Option<&str>,
    slice_home: Option<&str>,
    xdg: Option<&str>,
    home: Option<&str>,
) -> LibrarySearchEnv {
    LibrarySearchEnv {
        ort_dylib_path: ort.map(Into::into),
        onnx_slice_home: slice_home.map(Into::into),
        xdg_cache_home: xdg.map(Into::into),
        home: home.map(Into::into),
    }
}

#[test]
fn library_path_precedence_is_flag_then_env_var_then_default() {
    let env = search_env(Some("/env/libort.so"), Some("/slice"), Some("/xdg"), Some("/home/u"));
    let chosen = |explicit: Option<&str>, env: &LibrarySearchEnv| {
        choose_library(explicit.map(Path::new), env)
            .map(|location| (location.path, location.source))
            .ok()
    };
    assert_eq!(
        chosen(Some("/flag/lib.so"), &env),
        Some(("/flag/lib.so".into(), LibrarySource::Flag))
    );
    assert_eq!(chosen(None, &env), Some(("/env/libort.so".into(), LibrarySource::EnvVar)));
    let default =
        |env: &LibrarySearchEnv| default_library_path(env).map(|path| path.display().to_string());
    let suffix = "onnxruntime-1.31.1/libonnxruntime.so.1.31.1";
    assert_eq!(default(&env), Some(format!("/slice/{suffix}")));
    assert_eq!(
        default(&search_env(None, None, Some("/xdg"), Some("/home/u"))),
        Some(format!("/xdg/onnx-slice/{suffix}"))
    );
    assert_eq!(
        default(&search_env(None, None, None, Some("/home/u"))),
        Some(format!("/home/u/.cache/onnx-slice/{suffix}"))
    );
    let nothing = choose_library(None, &LibrarySearchEnv::default()).err();
    assert!(matches!(nothing, Some(RuntimeError::NoDefaultLibraryLocation)));
}

#[test]
fn missing_library_is_a_typed_error_that_says_how_to_fix_it() {
    let missing = Path::new("/nonexistent/libonnxruntime.so.1.31.1");
    let env = search_env(None, None, None, Some("/home/u"));
    let error = locate_library(Some(missing), &env).err();
    let message = error.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(
        matches!(&error, Some(RuntimeError::LibraryNotFound { origin: LibrarySource::Flag, .. })),
        "{message}"
    );
    assert!(
        message.contains("tried /nonexistent/libonnxruntime.so.1.31.1 (from --ort-lib)"),
        "{message}"
    );
    assert!(message.contains("scripts/setup-ort.sh") && message.contains("--ort-lib"), "{message}");
    assert!(
        message.contains("/home/u/.cache/onnx-slice/onnxruntime-1.31.1/libonnxruntime.so.1.31.1"),
        "{message}"
    );
    // Through the real entry point too: the check happens before ONNX Runtime is touched, so
    // this cannot disturb the other tests' runtime.
    assert!(matches!(init_runtime(Some(missing)), Err(RuntimeError::LibraryNotFound { .. })));
}

#[test]
fn a_second_library_is_refused_once_one_is_loaded() {
    runtime();
    let other = tempfile::NamedTempFile::new().unwrap_or_else(|error| panic!("{error}"));
    let error = init_runtime(Some(other.path())).err();
    assert!(matches!(error, Some(RuntimeError::AlreadyInitialised { .. })), "{error:?}");
    let loaded = loaded_library().map(Path::to_path_buf);
    assert_eq!(init_runtime(loaded.as_deref()).ok().map(Path::to_path_buf), loaded);
}

/// `y = x + x`, float16 or float32, `x` and `y` of shape `[n]`.
fn doubling_model_bytes(dtype: DataType) -> Vec<u8> {
    let mut graph = Graph::new("doubling");
    let n = [GraphDim::Symbolic("n".into())];
    graph.nodes.push(Node::new("Add", "double", vec!["x".into(), "x".into()], vec!["y".into()]));
    graph.inputs.push(ValueInfo::tensor("x", dtype, &n));
    graph.outputs.push(ValueInfo::tensor("y", dtype, &n));
    onnx::to_bytes(&Model::new(&[("", 17)], graph)).unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn bound_runs_pass_kept_tensors_from_session_to_session_in_their_own_type() {
    runtime();
    let _arena = SharedArena::acquire().unwrap_or_else(|error| panic!("{error}"));
    let config = SessionConfig { shared_arena: true, ..cpu() };
    for dtype in [DataType::Float, DataType::Float16] {
        let bytes = doubling_model_bytes(dtype);
        let mut first = ModelSession::from_bytes(&bytes, None, &config).unwrap();
        let mut second = ModelSession::from_bytes(&bytes, None, &config).unwrap();
        let x = match dtype {
            DataType::Float => TensorValue::from(ndarray::arr1(&[1.5f32, -2.0])),
            _ => TensorValue::from(ndarray::arr1(&[
                half::f16::from_f32(1.5),
                half::f16::from_f32(-2.0),
            ])),
        };
        let kept = first
            .run_bound(&[("x", Feed::Host(&x))], &[("y", Placement::Device)])
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(kept.host.is_empty());
        assert_eq!(kept.kept[0].shape(), [2]);
        // Fed as it is, once more doubled, and brought back to the host in its own type.
        let back = second
            .run_bound(&[("x", Feed::Kept(&kept.kept[0]))], &[("y", Placement::Host)])
            .unwrap_or_else(|error| panic!("{error}"));
        let expected = match dtype {
            DataType::Float => TensorValue::from(ndarray::arr1(&[6.0f32, -8.0])),
            _ => TensorValue::from(ndarray::arr1(&[
                half::f16::from_f32(6.0),
                half::f16::from_f32(-8.0),
            ])),
        };
        assert_eq!(back.host.get("y"), Some(&expected), "{dtype:?}");
        // On the CPU the kept tensor is host memory: it reads back as the first run's output.
        let doubled = kept.kept[0].to_host().unwrap_or_else(|error| panic!("{error}"));
        let twice_x = first.run(&[("x", &x)]).unwrap().get("y").cloned();
        assert_eq!(Some(doubled), twice_x);
    }
}

#[test]
fn bound_runs_report_unknown_names() {
    runtime();
    let mut session =
        ModelSession::from_bytes(&doubling_model_bytes(DataType::Float), None, &cpu()).unwrap();
    let x = TensorValue::from(ndarray::arr1(&[1.0f32]));
    let error = session.run_bound(&[("ids", Feed::Host(&x))], &[("y", Placement::Host)]).err();
    assert!(error.is_some_and(|e| e.to_string().contains("no input named `ids`")));
    let error = session.run_bound(&[("x", Feed::Host(&x))], &[("logits", Placement::Device)]).err();
    assert!(error.is_some_and(|e| e.to_string().contains("no output named `logits`")));
}
