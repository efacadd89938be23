//! Small editing helpers shared by the rewrites: unique names, replacing initializers, finding a
//! node by what it produces.
use std::collections::HashSet;

use super::{Graph, Tensor};

/// Hands out names that no value, node or initializer of the graph uses yet.
pub struct Namer {
    used: HashSet<String>,
}

impl Namer {
    pub fn new(graph: &Graph) -> Self {
        let mut used: HashSet<String> = graph.initializers.iter().map(|t| t.name.clone()).collect();
        for node in &graph.nodes {
            used.insert(node.name.clone());
            used.extend(node.inputs.iter().cloned());
            used.extend(node.outputs.iter().cloned());
        }
        used.extend(graph.inputs.iter().map(|v| v.name.clone()));
        used.extend(graph.outputs.iter().map(|v| v.name.clone()));
        Namer { used }
    }

    /// `base`, or `base_2`, `base_3`, … whichever is free.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 1;
        while self.used.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        self.used.insert(name.clone());
        name
    }
}

impl Graph {
    pub fn initializer_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.initializers.iter_mut().find(|t| t.name == name)
    }

    /// Replaces the initializer of the same name, or adds it.
    pub fn set_initializer(&mut self, tensor: Tensor) {
        match self.initializer_mut(&tensor.name) {
            Some(slot) => *slot = tensor,
            None => self.initializers.push(tensor),
        }
    }

    pub fn node_index_producing(&self, value: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.outputs.iter().any(|o| o == value))
    }

    /// value_info entries for initializers and Constant outputs say nothing the tensors themselves
    /// don't, and after a rewrite they would say it wrong (some exporters even declare them wrong):
    /// the tensors' own dims are the truth.
    pub fn forget_constant_shapes(&mut self) {
        let mut constants: std::collections::HashSet<&str> =
            self.initializers.iter().map(|t| t.name.as_str()).collect();
        constants.extend(
            self.nodes
                .iter()
                .filter(|n| n.is("Constant"))
                .flat_map(|n| n.outputs.iter().map(String::as_str)),
        );
        let constants: std::collections::HashSet<String> =
            constants.into_iter().map(String::from).collect();
        self.value_info.retain(|v| !constants.contains(&v.name));
    }

    /// How many node inputs (across all nodes) read `value`.
    pub fn use_count(&self, value: &str) -> usize {
        self.nodes.iter().flat_map(|n| n.inputs.iter()).filter(|i| *i == value).count()
    }
}
