//! Export folders as inputs and outputs, without the clients (those are tests/clients.rs): which
//! folders are refused, with exit code 2 and before anything is written; that the output folder
//! appears complete or not at all; that a folder's model keeps its storage; and that `inspect`,
//! `eval` and `convert` take folders too.
mod common;

use std::path::{Path, PathBuf};

use common::cli::{onnx_slice, snapshot};
use common::{file_names as names, fixture, scratch};
use onnx_slice::export::{plan_output, resolve_input, Destination, Family};
use onnx_slice::onnx::{self, SaveOptions};

/// A copy of a fixture folder in `dir` (tests that change the input work on copies).
fn copy_folder(rel: &str, dir: &Path) -> PathBuf {
    let to = dir.join(rel.replace('/', "-"));
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(fixture(rel)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    to
}

/// A slicing run that needs no calibration.
fn slice(input: &Path, out: &Path, extra: &[&str]) -> common::cli::Outcome {
    let mut args = vec![
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--ratio",
        "0.25",
        "--orientation",
        "random",
        "--quiet",
    ];
    args.extend(extra);
    onnx_slice(args)
}

#[test]
fn an_output_folder_in_the_input_folder_is_refused_before_any_work() {
    let dir = scratch();
    let input = copy_folder("llama/optimum", dir.path());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let before = snapshot(&input);
    let inside = [
        input.join("sliced"),
        input.clone(),
        input.join("..").join(input.file_name().unwrap()),
        link.join("sliced"),
        link.clone(),
    ];
    for out in inside {
        let run = slice(&input, &out, &[]);
        assert_eq!(run.code, Some(2), "-o {}: {}", out.display(), run.stderr);
        assert!(run.stderr.contains("the input folder"), "{}", run.stderr);
        assert!(run.seconds < 10.0, "refused after {} s", run.seconds);
        assert_eq!(snapshot(&input), before, "-o {}: the input folder changed", out.display());
        assert_eq!(names(&input), names(&fixture("llama/optimum")));
    }
}

#[test]
fn an_output_folder_must_be_new_or_empty() {
    let dir = scratch();
    let input = fixture("llama/optimum");
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let run = slice(&input, &full, &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("not empty"), "{}", run.stderr);
    assert_eq!(names(&full), ["keep.txt"]);

    let file = dir.path().join("model.sliced.onnx");
    std::fs::write(&file, b"x").unwrap();
    let run = slice(&input, &file, &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("export folder"), "{}", run.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    let run = slice(&input, &dir.path().join("new.onnx"), &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("names a .onnx file"), "{}", run.stderr);

    let missing_parent = dir.path().join("no/such/out");
    let run = slice(&input, &missing_parent, &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let run = slice(&input, &empty, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(names(&empty).contains(&"model.onnx".to_string()));
    assert_eq!(names(dir.path()), ["empty", "full", "model.sliced.onnx"], "nothing else is left");
}

#[test]
fn folders_that_are_not_one_export_are_refused() {
    let dir = scratch();
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(fixture("llama/ts17/model.onnx"), bare.join("model.onnx")).unwrap();
    let run = slice(&bare, &dir.path().join("out1"), &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("not an export folder"), "{}", run.stderr);

    let two = copy_folder("llama/optimum", dir.path());
    std::fs::copy(fixture("llama/ts17/model.onnx"), two.join("model.sliced.onnx")).unwrap();
    let run = slice(&two, &dir.path().join("out2"), &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("model.sliced.onnx"), "{}", run.stderr);

    let genai = copy_folder("llama/genai", dir.path());
    std::fs::copy(fixture("llama/ts17/model.onnx"), genai.join("other.onnx")).unwrap();
    let run = slice(&genai, &dir.path().join("out3"), &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("other.onnx"), "{}", run.stderr);

    let config = genai.join("genai_config.json");
    std::fs::remove_file(genai.join("other.onnx")).unwrap();
    std::fs::write(&config, b"{ not json").unwrap();
    let run = slice(&genai, &dir.path().join("out4"), &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("genai_config.json"), "{}", run.stderr);
    assert_eq!(
        names(dir.path()),
        ["bare", "llama-genai", "llama-optimum"],
        "no output was created"
    );
}

#[test]
fn a_failure_while_writing_leaves_no_folder() {
    let dir = scratch();
    let input = copy_folder("llama/optimum", dir.path());
    let source = resolve_input(&input).unwrap();
    assert_eq!(source.folder.as_ref().unwrap().family, Family::Optimum);
    let out = dir.path().join("out");
    let destination = plan_output(&source, &out).unwrap();
    let Destination::Folder(plan) = &destination else { panic!("a folder input writes a folder") };
    assert!(plan.side_files().contains(&"tokenizer.json".to_string()), "{:?}", plan.side_files());
    let model = onnx::load(&source.model).unwrap();
    // A side file that disappears between the plan and the copy.
    std::fs::remove_file(input.join("tokenizer.json")).unwrap();
    let err = destination.save(&model, &SaveOptions::default()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert_eq!(names(dir.path()), ["llama-optimum"], "a partial folder was left");
}

#[test]
fn a_folders_model_keeps_its_storage_and_the_familys_data_name() {
    let dir = scratch();
    let genai = dir.path().join("genai");
    let run = slice(&fixture("llama/genai"), &genai, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(names(&genai).contains(&"model.onnx.data".to_string()), "{:?}", names(&genai));

    let inline = dir.path().join("genai-inline");
    let run = slice(&fixture("llama/genai"), &inline, &["--inline"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!names(&inline).iter().any(|n| n.contains("data")), "{:?}", names(&inline));

    let optimum = dir.path().join("optimum");
    let run = slice(&fixture("gpt2/optimum_past"), &optimum, &["--external-data"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(names(&optimum).contains(&"model.onnx_data".to_string()), "{:?}", names(&optimum));
    assert!(!names(&optimum).contains(&"model.onnx.data".to_string()));
    // A model written into a folder is read back from it, its data found by the model's own record.
    let reloaded = onnx::load(optimum.join("model.onnx")).unwrap();
    assert_eq!(reloaded.source.unwrap().external_files, [optimum.join("model.onnx_data")]);
}

#[test]
fn inspect_eval_and_convert_take_folders() {
    let dir = scratch();
    let run = onnx_slice(["inspect", fixture("qwen2/genai").to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("genai/model.onnx"), "{}", run.stdout);

    let text = fixture("calibration.txt");
    let run = onnx_slice([
        "eval",
        fixture("llama/optimum").to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seqlen",
        "32",
        "--max-windows",
        "2",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let out = dir.path().join("converted");
    let input = fixture("llama/genai");
    let run =
        onnx_slice(["convert", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--inline"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let mut expected: Vec<String> =
        names(&input).into_iter().filter(|n| n != "model.onnx.data").collect();
    expected.sort();
    assert_eq!(names(&out), expected);
    assert_eq!(
        std::fs::read(out.join("genai_config.json")).unwrap(),
        std::fs::read(input.join("genai_config.json")).unwrap()
    );

    let run =
        onnx_slice(["convert", input.to_str().unwrap(), "-o", input.join("x").to_str().unwrap()]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}
