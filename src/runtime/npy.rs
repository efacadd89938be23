//! Reading NumPy `.npy` arrays and `.npz` archives (as written by `np.save` / `np.savez`).
//!
//! Supported: little-endian int64, int32, float32 and float64 arrays, C or Fortran order
//! (Fortran-order arrays are returned in standard C layout), format versions 1.0–3.0.
//! An `.npz` is a zip of `.npy` entries; only stored (uncompressed) entries are read, which is
//! what `np.savez` writes (`np.savez_compressed` archives are rejected with a clear error).
//! Used for reference data in tests and for `--calib-ids FILE.npy`.

mod stored_zip;

use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn, ShapeBuilder};

use stored_zip::{stored_entries, ZipError};

/// An array read from a `.npy` file, by element type.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyArray {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
}

/// Why a `.npy` or `.npz` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },

    #[error("{origin} is not a valid {kind} file: {reason}")]
    Invalid { origin: String, kind: &'static str, reason: String },

    #[error(
        "{origin} has dtype {descr}, which onnx-slice cannot read; supported are little-endian \
         int64 (<i8), int32 (<i4), float32 (<f4) and float64 (<f8)"
    )]
    UnsupportedDtype { origin: String, descr: String },

    #[error(
        "{origin}: entry `{entry}` is compressed (zip method {method}); onnx-slice reads only \
         archives written by np.savez, not np.savez_compressed: re-save it with np.savez"
    )]
    CompressedEntry { origin: String, entry: String, method: u16 },

    #[error("{origin} has no array named `{name}`; it has: {}", available.join(", "))]
    MissingEntry { origin: String, name: String, available: Vec<String> },

    #[error("expected an array of {expected}, got {found}")]
    WrongDtype { expected: &'static str, found: &'static str },
}

impl NpyArray {
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32(array) => array.shape(),
            Self::F64(array) => array.shape(),
            Self::I64(array) => array.shape(),
            Self::I32(array) => array.shape(),
        }
    }

    /// NumPy's name for the element type: `float32`, `int64`, ...
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Self::F32(_) => Dtype::F32.name(),
            Self::F64(_) => Dtype::F64.name(),
            Self::I64(_) => Dtype::I64.name(),
            Self::I32(_) => Dtype::I32.name(),
        }
    }

    /// The array as int64; int32 arrays are widened (token ids are often saved as int32).
    pub fn into_i64(self) -> Result<ArrayD<i64>, NpyError> {
        match self {
            Self::I64(array) => Ok(array),
            Self::I32(array) => Ok(array.mapv(i64::from)),
            other => Err(other.wrong_dtype("int64 or int32")),
        }
    }

    /// The array as float32; other types are refused rather than rounded.
    pub fn into_f32(self) -> Result<ArrayD<f32>, NpyError> {
        match self {
            Self::F32(array) => Ok(array),
            other => Err(other.wrong_dtype("float32")),
        }
    }

    /// The array as float64; float32 arrays are widened exactly.
    pub fn into_f64(self) -> Result<ArrayD<f64>, NpyError> {
        match self {
            Self::F64(array) => Ok(array),
            Self::F32(array) => Ok(array.mapv(f64::from)),
            other => Err(other.wrong_dtype("float64 or float32")),
        }
    }

    fn wrong_dtype(&self, expected: &'static str) -> NpyError {
        NpyError::WrongDtype { expected, found: self.dtype_name() }
    }
}

/// The arrays of an `.npz` archive, in archive order, named without their `.npy` suffix.
#[derive(Debug, Clone, PartialEq)]
pub struct Npz {
    origin: String,
    arrays: Vec<(String, NpyArray)>,
}

impl Npz {
    pub fn read(path: &Path) -> Result<Self, NpyError> {
        let bytes = read_file(path)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses an archive already in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, NpyError> {
        let entries = stored_entries(bytes).map_err(|error| zip_error(origin, error))?;
        let arrays = entries
            .into_iter()
            .map(|entry| {
                let entry_origin = format!("{origin}:{}", entry.name);
                let array = parse_npy(entry.data, &entry_origin)?;
                let name = entry.name.strip_suffix(".npy").unwrap_or(&entry.name).to_string();
                Ok((name, array))
            })
            .collect::<Result<_, NpyError>>()?;
        Ok(Self { origin: origin.to_string(), arrays })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.arrays.iter().map(|(name, _)| name.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&NpyArray> {
        self.arrays.iter().find(|(entry, _)| entry == name).map(|(_, array)| array)
    }

    /// The named array, or an error listing the names the archive has.
    pub fn array(&self, name: &str) -> Result<&NpyArray, NpyError> {
        self.get(name).ok_or_else(|| NpyError::MissingEntry {
            origin: self.origin.clone(),
            name: name.to_string(),
            available: self.names().map(str::to_string).collect(),
        })
    }

    pub fn into_vec(self) -> Vec<(String, NpyArray)> {
        self.arrays
    }
}

/// Reads one `.npy` file.
pub fn read_npy(path: &Path) -> Result<NpyArray, NpyError> {
    let bytes = read_file(path)?;
    parse_npy(&bytes, &path.display().to_string())
}

/// Parses the bytes of one `.npy` file; `origin` names it in errors.
pub fn parse_npy(bytes: &[u8], origin: &str) -> Result<NpyArray, NpyError> {
    let (header_text, data) = split_header(bytes).map_err(|reason| invalid_npy(origin, reason))?;
    let header = parse_header(header_text).map_err(|reason| invalid_npy(origin, reason))?;
    let dtype = Dtype::from_descr(&header.descr)
        .ok_or_else(|| NpyError::UnsupportedDtype { origin: origin.to_string(), descr: header.descr.clone() })?;
    let shape = header.shape_with_order();
    let element_count: usize = header.shape.iter().product();
    let expected_bytes = element_count * dtype.size();
    if data.len() != expected_bytes {
        let reason = format!("shape {:?} of {} needs {expected_bytes} data bytes, found {}", header.shape, dtype.name(), data.len());
        return Err(invalid_npy(origin, reason));
    }
    Ok(decode(dtype, data, shape).map_err(|reason| invalid_npy(origin, reason))?.into_standard_layout())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    I64,
    I32,
}

impl Dtype {
    fn from_descr(descr: &str) -> Option<Self> {
        // '=' is native order, which numpy writes as '<' on little-endian machines anyway.
        let little_endian = descr.strip_prefix('<').or_else(|| descr.strip_prefix('='))?;
        match little_endian {
            "f4" => Some(Self::F32),
            "f8" => Some(Self::F64),
            "i8" => Some(Self::I64),
            "i4" => Some(Self::I32),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F64 => "float64",
            Self::I64 => "int64",
            Self::I32 => "int32",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl Header {
    fn shape_with_order(&self) -> ndarray::Shape<IxDyn> {
        IxDyn(&self.shape).set_f(self.fortran_order)
    }
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Splits a `.npy` file into its header text and its data bytes.
fn split_header(bytes: &[u8]) -> Result<(&str, &[u8]), String> {
    if !bytes.starts_with(NPY_MAGIC) {
        return Err("it does not start with the .npy magic string".into());
    }
    let major_version = *bytes.get(6).ok_or("it is truncated")?;
    let (length_field, header_start) = match major_version {
        1 => (bytes.get(8..10).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))), 10),
        2 | 3 => (bytes.get(8..12).and_then(|b| usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()), 12),
        other => return Err(format!("format version {other} is not supported (1, 2 and 3 are)")),
    };
    let header_len = length_field.ok_or("it is truncated")?;
    let header_end = header_start + header_len;
    let header = bytes.get(header_start..header_end).ok_or("its header is truncated")?;
    let header_text = std::str::from_utf8(header).map_err(|_| "its header is not text".to_string())?;
    Ok((header_text, &bytes[header_end..]))
}

/// Parses the header, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 7), }`.
fn parse_header(text: &str) -> Result<Header, String> {
    let descr = quoted_string(value_after_key(text, "descr")?).ok_or("its 'descr' is not a simple dtype string")?;
    let fortran_order = match value_after_key(text, "fortran_order")? {
        value if value.starts_with("True") => true,
        value if value.starts_with("False") => false,
        _ => return Err("its 'fortran_order' is neither True nor False".into()),
    };
    let shape = shape_tuple(value_after_key(text, "shape")?)?;
    Ok(Header { descr: descr.to_string(), fortran_order, shape })
}

/// The text following `'key':` (or `"key":`), leading spaces removed.
fn value_after_key<'a>(text: &'a str, key: &str) -> Result<&'a str, String> {
    [format!("'{key}'"), format!("\"{key}\"")]
        .iter()
        .find_map(|quoted| text.find(quoted.as_str()).map(|at| &text[at + quoted.len()..]))
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .map(str::trim_start)
        .ok_or_else(|| format!("its header has no '{key}'"))
}

fn quoted_string(value: &str) -> Option<&str> {
    let quote = value.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &value[1..];
    rest.find(quote).map(|end| &rest[..end])
}

fn shape_tuple(value: &str) -> Result<Vec<usize>, String> {
    let inner = value
        .strip_prefix('(')
        .and_then(|rest| rest.split_once(')'))
        .map(|(inner, _)| inner)
        .ok_or("its 'shape' is not a tuple")?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|dim| !dim.is_empty())
        .map(|dim| dim.trim_end_matches('L').parse::<usize>().map_err(|_| format!("its shape has a bad dimension `{dim}`")))
        .collect()
}

fn decode(dtype: Dtype, data: &[u8], shape: ndarray::Shape<IxDyn>) -> Result<NpyArray, String> {
    let shape_error = |error: ndarray::ShapeError| error.to_string();
    Ok(match dtype {
        Dtype::F32 => NpyArray::F32(ArrayD::from_shape_vec(shape, le_values(data, f32::from_le_bytes)).map_err(shape_error)?),
        Dtype::F64 => NpyArray::F64(ArrayD::from_shape_vec(shape, le_values(data, f64::from_le_bytes)).map_err(shape_error)?),
        Dtype::I64 => NpyArray::I64(ArrayD::from_shape_vec(shape, le_values(data, i64::from_le_bytes)).map_err(shape_error)?),
        Dtype::I32 => NpyArray::I32(ArrayD::from_shape_vec(shape, le_values(data, i32::from_le_bytes)).map_err(shape_error)?),
    })
}

fn le_values<T, const N: usize>(data: &[u8], from_le_bytes: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|chunk| {
            let mut bytes = [0u8; N];
            bytes.copy_from_slice(chunk);
            from_le_bytes(bytes)
        })
        .collect()
}

impl NpyArray {
    // Fortran-order files decode into column-major arrays; callers expect C layout.
    fn into_standard_layout(self) -> Self {
        match self {
            Self::F32(array) => Self::F32(standard(array)),
            Self::F64(array) => Self::F64(standard(array)),
            Self::I64(array) => Self::I64(standard(array)),
            Self::I32(array) => Self::I32(standard(array)),
        }
    }
}

fn standard<T: Clone>(array: ArrayD<T>) -> ArrayD<T> {
    if array.is_standard_layout() {
        array
    } else {
        array.as_standard_layout().into_owned()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, NpyError> {
    std::fs::read(path).map_err(|error| NpyError::Io { path: path.to_path_buf(), error })
}

fn invalid_npy(origin: &str, reason: impl Into<String>) -> NpyError {
    NpyError::Invalid { origin: origin.to_string(), kind: ".npy", reason: reason.into() }
}

fn zip_error(origin: &str, error: ZipError) -> NpyError {
    match error {
        ZipError::Compressed { entry, method } => NpyError::CompressedEntry { origin: origin.to_string(), entry, method },
        ZipError::Invalid(reason) => NpyError::Invalid { origin: origin.to_string(), kind: ".npz (zip)", reason },
    }
}

#[cfg(test)]
mod tests;
