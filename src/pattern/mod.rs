//! Reading a graph's dataflow: who produces and who consumes each value, constant values (from
//! initializers or Constant nodes), and walking past ops that do not change a tensor's values
//! (Cast between float types, Identity). Matchers are built on this; it never edits the graph.
pub mod norm;

use std::collections::{HashMap, HashSet};

use crate::graph::{AttrValue, DataType, Graph, Node, Tensor};

pub struct GraphIndex<'g> {
    pub graph: &'g Graph,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<usize>>,
    initializers: HashMap<&'g str, &'g Tensor>,
    outputs: HashSet<&'g str>,
}

impl<'g> GraphIndex<'g> {
    pub fn new(graph: &'g Graph) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            for output in node.outputs.iter().filter(|o| !o.is_empty()) {
                producer.insert(output.as_str(), i);
            }
            for input in node.inputs.iter().filter(|o| !o.is_empty()) {
                let list = consumers.entry(input.as_str()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        GraphIndex {
            graph,
            producer,
            consumers,
            initializers: graph.initializers.iter().map(|t| (t.name.as_str(), t)).collect(),
            outputs: graph.outputs.iter().map(|o| o.name.as_str()).collect(),
        }
    }

    pub fn node(&self, i: usize) -> &'g Node {
        &self.graph.nodes[i]
    }

    pub fn producer_index(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    pub fn producer(&self, value: &str) -> Option<&'g Node> {
        self.producer_index(value).map(|i| self.node(i))
    }

    /// Indices of the nodes that read `value`, in graph order, each once.
    pub fn consumer_indices(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }

    pub fn consumers(&self, value: &str) -> impl Iterator<Item = &'g Node> + '_ {
        self.consumer_indices(value).iter().map(|&i| self.node(i))
    }

    pub fn is_graph_output(&self, value: &str) -> bool {
        self.outputs.contains(value)
    }

    pub fn initializer(&self, value: &str) -> Option<&'g Tensor> {
        self.initializers.get(value).copied()
    }

    /// The value of a constant: an initializer, or the output of a Constant node.
    pub fn constant(&self, value: &str) -> Option<Tensor> {
        if let Some(t) = self.initializer(value) {
            return Some(t.clone());
        }
        let node = self.producer(value)?;
        if !node.is("Constant") {
            return None;
        }
        constant_node_value(node)
    }

    pub fn constant_f32(&self, value: &str) -> Option<Vec<f32>> {
        self.constant(value)?.to_f32().ok()
    }

    pub fn constant_i64(&self, value: &str) -> Option<Vec<i64>> {
        self.constant(value)?.to_i64().ok()
    }

    /// A single float constant (any shape with one element).
    pub fn scalar_f32(&self, value: &str) -> Option<f32> {
        match self.constant_f32(value)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    pub fn is_constant(&self, value: &str) -> bool {
        self.initializer(value).is_some() || self.producer(value).is_some_and(|n| n.is("Constant"))
    }

    /// Follows `value` back through value-preserving ops (Identity, float-to-float Cast) to where it
    /// is really computed. A chain that comes back to a value it passed (a cycle: only an invalid
    /// graph has one, and the matchers also run on graphs detection refuses) ends there.
    pub fn source_of<'a>(&'a self, mut value: &'a str) -> &'a str {
        let mut passed = HashSet::new();
        while let Some(node) = self.producer(value) {
            match node.inputs.first() {
                Some(from) if is_value_preserving(node) && passed.insert(value) => value = from,
                _ => break,
            }
        }
        value
    }

    /// Every value that carries the same numbers as `value`: itself and the outputs of
    /// value-preserving ops reading it, transitively.
    pub fn aliases(&self, value: &str) -> Vec<String> {
        let mut out = vec![value.to_string()];
        let mut i = 0;
        while i < out.len() {
            let current = out[i].clone();
            for node in self.consumers(&current) {
                let alias = node.outputs.first().filter(|_| is_value_preserving(node));
                // Each value once: a cycle of Identity/Cast (an invalid graph) would never end.
                if let Some(alias) = alias.filter(|alias| !out.contains(alias)) {
                    out.push(alias.clone());
                }
            }
            i += 1;
        }
        out
    }

    /// Consumers of `value` or of any alias of it (looking through Cast/Identity).
    pub fn consumers_through_aliases(&self, value: &str) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for alias in self.aliases(value) {
            for &i in self.consumer_indices(&alias) {
                if !is_value_preserving(self.node(i)) && !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.sort_unstable();
        out
    }
}

/// A Transpose that swaps the two axes of a matrix (perm [1, 0], or no perm: reverse the axes).
pub fn is_matrix_transpose(node: &Node) -> bool {
    node.is("Transpose")
        && node.in_default_domain()
        && matches!(node.attr_ints("perm"), None | Some([1, 0]))
}

/// Ops that pass the stream (or a normalized stream) on with its last axis intact: the
/// value-preserving ones, and the reshapes exporters apply (`[B, S, D]` ⇄ `[B·S, D]`).
pub fn is_stream_transparent(node: &Node) -> bool {
    is_value_preserving(node)
        || (node.in_default_domain() && matches!(node.op_type.as_str(), "Reshape" | "Flatten"))
}

/// Identity, and Cast to a float type (exporters wrap fp32 norms in Cast to float32 and back).
pub fn is_value_preserving(node: &Node) -> bool {
    match node.op_type.as_str() {
        "Identity" => node.in_default_domain() && node.inputs.len() == 1,
        "Cast" => {
            node.inputs.len() == 1
                && node
                    .attr_int("to")
                    .map(|code| DataType::from_code(code as i32))
                    .is_some_and(|t| matches!(t, DataType::Float | DataType::Double))
        }
        _ => false,
    }
}

fn constant_node_value(node: &Node) -> Option<Tensor> {
    let attr = node.attributes.first()?;
    let name = node.outputs.first()?.clone();
    match &attr.value {
        AttrValue::Tensor(t) => {
            let mut t = (**t).clone();
            t.name = name;
            Some(t)
        }
        AttrValue::Float(v) => Some(Tensor::from_f32(name, vec![], &[*v])),
        AttrValue::Floats(v) => Some(Tensor::from_f32(name, vec![v.len() as i64], v)),
        AttrValue::Int(v) => Some(Tensor::from_i64(name, vec![], &[*v])),
        AttrValue::Ints(v) => Some(Tensor::from_i64(name, vec![v.len() as i64], v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::GraphIndex;
    use crate::graph::{Graph, Node};

    fn names(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    /// Two Identity nodes that read each other (a cycle, as a mutated file can hold): the walks
    /// back and forward through aliases end (a mutation run hung in this walk before).
    #[test]
    fn walks_through_identity_end_on_a_cycle() {
        let mut graph = Graph::new("cycle");
        graph.nodes.push(Node::new("Identity", "i0", names(&["b"]), names(&["a"])));
        graph.nodes.push(Node::new("Identity", "i1", names(&["a"]), names(&["b"])));
        graph.nodes.push(Node::new("Identity", "i2", names(&["a"]), vec![]));
        let index = GraphIndex::new(&graph);
        assert!(["a", "b"].contains(&index.source_of("a")));
        let mut aliases = index.aliases("a");
        aliases.sort();
        assert_eq!(aliases, ["a", "b"]);
    }
}
