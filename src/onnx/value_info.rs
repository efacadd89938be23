//! Element type and shape of declared values (graph inputs, outputs, value_info).
use super::proto::{
    self, tensor_shape_proto::dimension::Value as DimValue, type_proto::Value as TypeValue,
};
use super::Opaque;
use crate::graph::{DataType, Dim, ValueInfo};

impl ValueInfo {
    /// A declaration with a name only (ONNX Runtime infers the type of such an output).
    pub fn untyped(name: impl Into<String>) -> Self {
        ValueInfo { name: name.into(), rest: Opaque::default() }
    }

    /// A tensor declaration with element type and shape.
    pub fn tensor(name: impl Into<String>, dtype: DataType, shape: &[Dim]) -> Self {
        let mut v = Self::untyped(name);
        v.rest.0.r#type = Some(proto::TypeProto {
            value: Some(TypeValue::TensorType(proto::type_proto::Tensor {
                elem_type: Some(dtype.code()),
                shape: Some(proto::TensorShapeProto { dim: Vec::new() }),
            })),
            ..Default::default()
        });
        v.set_shape(shape);
        v
    }

    /// A tensor declaration with an element type and no shape (any rank).
    pub fn tensor_of_rank_unknown(name: impl Into<String>, dtype: DataType) -> Self {
        let mut v = Self::tensor(name, dtype, &[]);
        v.clear_shape();
        v
    }

    fn tensor_type(&self) -> Option<&proto::type_proto::Tensor> {
        match self.rest.0.r#type.as_ref()?.value.as_ref()? {
            TypeValue::TensorType(t) => Some(t),
            _ => None,
        }
    }

    fn tensor_type_mut(&mut self) -> Option<&mut proto::type_proto::Tensor> {
        match self.rest.0.r#type.as_mut()?.value.as_mut()? {
            TypeValue::TensorType(t) => Some(t),
            _ => None,
        }
    }

    /// Element type, for tensor values that declare one.
    pub fn elem_type(&self) -> Option<DataType> {
        self.tensor_type()?.elem_type.map(DataType::from_code)
    }

    /// Declared shape, for tensor values that declare one (`None`: rank unknown).
    pub fn shape(&self) -> Option<Vec<Dim>> {
        let shape = self.tensor_type()?.shape.as_ref()?;
        Some(
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(DimValue::DimValue(v)) => Dim::Fixed(*v),
                    Some(DimValue::DimParam(p)) => Dim::Symbolic(p.clone()),
                    None => Dim::Unknown,
                })
                .collect(),
        )
    }

    /// Replaces the declared shape of a tensor value; does nothing for other kinds of values.
    pub fn set_shape(&mut self, dims: &[Dim]) {
        if let Some(t) = self.tensor_type_mut() {
            let old = t.shape.take().map(|s| s.dim).unwrap_or_default();
            let dim = dims
                .iter()
                .enumerate()
                .map(|(i, d)| proto::tensor_shape_proto::Dimension {
                    denotation: old.get(i).and_then(|o| o.denotation.clone()),
                    value: match d {
                        Dim::Fixed(v) => Some(DimValue::DimValue(*v)),
                        Dim::Symbolic(p) => Some(DimValue::DimParam(p.clone())),
                        Dim::Unknown => None,
                    },
                })
                .collect();
            t.shape = Some(proto::TensorShapeProto { dim });
        }
    }

    /// Forgets the declared shape (keeps the element type): for values whose shape a pass changed.
    pub fn clear_shape(&mut self) {
        if let Some(t) = self.tensor_type_mut() {
            t.shape = None;
        }
    }

    /// "float32[batch_size, sequence_length, 64]"-style description.
    pub fn describe(&self) -> String {
        let dtype = self.elem_type().map_or_else(|| "?".to_string(), DataType::name);
        match self.shape() {
            Some(dims) => format!(
                "{dtype}[{}]",
                dims.iter().map(Dim::to_string).collect::<Vec<_>>().join(", ")
            ),
            None => format!("{dtype}[?]"),
        }
    }
}
