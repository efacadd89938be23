//! Files written so that nobody ever sees a partial one: the bytes go to a temporary file in the
//! destination's folder, which is renamed into place once complete. A failure leaves nothing.
//!
//! Also the scratch files that keep large intermediate tensors out of anonymous memory
//! ([`ScratchScope`], docs/design.md §8).
use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use memmap2::Mmap;
use tempfile::NamedTempFile;

use crate::error::{Error, Result};

/// An output under construction: write to it, then [`Staged::commit`]; dropped without a commit,
/// it removes its temporary file.
pub struct Staged {
    target: PathBuf,
    writer: BufWriter<NamedTempFile>,
}

impl Staged {
    pub fn new(target: &Path) -> Result<Self> {
        let name = target.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::Save {
            output: target.into(),
            message: "the path has no file name".into(),
        })?;
        let dir = parent_folder(target);
        let file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".part")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        Ok(Staged { target: target.into(), writer: BufWriter::with_capacity(1 << 20, file) })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The file with everything written so far flushed to it (to map what was written).
    pub fn flushed_file(&mut self) -> std::io::Result<&File> {
        self.writer.flush()?;
        Ok(self.writer.get_ref().as_file())
    }

    /// Where the bytes are until the commit, for writers that insist on a path of their own.
    pub fn temporary_path(&self) -> &Path {
        self.writer.get_ref().path()
    }

    /// Flushes, syncs, gives the file the usual permissions and renames it into place.
    pub fn commit(self) -> Result<()> {
        let target = self.target;
        let file = self.writer.into_inner().map_err(|e| Error::io(&target, e.into_error()))?;
        file.as_file().sync_all().map_err(|e| Error::io(&target, e))?;
        set_default_permissions(file.as_file());
        file.persist(&target).map_err(|e| Error::io(&target, e.error))?;
        Ok(())
    }
}

impl Write for Staged {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.writer.write(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// Writes `bytes` to `path` through a [`Staged`] file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut staged = Staged::new(path)?;
    staged.write_all(bytes).map_err(|e| Error::io(path, e))?;
    staged.commit()
}

/// The folder a file goes into ("." for a bare file name).
pub fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temporary files are created 0600; an output should get the usual 0644 (less the umask).
fn set_default_permissions(file: &File) {
    use std::os::unix::fs::PermissionsExt;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
}

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
