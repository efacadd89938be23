//! The errors of structure detection: where detection stopped, and a quantized model refused by
//! name. Here, below every layer, so that the crate's `Error` wraps them without depending on
//! `structure`; `structure` re-exports them.

/// Where detection stopped and what it expected there.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("structure detection stopped at node '{node}' ({op}): expected {expected}")]
pub struct DetectError {
    pub node: String,
    pub op: String,
    pub expected: String,
}

/// The quantized forms ONNX Runtime's tools produce, by the operators that mark them, in the
/// order that decides a model's form (dynamic int8 and int4 models also hold DequantizeLinear
/// nodes, for their embedding tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantizedForm {
    /// `quantize_dynamic`: MatMulInteger fed by DynamicQuantizeLinear (int8/uint8).
    DynamicInt8,
    /// 4-bit (or n-bit) block quantization: MatMulNBits, GatherBlockQuantized (onnxruntime-genai
    /// int4 models, `MatMulNBitsQuantizer`).
    BlockNBits,
    /// Operator-oriented static quantization: QLinear* ops.
    QOperator,
    /// `quantize_static` in QDQ format: QuantizeLinear/DequantizeLinear pairs around float ops.
    Qdq,
}

impl QuantizedForm {
    pub(crate) fn description(self) -> &'static str {
        match self {
            Self::DynamicInt8 => "int8 dynamically quantized (MatMulInteger/DynamicQuantizeLinear)",
            Self::Qdq => "QDQ quantized (QuantizeLinear/DequantizeLinear)",
            Self::QOperator => "statically quantized in operator form (QLinear* ops)",
            Self::BlockNBits => "block quantized to int4 (MatMulNBits/GatherBlockQuantized)",
        }
    }

    /// How to quantize the sliced float model the same way again.
    pub(crate) fn remedy(self) -> &'static str {
        match self {
            Self::DynamicInt8 => "onnxruntime.quantization.quantize_dynamic",
            Self::Qdq => "onnxruntime.quantization.quantize_static with quant_format=QuantFormat.QDQ",
            Self::QOperator => "onnxruntime.quantization.quantize_static with quant_format=QuantFormat.QOperator",
            Self::BlockNBits => "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (or onnxruntime-genai's builder with -p int4)",
        }
    }
}

/// The model is quantized: onnx-slice cannot rotate its weights.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the model is {}: node '{node}' is {op} ({count} quantized node(s) in all). onnx-slice rotates float weights and cannot rotate \
     quantized ones. Slice the float (float32, float16 or bfloat16) model instead, then quantize the sliced model with {} \
     (see README.md, \"Quantized models\")",
    form.description(),
    form.remedy()
)]
pub struct QuantizedModel {
    pub form: QuantizedForm,
    pub node: String,
    pub op: String,
    pub count: usize,
}
