//! What an interrupted process must not leave behind. A staged output (a `.NAME.XXXX.part` file or
//! folder) is removed by its owner's `Drop` on every error; a signal (Ctrl-C, `kill`, a closed
//! terminal) ends the process without running destructors, and a 7B output left half-written
//! would hold gigabytes under a hidden name. So every staged path is also registered here, and the
//! binary's signal handler calls [`remove_staged`] before it exits. The library installs no
//! handler itself: signals belong to the program that embeds it.
//!
//! A program that cannot end the process on a signal (the Python package, whose caller gets a
//! `KeyboardInterrupt` and goes on) asks the work to stop instead: [`request_stop`]. Calibration
//! checks for it before every batch it runs ([`check_stop`]) and ends with [`Error::Interrupted`],
//! so the staged outputs are removed by their owners as on any other error.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every slicing run in this process to stop at its next check (and later runs at their
/// first), until [`clear_stop_request`].
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Lets runs go on again after [`request_stop`].
pub fn clear_stop_request() {
    STOP.store(false, Ordering::SeqCst);
}

/// [`Error::Interrupted`] once [`request_stop`] has been called.
pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

static STAGED: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A staged path that [`remove_staged`] removes until this guard is dropped (on commit or
/// ordinary cleanup, by the owner of the path).
#[derive(Debug)]
pub struct RemoveOnInterrupt {
    id: u64,
}

impl RemoveOnInterrupt {
    pub fn register(path: &Path) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        staged().push((id, path.to_path_buf()));
        RemoveOnInterrupt { id }
    }
}

impl Drop for RemoveOnInterrupt {
    fn drop(&mut self) {
        staged().retain(|(id, _)| *id != self.id);
    }
}

/// Removes every staged file and folder still registered; for a signal handler, just before the
/// process exits. Returns how many paths were removed.
pub fn remove_staged() -> usize {
    staged_paths().iter().filter(|path| remove(path)).count()
}

fn staged_paths() -> Vec<PathBuf> {
    staged().iter().map(|(_, path)| path.clone()).collect()
}

fn remove(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).is_ok(),
        Ok(_) => std::fs::remove_file(path).is_ok(),
        Err(_) => false,
    }
}

/// The registry, usable even if a thread panicked while holding it (the list stays valid).
fn staged() -> std::sync::MutexGuard<'static, Vec<(u64, PathBuf)>> {
    STAGED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Not `remove_staged` itself: it would remove the staged outputs of tests running beside
    // this one. tests/cli_checks.rs signals the binary instead.
    #[test]
    fn a_path_is_registered_until_its_guard_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (staged, committed) = (dir.path().join("a.part"), dir.path().join("b.part"));
        let _guard = RemoveOnInterrupt::register(&staged);
        drop(RemoveOnInterrupt::register(&committed));
        let paths = staged_paths();
        assert!(paths.contains(&staged));
        assert!(!paths.contains(&committed));
    }

    #[test]
    fn staged_files_and_folders_are_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (file, folder) = (dir.path().join("a.part"), dir.path().join("b.part"));
        std::fs::write(&file, b"x").unwrap();
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("model.onnx"), b"y").unwrap();
        assert!(remove(&file) && remove(&folder));
        assert!(!file.exists() && !folder.exists());
        assert!(!remove(&file), "a path already gone is not counted");
    }
}
