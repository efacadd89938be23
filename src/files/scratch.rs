//! Scratch files: large tensors parked out of anonymous memory while a model is rewritten
//! (docs/design.md §8). Each file is unlinked as soon as it is made, so nothing is left behind.
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use memmap2::Mmap;

use crate::error::{Error, Result};

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// While a scope is alive, [`park`] on its thread puts large buffers in scratch files in its
/// folder. The passes create every large tensor through [`park`], so the rewritten weights of a
/// model larger than memory live in the page cache (which the kernel writes back and drops) and
/// not in anonymous memory. A scope is per thread and restores the previous one when dropped.
pub struct ScratchScope {
    previous: Option<PathBuf>,
}

impl ScratchScope {
    pub fn enter(folder: &Path) -> Self {
        let previous = SCRATCH.with(|s| s.replace(Some(folder.to_path_buf())));
        ScratchScope { previous }
    }

    /// No parking until the guard is dropped: for buffers their consumer writes out at once.
    pub fn suspend() -> Self {
        let previous = SCRATCH.with(|s| s.replace(None));
        ScratchScope { previous }
    }
}

impl Drop for ScratchScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SCRATCH.with(|s| *s.borrow_mut() = previous);
    }
}

/// Buffers smaller than this stay in memory: a file each would cost more than it saves.
pub const PARK_AT_LEAST: usize = 1 << 20;

/// `bytes` as shared bytes: inside a [`ScratchScope`] and from [`PARK_AT_LEAST`] bytes on, in a
/// scratch file of the scope's folder, mapped read-only; otherwise in memory as they are. The
/// scratch file has no name (it is unlinked at once), so nothing is left behind whatever happens,
/// and its disk space is freed when the last view of it is dropped.
pub fn park(bytes: Vec<u8>) -> Result<Bytes> {
    let folder = SCRATCH.with(|s| s.borrow().clone());
    match folder {
        Some(folder) if bytes.len() >= PARK_AT_LEAST => {
            let fail = |e: std::io::Error| Error::Save {
                output: folder.clone(),
                message: format!("cannot write a scratch file of {} bytes there: {e}", bytes.len()),
            };
            let mut file = tempfile::tempfile_in(&folder).map_err(fail)?;
            file.write_all(&bytes).map_err(fail)?;
            // SAFETY: the file has no name, so no other process can change it; this handle and the
            // map are the only ones, and the map is read-only.
            let map = unsafe { Mmap::map(&file) }.map_err(fail)?;
            Ok(Bytes::from_owner(map))
        }
        _ => Ok(Bytes::from(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line of /proc/self/maps whose range holds `address`.
    fn mapping_of(address: *const u8) -> String {
        let address = address as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").expect("Linux");
        maps.lines()
            .find(|line| {
                let range = line.split_whitespace().next().unwrap_or("");
                let (start, end) = range.split_once('-').unwrap_or(("0", "0"));
                let parse = |h: &str| usize::from_str_radix(h, 16).unwrap_or(0);
                (parse(start)..parse(end)).contains(&address)
            })
            .unwrap_or_else(|| panic!("no mapping holds {address:#x}"))
            .to_string()
    }

    #[test]
    fn parked_bytes_live_in_an_unlinked_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = (0..PARK_AT_LEAST + 5).map(|i| (i % 251) as u8).collect();
        let parked = {
            let _scope = ScratchScope::enter(dir.path());
            park(values.clone()).unwrap()
        };
        assert_eq!(&parked[..], &values[..]);
        let mapping = mapping_of(parked.as_ptr());
        assert!(
            mapping.contains(&dir.path().display().to_string()) && mapping.ends_with("(deleted)"),
            "{mapping}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the scratch file has a name"
        );
    }

    #[test]
    fn without_a_scope_or_below_the_size_bytes_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let outside = park(vec![1u8; PARK_AT_LEAST]).unwrap();
        assert!(!mapping_of(outside.as_ptr()).contains('/'), "{}", mapping_of(outside.as_ptr()));
        let _scope = ScratchScope::enter(dir.path());
        let small = park(vec![1u8; PARK_AT_LEAST - 1]).unwrap();
        assert!(!mapping_of(small.as_ptr()).contains(&dir.path().display().to_string()));
    }

    #[test]
    fn a_scope_ends_with_its_guard_and_restores_the_one_before() {
        let (outer, inner) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _outer = ScratchScope::enter(outer.path());
        {
            let _inner = ScratchScope::enter(inner.path());
            let parked = park(vec![2u8; PARK_AT_LEAST]).unwrap();
            assert!(mapping_of(parked.as_ptr()).contains(&inner.path().display().to_string()));
        }
        let parked = park(vec![3u8; PARK_AT_LEAST]).unwrap();
        assert!(mapping_of(parked.as_ptr()).contains(&outer.path().display().to_string()));
        {
            let _suspended = ScratchScope::suspend();
            let kept = park(vec![4u8; PARK_AT_LEAST]).unwrap();
            assert!(!mapping_of(kept.as_ptr()).contains('/'), "{}", mapping_of(kept.as_ptr()));
        }
        let parked = park(vec![5u8; PARK_AT_LEAST]).unwrap();
        assert!(mapping_of(parked.as_ptr()).contains(&outer.path().display().to_string()));
    }
}
