//! What a run will write, known before it runs: the parameters and weight bytes of the output from
//! the layout, the widths, the basis groups and the dtypes ([`Plan::predict_widths`]). Methods
//! solve their budgets with it (`slicegpt::widths`), `--dry-run` prints it, and the tests check it
//! against what the real rewrite writes.
//!
//! "Parameters" and "weight bytes" count the floating-point initializers (weights, biases,
//! shortcuts, adapters, the rewrite's scalars); integer initializers are shape constants and
//! indices, not weights.
use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::algebra;
use crate::analysis::Analysis;
use crate::error::{Error, Result};
use crate::graph::{DataType, Graph, Model};
use crate::rotate::{extends_last_basis, SkipForm};
use crate::structure::{self, Layout};

/// Floating-point parameters and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub parameters: u64,
    pub bytes: u64,
}

/// The floating-point initializers of a graph.
pub fn weight_totals(graph: &Graph) -> Totals {
    graph.initializers.iter().filter(|t| is_float(t.dtype)).fold(Totals::default(), |sum, t| {
        Totals { parameters: sum.parameters + t.numel(), bytes: sum.bytes + t.byte_len() }
    })
}

fn is_float(dtype: DataType) -> bool {
    matches!(dtype, DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)
}

/// A `--target-size` without a unit up to this many bytes is refused as a percentage missing its
/// `%` (no model's weights fit in it).
const PERCENT_LOOKALIKE: u64 = 100;

/// A size budget: weight bytes or parameters of the output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    Bytes(u64),
    /// A fraction (0 < f ≤ 1) of the input's weight bytes.
    BytesFraction(f64),
    Parameters(u64),
}

impl Budget {
    /// `BYTES` or `N%` (of the input's weight bytes).
    pub fn parse_size(text: &str) -> std::result::Result<Budget, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Budget::BytesFraction(p / 100.0)),
                _ => Err(format!("expected a percentage in (0, 100], got '{text}'")),
            };
        }
        let bytes = text.parse::<u64>().map_err(|_| {
            format!("expected a number of bytes or a percentage like 80%, got '{text}'")
        })?;
        // No model's weights fit in 100 bytes: a bare number this small is a share without its %.
        if bytes <= PERCENT_LOOKALIKE {
            return Err(format!(
                "{bytes} would mean {bytes} bytes; did you mean {bytes}%? (a size in bytes is a larger \
                 number, such as 200000000)"
            ));
        }
        Ok(Budget::Bytes(bytes))
    }

    /// The limit in the budget's unit, for a model of `before`.
    pub fn limit(&self, before: Totals) -> u64 {
        match *self {
            Budget::Bytes(b) => b,
            Budget::BytesFraction(f) => (before.bytes as f64 * f).floor() as u64,
            Budget::Parameters(p) => p,
        }
    }

    /// The budget's unit of `totals`: bytes or parameters.
    pub fn measure(&self, totals: Totals) -> u64 {
        match self {
            Budget::Parameters(_) => totals.parameters,
            _ => totals.bytes,
        }
    }

    /// "parameters" or "weight bytes".
    pub fn unit(&self) -> &'static str {
        match self {
            Budget::Parameters(_) => "parameters",
            _ => "weight bytes",
        }
    }

    /// Whether `after` fits; else the error a CI job gets.
    pub fn check(&self, before: Totals, after: Totals) -> Result<()> {
        let (limit, got) = (self.limit(before), self.measure(after));
        if got <= limit {
            return Ok(());
        }
        Err(Error::Budget {
            message: format!(
                "the sliced model has {got} {}, over the target of {limit}",
                self.unit()
            ),
        })
    }
}

/// What the prediction needs from the input model, found without rewriting any weight.
#[derive(Clone)]
pub struct Plan {
    /// The layout of the model as found (before fusion; the tied head not yet adapted).
    pub layout: Layout,
    /// The head computes `x Eᵀ` with the token table (kept as one table).
    pub tied: bool,
    pub before: Totals,
    /// Every float initializer that survives fusion: name → (elements, dtype).
    kept: HashMap<String, (u64, DataType)>,
    /// The float initializers only the norms read (γ, β), which fusion folds away, and the head's
    /// copy of a tied table, which fusion shares: in an unfused output they stay.
    unfused_only: HashMap<String, (u64, DataType)>,
    /// Elements the fusion adds (its scalars, biases from folded shifts), with their dtypes.
    added: Vec<(u64, DataType)>,
    /// The dtype of the tensors the rewrite creates (shortcuts, adapters).
    created: DataType,
    /// How the model's opset lets a zero-extending skip be written.
    skips: SkipForm,
}

/// A predicted result.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub widths: Vec<usize>,
    /// Every block's MLP width.
    pub mlp_widths: Vec<usize>,
    /// Skips that get a shortcut MatMul.
    pub shortcuts: usize,
    pub shortcut_parameters: u64,
    pub before: Totals,
    pub after: Totals,
}

impl Plan {
    /// Notes what fusion removes and adds in an analysed model. Reads no weight except the norms'
    /// β.
    pub fn new(model: &Model, analysis: &Analysis) -> Result<Plan> {
        let graph = &model.graph;
        let layout = analysis.layout.clone();
        let tied = analysis.tied_head;
        let before = weight_totals(&model.graph);
        let norm_nodes: HashSet<usize> =
            layout.branches().flat_map(|b| b.norm.nodes.iter().copied()).collect();
        let mut read: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        read.extend(graph.outputs.iter().map(|v| v.name.as_str()));
        for (_, node) in graph.nodes.iter().enumerate().filter(|(i, _)| !norm_nodes.contains(i)) {
            read.extend(node.inputs.iter().map(String::as_str));
        }
        let mut kept: HashMap<String, (u64, DataType)> = graph
            .initializers
            .iter()
            .filter(|t| is_float(t.dtype) && read.contains(t.name.as_str()))
            .map(|t| (t.name.clone(), (t.numel(), t.dtype)))
            .collect();
        let norm_read: HashSet<&str> = norm_nodes
            .iter()
            .flat_map(|&i| graph.nodes[i].inputs.iter().map(String::as_str))
            .collect();
        let mut unfused_only: HashMap<String, (u64, DataType)> = graph
            .initializers
            .iter()
            .filter(|t| is_float(t.dtype) && !kept.contains_key(&t.name))
            .filter(|t| norm_read.contains(t.name.as_str()))
            .map(|t| (t.name.clone(), (t.numel(), t.dtype)))
            .collect();
        let stream = algebra::stream_dtype(graph, &layout);
        let created = algebra::created_dtype(stream);
        // The norms' scalars (the exponent 2, and an ε per norm) are in the type they accumulate
        // in; their gain vectors (one per width) depend on the widths (`predict_widths`).
        let norm_constants = algebra::accumulation_dtype(created);
        let mut added = vec![(1, norm_constants)];
        added.extend(layout.branches().map(|_| (1, norm_constants)));
        if tied {
            for head in &layout.head.readers {
                if head.weight != layout.embeddings[0].table {
                    if let Some(copy) = kept.remove(&head.weight) {
                        unfused_only.insert(head.weight.clone(), copy);
                    }
                }
            }
        }
        let index = crate::pattern::GraphIndex::new(graph);
        for (i, branch) in layout.branches().enumerate() {
            let shifts = branch
                .norm
                .beta
                .as_deref()
                .and_then(|b| index.constant_f32(b))
                .is_some_and(|b| b.iter().any(|&v| v != 0.0));
            if !shifts {
                continue;
            }
            let is_head = i + 1 == layout.branches().count();
            if is_head && tied {
                added.push((layout.width as u64, created));
                continue;
            }
            for reader in branch.readers.iter().filter(|r| r.bias.is_none()) {
                let dtype = kept.get(&reader.weight).map_or(stream, |&(_, t)| t);
                added.push((reader.out_features as u64, dtype));
            }
        }
        let skips = SkipForm::for_model(model);
        Ok(Plan { layout, tied, before, kept, unfused_only, added, created, skips })
    }

    /// Parameters and bytes of the output for a width and a basis group at every stream point.
    pub fn predict_widths(&self, widths: Vec<usize>, groups: &[usize]) -> Prediction {
        let mlp = self.mlp_widths();
        self.predict(&Shape { stream: Some((widths, groups.to_vec())), mlp, mlp_biases: false })
    }

    /// Every block's MLP width F as the model has it (0 for a block without a recognized MLP).
    pub fn mlp_widths(&self) -> Vec<usize> {
        self.layout.blocks.iter().map(|b| b.mlp.as_ref().map_or(0, |m| m.width)).collect()
    }

    /// Parameters and bytes of the output of a rewrite of this shape.
    pub fn predict(&self, shape: &Shape) -> Prediction {
        let layout = &self.layout;
        let d = layout.width as u64;
        let (widths, groups) = match &shape.stream {
            Some((widths, groups)) => (widths.clone(), groups.clone()),
            None => {
                let points = layout.stream_points().len();
                (vec![layout.width; points], (0..points).map(|_| 0).collect())
            }
        };
        let fused = shape.stream.is_some();
        let k = |p: usize| widths[p] as u64;
        let mut sizes = self.kept.clone();
        if !fused {
            sizes.extend(self.unfused_only.clone());
        }
        let mlp_of = self.mlp_roles(&shape.mlp);
        let mut resize = |name: &str, elements: u64| {
            if let Some(entry) = sizes.get_mut(name) {
                entry.0 = elements;
            }
        };
        let mut created: Vec<u64> = Vec::new();
        for (e, embedding) in layout.embeddings.iter().enumerate() {
            if e == 0 && self.tied && fused {
                created.push(d * k(0));
            } else {
                let rows = self.kept.get(&embedding.table).map_or(0, |&(n, _)| n / d);
                resize(&embedding.table, rows * k(0));
            }
        }
        let last = widths.len() - 1;
        for (p, branches) in layout
            .segments
            .iter()
            .map(|s| s.branches.as_slice())
            .chain([std::slice::from_ref(&layout.head)])
            .enumerate()
        {
            for reader in branches.iter().flat_map(|b| b.readers.iter()) {
                if p == last && self.tied && fused {
                    created.push(k(p) * d);
                    continue;
                }
                let out = mlp_of.width(&reader.weight).unwrap_or(reader.out_features) as u64;
                resize(&reader.weight, k(p) * out);
                if let Some(width) = mlp_of.width(&reader.weight) {
                    if let Some(
                        structure::Bias::GemmC(b) | structure::Bias::AddNode { initializer: b, .. },
                    ) = &reader.bias
                    {
                        resize(b, width as u64);
                    }
                }
            }
        }
        let mut created_biases: Vec<(u64, DataType)> = Vec::new();
        let mut shortcuts = 0;
        let mut shortcut_parameters = 0;
        for (i, segment) in layout.segments.iter().enumerate() {
            for writer in &segment.writers {
                let input = mlp_of.width(&writer.weight).unwrap_or(writer.in_features) as u64;
                resize(&writer.weight, input * k(i + 1));
                match &writer.bias {
                    Some(
                        structure::Bias::GemmC(b) | structure::Bias::AddNode { initializer: b, .. },
                    ) => {
                        resize(b, k(i + 1));
                    }
                    None if shape.mlp_biases && mlp_of.pruned(&writer.weight) => {
                        let dtype = self.kept.get(&writer.weight).map_or(self.created, |&(_, t)| t);
                        created_biases.push((k(i + 1), dtype));
                    }
                    None => {}
                }
            }
            if groups[i] != groups[i + 1] {
                let parameters =
                    if i + 1 == last && extends_last_basis(layout.width, &groups, &widths) {
                        self.skips.extension_parameters(widths[i], layout.width)
                    } else {
                        k(i) * k(i + 1)
                    };
                if parameters > 0 {
                    shortcuts += 1;
                    shortcut_parameters += parameters;
                }
            }
        }
        for (name, width) in &mlp_of.constants {
            resize(name, *width as u64);
        }
        if fused {
            created.push(shortcut_parameters);
            // The norms share one gain vector per stream width (`fuse::gain_tensor`).
            let mut norm_widths = widths.clone();
            norm_widths.sort_unstable();
            norm_widths.dedup();
            created.extend(norm_widths.iter().map(|&k| k as u64));
        }
        let element = |dtype: DataType| dtype.byte_size().unwrap_or(4) as u64;
        let mut after = Totals::default();
        let added: &[(u64, DataType)] = if fused { &self.added } else { &[] };
        for &(n, dtype) in sizes.values().chain(added.iter()).chain(created_biases.iter()) {
            after.parameters += n;
            after.bytes += n * element(dtype);
        }
        let created: u64 = created.iter().sum();
        after.parameters += created;
        after.bytes += created * element(self.created);
        Prediction {
            widths,
            mlp_widths: shape.mlp.clone(),
            shortcuts,
            shortcut_parameters,
            before: self.before,
            after,
        }
    }

    /// The MLP weights, biases and per-neuron constants of `mlp`'s widths, by initializer name.
    fn mlp_roles(&self, mlp: &[usize]) -> MlpRoles {
        let mut roles = MlpRoles::default();
        for (block, &width) in self.layout.blocks.iter().zip(mlp) {
            let Ok(m) = &block.mlp else { continue };
            let pruned = width < m.width;
            for &r in &m.readers {
                roles.weights.insert(self.layout.linear(r).weight.clone(), (width, pruned));
            }
            roles.weights.insert(self.layout.linear(m.writer).weight.clone(), (width, pruned));
            roles.constants.extend(m.neuron_constants.iter().map(|c| (c.clone(), width)));
        }
        roles
    }
}

/// What a rewrite does to the model's shape, for [`Plan::predict`].
#[derive(Debug, Clone)]
pub struct Shape {
    /// SliceGPT's stream width and basis group at every point (the norms fused, the stream
    /// rotated); `None`: the stream and the norms are left as they are.
    pub stream: Option<(Vec<usize>, Vec<usize>)>,
    /// Every block's MLP width ([`Plan::mlp_widths`] where it is kept whole).
    pub mlp: Vec<usize>,
    /// A down projection without a bias gets one where its MLP loses neurons.
    pub mlp_biases: bool,
}

#[derive(Default)]
struct MlpRoles {
    /// Reader and writer weights: (their MLP's width, whether it loses neurons).
    weights: HashMap<String, (usize, bool)>,
    constants: Vec<(String, usize)>,
}

impl MlpRoles {
    fn width(&self, weight: &str) -> Option<usize> {
        self.weights.get(weight).map(|&(w, _)| w)
    }

    fn pruned(&self, weight: &str) -> bool {
        self.weights.get(weight).is_some_and(|&(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_targets_parse_as_bytes_or_a_share() {
        assert_eq!(Budget::parse_size("1000"), Ok(Budget::Bytes(1000)));
        assert_eq!(Budget::parse_size(" 80% "), Ok(Budget::BytesFraction(0.8)));
        for bad in ["0%", "101%", "-5", "80 percent", ""] {
            assert!(Budget::parse_size(bad).is_err(), "{bad}");
        }
        let before = Totals { parameters: 10, bytes: 1001 };
        assert_eq!(Budget::BytesFraction(0.5).limit(before), 500);
        assert!(Budget::BytesFraction(0.5)
            .check(before, Totals { parameters: 10, bytes: 500 })
            .is_ok());
        assert!(Budget::Parameters(9).check(before, Totals { parameters: 10, bytes: 1 }).is_err());
    }
}
