//! The fixtures' reference inputs (torch's, from reference.npz) and running models on them in ONNX
//! Runtime.
use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, Axis};
use onnx_slice::runtime::npy::Npz;
use onnx_slice::runtime::{init_runtime, Dim, Ep, ModelSession, SessionConfig, TensorValue};

use super::fixture;

/// Loads ONNX Runtime the way the tool does, failing (never skipping) when it is missing.
pub fn runtime() {
    if let Err(error) = init_runtime(None) {
        panic!("these tests need ONNX Runtime: {error}");
    }
}

pub fn cpu() -> SessionConfig {
    SessionConfig { ep: Ep::Cpu, intra_threads: None, shared_arena: false }
}

pub fn open(path: &Path, config: &SessionConfig) -> ModelSession {
    runtime();
    ModelSession::from_file(path, config)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

pub struct Reference {
    pub input_ids: ArrayD<i64>,
    pub attention_mask: ArrayD<i64>,
    pub position_ids: ArrayD<i64>,
    pub logits: ArrayD<f32>,
    /// Attention heads per KV head and head size, for building an empty KV cache.
    pub head_dim: usize,
}

impl Reference {
    pub fn load(arch: &str) -> Self {
        let npz = Npz::read(&fixture(&format!("{arch}/reference.npz")))
            .unwrap_or_else(|error| panic!("{error}"));
        let int64 = |name: &str| {
            npz.array(name)
                .cloned()
                .and_then(|a| a.into_i64())
                .unwrap_or_else(|error| panic!("{error}"))
        };
        let logits = npz
            .array("logits")
            .cloned()
            .and_then(|a| a.into_f32())
            .unwrap_or_else(|error| panic!("{error}"));
        Self {
            input_ids: int64("input_ids"),
            attention_mask: int64("attention_mask"),
            position_ids: int64("position_ids"),
            logits,
            head_dim: head_dim(arch),
        }
    }

    /// The reference for one exporter: opset-23 dynamo exports run in ONNX Runtime at batch 1 only
    /// (an exporter bug, see fixtures/README.md), so they get the first row.
    pub fn for_exporter(arch: &str, exporter: &str) -> Self {
        let full = Self::load(arch);
        if exporter == "dynamo23" {
            full.first_row()
        } else {
            full
        }
    }

    pub fn first_row(&self) -> Self {
        let row = |array: &ArrayD<i64>| array.slice_axis(Axis(0), (0..1).into()).to_owned();
        Self {
            input_ids: row(&self.input_ids),
            attention_mask: row(&self.attention_mask),
            position_ids: row(&self.position_ids),
            logits: self.logits.slice_axis(Axis(0), (0..1).into()).to_owned(),
            head_dim: self.head_dim,
        }
    }

    /// Every input the model declares: the reference tensors by name, and an empty KV cache for
    /// `past_key_values.*` inputs.
    pub fn inputs_for(&self, session: &ModelSession) -> Vec<(String, TensorValue)> {
        feed(
            session,
            &self.input_ids,
            &self.attention_mask,
            &self.position_ids,
            None,
            self.head_dim,
        )
        .unwrap_or_else(|error| panic!("{error}"))
    }
}

/// `present.*` outputs of a run, by name.
pub type Cache = BTreeMap<String, ArrayD<f32>>;

/// Every input the session declares: the token tensors, and `past_key_values.N.*` from `past`'s
/// `present.N.*` (or empty, `[batch, kv_heads, 0, head_dim]`, without a past).
pub fn feed(
    session: &ModelSession,
    input_ids: &ArrayD<i64>,
    attention_mask: &ArrayD<i64>,
    position_ids: &ArrayD<i64>,
    past: Option<&Cache>,
    head_dim: usize,
) -> Result<Vec<(String, TensorValue)>, String> {
    let batch = input_ids.shape()[0];
    session
        .inputs()
        .iter()
        .map(|input| {
            let value = match input.name.as_str() {
                "input_ids" => TensorValue::I64(input_ids.clone()),
                "attention_mask" => TensorValue::I64(attention_mask.clone()),
                "position_ids" => TensorValue::I64(position_ids.clone()),
                name if name.starts_with("past_key_values.") => match past {
                    Some(cache) => {
                        let present = name.replacen("past_key_values.", "present.", 1);
                        TensorValue::F32(
                            cache
                                .get(&present)
                                .cloned()
                                .ok_or_else(|| format!("no output {present} to feed {name}"))?,
                        )
                    }
                    None => match input.dims.as_slice() {
                        [_, Dim::Fixed(heads), _, _] => TensorValue::F32(ArrayD::zeros(vec![
                            batch,
                            *heads as usize,
                            0,
                            head_dim,
                        ])),
                        other => {
                            return Err(format!("unexpected KV-cache dims {other:?} for {name}"))
                        }
                    },
                },
                other => return Err(format!("no value for input {other}")),
            };
            Ok((input.name.clone(), value))
        })
        .collect()
}

/// `head_dim` from a fixture's meta.json (some exports leave it symbolic).
fn head_dim(arch: &str) -> usize {
    let dir = fixture(arch);
    let meta = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("meta.json"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no meta.json under {}", dir.display()));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    meta["head_dim"]
        .as_u64()
        .map(|dim| dim as usize)
        .unwrap_or_else(|| panic!("meta.json has no head_dim"))
}

pub fn as_named(inputs: &[(String, TensorValue)]) -> Vec<(&str, &TensorValue)> {
    inputs.iter().map(|(name, value)| (name.as_str(), value)).collect()
}

pub fn run_logits(session: &mut ModelSession, inputs: &[(String, TensorValue)]) -> ArrayD<f32> {
    let mut outputs =
        session.run_for(&as_named(inputs), &["logits"]).unwrap_or_else(|error| panic!("{error}"));
    outputs
        .remove("logits")
        .map(TensorValue::into_f32)
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no f32 logits"))
}

/// All outputs of a model on its reference inputs, in the model's order.
pub fn run_all(path: &Path, reference: &Reference) -> Vec<(String, TensorValue)> {
    let mut session = open(path, &cpu());
    let inputs = reference.inputs_for(&session);
    session
        .run(&as_named(&inputs))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .into_vec()
}

pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A session of `model` as it is in memory; external data is read from `dir`.
pub fn session_for(model: &onnx_slice::graph::Model, dir: &Path) -> ModelSession {
    runtime();
    let bytes = onnx_slice::onnx::to_bytes(model).unwrap_or_else(|e| panic!("{e}"));
    ModelSession::from_bytes(&bytes, Some(dir), &cpu()).unwrap_or_else(|e| panic!("{e}"))
}

/// The logits of `model` (in memory) on the reference inputs, through ONNX Runtime.
pub fn logits_of(
    model: &onnx_slice::graph::Model,
    dir: &Path,
    reference: &Reference,
) -> ArrayD<f32> {
    let mut session = session_for(model, dir);
    let inputs = reference.inputs_for(&session);
    run_logits(&mut session, &inputs)
}
