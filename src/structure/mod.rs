//! The transformer inside an exported graph, as roles: embeddings, the residual stream and its
//! points, each segment's norms, readers and writers, the final norm and the head. This is the only
//! module that knows what a transformer looks like; everything is found by dataflow, never by name.
//!
//! ```text
//!  input_ids ─ Gather(E) ─(+ Gather(P))─► x0 ─┬─ norm ─ readers ─ … ─ writers ─┐
//!                                             └──────────── skip ────────────── Add ─► x1 ─┬─ …
//!  … ─► xL ─ final norm ─ head ─► logits
//! ```
//! A segment goes from one stream point to the next: a sequential block (GPT-2, OPT, LLaMA, Qwen2)
//! has two (attention, MLP), a parallel block (Phi, GPT-NeoX) one, with both branches in it.
mod blocks;
mod quantized;
mod walk;

use crate::pattern::norm::{NormKind, NormMatch};

pub use crate::error::DetectError;
pub use blocks::{Attention, Block, LinearRef, Mlp};
pub use quantized::{refuse_quantized, QuantizedForm, QuantizedModel};
pub use walk::detect;

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `[in, out]`: MatMul's B operand, Gemm with transB=0.
    InOut,
    /// `[out, in]`: Gemm with transB=1.
    OutIn,
}

/// Where a linear layer's bias lives.
#[derive(Debug, Clone, PartialEq)]
pub enum Bias {
    /// Gemm's C input (an initializer).
    GemmC(String),
    /// An `Add(linear output, bias)` node right after the linear layer: (Add output, initializer).
    AddNode { output: String, initializer: String },
}

/// A MatMul or Gemm with a constant weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// The node's name (may be empty in some exports) and its output value (always unique).
    pub node_name: String,
    pub output: String,
    /// The initializer holding the weight.
    pub weight: String,
    pub layout: WeightLayout,
    /// The weight is read through a `Transpose(perm=[1,0])` of the initializer (a tied head).
    pub through_transpose: Option<String>,
    pub bias: Option<Bias>,
    pub in_features: usize,
    pub out_features: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingRole {
    Token,
    Position,
}

/// A `Gather(table, ids)` that writes to the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub role: EmbeddingRole,
    pub output: String,
    pub table: String,
    /// The Gather reads `Transpose(table)` (the table is stored `[D, V]` for a tied head).
    pub through_transpose: Option<String>,
    /// A tied head keeps the table as it is: the Gather is followed by `MatMul(·, adapter)`, a
    /// `[D, k]` initializer that carries the rotation instead (set by the rewrite, not detection).
    pub adapter: Option<String>,
}

/// The residual Add that joins a segment's skip path and its branch.
#[derive(Debug, Clone, PartialEq)]
pub struct ResidualAdd {
    /// The Add's output value.
    pub output: String,
    /// Which input (0 or 1) carries the skip path.
    pub skip_input: usize,
}

/// A norm and the linear layers that read its output.
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub norm: NormMatch,
    pub readers: Vec<Linear>,
}

/// A Reshape applied to a stream-width tensor, and the stream point whose width it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamReshape {
    /// The Reshape's output value.
    pub output: String,
    pub point: usize,
}

/// From one stream point to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub input: String,
    /// One branch per norm reading the input (GPT-NeoX has two, for attention and MLP).
    pub branches: Vec<Branch>,
    pub writers: Vec<Linear>,
    /// The Adds from `input` to `output`; the first one receives the skip path.
    pub residual_adds: Vec<ResidualAdd>,
    pub output: String,
    /// Values of stream width on this segment's paths (norm outputs to readers, writers to the
    /// residual Adds, the skip path): their declared shapes change when the stream is sliced.
    pub stream_values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Residual stream width D.
    pub width: usize,
    pub norm_kind: NormKind,
    pub embeddings: Vec<Embedding>,
    pub segments: Vec<Segment>,
    /// The final norm and the LM head.
    pub head: Branch,
    /// The head reads the token embedding's initializer (tied weights). After the rewrite the
    /// head's reader is a `[D, D]` adapter in front of the unchanged `Transpose(table)` MatMul.
    pub tied_head: bool,
    /// Stream values between the embeddings and the first segment, and after the last one.
    pub stream_values: Vec<String>,
    /// Reshapes applied to stream-width tensors: their shape constants carry D and change when
    /// the stream is sliced.
    pub stream_reshapes: Vec<StreamReshape>,
    /// The segments grouped into blocks, with their attention and MLP roles.
    pub blocks: Vec<Block>,
}

impl Embedding {
    /// The Gather reading the table (behind the adapter of a tied table).
    pub fn gather<'g>(&self, graph: &'g crate::graph::Graph) -> Option<&'g crate::graph::Node> {
        let producer = |value: &str| {
            graph.nodes.iter().find(|n| n.outputs.first().map(String::as_str) == Some(value))
        };
        let node = producer(&self.output)?;
        match &self.adapter {
            Some(_) if node.is("MatMul") => producer(node.inputs.first()?),
            _ => Some(node),
        }
    }
}

impl Linear {
    /// Reads the weight from the linear's node again (an initializer, or the Transpose of one).
    fn follow_weight(&mut self, graph: &crate::graph::Graph) {
        let Some(node) = graph.nodes.iter().find(|n| n.outputs.first() == Some(&self.output))
        else {
            return;
        };
        if let Some(found) = node.inputs.get(1).and_then(|w| weight_source(graph, w)) {
            (self.weight, self.through_transpose) = found;
        }
    }
}

/// `value` as (initializer, the Transpose reading it): an initializer itself, or
/// `Transpose(initializer, perm=[1,0])`.
fn weight_source(graph: &crate::graph::Graph, value: &str) -> Option<(String, Option<String>)> {
    if graph.initializer(value).is_some() {
        return Some((value.to_string(), None));
    }
    let transpose =
        graph.nodes.iter().find(|n| n.outputs.first().map(String::as_str) == Some(value))?;
    let source = transpose.inputs.first()?;
    (crate::pattern::is_matrix_transpose(transpose) && graph.initializer(source).is_some())
        .then(|| (source.clone(), Some(value.to_string())))
}

impl Segment {
    /// A parallel block (attention and MLP side by side) has writers from both branches.
    pub fn is_parallel(&self) -> bool {
        self.writers.len() > 1
    }
}

impl Layout {
    /// Blocks as people count them: a parallel segment is one block, sequential segments pair up.
    pub fn block_count(&self) -> usize {
        let parallel = self.segments.iter().filter(|s| s.is_parallel()).count();
        parallel + (self.segments.len() - parallel) / 2
    }

    /// Every stream point, in order: the first segment's input, then each segment's output.
    pub fn stream_points(&self) -> Vec<&str> {
        let mut points: Vec<&str> =
            self.segments.first().map(|s| s.input.as_str()).into_iter().collect();
        points.extend(self.segments.iter().map(|s| s.output.as_str()));
        points
    }

    /// Every norm with its readers, in stream order, the final norm and head last.
    pub fn branches(&self) -> impl Iterator<Item = &Branch> {
        self.segments.iter().flat_map(|s| s.branches.iter()).chain(std::iter::once(&self.head))
    }

    /// Follows the weights of every linear layer and embedding table to the initializers their
    /// nodes read now: after [`crate::fuse::privatize_weights`] gave shared weights copies of their
    /// own and turned transposed reads into transposed copies, the layout is the same but for
    /// these names.
    pub fn follow_weights(&mut self, graph: &crate::graph::Graph) {
        for segment in &mut self.segments {
            for linear in segment
                .branches
                .iter_mut()
                .flat_map(|b| b.readers.iter_mut())
                .chain(segment.writers.iter_mut())
            {
                linear.follow_weight(graph);
            }
        }
        for linear in &mut self.head.readers {
            linear.follow_weight(graph);
        }
        for e in 0..self.embeddings.len() {
            let found = self.embeddings[e]
                .gather(graph)
                .and_then(|g| g.inputs.first())
                .and_then(|table| weight_source(graph, table));
            if let Some((table, through_transpose)) = found {
                (self.embeddings[e].table, self.embeddings[e].through_transpose) =
                    (table, through_transpose);
            }
        }
    }

    /// Every linear layer the rewrite touches.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.branches()
            .flat_map(|b| b.readers.iter())
            .chain(self.segments.iter().flat_map(|s| s.writers.iter()))
    }
}
