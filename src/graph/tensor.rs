//! Tensors as the passes see them: a name, an element type, dims and the data, wherever it lives.
//!
//! Data loaded from a file stays in the file's memory map (`Bytes` slices); nothing is copied until
//! a pass asks for numbers.
use bytes::Bytes;
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::protobuf::Opaque;

/// ONNX element types (TensorProto.DataType codes). Unknown codes pass through untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Float,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Int32,
    Int64,
    String,
    Bool,
    Float16,
    Double,
    Uint32,
    Uint64,
    Complex64,
    Complex128,
    Bfloat16,
    Other(i32),
}

impl DataType {
    pub fn from_code(code: i32) -> Self {
        use DataType::*;
        match code {
            1 => Float,
            2 => Uint8,
            3 => Int8,
            4 => Uint16,
            5 => Int16,
            6 => Int32,
            7 => Int64,
            8 => String,
            9 => Bool,
            10 => Float16,
            11 => Double,
            12 => Uint32,
            13 => Uint64,
            14 => Complex64,
            15 => Complex128,
            16 => Bfloat16,
            other => Other(other),
        }
    }

    pub fn code(self) -> i32 {
        use DataType::*;
        match self {
            Float => 1,
            Uint8 => 2,
            Int8 => 3,
            Uint16 => 4,
            Int16 => 5,
            Int32 => 6,
            Int64 => 7,
            String => 8,
            Bool => 9,
            Float16 => 10,
            Double => 11,
            Uint32 => 12,
            Uint64 => 13,
            Complex64 => 14,
            Complex128 => 15,
            Bfloat16 => 16,
            Other(code) => code,
        }
    }

    /// Bytes per element in raw little-endian storage; `None` for strings and sub-byte or unknown types.
    pub fn byte_size(self) -> Option<usize> {
        use DataType::*;
        match self {
            Uint8 | Int8 | Bool => Some(1),
            Uint16 | Int16 | Float16 | Bfloat16 => Some(2),
            Float | Int32 | Uint32 => Some(4),
            Double | Int64 | Uint64 | Complex64 => Some(8),
            Complex128 => Some(16),
            String | Other(_) => None,
        }
    }

    pub fn name(self) -> String {
        use DataType::*;
        match self {
            Float => "float32".into(),
            Uint8 => "uint8".into(),
            Int8 => "int8".into(),
            Uint16 => "uint16".into(),
            Int16 => "int16".into(),
            Int32 => "int32".into(),
            Int64 => "int64".into(),
            String => "string".into(),
            Bool => "bool".into(),
            Float16 => "float16".into(),
            Double => "float64".into(),
            Uint32 => "uint32".into(),
            Uint64 => "uint64".into(),
            Complex64 => "complex64".into(),
            Complex128 => "complex128".into(),
            Bfloat16 => "bfloat16".into(),
            Other(code) => format!("dtype{code}"),
        }
    }
}

/// Where an external tensor's bytes came from, kept so that an unchanged model can be written back
/// with the same external-data entries.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalSource {
    /// The `external_data` key/value entries exactly as stored (location, offset, length, ...).
    pub entries: Vec<(String, String)>,
    pub location: String,
    pub offset: u64,
    pub length: u64,
}

/// The values stored in one of TensorProto's typed repeated fields.
#[derive(Debug, Clone, PartialEq)]
pub enum TypedValues {
    Floats(Vec<f32>),
    /// int32_data also carries int8/16, uint8/16, bool, float16 and bfloat16 (as bit patterns).
    Int32s(Vec<i32>),
    Int64s(Vec<i64>),
    Doubles(Vec<f64>),
    /// uint64_data also carries uint32.
    Uint64s(Vec<u64>),
    Strings(Vec<Bytes>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Little-endian raw bytes held inline in the model (or produced by a pass).
    Raw(Bytes),
    /// Raw bytes read from an external data file (memory-mapped).
    External { bytes: Bytes, source: ExternalSource },
    /// Values in one of the typed repeated fields.
    Typed(TypedValues),
    /// No data field at all.
    Empty,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    pub data: TensorData,
    pub(crate) rest: Opaque<crate::protobuf::onnx::TensorProto>,
}

impl Tensor {
    /// A new tensor holding raw little-endian bytes.
    pub fn from_raw(
        name: impl Into<String>,
        dtype: DataType,
        dims: Vec<i64>,
        bytes: Bytes,
    ) -> Self {
        Tensor {
            name: name.into(),
            dtype,
            dims,
            data: TensorData::Raw(bytes),
            rest: Opaque::default(),
        }
    }

    pub fn from_f32(name: impl Into<String>, dims: Vec<i64>, values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_raw(name, DataType::Float, dims, Bytes::from(bytes))
    }

    pub fn from_i64(name: impl Into<String>, dims: Vec<i64>, values: &[i64]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_raw(name, DataType::Int64, dims, Bytes::from(bytes))
    }

    pub fn numel(&self) -> u64 {
        self.dims.iter().map(|&d| d.max(0) as u64).product()
    }

    /// Bytes the tensor's values occupy in raw form (what it costs on disk).
    pub fn byte_len(&self) -> u64 {
        match &self.data {
            TensorData::Raw(b) | TensorData::External { bytes: b, .. } => b.len() as u64,
            TensorData::Typed(TypedValues::Strings(s)) => s.iter().map(|b| b.len() as u64).sum(),
            _ => self.dtype.byte_size().map_or(0, |s| s as u64 * self.numel()),
        }
    }

    pub fn is_external(&self) -> bool {
        matches!(self.data, TensorData::External { .. })
    }

    /// The raw little-endian bytes, if the tensor is stored that way (inline or external).
    pub fn raw_bytes(&self) -> Option<&Bytes> {
        match &self.data {
            TensorData::Raw(b) | TensorData::External { bytes: b, .. } => Some(b),
            _ => None,
        }
    }

    /// Raw little-endian bytes for any numeric storage (typed fields are encoded on the fly).
    pub fn to_raw_bytes(&self) -> Result<Bytes> {
        if let Some(b) = self.raw_bytes() {
            return Ok(b.clone());
        }
        let size = self.dtype.byte_size().ok_or_else(|| self.unsupported("raw bytes"))?;
        let mut out = Vec::with_capacity(size * self.numel() as usize);
        match &self.data {
            TensorData::Typed(TypedValues::Floats(v)) => {
                v.iter().for_each(|x| out.extend(x.to_le_bytes()))
            }
            TensorData::Typed(TypedValues::Doubles(v)) => {
                v.iter().for_each(|x| out.extend(x.to_le_bytes()))
            }
            TensorData::Typed(TypedValues::Int64s(v)) => {
                v.iter().for_each(|x| out.extend(x.to_le_bytes()))
            }
            TensorData::Typed(TypedValues::Uint64s(v)) => {
                v.iter().for_each(|x| out.extend(&x.to_le_bytes()[..size]))
            }
            TensorData::Typed(TypedValues::Int32s(v)) => {
                v.iter().for_each(|x| out.extend(&x.to_le_bytes()[..size]))
            }
            TensorData::Empty => {}
            _ => return Err(self.unsupported("raw bytes")),
        }
        Ok(Bytes::from(out))
    }

    /// The values as f32, from float32, float16, bfloat16 or float64 storage.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let values = match (&self.data, self.dtype) {
            (TensorData::Typed(TypedValues::Floats(v)), _) => v.clone(),
            (TensorData::Typed(TypedValues::Doubles(v)), _) => {
                v.iter().map(|&x| x as f32).collect()
            }
            (TensorData::Typed(TypedValues::Int32s(v)), DataType::Float16) => {
                v.iter().map(|&x| f16::from_bits(x as u16).to_f32()).collect()
            }
            (TensorData::Typed(TypedValues::Int32s(v)), DataType::Bfloat16) => {
                v.iter().map(|&x| bf16::from_bits(x as u16).to_f32()).collect()
            }
            (TensorData::Empty, _) if self.numel() == 0 => Vec::new(),
            (_, dtype) => {
                let raw = self.raw_bytes().ok_or_else(|| self.unsupported("f32"))?;
                match dtype {
                    DataType::Float => le_chunks::<4>(raw).map(f32::from_le_bytes).collect(),
                    DataType::Double => {
                        le_chunks::<8>(raw).map(|b| f64::from_le_bytes(b) as f32).collect()
                    }
                    DataType::Float16 => {
                        le_chunks::<2>(raw).map(|b| f16::from_le_bytes(b).to_f32()).collect()
                    }
                    DataType::Bfloat16 => {
                        le_chunks::<2>(raw).map(|b| bf16::from_le_bytes(b).to_f32()).collect()
                    }
                    _ => return Err(self.unsupported("f32")),
                }
            }
        };
        self.check_count(values.len())?;
        Ok(values)
    }

    /// The values as i64, from int64, int32, int16, int8, uint8, uint16, uint32 or bool storage.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let values: Vec<i64> = match (&self.data, self.dtype) {
            (TensorData::Typed(TypedValues::Int64s(v)), _) => v.clone(),
            (TensorData::Typed(TypedValues::Int32s(v)), _) => v.iter().map(|&x| x as i64).collect(),
            (TensorData::Typed(TypedValues::Uint64s(v)), DataType::Uint32) => {
                v.iter().map(|&x| x as i64).collect()
            }
            (TensorData::Empty, _) if self.numel() == 0 => Vec::new(),
            (_, dtype) => {
                let raw = self.raw_bytes().ok_or_else(|| self.unsupported("i64"))?;
                match dtype {
                    DataType::Int64 => le_chunks::<8>(raw).map(i64::from_le_bytes).collect(),
                    DataType::Int32 => {
                        le_chunks::<4>(raw).map(|b| i32::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Uint32 => {
                        le_chunks::<4>(raw).map(|b| u32::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Int16 => {
                        le_chunks::<2>(raw).map(|b| i16::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Uint16 => {
                        le_chunks::<2>(raw).map(|b| u16::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Int8 => raw.iter().map(|&b| b as i8 as i64).collect(),
                    DataType::Uint8 | DataType::Bool => raw.iter().map(|&b| b as i64).collect(),
                    _ => return Err(self.unsupported("i64")),
                }
            }
        };
        self.check_count(values.len())?;
        Ok(values)
    }

    fn check_count(&self, got: usize) -> Result<()> {
        if got as u64 == self.numel() {
            Ok(())
        } else {
            Err(Error::Tensor {
                tensor: self.name.clone(),
                message: format!(
                    "holds {got} values but its dims {:?} need {}",
                    self.dims,
                    self.numel()
                ),
            })
        }
    }

    fn unsupported(&self, wanted: &str) -> Error {
        Error::Tensor {
            tensor: self.name.clone(),
            message: format!(
                "cannot read {} data stored as {} as {wanted}",
                self.dtype.name(),
                self.data.kind()
            ),
        }
    }
}

impl TensorData {
    fn kind(&self) -> &'static str {
        match self {
            TensorData::Raw(_) => "raw bytes",
            TensorData::External { .. } => "external raw bytes",
            TensorData::Typed(TypedValues::Floats(_)) => "float_data",
            TensorData::Typed(TypedValues::Int32s(_)) => "int32_data",
            TensorData::Typed(TypedValues::Int64s(_)) => "int64_data",
            TensorData::Typed(TypedValues::Doubles(_)) => "double_data",
            TensorData::Typed(TypedValues::Uint64s(_)) => "uint64_data",
            TensorData::Typed(TypedValues::Strings(_)) => "string_data",
            TensorData::Empty => "no data",
        }
    }
}

fn le_chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    raw.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}
