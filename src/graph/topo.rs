//! Topological order and dead-code removal: the last step of every graph surgery.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use super::{Graph, Node};
use crate::error::{Error, Result};

/// Every value a node reads: its inputs plus the outer-scope values its subgraphs read.
fn node_reads(node: &Node) -> Vec<String> {
    let mut reads: Vec<String> = node.inputs.iter().filter(|n| !n.is_empty()).cloned().collect();
    for g in node.subgraphs() {
        reads.extend(free_values(g));
    }
    reads
}

/// Values a subgraph reads from its enclosing scope.
fn free_values(graph: &Graph) -> HashSet<String> {
    let mut defined: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    defined.extend(graph.initializers.iter().map(|t| t.name.as_str()));
    defined.extend(graph.nodes.iter().flat_map(|n| n.outputs.iter().map(String::as_str)));
    let mut free = HashSet::new();
    for node in &graph.nodes {
        free.extend(node_reads(node).into_iter().filter(|n| !defined.contains(n.as_str())));
    }
    free.extend(
        graph.outputs.iter().map(|o| o.name.clone()).filter(|n| !defined.contains(n.as_str())),
    );
    free
}

/// Which node (by index) produces each value.
fn producers(graph: &Graph) -> HashMap<&str, usize> {
    graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().filter(|o| !o.is_empty()).map(move |o| (o.as_str(), i)))
        .collect()
}

/// Sorts nodes so that every node comes after the producers of what it reads, keeping the
/// original order wherever the dependencies allow (so an already sorted graph is left as it is).
pub fn toposort(graph: &mut Graph) -> Result<()> {
    let order = topological_order(graph).map_err(|stuck| Error::Graph {
        node: graph.nodes[stuck].label().to_string(),
        message: "the graph has a cycle".into(),
    })?;
    let mut slots: Vec<Option<Node>> =
        std::mem::take(&mut graph.nodes).into_iter().map(Some).collect();
    graph.nodes = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok(())
}

/// A node on a cycle (reading, directly or not, its own output), if the graph has one.
pub fn node_on_cycle(graph: &Graph) -> Option<&Node> {
    topological_order(graph).err().map(|stuck| &graph.nodes[stuck])
}

/// Node indices in dependency order (ties in original order), or a node that never becomes ready.
fn topological_order(graph: &Graph) -> std::result::Result<Vec<usize>, usize> {
    let producer = producers(graph);
    let n = graph.nodes.len();
    let mut waiting_on = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in graph.nodes.iter().enumerate() {
        let deps: HashSet<usize> =
            node_reads(node).iter().filter_map(|r| producer.get(r.as_str()).copied()).collect();
        waiting_on[i] = deps.len();
        for p in deps {
            dependents[p].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| waiting_on[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    match (0..n).find(|&i| waiting_on[i] > 0) {
        Some(stuck) => Err(stuck),
        None => Ok(order),
    }
}

/// Removes nodes whose outputs nobody reads, initializers nobody reads, and value_info entries of
/// values that no longer exist. Graph outputs are never removed. Works in any node order.
pub fn cleanup(graph: &mut Graph) {
    let producer = producers(graph);
    let mut live: HashSet<String> = HashSet::new();
    let mut keep = vec![false; graph.nodes.len()];
    let mut pending: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    while let Some(value) = pending.pop() {
        if !live.insert(value.clone()) {
            continue;
        }
        if let Some(&i) = producer.get(value.as_str()) {
            if !keep[i] {
                keep[i] = true;
                pending.extend(node_reads(&graph.nodes[i]));
            }
        }
    }
    let mut keep_iter = keep.into_iter();
    graph.nodes.retain(|_| keep_iter.next().unwrap_or(true));
    let declared_inputs: HashSet<String> = graph.inputs.iter().map(|v| v.name.clone()).collect();
    graph.initializers.retain(|t| live.contains(&t.name) || declared_inputs.contains(&t.name));
    let mut existing: HashSet<&str> =
        graph.nodes.iter().flat_map(|n| n.outputs.iter().map(String::as_str)).collect();
    existing.extend(graph.inputs.iter().map(|v| v.name.as_str()));
    existing.extend(graph.initializers.iter().map(|t| t.name.as_str()));
    let existing: HashSet<String> = existing.into_iter().map(String::from).collect();
    graph.value_info.retain(|v| existing.contains(&v.name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ValueInfo;

    fn node(name: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node::new(
            "Identity",
            name,
            inputs.iter().map(|s| s.to_string()).collect(),
            outputs.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn toposort_moves_consumers_after_producers_and_keeps_sorted_order() {
        let mut g = Graph {
            nodes: vec![
                node("c", &["b"], &["c"]),
                node("a", &["x"], &["a"]),
                node("b", &["a"], &["b"]),
            ],
            inputs: vec![ValueInfo::untyped("x")],
            ..Default::default()
        };
        toposort(&mut g).unwrap();
        let names: Vec<_> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn toposort_reports_a_cycle() {
        let mut g = Graph {
            nodes: vec![node("a", &["b"], &["a"]), node("b", &["a"], &["b"])],
            ..Default::default()
        };
        assert!(matches!(toposort(&mut g), Err(Error::Graph { .. })));
    }

    #[test]
    fn cleanup_keeps_live_nodes_in_any_order() {
        let mut g = Graph {
            nodes: vec![node("b", &["a"], &["b"]), node("a", &["x"], &["a"])],
            inputs: vec![ValueInfo::untyped("x")],
            outputs: vec![ValueInfo::untyped("b")],
            ..Default::default()
        };
        cleanup(&mut g);
        assert_eq!(g.nodes.len(), 2);
    }

    #[test]
    fn cleanup_removes_dead_nodes_and_initializers() {
        let mut g = Graph {
            nodes: vec![node("a", &["x", "w"], &["a"]), node("dead", &["x", "w2"], &["d"])],
            inputs: vec![ValueInfo::untyped("x")],
            outputs: vec![ValueInfo::untyped("a")],
            initializers: vec![
                crate::graph::Tensor::from_f32("w", vec![1], &[1.0]),
                crate::graph::Tensor::from_f32("w2", vec![1], &[1.0]),
            ],
            ..Default::default()
        };
        cleanup(&mut g);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.initializers.len(), 1);
        assert_eq!(g.initializers[0].name, "w");
    }
}
