//! A new user's mistakes are caught before the long work, with a plain message that names the flag
//! and the path, exit code 2 (3 for a model onnx-slice cannot slice), and nothing written; the
//! tool knows its own output; calibration that is not what the user thinks gets a warning.
mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::cli::{onnx_slice, snapshot, Outcome};
use common::*;

/// A path check (a few file-system calls, no model loaded) takes milliseconds; this bound leaves
/// room for a loaded machine and is far below any calibration that [`long_calibration`] starts.
const CHECK_SECONDS: f64 = 5.0;

/// The fixture the README's first command slices (tokenizer.json and config.json beside it).
fn model() -> PathBuf {
    fixture("llama/optimum/model.onnx")
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    list.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// Token ids for a calibration that takes minutes: 20,000 samples of 128 tokens (the fixture's
/// position limit), 5,000 batches through each of the model's 5 segments (with a writable `-o`,
/// about 2 minutes on a 2-core machine).
fn long_calibration(dir: &Path) -> PathBuf {
    let (rows, cols) = (20_000usize, 128usize);
    let data: Vec<u8> = (0..rows * cols)
        .map(|i| (3 + (i * 7919) % 997) as i64)
        .flat_map(i64::to_le_bytes)
        .collect();
    let path = dir.join("long-calibration.npy");
    write_npy(&path, "<i8", &[rows, cols], &data);
    path
}

/// `--ratio 0.25` with the [`long_calibration`] at `ids`, every sample of it.
fn long_slicing(ids: &Path) -> Vec<OsString> {
    args(&[&"--ratio", &"0.25", &"--calib-ids", &ids, &"--calib-samples", &"20000"])
}

/// The promises for a command line that cannot work: exit code 2, `error: ` and `expected` on
/// stderr (no OS error number, no temporary file), no panic, nothing written in `outputs`, and fast.
fn assert_usage_error(run: &Outcome, expected: &str, outputs: &Path) {
    assert_eq!(run.code, Some(2), "stderr: {}", run.stderr);
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    assert!(run.stderr.contains(expected), "expected {expected:?} in: {}", run.stderr);
    assert!(
        !run.stderr.contains("os error") && !run.stderr.contains(".part"),
        "a raw OS error: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(snapshot(outputs), vec![], "files were written");
    assert!(run.seconds < CHECK_SECONDS, "the check took {:.1} s", run.seconds);
}

/// Output mistakes fail before calibration: with a calibration of minutes, each run ends in well
/// under [`CHECK_SECONDS`] (were a check made after calibrating, the run would take minutes).
#[test]
fn output_mistakes_fail_before_a_long_calibration() {
    let dir = scratch();
    let calibration = long_calibration(dir.path());
    let outputs = scratch();
    let out = outputs.path().join("out.onnx");
    let missing = outputs.path().join("no-such-folder").join("out.onnx");
    let slice = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut all = args(&[&model()]);
        all.extend(long_slicing(&calibration));
        all.extend(args(extra));
        onnx_slice(all)
    };

    let run = slice(&[&"-o", &missing]);
    assert_usage_error(
        &run,
        &format!("its folder {} does not exist", missing.parent().unwrap().display()),
        outputs.path(),
    );
    assert!(run.stderr.contains("-o"), "names the flag: {}", run.stderr);

    let run = slice(&[&"-o", &outputs.path()]);
    assert_usage_error(&run, "it is a folder", outputs.path());

    let run = slice(&[&"-o", &out, &"--report", &missing]);
    assert_usage_error(&run, "--report", outputs.path());
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);

    let run = slice(&[&"-o", &out, &"--save-rotations", &missing]);
    assert_usage_error(&run, "--save-rotations", outputs.path());

    let run = slice(&[&"-o", &out, &"--report", &out]);
    assert_usage_error(&run, "--report and -o name the same file", outputs.path());

    // The input itself as the output, and as the report.
    let inputs = scratch();
    let input = inputs.path().join("model.onnx");
    std::fs::copy(model(), &input).unwrap();
    std::fs::copy(fixture("llama/optimum/tokenizer.json"), inputs.path().join("tokenizer.json"))
        .unwrap();
    let before = snapshot(inputs.path());
    let run = onnx_slice([args(&[&input, &"-o", &input]), long_slicing(&calibration)].concat());
    assert_usage_error(&run, "is the input file", outputs.path());
    let run = onnx_slice(args(&[
        &input,
        &"-o",
        &out,
        &"--ratio",
        &"0.25",
        &"--report",
        &inputs.path().join("tokenizer.json"),
    ]));
    assert_usage_error(&run, "--report", outputs.path());
    assert!(run.stderr.contains("is the input file"), "{}", run.stderr);
    assert_eq!(snapshot(inputs.path()), before, "the input folder changed");
}

#[test]
fn input_mistakes_name_the_flag_and_the_path() {
    let outputs = scratch();
    let out = outputs.path().join("out.onnx");
    let folder = scratch();
    let missing = folder.path().join("missing.txt");

    // A folder is taken as an export folder: one without either family's configuration is not one.
    let run = onnx_slice(args(&[&folder.path(), &"-o", &out, &"--ratio", &"0.25"]));
    assert_usage_error(&run, "not an export folder", outputs.path());
    assert!(run.stderr.contains(&format!("MODEL {}", folder.path().display())), "{}", run.stderr);

    let run = onnx_slice(args(&[&missing, &"-o", &out, &"--ratio", &"0.25"]));
    assert_usage_error(&run, "no such file", outputs.path());

    let run = onnx_slice(args(&[&model(), &"-o", &out, &"--ratio", &"0.25", &"--calib", &missing]));
    assert_usage_error(
        &run,
        &format!("--calib {}: no such file", missing.display()),
        outputs.path(),
    );

    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &out,
        &"--ratio",
        &"0.25",
        &"--tokenizer",
        &folder.path(),
    ]));
    assert_usage_error(&run, "--tokenizer", outputs.path());

    // No tokenizer beside a model copied alone: the slicing command suggests its own flags.
    let alone = folder.path().join("model.onnx");
    std::fs::copy(model(), &alone).unwrap();
    let run = onnx_slice(args(&[&alone, &"-o", &out, &"--ratio", &"0.25"]));
    assert_usage_error(&run, "--calib-ids FILE.npy", outputs.path());
    assert!(run.stderr.contains("--tokenizer"), "{}", run.stderr);
    // ... and eval suggests eval's.
    let text = folder.path().join("text.txt");
    std::fs::write(&text, "t5 t6 t7\n").unwrap();
    let run = onnx_slice(args(&[&"eval", &alone, &"--text", &text]));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("--ids FILE.npy") && !run.stderr.contains("--calib-ids"),
        "{}",
        run.stderr
    );

    for command in ["inspect", "eval"] {
        let mut list = args(&[&command, &folder.path()]);
        if command == "eval" {
            list.extend(args(&[&"--text", &text]));
        }
        let run = onnx_slice(list);
        assert_usage_error(&run, "not an export folder", outputs.path());
    }
    let run = onnx_slice(args(&[&"convert", &folder.path(), &"-o", &out]));
    assert_usage_error(&run, "not an export folder", outputs.path());
    let run = onnx_slice(args(&[&"convert", &model(), &"-o", &outputs.path()]));
    assert_usage_error(&run, "it is a folder", outputs.path());

    // The library says the same without the command line's checks.
    let error = onnx_slice::onnx::load(folder.path()).unwrap_err().to_string();
    assert!(error.contains("it is a folder") && !error.contains("os error"), "{error}");
    let loaded = onnx_slice::onnx::load(model()).unwrap();
    let nowhere = outputs.path().join("no-such-folder").join("out.onnx");
    let error =
        onnx_slice::onnx::save(&loaded, &nowhere, &Default::default()).unwrap_err().to_string();
    assert!(
        error.contains("does not exist") && !error.contains("os error") && !error.contains(".part"),
        "{error}"
    );
    let error = onnx_slice::onnx::save(&loaded, outputs.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("it is a folder") && !error.contains("os error"), "{error}");
    assert_eq!(snapshot(outputs.path()), vec![]);
}

#[test]
fn flag_values_are_checked_with_plain_messages() {
    let outputs = scratch();
    let out = outputs.path().join("out.onnx");
    for ratio in ["-0.1", "1", "1.5"] {
        let run = onnx_slice(args(&[&model(), &"-o", &out, &"--ratio", &ratio]));
        assert_usage_error(
            &run,
            &format!("--ratio must be at least 0 and less than 1, got {ratio}"),
            outputs.path(),
        );
    }
    for flag in ["--calib-samples", "--calib-seqlen", "--calib-batch", "--round-to"] {
        let run = onnx_slice(args(&[&model(), &"-o", &out, &"--ratio", &"0.25", &flag, &"0"]));
        assert_usage_error(&run, &format!("{flag} must be at least 1"), outputs.path());
    }
    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &out,
        &"--ratio",
        &"0.25",
        &"--orientation",
        &"random-basis",
        &"--center-embeddings",
    ]));
    assert_usage_error(&run, "--center-embeddings applies to PCA slicing", outputs.path());
}

/// `inspect` says what sliced a model onnx-slice wrote and why its transformer is not detected
/// again; slicing it again is refused (exit 3) before calibration, with that reason.
#[test]
fn the_tool_knows_its_own_output() {
    let dir = scratch();
    let sliced = dir.path().join("model.sliced.onnx");
    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &sliced,
        &"--ratio",
        &"0.25",
        &"--orientation",
        &"random-basis",
        &"--seed",
        &"3",
        &"--quiet",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let inspect = onnx_slice(args(&[&"inspect", &sliced]));
    assert_eq!(inspect.code, Some(0), "{}", inspect.stderr);
    assert!(inspect.stdout.contains("sliced by:    onnx-slice "), "{}", inspect.stdout);
    assert!(
        inspect.stdout.contains("ratio 0.25") && inspect.stdout.contains("widths 48,48,48,48,64"),
        "{}",
        inspect.stdout
    );
    assert!(inspect.stdout.contains("orientation random-basis (seed 3)"), "{}", inspect.stdout);
    assert!(
        inspect.stdout.contains("this model is the output of onnx-slice"),
        "{}",
        inspect.stdout
    );
    let json = onnx_slice(args(&[&"inspect", &sliced, &"--json"]));
    let json: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(json["model"]["sliced_by"]["method"], "slicegpt");
    assert_eq!(json["model"]["sliced_by"]["ratio"], "0.25");
    assert_eq!(json["model"]["sliced_by"]["stream_width"], "64");
    let original = onnx_slice(args(&[&"inspect", &model(), &"--json"]));
    let original: serde_json::Value = serde_json::from_str(&original.stdout).unwrap();
    assert!(original["model"]["sliced_by"].is_null());

    let calibration = long_calibration(dir.path());
    let outputs = scratch();
    let again = outputs.path().join("again.onnx");
    let run = onnx_slice([args(&[&sliced, &"-o", &again]), long_slicing(&calibration)].concat());
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stderr.contains("already sliced by onnx-slice")
            && run.stderr.contains("slice the original model"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&sliced.display().to_string()), "names the model: {}", run.stderr);
    assert_eq!(snapshot(outputs.path()), vec![]);
    assert!(run.seconds < CHECK_SECONDS, "the refusal took {:.1} s", run.seconds);

    // With no tokenizer beside it, the refusal still comes first: it is the reason that matters.
    let run = onnx_slice(args(&[&sliced, &"-o", &again, &"--ratio", &"0.25"]));
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(run.stderr.contains("already sliced by onnx-slice"), "{}", run.stderr);

    let library = onnx_slice::slicegpt::fuse(&mut onnx_slice::onnx::load(&sliced).unwrap())
        .unwrap_err()
        .to_string();
    assert!(library.contains("already sliced"), "{library}");
}

/// A model with no transformer exits with 3, as an already sliced one does.
#[test]
fn a_model_without_a_transformer_exits_with_3() {
    let dir = scratch();
    let mut model = onnx_slice::onnx::load(model()).unwrap();
    model.graph.nodes.retain(|n| n.op_type != "Gather");
    let broken = dir.path().join("no-embedding.onnx");
    onnx_slice::onnx::save(&model, &broken, &Default::default()).unwrap();
    let out = dir.path().join("out.onnx");
    let run = onnx_slice(args(&[
        &broken,
        &"-o",
        &out,
        &"--ratio",
        &"0.25",
        &"--orientation",
        &"identity",
    ]));
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stderr.contains("structure detection stopped") || run.stderr.contains("embedding"),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
}

/// A 300-token text gives 2 of the 128 samples asked for, and English through the fixtures'
/// synthetic vocabulary is all `<unk>`: both are said on stderr, even with --quiet. The fixtures'
/// own calibration text gets no warning.
#[test]
fn calibration_short_of_what_was_asked_or_unknown_to_the_tokenizer_is_warned_about() {
    let dir = scratch();
    // Each run writes a new output: an existing one is refused.
    let out = |n: u32| dir.path().join(format!("out{n}.onnx"));
    let short = dir.path().join("short.txt");
    std::fs::write(
        &short,
        (0..300).map(|i| format!("t{}", 3 + i % 997)).collect::<Vec<_>>().join(" "),
    )
    .unwrap();
    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &out(1),
        &"--ratio",
        &"0.25",
        &"--calib",
        &short,
        &"--quiet",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("warning: calibrating on 2 of the 128 samples asked for"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("unknown token"), "{}", run.stderr);

    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &out(2),
        &"--ratio",
        &"0.25",
        &"--calib-samples",
        &"4",
        &"--quiet",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("of the calibration tokens are the unknown token '<unk>'"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("calibrating on"), "{}", run.stderr);

    let run = onnx_slice(args(&[
        &model(),
        &"-o",
        &out(3),
        &"--ratio",
        &"0.25",
        &"--calib",
        &fixture("calibration.txt"),
        &"--quiet",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

/// A signal in the middle of a run (Ctrl-C's SIGINT, `kill`'s SIGTERM, a closed terminal's
/// SIGHUP) leaves nothing in the output's folder: the staged output is removed before the process
/// exits with 130. The output is an export folder, which is staged (as a hidden `.part` sibling)
/// from before calibration on, so the signal reliably finds it there.
#[test]
fn an_interrupted_run_leaves_nothing_behind() {
    let dir = scratch();
    let calibration = long_calibration(dir.path());
    for signal in ["INT", "TERM", "HUP"] {
        let outputs = scratch();
        let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
            .args(args(&[&fixture("llama/optimum"), &"-o", &outputs.path().join("sliced")]))
            .args(long_slicing(&calibration))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run onnx-slice");
        wait_for_the_staged_folder(outputs.path(), ".sliced.", &mut run);
        let kill = std::process::Command::new("kill")
            .args(["-s", signal, &run.id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success());
        let finished = run.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&finished.stderr);
        assert_eq!(finished.status.code(), Some(130), "SIG{signal}: {stderr}");
        assert!(stderr.contains("interrupted: 1 unfinished output(s) removed"), "{stderr}");
        assert_eq!(file_names(outputs.path()), Vec::<String>::new(), "SIG{signal} left files");
    }
}

/// Waits until `folder` holds the staged output `PREFIX…part` while `run` works (fails if the run
/// ends first). Other names may come and go before it: the writability probe of the output's
/// folder (`.onnx-slice-check.…`) is one.
fn wait_for_the_staged_folder(folder: &Path, prefix: &str, run: &mut std::process::Child) {
    let started = std::time::Instant::now();
    loop {
        let staged = |name: &String| name.starts_with(prefix) && name.ends_with(".part");
        if file_names(folder).iter().any(staged) {
            return;
        }
        let status = run.try_wait().unwrap();
        assert!(status.is_none(), "the run ended ({status:?}) before its output was staged");
        assert!(started.elapsed().as_secs() < 120, "no staged output after two minutes");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `onnx-slice inspect MODEL | head -1`: a reader that closes the pipe early ends the command
/// quietly (exit 0), not with a panic ("failed printing to stdout").
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    use std::process::{Command, Stdio};
    let runs: [&[&dyn AsRef<std::ffi::OsStr>]; 3] = [
        &[&"inspect", &model()],
        &[&"inspect", &model(), &"--json"],
        &[&model(), &"--dry-run", &"--ratio", &"0.25"],
    ];
    for run in runs {
        let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
            .args(args(run))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes before the command has loaded the model, so every write fails.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
    }
}

/// A first day's mistakes, each with a message that says what to do.
#[test]
fn a_new_users_first_mistakes_are_explained() {
    let outputs = scratch();
    let out = outputs.path().join("out.onnx");
    // A size without its %: 80 bytes is no model's size.
    let run = onnx_slice(args(&[&model(), &"-o", &out, &"--target-size", &"80"]));
    assert_usage_error(&run, "did you mean 80%?", outputs.path());
    // No size at all: every way to give one is named.
    let run = onnx_slice(args(&[&model(), &"-o", &out]));
    assert_usage_error(&run, "--ratio", outputs.path());
    assert!(run.stderr.contains("--target-size") && run.stderr.contains("--target-params"));
    // Calibration ids the model has no embedding for: refused before any calibration run.
    let ids = outputs.path().join("ids").join("ids.npy");
    std::fs::create_dir(ids.parent().unwrap()).unwrap();
    let data: Vec<u8> =
        (0..4 * 16).map(|i| if i == 21 { 5000i64 } else { 7 }).flat_map(i64::to_le_bytes).collect();
    write_npy(&ids, "<i8", &[4, 16], &data);
    let run = onnx_slice(args(&[&model(), &"-o", &out, &"--ratio", &"0.25", &"--calib-ids", &ids]));
    assert_usage_error(
        &run,
        "token id 5000 (row 1, column 5) is outside the model's vocabulary of 1000",
        outputs.path(),
    );
    assert!(!run.stderr.contains("Gather"), "{}", run.stderr);
}

/// One rule for an output that exists, file or folder, slicing or convert: it is refused (exit 2),
/// never replaced, and --help says so.
#[test]
fn an_existing_output_is_refused_never_replaced() {
    let outputs = scratch();
    let out = outputs.path().join("out.onnx");
    std::fs::write(&out, b"an earlier result").unwrap();
    let before = snapshot(outputs.path());
    let slicing = onnx_slice(args(&[&model(), &"-o", &out, &"--ratio", &"0.25"]));
    let convert = onnx_slice(args(&[&"convert", &model(), &"-o", &out]));
    for run in [slicing, convert] {
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        assert!(
            run.stderr.contains("exists") && run.stderr.contains("never replaces"),
            "{}",
            run.stderr
        );
        assert_eq!(snapshot(outputs.path()), before);
    }
    let folder = outputs.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("model.onnx"), b"an earlier result").unwrap();
    let run = onnx_slice(args(&[&fixture("llama/optimum"), &"-o", &folder, &"--ratio", &"0.25"]));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("not empty"), "{}", run.stderr);
    for command in [&["--help"][..], &["convert", "--help"]] {
        let help = onnx_slice(command).stdout.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(help.contains("An output that exists is refused, never replaced"), "{help}");
    }
}
