//! Tensors exchanged with ONNX Runtime, and descriptions of a model's inputs and outputs.
//!
//! [`TensorValue`] is an owned `ndarray` per supported element type, so that no `ort` type
//! leaves this module tree.

use std::fmt;

use half::f16;
use ndarray::{Array, ArrayD, Dimension, IxDyn};
use ort::memory::Allocator;
use ort::session::SessionInputValue;
use ort::value::{
    DynTensor, DynTensorValueType, DynValue, PrimitiveTensorElementType, TensorElementType,
    TensorRef, ValueType,
};

use crate::error::RuntimeError;

/// An owned tensor of one of the element types onnx-slice feeds or reads.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValue {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    Bool(ArrayD<bool>),
}

/// The element type of a model input or output, as ONNX names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementType {
    F32,
    F16,
    Bf16,
    F64,
    I64,
    I32,
    I8,
    U8,
    Bool,
    /// Anything else, including non-tensor values (sequences, maps), by ONNX Runtime's name.
    Other(String),
}

pub use crate::graph::Dim;

/// A model input or output: its name, element type and declared shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub element_type: ElementType,
    /// Empty for scalars and for non-tensor values.
    pub dims: Vec<Dim>,
}

macro_rules! tensor_accessors {
    ($($variant:ident, $ty:ty, $as_fn:ident, $into_fn:ident;)*) => {
        impl TensorValue {
            $(
                /// The array when the tensor has this element type.
                pub fn $as_fn(&self) -> Option<&ArrayD<$ty>> {
                    match self {
                        Self::$variant(array) => Some(array),
                        _ => None,
                    }
                }

                /// The array, or [`RuntimeError::WrongElementType`] when the tensor has another type.
                pub fn $into_fn(self) -> Result<ArrayD<$ty>, RuntimeError> {
                    match self {
                        Self::$variant(array) => Ok(array),
                        other => Err(RuntimeError::WrongElementType {
                            expected: ElementType::$variant.to_string(),
                            found: other.element_type().to_string(),
                        }),
                    }
                }
            )*
        }

        $(
            impl<D: Dimension> From<Array<$ty, D>> for TensorValue {
                fn from(array: Array<$ty, D>) -> Self {
                    Self::$variant(array.into_dyn())
                }
            }
        )*
    };
}

tensor_accessors! {
    F32, f32, as_f32, into_f32;
    F64, f64, as_f64, into_f64;
    F16, f16, as_f16, into_f16;
    I64, i64, as_i64, into_i64;
    I32, i32, as_i32, into_i32;
    Bool, bool, as_bool, into_bool;
}

impl TensorValue {
    pub fn element_type(&self) -> ElementType {
        match self {
            Self::F32(_) => ElementType::F32,
            Self::F64(_) => ElementType::F64,
            Self::F16(_) => ElementType::F16,
            Self::I64(_) => ElementType::I64,
            Self::I32(_) => ElementType::I32,
            Self::Bool(_) => ElementType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32(array) => array.shape(),
            Self::F64(array) => array.shape(),
            Self::F16(array) => array.shape(),
            Self::I64(array) => array.shape(),
            Self::I32(array) => array.shape(),
            Self::Bool(array) => array.shape(),
        }
    }

    /// `i64[2,7]`-style summary for messages.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.shape().iter().map(usize::to_string).collect();
        format!("{}[{}]", self.element_type(), dims.join(","))
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F64 => "f64",
            Self::I64 => "i64",
            Self::I32 => "i32",
            Self::I8 => "i8",
            Self::U8 => "u8",
            Self::Bool => "bool",
            Self::Other(name) => name,
        })
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(Dim::to_string).collect();
        write!(f, "{}: {}[{}]", self.name, self.element_type, dims.join(","))
    }
}

impl TensorInfo {
    /// What ONNX Runtime reports for a graph input or output with this declaration.
    pub fn declared(value: &crate::graph::ValueInfo) -> TensorInfo {
        TensorInfo {
            name: value.name.clone(),
            element_type: value
                .elem_type()
                .map_or_else(|| ElementType::Other("undeclared".into()), element_type_of_data),
            dims: value.shape().unwrap_or_default(),
        }
    }
}

fn element_type_of_data(dtype: crate::graph::DataType) -> ElementType {
    use crate::graph::DataType;
    match dtype {
        DataType::Float => ElementType::F32,
        DataType::Float16 => ElementType::F16,
        DataType::Bfloat16 => ElementType::Bf16,
        DataType::Double => ElementType::F64,
        DataType::Int64 => ElementType::I64,
        DataType::Int32 => ElementType::I32,
        DataType::Int8 => ElementType::I8,
        DataType::Uint8 => ElementType::U8,
        DataType::Bool => ElementType::Bool,
        other => ElementType::Other(other.name()),
    }
}

pub(crate) fn tensor_info(name: &str, value_type: &ValueType) -> TensorInfo {
    match value_type {
        ValueType::Tensor { ty, shape, dimension_symbols } => TensorInfo {
            name: name.to_string(),
            element_type: element_type_of(*ty),
            dims: shape
                .iter()
                .zip(dimension_symbols.iter())
                .map(|(&size, symbol)| dim_of(size, symbol))
                .collect(),
        },
        other => TensorInfo {
            name: name.to_string(),
            element_type: ElementType::Other(other.to_string()),
            dims: Vec::new(),
        },
    }
}

fn dim_of(size: i64, symbol: &str) -> Dim {
    match (size, symbol) {
        (size, _) if size >= 0 => Dim::Fixed(size),
        (_, "") => Dim::Unknown,
        (_, symbol) => Dim::Symbolic(symbol.to_string()),
    }
}

fn element_type_of(ty: TensorElementType) -> ElementType {
    match ty {
        TensorElementType::Float32 => ElementType::F32,
        TensorElementType::Float16 => ElementType::F16,
        TensorElementType::Bfloat16 => ElementType::Bf16,
        TensorElementType::Float64 => ElementType::F64,
        TensorElementType::Int64 => ElementType::I64,
        TensorElementType::Int32 => ElementType::I32,
        TensorElementType::Int8 => ElementType::I8,
        TensorElementType::Uint8 => ElementType::U8,
        TensorElementType::Bool => ElementType::Bool,
        other => ElementType::Other(other.to_string()),
    }
}

/// Wraps a tensor for `Session::run`, borrowing its data when the layout allows.
pub(crate) fn session_input(value: &TensorValue) -> ort::Result<SessionInputValue<'_>> {
    match value {
        TensorValue::F32(array) => array_input(array),
        TensorValue::F64(array) => array_input(array),
        TensorValue::F16(array) => f16_input(array).map(SessionInputValue::from),
        TensorValue::I64(array) => array_input(array),
        TensorValue::I32(array) => array_input(array),
        TensorValue::Bool(array) => array_input(array),
    }
}

fn array_input<T>(array: &ArrayD<T>) -> ort::Result<SessionInputValue<'_>>
where
    T: PrimitiveTensorElementType + fmt::Debug + Clone + 'static,
{
    if array.is_standard_layout() {
        return Ok(TensorRef::from_array_view(array.view())?.into());
    }
    Ok(ort::value::Tensor::from_array(array.as_standard_layout().into_owned())?.into())
}

// `ort` maps `half::f16` only with its `half` feature, which this crate does not enable, so f16
// tensors are copied bit for bit into a tensor that ONNX Runtime allocates.
fn f16_input(array: &ArrayD<f16>) -> ort::Result<DynTensor> {
    let contiguous = array.as_standard_layout();
    let mut tensor = DynTensor::new(
        &Allocator::default(),
        TensorElementType::Float16,
        contiguous.shape().to_vec(),
    )?;
    let source = contiguous
        .as_slice()
        .ok_or_else(|| ort::Error::new("f16 input is not contiguous after copying"))?;
    let destination = tensor.data_ptr_mut().cast::<f16>();
    if !source.is_empty() && !destination.is_null() {
        // SAFETY: ONNX Runtime allocated `destination` on the CPU for exactly `source.len()`
        // f16 elements of this shape; `half::f16` is a transparent u16, as ONNX's float16 is.
        unsafe { std::ptr::copy_nonoverlapping(source.as_ptr(), destination, source.len()) };
    }
    Ok(tensor)
}

/// Copies a session output into an owned [`TensorValue`].
pub(crate) fn output_tensor(value: &DynValue) -> Result<TensorValue, OutputError> {
    let element_type = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => return Err(OutputError::Unsupported(other.to_string())),
    };
    let extracted = match element_type {
        TensorElementType::Float32 => {
            value.try_extract_array::<f32>().map(|a| TensorValue::F32(a.to_owned()))
        }
        TensorElementType::Float64 => {
            value.try_extract_array::<f64>().map(|a| TensorValue::F64(a.to_owned()))
        }
        TensorElementType::Int64 => {
            value.try_extract_array::<i64>().map(|a| TensorValue::I64(a.to_owned()))
        }
        TensorElementType::Int32 => {
            value.try_extract_array::<i32>().map(|a| TensorValue::I32(a.to_owned()))
        }
        TensorElementType::Bool => {
            value.try_extract_array::<bool>().map(|a| TensorValue::Bool(a.to_owned()))
        }
        TensorElementType::Float16 => f16_output(value).map(TensorValue::F16),
        other => return Err(OutputError::Unsupported(other.to_string())),
    };
    extracted.map_err(|error| OutputError::Ort(error.to_string()))
}

/// Why an output could not be read.
pub(crate) enum OutputError {
    Unsupported(String),
    Ort(String),
}

fn f16_output(value: &DynValue) -> ort::Result<ArrayD<f16>> {
    let tensor = value.view().downcast::<DynTensorValueType>()?;
    if !tensor.memory_info().is_cpu_accessible() {
        return Err(ort::Error::new("the f16 output is not in CPU memory"));
    }
    let shape: Vec<usize> =
        tensor.shape().iter().map(|&size| usize::try_from(size).unwrap_or(0)).collect();
    let len: usize = shape.iter().product();
    let source = tensor.data_ptr().cast::<f16>();
    let data = if len == 0 || source.is_null() {
        Vec::new()
    } else {
        // SAFETY: the tensor is a CPU tensor of `len` f16 elements owned by `value`, which
        // outlives this copy; `half::f16` has the layout of ONNX's float16.
        unsafe { std::slice::from_raw_parts(source, len) }.to_vec()
    };
    ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|error| ort::Error::new(error.to_string()))
}

/// A tensor that ONNX Runtime allocated where the session ran (the GPU's memory under CUDA),
/// passed from one run to the next without a copy to the host and in its own element type.
#[derive(Debug)]
pub struct DeviceTensor {
    pub(crate) value: DynValue,
}

impl DeviceTensor {
    pub fn shape(&self) -> Vec<usize> {
        match self.value.dtype() {
            ValueType::Tensor { shape, .. } => {
                shape.iter().map(|&size| usize::try_from(size).unwrap_or(0)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The values of a float64 tensor in memory the CPU can read, without a copy.
    pub fn f64_values(&self) -> Option<&[f64]> {
        let tensor = self.value.view().downcast::<DynTensorValueType>().ok()?;
        if !tensor.memory_info().is_cpu_accessible() {
            return None;
        }
        self.value.try_extract_tensor::<f64>().ok().map(|(_, values)| values)
    }

    /// A copy on the host; only for tensors in memory the CPU can read.
    pub fn to_host(&self) -> Result<TensorValue, RuntimeError> {
        let readable = self
            .value
            .view()
            .downcast::<DynTensorValueType>()
            .is_ok_and(|tensor| tensor.memory_info().is_cpu_accessible());
        if !readable {
            return Err(RuntimeError::Session {
                model: "(a kept tensor)".into(),
                step: crate::error::SessionStep::ReadOutputs,
                reason: "the tensor is in device memory the host cannot read".into(),
            });
        }
        output_tensor(&self.value).map_err(|error| RuntimeError::Session {
            model: "(a kept tensor)".into(),
            step: crate::error::SessionStep::ReadOutputs,
            reason: match error {
                OutputError::Unsupported(ty) => format!("element type {ty}"),
                OutputError::Ort(reason) => reason,
            },
        })
    }
}

/// An owned ONNX Runtime tensor holding a copy of `value` (for an I/O binding, which keeps its
/// inputs alive itself).
pub(crate) fn owned_input(value: &TensorValue) -> ort::Result<DynValue> {
    fn owned<T>(array: &ArrayD<T>) -> ort::Result<DynValue>
    where
        T: PrimitiveTensorElementType + fmt::Debug + Clone + 'static,
    {
        Ok(ort::value::Tensor::from_array(array.as_standard_layout().into_owned())?.into_dyn())
    }
    match value {
        TensorValue::F32(array) => owned(array),
        TensorValue::F64(array) => owned(array),
        TensorValue::F16(array) => f16_input(array).map(DynTensor::into_dyn),
        TensorValue::I64(array) => owned(array),
        TensorValue::I32(array) => owned(array),
        TensorValue::Bool(array) => owned(array),
    }
}
