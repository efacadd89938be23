//! The project's own model representation. Passes read and edit these types only; `crate::onnx`
//! converts them from and to protobuf. Every field a pass has no use for is carried along
//! untouched (`rest`), so that a model that is loaded and saved unchanged is the same file.
mod edit;
mod tensor;
mod topo;
mod types;

use std::path::PathBuf;

pub use crate::error::TypeError;
pub use edit::Namer;
pub use tensor::{DataType, ExternalSource, Tensor, TensorData, TypedValues};
pub use topo::{cleanup, node_on_cycle, toposort};
pub use types::{check_types, value_types};

/// Takes each tensor the moment a pass has made it final (no pass changes it afterwards), to store
/// it where the output keeps it instead of holding it until the model is saved: the output's
/// external data file (`crate::onnx::DataStream`), which then backs the tensor's bytes.
pub trait TensorSink {
    fn finished(&mut self, tensor: &mut Tensor) -> crate::error::Result<()>;

    /// Whether [`TensorSink::finished`] moves tensors' bytes out of memory itself: then a tensor
    /// made for it need not be parked in a scratch file first (`crate::files::park`).
    fn stores_bytes(&self) -> bool {
        false
    }
}

/// Finished tensors stay in the graph as they are until the model is saved.
pub struct KeepInGraph;

impl TensorSink for KeepInGraph {
    fn finished(&mut self, _tensor: &mut Tensor) -> crate::error::Result<()> {
        Ok(())
    }
}

use crate::protobuf::{onnx as proto, Opaque};

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub metadata: Vec<(String, String)>,
    pub graph: Graph,
    /// Where the model was read from, if it came from a file.
    pub source: Option<Source>,
    pub(crate) rest: Opaque<proto::ModelProto>,
}

/// The files a loaded model lives in; saving refuses to overwrite any of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub path: PathBuf,
    pub external_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpsetImport {
    pub domain: String,
    pub version: i64,
    pub(crate) rest: Opaque<proto::OperatorSetIdProto>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
    pub(crate) rest: Opaque<proto::GraphProto>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// "" for the default ONNX domain (also written "ai.onnx").
    pub domain: String,
    /// "" marks an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    pub(crate) rest: Opaque<proto::NodeProto>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
    pub(crate) rest: Opaque<proto::AttributeProto>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(Box<Tensor>),
    Graph(Box<Graph>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    /// Sparse tensors, type protos and references to function attributes: carried, not interpreted.
    Other,
}

/// Shape dimension of a declared value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbolic(s) => write!(f, "{s}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

/// A declared value (graph input, output or value_info entry): a name and, for tensors, the element
/// type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub(crate) rest: Opaque<proto::ValueInfoProto>,
}

impl Model {
    /// A new model (IR 10, readable by ONNX Runtime ≥ 1.16) importing the given opsets.
    pub fn new(opsets: &[(&str, i64)], graph: Graph) -> Self {
        Model {
            ir_version: 10,
            opset_imports: opsets
                .iter()
                .map(|&(domain, version)| OpsetImport::new(domain, version))
                .collect(),
            producer_name: "onnx-slice".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            metadata: Vec::new(),
            graph,
            source: None,
            rest: Opaque::default(),
        }
    }

    pub fn opset_version(&self, domain: &str) -> Option<i64> {
        self.opset_imports.iter().find(|o| same_domain(&o.domain, domain)).map(|o| o.version)
    }

    /// Parameter count: the element count of every initializer.
    pub fn parameter_count(&self) -> u64 {
        self.graph.initializers.iter().map(Tensor::numel).sum()
    }
}

/// "" and "ai.onnx" both name the default domain.
pub fn same_domain(a: &str, b: &str) -> bool {
    fn norm(d: &str) -> &str {
        if d == "ai.onnx" {
            ""
        } else {
            d
        }
    }
    norm(a) == norm(b)
}

impl OpsetImport {
    pub fn new(domain: &str, version: i64) -> Self {
        OpsetImport { domain: domain.into(), version, rest: Opaque::default() }
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name == name)
    }

    /// Declares `name` as an extra graph output (for reading an intermediate tensor), with the type
    /// found in value_info when there is one.
    pub fn expose_output(&mut self, name: &str) {
        if self.outputs.iter().any(|o| o.name == name) {
            return;
        }
        let declared = self.value_info.iter().find(|v| v.name == name).cloned();
        self.outputs.push(declared.unwrap_or_else(|| ValueInfo::untyped(name)));
    }

    /// The first node that breaks the ONNX rules the passes rely on (every node has an output; the
    /// operators they follow have their required inputs), and what is wrong with it. The passes
    /// then index inputs and outputs without re-checking, and walk the dataflow without looping.
    pub fn malformed_node(&self) -> Option<(&Node, String)> {
        let arity = self.nodes.iter().find_map(|node| {
            if node.outputs.first().is_none_or(String::is_empty) {
                return Some((node, "the node has no output".to_string()));
            }
            let required = required_inputs(&node.op_type);
            let present = node.inputs.iter().take(required).filter(|i| !i.is_empty()).count();
            (present < required).then(|| {
                (node, format!("{} needs {required} inputs, it has {present}", node.op_type))
            })
        });
        arity.or_else(|| {
            node_on_cycle(self)
                .map(|node| (node, "the node reads its own output through a cycle".to_string()))
        })
    }
}

/// Inputs an operator cannot do without, for the operators the passes follow (0 for the rest).
fn required_inputs(op_type: &str) -> usize {
    match op_type {
        "Where" | "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => 3,
        "Gemm"
        | "Add"
        | "Sub"
        | "Mul"
        | "Div"
        | "Pow"
        | "MatMul"
        | "Gather"
        | "Reshape"
        | "Expand"
        | "LayerNormalization"
        | "SimplifiedLayerNormalization"
        | "RMSNormalization" => 2,
        "Cast" | "Identity" | "Transpose" | "ReduceMean" | "ReduceSum" | "Sqrt" | "Reciprocal"
        | "Unsqueeze" | "Squeeze" | "Softmax" | "IsNaN" | "Split" | "Concat" | "Flatten"
        | "Shape" | "Slice" => 1,
        _ => 0,
    }
}

impl Node {
    pub fn new(
        op_type: &str,
        name: impl Into<String>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Self {
        Node { name: name.into(), op_type: op_type.into(), inputs, outputs, ..Default::default() }
    }

    /// `Cast(from) → to` of element type `dtype`.
    pub fn cast(name: impl Into<String>, from: &str, to: &str, dtype: DataType) -> Self {
        let mut node = Node::new("Cast", name, vec![from.into()], vec![to.into()]);
        node.set_attr("to", AttrValue::Int(dtype.code() as i64));
        node
    }

    pub fn is(&self, op_type: &str) -> bool {
        self.op_type == op_type
    }

    /// The node's operator is from the default ONNX domain ("" or "ai.onnx").
    pub fn in_default_domain(&self) -> bool {
        same_domain(&self.domain, "")
    }

    /// The node's name for messages: its name, or its first output when the exporter left it
    /// unnamed (outputs are unique in a graph).
    pub fn label(&self) -> &str {
        match (self.name.is_empty(), self.outputs.first()) {
            (true, Some(output)) => output,
            _ => &self.name,
        }
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes.iter().find(|a| a.name == name).map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name) {
            Some(AttrValue::Int(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name) {
            Some(AttrValue::Float(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name) {
            Some(AttrValue::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn set_attr(&mut self, name: &str, value: AttrValue) {
        match self.attributes.iter_mut().find(|a| a.name == name) {
            Some(a) => a.value = value,
            None => self.attributes.push(Attribute::new(name, value)),
        }
    }

    /// Subgraphs held in attributes (If/Loop/Scan bodies).
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.attributes.iter().flat_map(|a| match &a.value {
            AttrValue::Graph(g) => std::slice::from_ref(g.as_ref()).iter().collect::<Vec<_>>(),
            AttrValue::Graphs(gs) => gs.iter().collect(),
            _ => Vec::new(),
        })
    }
}

impl Attribute {
    pub fn new(name: &str, value: AttrValue) -> Self {
        Attribute { name: name.into(), value, rest: Opaque::default() }
    }
}
