//! A model's interface to the outside: how to feed it (inputs, KV-cache pasts, the logits output),
//! what the files beside it say (`config.json`, `genai_config.json`), the longest sequence it
//! accepts, and its tokenizer. Calibration and evaluation both run models through it.
mod config;
mod tokenizer;

pub use config::{position_limit, ModelConfig};
pub use tokenizer::{find_tokenizer, load_tokenizer, plain_tokenizer};

use std::path::Path;

use half::f16;
use ndarray::{Array2, ArrayD, IxDyn};

use crate::graph::Graph;
use crate::runtime::{Dim, ElementType, ModelSession, TensorInfo, TensorValue};
use crate::{Error, Result};

/// How to fill a model's inputs for a batch of token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPlan {
    ids: Feed,
    mask: Option<Feed>,
    positions: Option<Feed>,
    past: Vec<PastInput>,
    /// Boolean inputs set to false (optimum's merged decoders' `use_cache_branch`).
    flags: Vec<String>,
    /// The output holding the logits.
    pub logits: String,
    /// A batch size fixed by the model, if any.
    pub fixed_batch: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
struct Feed {
    name: String,
    element_type: ElementType,
}

#[derive(Debug, Clone, PartialEq)]
struct PastInput {
    name: String,
    element_type: ElementType,
    heads: usize,
    head_dim: usize,
}

impl InputPlan {
    /// Works out the feed from the session's declared inputs. `model_path` (the `.onnx` file) is
    /// where `genai_config.json` / `config.json` are looked for when a past input's head count or
    /// head size is symbolic.
    pub fn for_session(session: &ModelSession, model_path: Option<&Path>) -> Result<Self> {
        Self::for_interface(session.label(), session.inputs(), session.outputs(), model_path)
    }

    /// The same plan from the graph's declared inputs and outputs, without building a session
    /// (ONNX Runtime reports exactly these declarations; inputs with an initializer are constants).
    pub fn for_graph(graph: &Graph, label: &str, model_path: Option<&Path>) -> Result<Self> {
        let inputs: Vec<TensorInfo> = graph
            .inputs
            .iter()
            .filter(|v| graph.initializer(&v.name).is_none())
            .map(TensorInfo::declared)
            .collect();
        let outputs: Vec<TensorInfo> = graph.outputs.iter().map(TensorInfo::declared).collect();
        Self::for_interface(label, &inputs, &outputs, model_path)
    }

    fn for_interface(
        label: &str,
        inputs: &[TensorInfo],
        outputs: &[TensorInfo],
        model_path: Option<&Path>,
    ) -> Result<Self> {
        let config = ModelConfig::beside(model_path);
        let mut plan = InputPlan {
            ids: Feed { name: String::new(), element_type: ElementType::I64 },
            mask: None,
            positions: None,
            past: Vec::new(),
            flags: Vec::new(),
            logits: logits_output(outputs),
            fixed_batch: None,
        };
        let mut found_ids = false;
        for input in inputs {
            match input.name.as_str() {
                "input_ids" => {
                    plan.ids = integer_feed(label, input)?;
                    plan.fixed_batch = match input.dims.first() {
                        Some(Dim::Fixed(n)) if *n > 0 => usize::try_from(*n).ok(),
                        _ => None,
                    };
                    found_ids = true;
                }
                "attention_mask" => plan.mask = Some(integer_feed(label, input)?),
                "position_ids" => plan.positions = Some(integer_feed(label, input)?),
                "use_cache_branch" if input.element_type == ElementType::Bool => plan.flags.push(input.name.clone()),
                name if name.contains("past") && matches!(input.element_type, ElementType::F32 | ElementType::F16) => {
                    plan.past.push(past_input(label, input, outputs, &config)?);
                }
                name => {
                    return Err(unusable(format!(
                        "{label}: input `{name}` ({input}) is not one onnx-slice knows how to fill; it feeds input_ids, \
                         attention_mask, position_ids, past_key_values.* and use_cache_branch"
                    )))
                }
            }
        }
        if !found_ids {
            return Err(unusable(format!(
                "{label} has no `input_ids` input; its inputs are: {}",
                input_names(inputs)
            )));
        }
        Ok(plan)
    }

    /// Whether the model takes a past (KV cache).
    pub fn has_past(&self) -> bool {
        !self.past.is_empty()
    }

    /// The inputs for token ids `[b, L]` and their mask (1 = real token; all ones when `None`).
    /// Position ids follow Hugging Face: `cumsum(mask) − 1`, and 1 at padding.
    pub fn feed(
        &self,
        ids: &Array2<i64>,
        mask: Option<&Array2<i64>>,
    ) -> Result<Vec<(String, TensorValue)>> {
        let (batch, length) = ids.dim();
        let ones;
        let mask = match mask {
            Some(mask) => mask,
            None => {
                ones = Array2::<i64>::ones((batch, length));
                &ones
            }
        };
        let mut inputs = vec![(self.ids.name.clone(), integer_tensor(ids, &self.ids.element_type))];
        if let Some(feed) = &self.mask {
            inputs.push((feed.name.clone(), integer_tensor(mask, &feed.element_type)));
        }
        if let Some(feed) = &self.positions {
            inputs
                .push((feed.name.clone(), integer_tensor(&position_ids(mask), &feed.element_type)));
        }
        for past in &self.past {
            let shape = IxDyn(&[batch, past.heads, 0, past.head_dim]);
            let empty = match past.element_type {
                ElementType::F16 => TensorValue::F16(
                    ArrayD::<f16>::from_shape_vec(shape, Vec::new()).expect("empty past"),
                ),
                _ => TensorValue::F32(
                    ArrayD::<f32>::from_shape_vec(shape, Vec::new()).expect("empty past"),
                ),
            };
            inputs.push((past.name.clone(), empty));
        }
        for flag in &self.flags {
            inputs.push((flag.clone(), TensorValue::Bool(ArrayD::from_elem(IxDyn(&[1]), false))));
        }
        Ok(inputs)
    }

    /// Runs the model on `ids [b, L]` and returns the logits `[b, L, V]` as f32.
    pub fn logits(
        &self,
        session: &mut ModelSession,
        ids: &Array2<i64>,
        mask: Option<&Array2<i64>>,
    ) -> Result<ArrayD<f32>> {
        let inputs = self.feed(ids, mask)?;
        let named: Vec<(&str, &TensorValue)> =
            inputs.iter().map(|(name, value)| (name.as_str(), value)).collect();
        let mut outputs = session.run_for(&named, &[self.logits.as_str()])?;
        let logits =
            outputs.remove(&self.logits).expect("run_for returns the output it was asked for");
        let logits = match logits {
            TensorValue::F32(array) => array,
            TensorValue::F16(array) => array.mapv(f32::from),
            other => {
                return Err(unusable(format!(
                    "{}: output `{}` is {}, expected float logits",
                    session.label(),
                    self.logits,
                    other.describe()
                )))
            }
        };
        let (batch, length) = ids.dim();
        if logits.ndim() != 3 || logits.shape()[0] != batch || logits.shape()[1] != length {
            return Err(unusable(format!(
                "{}: output `{}` has shape {:?} for input_ids [{batch}, {length}]; expected [{batch}, {length}, vocab]",
                session.label(),
                self.logits,
                logits.shape()
            )));
        }
        Ok(logits)
    }
}

fn input_names(inputs: &[TensorInfo]) -> String {
    inputs.iter().map(|input| input.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn logits_output(outputs: &[TensorInfo]) -> String {
    outputs
        .iter()
        .find(|output| output.name == "logits")
        .or_else(|| outputs.first())
        .map(|output| output.name.clone())
        .unwrap_or_else(|| "logits".to_string())
}

fn integer_feed(label: &str, input: &TensorInfo) -> Result<Feed> {
    match input.element_type {
        ElementType::I64 | ElementType::I32 => {
            Ok(Feed { name: input.name.clone(), element_type: input.element_type.clone() })
        }
        _ => Err(unusable(format!("{label}: input {input} must be int64 or int32"))),
    }
}

fn integer_tensor(values: &Array2<i64>, element_type: &ElementType) -> TensorValue {
    match element_type {
        // Token ids and positions fit in i32 for every model that declares an int32 input.
        ElementType::I32 => TensorValue::I32(values.mapv(|v| v as i32).into_dyn()),
        _ => TensorValue::I64(values.clone().into_dyn()),
    }
}

fn position_ids(mask: &Array2<i64>) -> Array2<i64> {
    let mut positions = Array2::<i64>::zeros(mask.dim());
    for (mut out, row) in positions.rows_mut().into_iter().zip(mask.rows()) {
        let mut count = 0;
        for (position, &real) in out.iter_mut().zip(row) {
            count += i64::from(real != 0);
            *position = if real != 0 { count - 1 } else { 1 };
        }
    }
    positions
}

/// A past input `[batch, kv_heads, past_length, head_dim]`.
fn past_input(
    label: &str,
    input: &TensorInfo,
    outputs: &[TensorInfo],
    config: &ModelConfig,
) -> Result<PastInput> {
    if input.dims.len() != 4 {
        return Err(unusable(format!(
            "{label}: past input {input} is not 4-D [batch, heads, past_length, head_dim]; onnx-slice cannot feed it"
        )));
    }
    let present = present_output(&input.name, outputs);
    let resolve = |axis: usize, from_config: Option<usize>, what: &str| -> Result<usize> {
        let declared = |dims: &[Dim]| match dims.get(axis) {
            Some(Dim::Fixed(n)) if *n > 0 => usize::try_from(*n).ok(),
            _ => None,
        };
        declared(&input.dims).or_else(|| present.and_then(|output| declared(&output.dims))).or(from_config).ok_or_else(|| {
            unusable(format!(
                "{label}: the {what} of past input {input} is symbolic, and neither a present output nor a \
                     genai_config.json / config.json beside the model gives it"
            ))
        })
    };
    Ok(PastInput {
        name: input.name.clone(),
        element_type: input.element_type.clone(),
        heads: resolve(1, config.kv_heads, "key/value head count")?,
        head_dim: resolve(3, config.head_dim, "head size")?,
    })
}

/// `present.N.key` for `past_key_values.N.key` (optimum and genai naming).
fn present_output<'a>(past: &str, outputs: &'a [TensorInfo]) -> Option<&'a TensorInfo> {
    let present = past.replacen("past_key_values", "present", 1);
    outputs.iter().find(|output| output.name == present)
}

/// Data or files around the model that cannot be used; the message says which and why.
fn unusable(message: impl Into<String>) -> Error {
    Error::Calibration { message: message.into() }
}
