//! The library's one slicing call, `onnx_slice::slice`, and the command line's conventions on top
//! of it: the same bytes from both, the report's provenance (schema, versions, execution provider,
//! the input's SHA-256), `-v`, `--sparsity`, and `--orientation random`'s new name.
mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::cli::onnx_slice;
use common::{fixture, read, scratch};
use onnx_slice::pipeline::{CalibrationData, MethodOptions, Notice};
use onnx_slice::runtime::ActiveEp;
use onnx_slice::slicegpt::{Orientation, SliceGpt};
use onnx_slice::{Error, Options};
use sha2::Digest as _;

fn model() -> PathBuf {
    fixture("llama/optimum/model.onnx")
}

fn args(items: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    items.iter().map(|item| item.as_ref().to_os_string()).collect()
}

fn sha256_of(path: &Path) -> String {
    sha2::Sha256::digest(read(path)).iter().map(|b| format!("{b:02x}")).collect()
}

/// The command line and the library write the same bytes for the same settings: the command line
/// is the library's call with its flags as options (PCA on the fixtures' calibration text, and a
/// random basis).
#[test]
fn the_command_line_and_the_library_write_the_same_model() {
    let dir = scratch();
    let calibration = fixture("calibration.txt");
    let (from_cli, from_library) = (dir.path().join("cli.onnx"), dir.path().join("library.onnx"));
    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &from_cli,
        &"--ratio",
        &"0.25",
        &"--basis",
        &"block",
        &"--calib",
        &calibration,
        &"--calib-samples",
        &"8",
        &"--calib-seqlen",
        &"64",
        &"--quiet",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let options = Options {
        method: MethodOptions::SliceGpt(SliceGpt {
            ratio: 0.25,
            basis: onnx_slice::slicegpt::BasisMode::Block,
            ..SliceGpt::default()
        }),
        calibration: CalibrationData::Texts(vec![calibration]),
        calib_samples: 8,
        calib_seqlen: 64,
        ..Options::default()
    };
    let report = onnx_slice::slice(&model(), &from_library, &options).unwrap();
    assert_eq!(read(&from_cli), read(&from_library));
    assert_eq!(report.calibration_tokens, 8 * 64);
    assert_eq!(report.execution_provider.as_deref(), Some("CPU"));
    assert_eq!(report.execution_provider_requested.as_deref(), Some("cpu"));
    let version = onnx_slice::runtime::loaded_version().expect("ONNX Runtime reports its version");
    assert_eq!(report.onnx_runtime.as_deref(), Some(version));
    assert!(version.starts_with("1."), "{version}");

    let (from_cli, from_library) =
        (dir.path().join("cli-r.onnx"), dir.path().join("library-r.onnx"));
    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &from_cli,
        &"--sparsity",
        &"0.3",
        &"--orientation",
        &"random-basis",
        &"--seed",
        &"9",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let options = Options::slicegpt(SliceGpt {
        ratio: 0.3,
        orientation: Orientation::RandomBasis { seed: 9 },
        ..SliceGpt::default()
    });
    let report = onnx_slice::slice(&model(), &from_library, &options).unwrap();
    assert_eq!(read(&from_cli), read(&from_library));
    assert_eq!(report.execution_provider, None, "no session runs without calibration");
    assert_eq!(report.onnx_runtime, None);
}

/// The report says what produced it and from what: its schema version, the tool's version, the
/// SHA-256 of every input file (the external data file too), and what the dry run predicted.
#[test]
fn the_report_carries_provenance_and_the_plan_predicts_it() {
    let dir = scratch();
    let input = fixture("llama/genai/model.onnx");
    let data = input.with_file_name("model.onnx.data");
    assert!(data.is_file(), "this fixture keeps its weights in {}", data.display());
    let options = Options::slicegpt(SliceGpt {
        ratio: 0.25,
        orientation: Orientation::Identity,
        basis: onnx_slice::slicegpt::BasisMode::Point,
        ..SliceGpt::default()
    });
    let planned = onnx_slice::plan(&input, &options).unwrap();
    let report = onnx_slice::slice(&input, &dir.path().join("out.onnx"), &options).unwrap();
    assert_eq!(report.schema_version, onnx_slice::report::SCHEMA_VERSION);
    assert_eq!(report.tool, format!("onnx-slice {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(report.input_sha256, sha256_of(&input));
    let files: Vec<(&str, u64, &str)> =
        report.input_files.iter().map(|f| (f.path.as_str(), f.bytes, f.sha256.as_str())).collect();
    let expected = [&input, &data]
        .map(|p| (p.display().to_string(), std::fs::metadata(p).unwrap().len(), sha256_of(p)));
    let expected: Vec<(&str, u64, &str)> =
        expected.iter().map(|(p, n, h)| (p.as_str(), *n, h.as_str())).collect();
    assert_eq!(files, expected);

    assert_eq!(planned.widths, report.widths);
    assert_eq!(planned.after.bytes, report.weight_bytes_after);
    assert_eq!(planned.after.parameters, report.parameters_after);
    assert_eq!(planned.shortcut_parameters, report.shortcut_parameters);
    let json = serde_json::to_value(&report).unwrap();
    for key in ["schema_version", "tool", "input_sha256", "onnx_runtime", "execution_provider"] {
        assert!(json.get(key).is_some(), "no {key} in {json}");
    }
}

/// Options that cannot work are typed errors naming the option, found before the model is read.
#[test]
fn invalid_options_are_refused_before_reading() {
    let dir = scratch();
    let missing = dir.path().join("missing.onnx");
    let out = dir.path().join("out.onnx");
    for (options, option) in [
        (Options::slicegpt(SliceGpt { ratio: 1.0, ..SliceGpt::default() }), "ratio"),
        (Options { round_to: 0, ..Options::default() }, "round_to"),
        (Options { calib_batch: 0, ..Options::default() }, "calib_batch"),
        (
            Options::slicegpt(SliceGpt {
                center_embeddings: true,
                orientation: Orientation::Identity,
                ..SliceGpt::default()
            }),
            "center_embeddings",
        ),
        (
            Options::slicegpt(SliceGpt { allocate_widths: true, ..SliceGpt::default() }),
            "allocate_widths",
        ),
    ] {
        match onnx_slice::slice(&missing, &out, &options) {
            Err(Error::Invalid { option: got, .. }) => assert_eq!(got, option),
            other => panic!("{option}: {:?}", other.map(|_| ())),
        }
    }
    // The output may not overwrite the input.
    let copy = dir.path().join("model.onnx");
    std::fs::copy(model(), &copy).unwrap();
    let options =
        Options::slicegpt(SliceGpt { orientation: Orientation::Identity, ..SliceGpt::default() });
    match onnx_slice::slice(&copy, &copy, &options) {
        Err(Error::Invalid { option: "output", .. }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(read(&copy), read(&model()));
}

/// Calibration tells its caller, as it happens, which execution provider ran and what is wrong
/// with the data; the report keeps the warnings.
#[test]
fn notices_say_the_execution_provider_and_the_warnings_as_they_happen() {
    let dir = scratch();
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = heard.clone();
    let options = Options {
        method: MethodOptions::SliceGpt(SliceGpt { ratio: 0.25, ..SliceGpt::default() }),
        calib_samples: 4,
        calib_seqlen: 32,
        notices: Some(Arc::new(move |notice| {
            let line = match notice {
                Notice::Warning(message) => format!("warning {message}"),
                Notice::ExecutionProvider(choice) => {
                    assert_eq!(choice.active, ActiveEp::Cpu);
                    format!("ep {choice}")
                }
            };
            log.lock().unwrap().push(line);
        })),
        ..Options::default()
    };
    let report = onnx_slice::slice(&model(), &dir.path().join("out.onnx"), &options).unwrap();
    let heard = heard.lock().unwrap().clone();
    assert_eq!(heard.iter().filter(|l| l.starts_with("ep ")).count(), 1, "{heard:?}");
    // English through the fixture's synthetic vocabulary is all unknown tokens.
    let warnings: Vec<&String> = heard.iter().filter(|l| l.starts_with("warning ")).collect();
    assert_eq!(warnings.len(), 1, "{heard:?}");
    assert!(warnings[0].contains("unknown token"), "{heard:?}");
    assert_eq!(report.warnings.len(), 1);
    assert!(report.warnings[0].contains("unknown token"));
}

/// `-v` says which execution provider ran (or that none did), `--sparsity` is `--ratio`, and
/// `--orientation random` still works, as random-basis, with a deprecation warning.
#[test]
fn verbose_sparsity_and_the_old_orientation_name() {
    let dir = scratch();
    let calibration = fixture("calibration.txt");
    let out = dir.path().join("v.onnx");
    let report = dir.path().join("v.json");
    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &out,
        &"--sparsity",
        &"0.25",
        &"--calib",
        &calibration,
        &"--calib-samples",
        &"4",
        &"--calib-seqlen",
        &"32",
        &"-v",
        &"--report",
        &report,
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("note: ONNX Runtime runs on the CPU execution provider"),
        "{}",
        run.stderr
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["ratio"], 0.25);
    assert_eq!(json["execution_provider"], "CPU");
    assert_eq!(json["input_sha256"], sha256_of(&model()));
    let quiet = onnx_slice(args(&[
        &model(),
        &"-o",
        &dir.path().join("q.onnx"),
        &"--ratio",
        &"0.25",
        &"--calib",
        &calibration,
        &"--calib-samples",
        &"4",
        &"--calib-seqlen",
        &"32",
    ]));
    assert_eq!(quiet.code, Some(0), "{}", quiet.stderr);
    assert!(!quiet.stderr.contains("execution provider"), "{}", quiet.stderr);
    assert_eq!(read(&out), read(&dir.path().join("q.onnx")), "--sparsity is --ratio");

    let (old, new) = (dir.path().join("old.onnx"), dir.path().join("new.onnx"));
    let slice = |orientation: &str, output: &Path| {
        onnx_slice(args(&[
            &model(),
            &"-o",
            &output,
            &"--ratio",
            &"0.25",
            &"--orientation",
            &orientation,
            &"--seed",
            &"4",
            &"-v",
        ]))
    };
    let run = slice("random", &old);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("warning: --orientation random is deprecated"), "{}", run.stderr);
    assert!(run.stderr.contains("no ONNX Runtime session ran"), "{}", run.stderr);
    let run = slice("random-basis", &new);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("deprecated"), "{}", run.stderr);
    assert_eq!(read(&old), read(&new));
    let help = onnx_slice(["--help"]);
    assert!(
        help.stdout.contains("random-basis") && help.stdout.contains("--sparsity"),
        "{}",
        help.stdout
    );
    assert!(!help.stdout.contains("pca, random,"), "the old name is not offered: {}", help.stdout);
}

/// `eval -v` says which execution provider ran too, through the same notice as slicing.
#[test]
fn eval_verbose_says_the_execution_provider() {
    let dir = scratch();
    let ids = dir.path().join("ids.npy");
    let data: Vec<u8> = (0..2 * 16).flat_map(|i: i64| (3 + i % 50).to_le_bytes()).collect();
    common::write_npy(&ids, "<i8", &[2, 16], &data);
    let run = onnx_slice(args(&[&"eval", &model(), &"--ids", &ids, &"-v"]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("note: ONNX Runtime runs on the CPU execution provider"),
        "{}",
        run.stderr
    );
    let run = onnx_slice(args(&[&"eval", &model(), &"--ids", &ids]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("execution provider"), "{}", run.stderr);
}
