//! The module graph has no cycle: a top-level module (`src/X.rs` or `src/X/`) only uses modules
//! below it in the data flow (docs/design.md §5). Read from the sources: every `crate::name` path
//! outside comments.
//!
//! `error` is checked like every other module: the typed errors it wraps (detection, quantized
//! models, ONNX Runtime, element types, NumPy files) are defined in it, below every layer, and
//! re-exported where they are raised.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → the other top-level modules its files name as `crate::…`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let first = relative
            .components()
            .next()
            .expect("a path")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let uses = graph.entry(module.clone()).or_default();
        let code = text.lines().filter(|line| !line.trim_start().starts_with("//"));
        for line in code {
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, as the list of modules on it, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == start {
                return Some([path.clone(), vec![start.to_string()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() >= 10, "expected the crate's modules, found {:?}", graph.keys());
    let cycles: Vec<String> =
        graph.keys().filter_map(|m| cycle_from(&graph, m)).map(|c| c.join(" → ")).collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

/// The protobuf types are named only by the IR (which carries them, unopened) and by `onnx`
/// (which converts); only `onnx` builds or opens an `Opaque` value.
#[test]
fn only_onnx_opens_the_protobuf_leftovers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut offenders = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src/").to_string_lossy().into_owned();
        if relative.starts_with("onnx") || relative.starts_with("protobuf") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        for line in text.lines().filter(|line| !line.trim_start().starts_with("//")) {
            let names_protobuf = line.contains("crate::protobuf") && !relative.starts_with("graph");
            let opens = line.contains("Opaque(") || line.contains("rest.0");
            if names_protobuf || opens {
                offenders.push(format!("{relative}: {}", line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "protobuf seen outside onnx/:\n{}", offenders.join("\n"));
}
