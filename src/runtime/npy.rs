//! NumPy `.npy` arrays and `.npz` archives (as written by `np.save`, `np.savez` and
//! `np.savez_compressed`), read with the `ndarray-npy` crate. The element type is found from the
//! file: little-endian int64, int32, float32 or float64. Used for `--calib-ids` / `eval --ids` and for
//! the reference data of the tests.
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

pub use crate::error::NpyError;
use ndarray::ArrayD;
use ndarray_npy::{NpzReader, ReadNpyError, ReadNpyExt, ReadNpzError, ReadableElement};

/// An array read from a `.npy` file, by element type.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyArray {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
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

    pub fn dtype_name(&self) -> &'static str {
        match self {
            Self::F32(_) => "float32",
            Self::F64(_) => "float64",
            Self::I64(_) => "int64",
            Self::I32(_) => "int32",
        }
    }

    /// int64 as is, int32 widened.
    pub fn into_i64(self) -> Result<ArrayD<i64>, NpyError> {
        match self {
            Self::I64(array) => Ok(array),
            Self::I32(array) => Ok(array.mapv(i64::from)),
            other => Err(other.wrong_dtype("int64 or int32")),
        }
    }

    pub fn into_f32(self) -> Result<ArrayD<f32>, NpyError> {
        match self {
            Self::F32(array) => Ok(array),
            other => Err(other.wrong_dtype("float32")),
        }
    }

    /// float64 as is, float32 widened.
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
        let origin = path.display().to_string();
        let file =
            File::open(path).map_err(|error| NpyError::Io { path: path.to_path_buf(), error })?;
        let mut archive =
            NpzReader::new(BufReader::new(file)).map_err(|e| invalid_npz(&origin, e))?;
        let names = archive.names().map_err(|e| invalid_npz(&origin, e))?;
        let arrays = names
            .into_iter()
            .map(|entry| {
                let entry_origin = format!("{origin}:{entry}");
                let array = first_readable(
                    &entry_origin,
                    &mut NpzEntry { archive: &mut archive, name: &entry },
                )?;
                Ok((entry.strip_suffix(".npy").unwrap_or(&entry).to_string(), array))
            })
            .collect::<Result<_, NpyError>>()?;
        Ok(Self { origin, arrays })
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
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|error| NpyError::Io { path: path.to_path_buf(), error })?;
    let origin = path.display().to_string();
    first_readable(&origin, &mut NpyBytes(&bytes))
}

/// Why an element type did not fit: the header names another type, or the file is broken.
enum Failure {
    OtherType,
    Broken(String),
}

/// One array to read, as whichever element type its header names.
trait ArraySource {
    fn read<T: ReadableElement>(&mut self) -> Result<ArrayD<T>, Failure>;
}

struct NpyBytes<'a>(&'a [u8]);

impl ArraySource for NpyBytes<'_> {
    fn read<T: ReadableElement>(&mut self) -> Result<ArrayD<T>, Failure> {
        ArrayD::<T>::read_npy(Cursor::new(self.0)).map_err(npy_failure)
    }
}

struct NpzEntry<'a, R: Read + Seek> {
    archive: &'a mut NpzReader<R>,
    name: &'a str,
}

impl<R: Read + Seek> ArraySource for NpzEntry<'_, R> {
    fn read<T: ReadableElement>(&mut self) -> Result<ArrayD<T>, Failure> {
        self.archive.by_name::<ndarray::OwnedRepr<T>, ndarray::IxDyn>(self.name).map_err(|error| {
            match error {
                ReadNpzError::Npy(error) => npy_failure(error),
                other => Failure::Broken(other.to_string()),
            }
        })
    }
}

fn npy_failure(error: ReadNpyError) -> Failure {
    match error {
        ReadNpyError::WrongDescriptor(_) => Failure::OtherType,
        other => Failure::Broken(other.to_string()),
    }
}

/// The array as the first of int64, int32, float32, float64 that its header names, in standard
/// (C) layout whatever the file's order.
fn first_readable(origin: &str, source: &mut impl ArraySource) -> Result<NpyArray, NpyError> {
    let attempts = [
        source.read::<i64>().map(|a| NpyArray::I64(standard(a))),
        source.read::<i32>().map(|a| NpyArray::I32(standard(a))),
        source.read::<f32>().map(|a| NpyArray::F32(standard(a))),
        source.read::<f64>().map(|a| NpyArray::F64(standard(a))),
    ];
    let mut broken = None;
    for attempt in attempts {
        match attempt {
            Ok(array) => return Ok(array),
            Err(Failure::Broken(reason)) => broken = broken.or(Some(reason)),
            Err(Failure::OtherType) => {}
        }
    }
    Err(match broken {
        Some(reason) => {
            NpyError::Invalid { origin: origin.to_string(), kind: "NumPy array", reason }
        }
        None => NpyError::UnsupportedDtype { origin: origin.to_string() },
    })
}

fn standard<T: Clone>(array: ArrayD<T>) -> ArrayD<T> {
    if array.is_standard_layout() {
        array
    } else {
        array.as_standard_layout().into_owned()
    }
}

fn invalid_npz(origin: &str, error: ReadNpzError) -> NpyError {
    NpyError::Invalid { origin: origin.to_string(), kind: ".npz", reason: error.to_string() }
}

#[cfg(test)]
mod tests;
