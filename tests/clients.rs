//! Export folders in, export folders out, loaded AS THEY ARE by their real clients: optimum's
//! `ORTModelForCausalLM.from_pretrained(folder)` (without and with the KV cache) and
//! onnxruntime-genai's `Model(folder)`, generating greedily from fixed prompt ids
//! (`tests/clients/generate.py`, in the venv `scripts/setup-clients.sh` makes). At ratio 0 the
//! output folder must generate the tokens the original folder generates; a sliced one (ratio 0.25)
//! and one with MLP neurons removed (`--method neurons`) must load and generate. The folders' side files must come out byte for byte, the external data
//! under each family's name, and the input folder must not change.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cli::{onnx_slice, snapshot};
use common::{file_names as names, fixture, scratch};

/// Prompt ids every client generates from (the fixtures' vocabulary is 1000 words).
const PROMPT: [i64; 6] = [74, 547, 12, 900, 3, 321];
const NEW_TOKENS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    /// optimum's ORTModelForCausalLM, with `use_cache` as given.
    Optimum {
        use_cache: bool,
    },
    Genai,
}

/// One export folder sliced into a new folder, with the client that must load it.
struct Case {
    fixture: &'static str,
    client: Client,
    extra: &'static [&'static str],
}

/// The exact cases: one per family and form, two architectures each.
const EXACT: [Case; 7] = [
    Case { fixture: "llama/optimum", client: Client::Optimum { use_cache: false }, extra: &[] },
    Case { fixture: "gpt2/optimum", client: Client::Optimum { use_cache: false }, extra: &[] },
    Case { fixture: "llama/optimum_past", client: Client::Optimum { use_cache: true }, extra: &[] },
    // External data on request, under optimum's name.
    Case {
        fixture: "qwen2/optimum_past",
        client: Client::Optimum { use_cache: true },
        extra: &["--external-data"],
    },
    Case { fixture: "llama/genai", client: Client::Genai, extra: &[] },
    Case { fixture: "qwen2/genai", client: Client::Genai, extra: &[] },
    Case { fixture: "phi/genai", client: Client::Genai, extra: &[] },
];

/// Sliced for real: a quarter of the stream width, PCA-calibrated.
const SLICED: [Case; 3] = [
    Case { fixture: "llama/optimum_past", client: Client::Optimum { use_cache: true }, extra: &[] },
    Case { fixture: "gpt2/optimum", client: Client::Optimum { use_cache: false }, extra: &[] },
    Case { fixture: "qwen2/genai", client: Client::Genai, extra: &[] },
];

/// The python of the clients' venv: `ONNX_SLICE_CLIENTS_PYTHON`, else the one
/// scripts/setup-clients.sh makes (scripts/test.sh runs it). Missing → the test FAILS.
fn clients_python() -> PathBuf {
    if let Some(python) = std::env::var_os("ONNX_SLICE_CLIENTS_PYTHON") {
        return PathBuf::from(python);
    }
    let home = std::env::var_os("ONNX_SLICE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(".cache")
        });
        cache.join("onnx-slice")
    });
    let python = home.join("venv-clients/bin/python");
    assert!(
        python.exists(),
        "{} does not exist: run scripts/setup-clients.sh (a venv with optimum, torch and onnxruntime-genai), or set \
         ONNX_SLICE_CLIENTS_PYTHON to a python that imports them",
        python.display()
    );
    python
}

/// The tokens each (client, folder) generates, from one python process (torch is imported once).
fn generate(jobs: &[(Client, &Path)]) -> Vec<Vec<i64>> {
    let jobs_json: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(client, folder)| {
            let mut job = serde_json::json!({
                "folder": folder,
                "prompt": PROMPT,
                "new_tokens": NEW_TOKENS,
            });
            match client {
                Client::Optimum { use_cache } => {
                    job["client"] = "optimum".into();
                    job["use_cache"] = (*use_cache).into();
                }
                Client::Genai => job["client"] = "genai".into(),
            }
            job
        })
        .collect();
    let dir = scratch();
    let jobs_file = dir.path().join("jobs.json");
    std::fs::write(&jobs_file, serde_json::to_vec(&jobs_json).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/generate.py");
    let python = clients_python();
    // From a scratch folder: python puts the working folder first on its path.
    let out = Command::new(&python)
        .current_dir(dir.path())
        .arg(&script)
        .arg(&jobs_file)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} {} failed:\n{stderr}", python.display(), script.display());
    let tokens: Vec<Vec<i64>> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(tokens.len(), jobs.len());
    tokens
}

/// Slices `case`'s fixture folder into `out` with the given method flags and calibration on the
/// fixtures' text (genai folders carry no tokenizer: the checkpoint's is given).
fn slice_folder(case: &Case, out: &Path, how: &[&str]) {
    let input = fixture(case.fixture);
    let arch = case.fixture.split('/').next().unwrap();
    let tokenizer = fixture(&format!("_hf/{arch}/tokenizer.json"));
    let mut args: Vec<String> = vec![
        input.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--calib".into(),
        fixture("calibration.txt").display().to_string(),
        "--tokenizer".into(),
        tokenizer.display().to_string(),
        "--calib-samples".into(),
        "16".into(),
        "--calib-seqlen".into(),
        "64".into(),
        "--quiet".into(),
    ];
    args.extend(how.iter().chain(case.extra).map(|s| s.to_string()));
    let before = snapshot(&input);
    let run = onnx_slice(&args);
    assert_eq!(run.code, Some(0), "{}: {}", case.fixture, run.stderr);
    assert_eq!(snapshot(&input), before, "{}: the input folder changed", case.fixture);
}

/// The output folder holds the input's files under the same names, the side files byte for byte,
/// and the external data where (and as) the family's loader expects it.
fn check_folder_contents(case: &Case, out: &Path) {
    let input = fixture(case.fixture);
    let genai = case.client == Client::Genai;
    let external = genai || case.extra.contains(&"--external-data");
    let data_name = if genai { "model.onnx.data" } else { "model.onnx_data" };
    let mut expected: Vec<String> =
        names(&input).into_iter().filter(|n| n != "model.onnx.data").collect();
    if external {
        expected.push(data_name.into());
    }
    expected.sort();
    assert_eq!(names(out), expected, "{}: the files of the output folder", case.fixture);
    for name in names(&input) {
        if !name.starts_with("model.onnx") {
            assert!(
                std::fs::read(input.join(&name)).unwrap()
                    == std::fs::read(out.join(&name)).unwrap(),
                "{}: {name} is not a byte-for-byte copy",
                case.fixture
            );
        }
    }
}

#[test]
fn folders_sliced_at_ratio_0_generate_the_originals_tokens_in_their_clients() {
    let dir = scratch();
    let mut jobs: Vec<(Client, PathBuf)> = Vec::new();
    for (i, case) in EXACT.iter().enumerate() {
        let out = dir.path().join(format!("{i}-{}", case.fixture.replace('/', "-")));
        slice_folder(case, &out, &["--ratio", "0"]);
        check_folder_contents(case, &out);
        jobs.push((case.client, fixture(case.fixture)));
        jobs.push((case.client, out));
    }
    let borrowed: Vec<(Client, &Path)> = jobs.iter().map(|(c, p)| (*c, p.as_path())).collect();
    let tokens = generate(&borrowed);
    for (case, pair) in EXACT.iter().zip(tokens.chunks(2)) {
        assert_eq!(pair[0].len(), NEW_TOKENS, "{}: {:?}", case.fixture, pair[0]);
        assert_eq!(
            pair[1], pair[0],
            "{} ({:?}): sliced at ratio 0 vs the original",
            case.fixture, case.client
        );
    }
}

/// Sliced by SliceGPT (a quarter of the stream) and by `neurons` (85 % of the weight bytes), the
/// folders load and generate in their clients (one python process for all of them).
#[test]
fn folders_sliced_or_with_neurons_removed_load_and_generate_in_their_clients() {
    let dir = scratch();
    let mut jobs: Vec<(Client, PathBuf, &str)> = Vec::new();
    for (i, case) in SLICED.iter().enumerate() {
        let out = dir.path().join(format!("{i}-{}", case.fixture.replace('/', "-")));
        slice_folder(case, &out, &["--ratio", "0.25"]);
        check_folder_contents(case, &out);
        let inspect = onnx_slice(["inspect", out.to_str().unwrap()]);
        assert!(
            inspect.stdout.contains("ratio 0.25, stream width 64, widths 48,48,48,48"),
            "{}",
            inspect.stdout
        );
        jobs.push((case.client, out, case.fixture));
        let out = dir.path().join(format!("{i}-{}-neurons", case.fixture.replace('/', "-")));
        slice_folder(case, &out, &["--method", "neurons", "--target-size", "85%"]);
        check_folder_contents(case, &out);
        let inspect = onnx_slice(["inspect", out.to_str().unwrap()]);
        assert!(
            inspect.stdout.contains("method neurons") && inspect.stdout.contains("mlp widths"),
            "{}",
            inspect.stdout
        );
        jobs.push((case.client, out, case.fixture));
    }
    let borrowed: Vec<(Client, &Path)> = jobs.iter().map(|(c, p, _)| (*c, p.as_path())).collect();
    for ((_, out, fixture), tokens) in jobs.iter().zip(generate(&borrowed)) {
        let what = format!("{fixture} as {}", out.display());
        assert_eq!(tokens.len(), NEW_TOKENS, "{what}: {tokens:?}");
        assert!(tokens.iter().all(|&t| (0..1000).contains(&t)), "{what}: {tokens:?}");
    }
}
