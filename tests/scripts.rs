//! The set-up scripts say what they do: the first build is announced and shows cargo's progress
//! (later runs show what cargo says while it works, but not its "Finished" line); fetching ONNX
//! Runtime's library and making the clients' venv are announced before they start.
//! `cargo` and `python3` are stand-ins on PATH that record how they were called, so nothing is
//! built or downloaded here.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::scratch;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

fn write_executable(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A folder with stand-ins for `cargo` (prints its arguments) and `python3` (fails: no download).
fn stand_ins(dir: &Path) -> String {
    let bin = dir.join("bin");
    write_executable(&bin.join("cargo"), "#!/bin/sh\necho \"cargo $*\"\n");
    write_executable(&bin.join("python3"), "#!/bin/sh\nexit 1\n");
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// An ONNX Runtime home where the library is already in place (setup-ort.sh then does nothing).
fn ort_home(dir: &Path) -> PathBuf {
    let home = dir.join("ort-home");
    let lib = home.join("onnxruntime-1.31.1").join("libonnxruntime.so.1.31.1");
    std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
    std::fs::write(&lib, b"").unwrap();
    home
}

fn run(command: &mut Command) -> (String, String) {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A stand-in `cargo` that says what a real one says while it waits for another build and when it
/// is done (on stderr), prints how it was called (on stdout), and "builds" a binary that prints
/// its arguments.
fn building_cargo(dir: &Path) -> String {
    let bin = dir.join("bin");
    let script = r#"#!/bin/sh
echo "cargo $*"
echo "    Blocking waiting for file lock on build directory" >&2
mkdir -p "$CARGO_TARGET_DIR/release"
printf '#!/bin/sh\necho "onnx-slice $*"\n' > "$CARGO_TARGET_DIR/release/onnx-slice"
chmod +x "$CARGO_TARGET_DIR/release/onnx-slice"
echo "    Finished \`release\` profile [optimized] target(s) in 0.20s" >&2
"#;
    write_executable(&bin.join("cargo"), script);
    write_executable(&bin.join("python3"), "#!/bin/sh\nexit 1\n");
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// The first build is announced and shows cargo's progress; later runs show what cargo says while
/// it works (waiting for another build's lock: a minute of silence otherwise), but not its
/// "Finished" line.
#[test]
fn the_first_build_is_announced_and_cargo_is_heard_when_it_waits() {
    let dir = scratch();
    let path = building_cargo(dir.path());
    let target = dir.path().join("target");
    let onnx_slice = || {
        run(Command::new(script("onnx-slice"))
            .arg("--version")
            .env("PATH", &path)
            .env("CARGO_TARGET_DIR", &target)
            .env("ONNX_SLICE_HOME", ort_home(dir.path())))
    };

    let (stdout, stderr) = onnx_slice();
    assert!(stderr.contains("first build") && stderr.contains("several minutes"), "{stderr}");
    assert!(stderr.contains("Finished"), "the first build shows all of cargo's output: {stderr}");
    assert!(stdout.starts_with("cargo build --release") && !stdout.contains("--quiet"), "{stdout}");
    assert!(stdout.ends_with("onnx-slice --version\n"), "{stdout}");

    let (stdout, stderr) = onnx_slice();
    assert_eq!(stderr, "    Blocking waiting for file lock on build directory\n");
    assert!(stdout.starts_with("cargo build --release") && !stdout.contains("--quiet"), "{stdout}");
    assert!(stdout.ends_with("onnx-slice --version\n"), "{stdout}");
}

#[test]
fn fetching_onnx_runtime_is_announced_before_it_starts() {
    let dir = scratch();
    let home = dir.path().join("empty-home");
    let out = Command::new(script("setup-ort.sh"))
        .env("PATH", stand_ins(dir.path()))
        .env("ONNX_SLICE_HOME", &home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the stand-in python3 fails the download");
    assert!(
        stderr.contains("setup-ort: fetching ONNX Runtime 1.31.1")
            && stderr.contains(&home.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn the_clients_venv_is_announced_with_its_size_before_it_is_made() {
    let dir = scratch();
    let home = dir.path().join("empty-home");
    let out = Command::new(script("setup-clients.sh"))
        .env("PATH", stand_ins(dir.path()))
        .env("ONNX_SLICE_HOME", &home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the stand-in python3 makes no venv");
    assert!(
        stderr.contains("setup-clients: creating the Python venv")
            && stderr.contains(&home.join("venv-clients").display().to_string())
            && stderr.contains("5.7 GB"),
        "{stderr}"
    );
}
