//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! Where the library is looked for, first match wins:
//! 1. the `--ort-lib` path, when given;
//! 2. the `ORT_DYLIB_PATH` environment variable, when set and not empty;
//! 3. `${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}/onnxruntime-1.31.1/libonnxruntime.so.1.31.1`,
//!    where `scripts/setup-ort.sh` puts it.
//!
//! A chosen path that does not exist is an error: a mistyped `--ort-lib` must not silently fall
//! back to another copy of ONNX Runtime.
//!
//! ONNX Runtime can be loaded only once per process (it owns process-wide state and `ort` keeps
//! the first library it opened). [`init_runtime`] therefore succeeds again for the same library,
//! and returns [`RuntimeError::AlreadyInitialised`] when asked for a different one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use ort::environment::Environment;

use crate::error::{LibrarySource, RuntimeError};

/// The ONNX Runtime version `scripts/setup-ort.sh` installs and the default location names.
pub const ORT_VERSION: &str = "1.31.1";

const LIBRARY_FILE_NAME: &str = "libonnxruntime.so.1.31.1";

/// A library path and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryLocation {
    pub path: PathBuf,
    pub source: LibrarySource,
}

/// The environment variables that decide where the library is looked for.
///
/// Kept as data so that the search can be tested without touching the process environment.
#[derive(Debug, Clone, Default)]
pub struct LibrarySearchEnv {
    pub ort_dylib_path: Option<OsString>,
    pub onnx_slice_home: Option<OsString>,
    pub xdg_cache_home: Option<OsString>,
    pub home: Option<OsString>,
}

impl LibrarySearchEnv {
    /// Reads the variables from this process; empty values count as unset, as `${VAR:-...}` does.
    pub fn from_process() -> Self {
        Self {
            ort_dylib_path: non_empty_var("ORT_DYLIB_PATH"),
            onnx_slice_home: non_empty_var("ONNX_SLICE_HOME"),
            xdg_cache_home: non_empty_var("XDG_CACHE_HOME"),
            home: non_empty_var("HOME"),
        }
    }
}

fn non_empty_var(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|value| !value.is_empty())
}

/// Where `scripts/setup-ort.sh` installs the library, or `None` when no home directory is known.
pub fn default_library_path(env: &LibrarySearchEnv) -> Option<PathBuf> {
    let onnx_slice_home = match (&env.onnx_slice_home, &env.xdg_cache_home, &env.home) {
        (Some(home), _, _) => PathBuf::from(home),
        (None, Some(cache), _) => Path::new(cache).join("onnx-slice"),
        (None, None, Some(home)) => Path::new(home).join(".cache").join("onnx-slice"),
        (None, None, None) => return None,
    };
    Some(onnx_slice_home.join(format!("onnxruntime-{ORT_VERSION}")).join(LIBRARY_FILE_NAME))
}

/// Picks the library path by precedence, without checking that it exists.
pub fn choose_library(
    explicit: Option<&Path>,
    env: &LibrarySearchEnv,
) -> Result<LibraryLocation, RuntimeError> {
    if let Some(path) = explicit {
        return Ok(LibraryLocation { path: path.to_path_buf(), source: LibrarySource::Flag });
    }
    if let Some(path) = &env.ort_dylib_path {
        return Ok(LibraryLocation { path: PathBuf::from(path), source: LibrarySource::EnvVar });
    }
    default_library_path(env)
        .map(|path| LibraryLocation { path, source: LibrarySource::Default })
        .ok_or(RuntimeError::NoDefaultLibraryLocation)
}

/// Picks the library path by precedence and checks that it is a file.
///
/// Relative paths are taken relative to the current directory (never searched for in the
/// system's library path), so that the error names the file that was really looked at.
pub fn locate_library(
    explicit: Option<&Path>,
    env: &LibrarySearchEnv,
) -> Result<LibraryLocation, RuntimeError> {
    let chosen = choose_library(explicit, env)?;
    let path = std::path::absolute(&chosen.path).unwrap_or_else(|_| chosen.path.clone());
    if path.is_file() {
        return Ok(LibraryLocation { path, source: chosen.source });
    }
    Err(RuntimeError::LibraryNotFound {
        path,
        origin: chosen.source,
        default: default_library_path(env).filter(|_| chosen.source != LibrarySource::Default),
        version: ORT_VERSION,
    })
}

struct LoadedRuntime {
    library: PathBuf,
    /// The library's own version string (`OrtGetApiBase()->GetVersionString()`), when it gave one.
    version: Option<String>,
    environment: Environment,
}

static RUNTIME: OnceLock<LoadedRuntime> = OnceLock::new();
// Serialises first loads: two threads must not both open a library and race to register it.
static LOADING: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime (once per process) and returns the path of the library in use.
///
/// `explicit` is the `--ort-lib` value. Calling this again with the same library is a no-op;
/// with a different one it returns [`RuntimeError::AlreadyInitialised`].
pub fn init_runtime(explicit: Option<&Path>) -> Result<&'static Path, RuntimeError> {
    let location = locate_library(explicit, &LibrarySearchEnv::from_process())?;
    let _loading = LOADING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(loaded) = RUNTIME.get() {
        return same_library_or_error(loaded, &location.path);
    }
    let loaded = load_runtime(&location.path)?;
    Ok(&RUNTIME.get_or_init(|| loaded).library)
}

/// The path of the library this process loaded, if any.
pub fn loaded_library() -> Option<&'static Path> {
    RUNTIME.get().map(|loaded| loaded.library.as_path())
}

/// The version of the ONNX Runtime library this process loaded ("1.31.1"), as the library itself
/// reports it; `None` before [`init_runtime`] (or if the library gave no readable version).
pub fn loaded_version() -> Option<&'static str> {
    RUNTIME.get().and_then(|loaded| loaded.version.as_deref())
}

/// How much of ONNX Runtime's own logging reaches stderr. ONNX Runtime starts at `Error` (or at
/// the `ORT_LOG` environment variable's level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Everything, down to where each node runs.
    Verbose,
    /// Sessions, graph optimizations and execution providers as they are set up.
    Info,
    Warning,
    Error,
}

impl LogLevel {
    /// The level for a command line's `-v` count: `-v` its warnings, `-vv` also its information
    /// messages, `-vvv` everything; without `-v`, ONNX Runtime's own default (errors only).
    pub fn for_verbosity(count: u8) -> Option<LogLevel> {
        match count {
            0 => None,
            1 => Some(LogLevel::Warning),
            2 => Some(LogLevel::Info),
            _ => Some(LogLevel::Verbose),
        }
    }
}

/// Sets ONNX Runtime's log level for every session from now on (loading the library from its
/// usual place if no one has called [`init_runtime`] yet).
pub fn set_log_level(level: LogLevel) -> Result<(), RuntimeError> {
    environment()?.set_log_level(match level {
        LogLevel::Verbose => ort::logging::LogLevel::Verbose,
        LogLevel::Info => ort::logging::LogLevel::Info,
        LogLevel::Warning => ort::logging::LogLevel::Warning,
        LogLevel::Error => ort::logging::LogLevel::Error,
    });
    Ok(())
}

/// The process's ONNX Runtime environment, loading the library from its usual place if no one
/// has called [`init_runtime`] yet.
pub(crate) fn environment() -> Result<Environment, RuntimeError> {
    if let Some(loaded) = RUNTIME.get() {
        return Ok(loaded.environment.clone());
    }
    init_runtime(None)?;
    RUNTIME.get().map(|loaded| loaded.environment.clone()).ok_or_else(|| {
        RuntimeError::Environment { reason: "ONNX Runtime was not initialised".into() }
    })
}

fn load_runtime(library: &Path) -> Result<LoadedRuntime, RuntimeError> {
    let builder = ort::init_from(library).map_err(|error| RuntimeError::LibraryLoad {
        path: library.to_path_buf(),
        reason: error.to_string(),
        version: ORT_VERSION,
    })?;
    // Telemetry is off: onnx-slice never sends data anywhere.
    let environment = builder
        .with_name("onnx-slice")
        .with_telemetry(false)
        .build()
        .map_err(|error| RuntimeError::Environment { reason: error.to_string() })?;
    Ok(LoadedRuntime {
        library: library.to_path_buf(),
        version: library_version(library),
        environment,
    })
}

/// While one is alive, sessions built with [`SessionConfig::shared_arena`] allocate their CPU
/// memory from one arena the environment holds. Calibration runs each segment in a session of its
/// own, a few runs each: a session's own arena starts cold (fresh pages for every buffer: SmolLM2's
/// segment runs took 15 % longer), and while any tensor from it is alive (the stream it produced)
/// it stays whole. The arena goes when the last guard does (its tensors keep it until they go).
///
/// [`SessionConfig::shared_arena`]: super::SessionConfig::shared_arena
pub struct SharedArena(());

static SHARED_ARENA_USERS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

impl SharedArena {
    pub fn acquire() -> Result<Self, RuntimeError> {
        let mut users = SHARED_ARENA_USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *users == 0 {
            shared_arena_call(true)?;
        }
        *users += 1;
        Ok(SharedArena(()))
    }
}

impl Drop for SharedArena {
    fn drop(&mut self) {
        let mut users = SHARED_ARENA_USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *users = users.saturating_sub(1);
        if *users == 0 {
            // Nothing to tell anyone if it fails: the arena then lives until the process ends.
            let _ = shared_arena_call(false);
        }
    }
}

/// Registers (`register`) or unregisters the environment's CPU arena, with ONNX Runtime's default
/// arena settings (growing in powers of two: asked-for sizes fragmented it, 20 % more peak memory).
fn shared_arena_call(register: bool) -> Result<(), RuntimeError> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    use ort::AsPointer;
    let fail = |reason: String| RuntimeError::Environment { reason };
    let environment = environment()?;
    let info = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)
        .map_err(|error| fail(error.to_string()))?;
    let env = environment.ptr().cast_mut();
    // SAFETY: the environment and the memory info are live for the call; a null arena
    // configuration asks for the defaults; the environment owns the allocator it creates.
    let status = unsafe {
        if register {
            (ort::api().CreateAndRegisterAllocator)(env, info.ptr(), std::ptr::null())
        } else {
            (ort::api().UnregisterAllocator)(env, info.ptr())
        }
    };
    // SAFETY: `status` was just returned by an ONNX Runtime API call.
    unsafe { ort::Error::result_from_status(status) }.map_err(|error| fail(error.to_string()))
}

/// The version string of the library at `library`, which `ort` has just loaded: opening it again
/// only takes another reference to the same loaded copy. (`ort` reads it too, but keeps it
/// private.)
fn library_version(library: &Path) -> Option<String> {
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: the library is a loaded ONNX Runtime (ort::init_from succeeded on this path), whose
    // `OrtGetApiBase` has this signature and returns a pointer to a static table; its
    // `GetVersionString` returns a static NUL-terminated string, copied before `handle` drops.
    unsafe {
        let handle = libloading::Library::new(library).ok()?;
        let get_api_base: libloading::Symbol<'_, GetApiBase> = handle.get(b"OrtGetApiBase").ok()?;
        let base = get_api_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).GetVersionString)();
        if version.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(version).to_str().ok().map(str::to_string)
    }
}

fn same_library_or_error(
    loaded: &'static LoadedRuntime,
    requested: &Path,
) -> Result<&'static Path, RuntimeError> {
    if same_file(&loaded.library, requested) {
        return Ok(&loaded.library);
    }
    Err(RuntimeError::AlreadyInitialised {
        loaded: loaded.library.clone(),
        requested: requested.to_path_buf(),
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
