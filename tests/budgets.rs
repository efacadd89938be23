//! Size targets through the command, on one export of every fixture family: `--target-size`
//! writes a model at or under the target (and says so in the report), `--dry-run` predicts the
//! widths and bytes the real run writes without writing anything, and an unreachable target fails
//! with its own exit code and no output file.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use onnx_slice::onnx;
use onnx_slice::size::{weight_totals, Totals};

fn slice(model: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(["--calib-samples", "4", "--calib-seqlen", "32", "--quiet"])
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(run: &Output) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// `stream width D → [k, …] at …` and `… weight bytes B → A (…)` from the size summary.
fn summary_widths_and_bytes(text: &str) -> (String, u64) {
    let widths = text
        .lines()
        .find(|l| l.starts_with("stream width"))
        .and_then(|l| l.split('[').nth(1))
        .and_then(|l| l.split(']').next());
    let bytes = text
        .lines()
        .find_map(|l| l.split("weight bytes ").nth(1))
        .and_then(|b| b.split(" → ").nth(1))
        .and_then(|b| b.split(" (").next())
        .map(|b| b.replace(',', "").parse::<u64>().unwrap());
    (
        widths.unwrap_or_else(|| panic!("no widths in {text}")).to_string(),
        bytes.unwrap_or_else(|| panic!("no bytes in {text}")),
    )
}

/// The optimum export of every family, with its weight totals.
fn families() -> impl Iterator<Item = (&'static str, PathBuf, Totals)> {
    ARCHS.into_iter().map(|arch| {
        let model = fixture(&format!("{arch}/optimum/model.onnx"));
        let before = weight_totals(&onnx::load(&model).unwrap().graph);
        (arch, model, before)
    })
}

#[test]
fn target_size_is_met_on_every_family_and_dry_run_predicts_the_real_run() {
    let dir = scratch();
    let mut failures = Vec::new();
    for (arch, model, before) in families() {
        for (basis, target) in [("point", "85%"), ("block", "80%"), ("global", "75%")] {
            let out = dir.path().join(format!("{arch}-{basis}.onnx"));
            let report = dir.path().join(format!("{arch}-{basis}.json"));
            let args = ["--target-size", target, "--basis", basis];
            let dry = Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
                .arg(&model)
                .args(args)
                .arg("--dry-run")
                .output()
                .unwrap();
            if !dry.status.success() || out.exists() {
                failures.push(format!(
                    "{arch} {basis}: --dry-run failed or wrote a file: {}",
                    stderr(&dry)
                ));
                continue;
            }
            let run =
                slice(&model, &out, &[&args[..], &["--report", report.to_str().unwrap()]].concat());
            if !run.status.success() {
                failures.push(format!("{arch} {basis} --target-size {target}: {}", stderr(&run)));
                continue;
            }
            let written = weight_totals(&onnx::load(&out).unwrap().graph);
            let limit = (before.bytes as f64 * target.trim_end_matches('%').parse::<f64>().unwrap()
                / 100.0)
                .floor() as u64;
            if written.bytes > limit {
                failures.push(format!(
                    "{arch} {basis}: {} weight bytes, over the target {limit}",
                    written.bytes
                ));
            }
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
            let widths: Vec<String> =
                report["widths"].as_array().unwrap().iter().map(|w| w.to_string()).collect();
            let (dry_widths, dry_bytes) =
                summary_widths_and_bytes(&String::from_utf8_lossy(&dry.stdout));
            if dry_widths != widths.join(", ")
                || dry_bytes != written.bytes
                || report["weight_bytes_after"] != written.bytes
            {
                failures.push(format!(
                    "{arch} {basis}: --dry-run said [{dry_widths}], {dry_bytes} bytes; the run wrote {widths:?}, {} bytes",
                    written.bytes
                ));
            }
            if report["target_limit"] != limit || report["basis"] != basis {
                failures.push(format!(
                    "{arch} {basis}: report target_limit {} basis {}",
                    report["target_limit"], report["basis"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every method refuses a target it cannot meet (a target alone chooses `neurons`), with exit
/// code 4 and nothing written.
#[test]
fn an_unreachable_target_fails_with_its_own_exit_code_and_writes_nothing() {
    let dir = scratch();
    for arch in ARCHS {
        let model = fixture(&format!("{arch}/optimum/model.onnx"));
        let out = dir.path().join(format!("{arch}.onnx"));
        for (method, why) in [
            (&[][..], "no MLP width fits the target"),
            (&["--method", "slicegpt"][..], "no stream width fits the target"),
            (&["--method", "combined"][..], "no MLP width fits the target"),
        ] {
            for target in
                [["--target-size", "1000"], ["--target-params", "10"], ["--target-size", "1%"]]
            {
                let run = slice(&model, &out, &[&target[..], method].concat());
                let case = format!("{arch} {target:?} {method:?}");
                assert_eq!(run.status.code(), Some(4), "{case}: {}", stderr(&run));
                assert!(stderr(&run).contains(why), "{case}: {}", stderr(&run));
                assert!(!out.exists(), "{case}: an output file was written");
            }
        }
    }
}

#[test]
fn a_target_params_run_is_at_or_under_the_target() {
    let dir = scratch();
    let model = fixture("qwen2/optimum/model.onnx");
    let before = weight_totals(&onnx::load(&model).unwrap().graph);
    let target = before.parameters * 9 / 10;
    let out = dir.path().join("sliced.onnx");
    let run = slice(
        &model,
        &out,
        &["--target-params", &target.to_string(), "--orientation", "random-basis"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let after = weight_totals(&onnx::load(&out).unwrap().graph);
    assert!(after.parameters <= target, "{} parameters, target {target}", after.parameters);
}

/// `--allocate-widths`: widths per point from the spectra, still at or under the target, each a
/// multiple of `--round-to`, with the head's input at D.
#[test]
fn allocated_widths_meet_the_target_on_every_family() {
    let dir = scratch();
    let mut failures = Vec::new();
    for (arch, model, before) in families() {
        for basis in ["point", "block"] {
            let out = dir.path().join(format!("{arch}-{basis}.onnx"));
            let report = dir.path().join(format!("{arch}-{basis}.json"));
            let run = slice(
                &model,
                &out,
                &[
                    "--target-size",
                    "85%",
                    "--basis",
                    basis,
                    "--allocate-widths",
                    "--report",
                    report.to_str().unwrap(),
                ],
            );
            if !run.status.success() {
                failures.push(format!("{arch} {basis}: {}", stderr(&run)));
                continue;
            }
            let written = weight_totals(&onnx::load(&out).unwrap().graph);
            let limit = before.bytes * 85 / 100;
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
            let widths: Vec<u64> =
                report["widths"].as_array().unwrap().iter().map(|w| w.as_u64().unwrap()).collect();
            let d = report["stream_width"].as_u64().unwrap();
            if written.bytes > limit
                || widths.iter().any(|k| k % 8 != 0 || *k > d)
                || widths.last() != Some(&d)
            {
                failures.push(format!(
                    "{arch} {basis}: {} bytes (limit {limit}), widths {widths:?}",
                    written.bytes
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
