//! `onnx_slice._native`: the library's slice, plan and inspect for the Python package
//! (python/onnx_slice/__init__.py is the API; this module is its private half). Each call runs
//! with the GIL released, refuses what the command line refuses with the same message
//! ([`cli`]), and fails with `NativeError(exit_code, message)`: the code `onnx-slice` would exit
//! with and what it would print after "error: ". A stop request ([`request_stop`], the Python
//! side's Ctrl-C) ends calibration with `KeyboardInterrupt`, its staged output removed.
mod cli;
mod options;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use onnx_slice::export::{self, Destination};
use onnx_slice::{inspect as describe, onnx, pipeline};
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use serde_json::{json, Value};

use cli::checks;

pyo3::create_exception!(
    _native,
    NativeError,
    pyo3::exceptions::PyException,
    "A failed call: args are (exit_code, message), as the command line would exit and print."
);

/// Slices `model` into `output` as `onnx-slice MODEL -o OUTPUT` with the options in `kwargs` (a
/// JSON object of keyword arguments, python/src/options.rs); `method`: `--method`, or `None` for
/// the command line's choice. Returns JSON: `{"result": report,
/// "notices": [lines]}`.
#[pyfunction]
fn slice(
    py: Python<'_>,
    model: PathBuf,
    output: PathBuf,
    method: Option<String>,
    kwargs: &str,
    progress: bool,
) -> PyResult<String> {
    let kwargs = parse_kwargs(kwargs)?;
    py.detach(move || run_slice(&model, Some(&output), method.as_deref(), kwargs, progress))
        .map_err(to_py)
}

/// What `onnx-slice MODEL --dry-run` says: `{"result": dry_run, "notices": [...]}`.
#[pyfunction]
fn plan(py: Python<'_>, model: PathBuf, method: Option<String>, kwargs: &str) -> PyResult<String> {
    let kwargs = parse_kwargs(kwargs)?;
    py.detach(move || run_slice(&model, None, method.as_deref(), kwargs, false)).map_err(to_py)
}

/// What `onnx-slice inspect MODEL --json [--explain]` prints.
#[pyfunction]
fn inspect(py: Python<'_>, model: PathBuf, explain: bool) -> PyResult<String> {
    py.detach(move || run_inspect(&model, explain)).map_err(to_py)
}

/// Asks the running calls (and later ones, until [`clear_stop_request`]) to stop.
#[pyfunction]
fn request_stop() {
    onnx_slice::files::request_stop();
}

#[pyfunction]
fn clear_stop_request() {
    onnx_slice::files::clear_stop_request();
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("METHODS", options::METHODS.to_vec())?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add_function(wrap_pyfunction!(slice, m)?)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(request_stop, m)?)?;
    m.add_function(wrap_pyfunction!(clear_stop_request, m)?)?;
    Ok(())
}

fn parse_kwargs(kwargs: &str) -> PyResult<serde_json::Map<String, Value>> {
    serde_json::from_str(kwargs)
        .map_err(|e| PyValueError::new_err(format!("keyword arguments: {e}")))
}

/// The error as the command line would end on it; a stop request as `KeyboardInterrupt`.
fn to_py(error: anyhow::Error) -> PyErr {
    let interrupted = error.chain().any(|cause| {
        cause
            .downcast_ref::<onnx_slice::Error>()
            .is_some_and(|e| matches!(e.root(), onnx_slice::Error::Interrupted))
    });
    if interrupted {
        return PyKeyboardInterrupt::new_err(cli::message(&error));
    }
    NativeError::new_err((checks::exit_code(&error), cli::message(&error)))
}

/// src/cli.rs `run_slice`, step for step: the same checks in the same order, then the library's
/// [`pipeline::plan`] (no `output`) or [`pipeline::slice`].
fn run_slice(
    input: &Path,
    output: Option<&Path>,
    method: Option<&str>,
    kwargs: serde_json::Map<String, Value>,
    progress: bool,
) -> anyhow::Result<String> {
    let request = options::slice_options(method, kwargs, output.is_none(), progress)?;
    let source = export::resolve_input(input).map_err(|e| cli::flagged("MODEL", e))?;
    cli::method_flags(&request.args)?;
    let options = &request.options;
    options.check().map_err(cli::flag_error)?;
    let output_file = output.filter(|_| source.folder.is_none());
    cli::slice_command(&request.args, &source.model, output_file)?;
    let destination = output.map(|o| export::plan_output(&source, o));
    if let Some(Destination::Folder(plan)) =
        destination.transpose().map_err(|e| cli::flagged("-o", e))?
    {
        let mut notices = request.notices.lock().unwrap_or_else(|p| p.into_inner());
        notices.extend(
            plan.skipped_folders.iter().map(|f| format!("note: the folder {f} is not copied")),
        );
    }
    let result = match output {
        None => dry_run_json(&pipeline::plan(input, options).map_err(cli::flag_error)?),
        Some(output) => {
            let report = pipeline::slice(input, output, options).map_err(cli::flag_error)?;
            if let Some(path) = &request.report {
                write_json(path, &report)?;
            }
            serde_json::to_value(&report)?
        }
    };
    let notices = request.notices.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(json!({ "result": result, "notices": notices }).to_string())
}

fn dry_run_json(plan: &pipeline::DryRun) -> Value {
    json!({
        "method": plan.method,
        "stream_width": plan.stream_width,
        "widths": plan.widths,
        "blocks": plan.blocks,
        "before": plan.before,
        "after": plan.after,
        "basis": plan.basis.map(|b| b.to_string()),
        "shortcuts": plan.shortcuts,
        "shortcut_parameters": plan.shortcut_parameters,
        "mlp_widths_before": plan.mlp_widths.as_ref().map(|(before, _)| before),
        "mlp_widths": plan.mlp_widths.as_ref().map(|(_, after)| after),
        "mlp_widths_allocated": plan.allocated,
        "summary": plan.to_string(),
    })
}

/// src/cli.rs `write_json`.
fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    onnx_slice::files::write_atomically(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// src/cli.rs `run_inspect`.
fn run_inspect(model: &Path, explain: bool) -> anyhow::Result<String> {
    let input = export::resolve_input(model).map_err(|e| cli::flagged("MODEL", e))?.model;
    checks::input_file("MODEL", &input)?;
    let model = onnx::load(&input)?;
    let summary = describe::summarize(&model);
    let layout = describe::describe_layout(&model, explain);
    let text = format!("{summary}{layout}");
    Ok(json!({ "model": summary, "transformer": layout, "text": text }).to_string())
}
