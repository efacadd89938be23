//! Files written so that nobody ever sees a partial one: the bytes go to a temporary file in the
//! destination's folder, which is renamed into place once complete. A failure leaves nothing.
//!
//! Also the scratch files that keep large intermediate tensors out of anonymous memory
//! ([`scratch`], docs/design.md §8), and the removal of staged outputs when a signal ends the
//! process ([`interrupt`]).
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::error::{Error, Result};

/// An output under construction: write to it, then [`Staged::commit`]; dropped without a commit,
/// it removes its temporary file.
pub struct Staged {
    target: PathBuf,
    writer: BufWriter<NamedTempFile>,
    _on_interrupt: RemoveOnInterrupt,
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
        let on_interrupt = RemoveOnInterrupt::register(file.path());
        Ok(Staged {
            target: target.into(),
            writer: BufWriter::with_capacity(1 << 20, file),
            _on_interrupt: on_interrupt,
        })
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

mod interrupt;
mod scratch;

pub use interrupt::{
    check_stop, clear_stop_request, remove_staged, request_stop, RemoveOnInterrupt,
};
pub use scratch::{park, ScratchScope, PARK_AT_LEAST};
