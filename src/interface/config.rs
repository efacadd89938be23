//! What the files beside a model say about it (`config.json`, onnxruntime-genai's
//! `genai_config.json`), and the longest sequence it accepts.
use std::path::Path;

use crate::graph::{Graph, Model};
use crate::pattern::GraphIndex;
use crate::structure::EmbeddingRole;

/// Attention shapes and the position limit from the configuration files beside a model; each
/// file is read once.
#[derive(Debug, Default)]
pub struct ModelConfig {
    pub kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    /// `max_position_embeddings` (or `n_positions`) in `config.json`, else `context_length` in
    /// `genai_config.json`.
    pub position_limit: Option<usize>,
}

impl ModelConfig {
    /// Reads the files beside `model_path` (the `.onnx` file); missing files or keys leave `None`.
    pub fn beside(model_path: Option<&Path>) -> Self {
        let Some(dir) = model_path.and_then(Path::parent) else { return Self::default() };
        let read = |name: &str| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
        };
        let number = |value: &serde_json::Value, key: &str| {
            value.get(key).and_then(serde_json::Value::as_u64).and_then(|v| usize::try_from(v).ok())
        };
        let mut config = Self::default();
        if let Some(genai) = read("genai_config.json").and_then(|genai| genai.get("model").cloned())
        {
            if let Some(decoder) = genai.get("decoder") {
                config.head_dim = number(decoder, "head_size");
                config.kv_heads = number(decoder, "num_key_value_heads");
            }
            config.position_limit = number(&genai, "context_length");
        }
        if let Some(hf) = read("config.json") {
            let heads = number(&hf, "num_attention_heads");
            let hidden = number(&hf, "hidden_size");
            let head_dim =
                number(&hf, "head_dim").or_else(|| Some(hidden? / heads.filter(|&h| h > 0)?));
            config.head_dim = config.head_dim.or(head_dim);
            config.kv_heads =
                config.kv_heads.or_else(|| number(&hf, "num_key_value_heads").or(heads));
            let limit =
                number(&hf, "max_position_embeddings").or_else(|| number(&hf, "n_positions"));
            config.position_limit = limit.or(config.position_limit);
        }
        config
    }
}

/// The longest sequence the model accepts, where it has a limit:
///
/// - a learned position-embedding table (GPT-2, OPT): its row count, less the constant the
///   position ids are shifted by before the lookup when the graph has one (OPT adds 2:
///   `Gather(table, Add(positions, 2))`, so 2050 rows hold 2048 positions);
/// - `max_position_embeddings` (or `n_positions`) in a `config.json` beside the model, or
///   `context_length` in onnxruntime-genai's `genai_config.json`.
///
/// With both, the smaller. Rotary models without a config file have no limit that the graph
/// shows: `None`. (For rotary models the configured limit is the trained context, not a hard
/// limit of the graph.)
pub fn position_limit(model: &Model) -> Option<usize> {
    let from_table = position_table_limit(&model.graph);
    let from_config =
        ModelConfig::beside(model.source.as_ref().map(|source| source.path.as_path()))
            .position_limit;
    match (from_table, from_config) {
        (Some(table), Some(config)) => Some(table.min(config)),
        (table, config) => table.or(config),
    }
}

fn position_table_limit(graph: &Graph) -> Option<usize> {
    let mut graph = graph.clone();
    crate::fuse::skip::decompose_skip_norms(&mut graph).ok()?;
    let layout = crate::structure::detect(&graph).ok()?;
    let embedding = layout.embeddings.iter().find(|e| e.role == EmbeddingRole::Position)?;
    let table = graph.initializer(&embedding.table)?;
    let rows =
        if embedding.through_transpose.is_some() { table.dims.get(1) } else { table.dims.first() };
    let rows = usize::try_from(*rows?).ok()?;
    let index = GraphIndex::new(&graph);
    let offset = index
        .producer(&embedding.output)
        .filter(|gather| gather.is("Gather") && gather.inputs.len() == 2)
        .map_or(0, |gather| position_offset(&index, &gather.inputs[1]));
    Some(rows.saturating_sub(offset))
}

/// `c` when `indices` is `Add(x, c)` (through casts) with a constant non-negative integer scalar
/// `c`; else 0.
fn position_offset(index: &GraphIndex<'_>, indices: &str) -> usize {
    let mut value = indices;
    while let Some(node) = index.producer(value) {
        if let (true, Some(input)) = (node.is("Cast") || node.is("Identity"), node.inputs.first()) {
            value = input;
            continue;
        }
        if node.is("Add") && node.in_default_domain() && node.inputs.len() == 2 {
            let scalar = |v: &str| index.constant_i64(v).filter(|c| c.len() == 1).map(|c| c[0]);
            if let Some(c) = scalar(&node.inputs[1]).or_else(|| scalar(&node.inputs[0])) {
                return usize::try_from(c).unwrap_or(0);
            }
        }
        break;
    }
    0
}
