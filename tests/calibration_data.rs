//! Calibration token batches: text → windows, .npy ids, tokenizer lookup, the model's position limit.
mod common;

use std::path::{Path, PathBuf};

use common::{fixture, scratch};
use onnx_slice::calibrate::data::{
    default_calibration_text, documents, join_documents, special_tokens, CalibrationSet,
};
use onnx_slice::interface::{find_tokenizer, load_tokenizer, position_limit};
use onnx_slice::Error;
use tokenizers::Tokenizer;

/// The fixtures' shared 1000-token tokenizer: word level, `t3`..`t999` are ids 3..999, split at
/// whitespace, no special tokens added.
fn fixture_tokenizer() -> Tokenizer {
    load_tokenizer(&fixture("_hf/llama/tokenizer.json")).unwrap()
}

/// `documents` paragraphs whose tokens are, in order, ids `first, first+1, …` (`per_document` each).
fn numbered_text(first: u32, documents: usize, per_document: usize) -> String {
    let mut next = first;
    let paragraphs: Vec<String> = (0..documents)
        .map(|_| {
            let words: Vec<String> = (0..per_document)
                .map(|_| {
                    next += 1;
                    format!("t{}", next - 1)
                })
                .collect();
            words.join(" ")
        })
        .collect();
    paragraphs.join("\n\n")
}

#[test]
fn documents_are_paragraphs_between_blank_lines() {
    let text = "\n  first line\nsecond line\n\n\n  \t \nnext\r\n\r\nlast  \n";
    let docs: Vec<&str> = documents(text).collect();
    assert_eq!(docs, ["first line\nsecond line", "next", "last"]);
    assert_eq!(
        join_documents(&[text.to_string(), "more\n\n".to_string()]),
        "first line\nsecond line\n\nnext\n\nlast\n\nmore"
    );
    assert_eq!(documents("").count(), 0);
    assert_eq!(documents(" \n\n \n").count(), 0);
}

#[test]
fn text_becomes_non_overlapping_windows_of_the_stream() {
    let tokenizer = fixture_tokenizer();
    // 500 tokens, ids 3..503, in 20 documents: 10 windows of 50.
    let text = vec![numbered_text(3, 20, 25)];
    let set = CalibrationSet::from_texts(&text, &tokenizer, 4, 50, 42).unwrap();
    assert_eq!(set.len(), 4);
    assert_eq!(set.seqlen(), 50);
    assert_eq!(set.tokens(), 200);
    assert!(set.mask.iter().flatten().all(|&m| m == 1));
    let starts: Vec<i64> = set.ids.iter().map(|row| row[0]).collect();
    for (row, &start) in set.ids.iter().zip(&starts) {
        assert_eq!(
            (start - 3) % 50,
            0,
            "a window starts at a multiple of the window length: {start}"
        );
        assert_eq!(
            row,
            &(start..start + 50).collect::<Vec<i64>>(),
            "a window is a contiguous run of the stream"
        );
    }
    assert!(
        starts.windows(2).all(|w| w[0] < w[1]),
        "windows are distinct and in text order: {starts:?}"
    );
    assert!(
        set.source.contains("4 samples × 50 tokens") && set.source.contains("10 windows"),
        "{}",
        set.source
    );

    let again = CalibrationSet::from_texts(&text, &tokenizer, 4, 50, 42).unwrap();
    assert_eq!(again, set, "same seed, same samples");
    let differs = (0..8u64).any(|seed| {
        CalibrationSet::from_texts(&text, &tokenizer, 4, 50, seed).unwrap().ids != set.ids
    });
    assert!(differs, "other seeds choose other windows");
}

#[test]
fn short_text_gives_every_window_and_says_so() {
    let tokenizer = fixture_tokenizer();
    let text = vec![numbered_text(3, 3, 40), numbered_text(200, 2, 30)]; // 180 tokens
    let set = CalibrationSet::from_texts(&text, &tokenizer, 10, 50, 0).unwrap();
    assert_eq!(set.len(), 3, "180 tokens hold 3 windows of 50");
    assert_eq!(set.ids[0], (3..53).collect::<Vec<i64>>());
    // The second text's tokens follow the first's.
    assert_eq!(set.ids[2][..20], (103..123).collect::<Vec<i64>>()[..]);
    assert_eq!(set.ids[2][20..], (200..230).collect::<Vec<i64>>()[..]);
    assert!(set.source.contains("only 3 of the 10 requested samples"), "{}", set.source);
}

#[test]
fn too_little_text_is_an_error() {
    let tokenizer = fixture_tokenizer();
    let error =
        CalibrationSet::from_texts(&[numbered_text(3, 2, 10)], &tokenizer, 4, 50, 0).unwrap_err();
    assert!(matches!(error, Error::Calibration { .. }));
    let message = error.to_string();
    assert!(
        message.contains("too short")
            && message.contains("20 tokens")
            && message.contains("needs 50"),
        "{message}"
    );
    let empty = CalibrationSet::from_texts(&["\n\n".to_string()], &tokenizer, 1, 8, 0).unwrap_err();
    assert!(empty.to_string().contains("too short"), "{empty}");
    assert!(CalibrationSet::from_texts(&[numbered_text(3, 2, 10)], &tokenizer, 0, 5, 0).is_err());
}

/// A copy of the fixture tokenizer whose post-processor puts `<s>` (id 1) before every sequence,
/// as LLaMA-2's does.
fn tokenizer_with_bos(dir: &Path) -> Tokenizer {
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("_hf/llama/tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    });
    // A tokenizer.json may also ask for truncation; calibration must not truncate documents.
    json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

#[test]
fn special_tokens_of_the_post_processor_start_every_sample() {
    let dir = scratch();
    let tokenizer = tokenizer_with_bos(dir.path());
    assert_eq!(special_tokens(&tokenizer).unwrap(), (vec![1], vec![]));
    assert_eq!(
        special_tokens(&fixture_tokenizer()).unwrap(),
        (vec![], vec![]),
        "no post-processor, nothing added"
    );
    let text = vec![numbered_text(3, 10, 49)]; // 490 tokens: 10 windows of 49 + <s>
    let set = CalibrationSet::from_texts(&text, &tokenizer, 10, 50, 1).unwrap();
    assert_eq!(set.len(), 10);
    for (w, row) in set.ids.iter().enumerate() {
        assert_eq!(row.len(), 50);
        assert_eq!(row[0], 1, "every sample starts with <s>");
        let start = 3 + 49 * w as i64;
        assert_eq!(row[1..], (start..start + 49).collect::<Vec<i64>>()[..]);
    }
    let error = CalibrationSet::from_texts(&text, &tokenizer, 1, 1, 0).unwrap_err();
    assert!(error.to_string().contains("no room for text"), "{error}");
}

fn i64_bytes(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn npy_ids_round_trip() {
    let dir = scratch();
    let path = dir.path().join("ids.npy");
    let values: Vec<i64> = (0..15).map(|v| v * 7 + 1).collect();
    common::write_npy(&path, "<i8", &[3, 5], &i64_bytes(&values));
    let set = CalibrationSet::from_npy(&path, None).unwrap();
    assert_eq!(
        set.ids,
        vec![values[0..5].to_vec(), values[5..10].to_vec(), values[10..15].to_vec()]
    );
    assert_eq!(set.mask, vec![vec![1; 5]; 3]);
    assert_eq!(set.tokens(), 15);
    assert!(set.source.contains("3 samples × 5 tokens"), "{}", set.source);

    let batches: Vec<_> = set.batches(2).collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].0.shape(), [2, 5]);
    assert_eq!(batches[1].0.shape(), [1, 5]);
    assert_eq!(batches[1].0.iter().copied().collect::<Vec<_>>(), values[10..15].to_vec());
    assert_eq!(batches[0].1.shape(), [2, 5]);

    let first = CalibrationSet::from_npy(&path, Some(2)).unwrap();
    assert_eq!(first.ids, set.ids[..2].to_vec());
    assert!(first.source.contains("first 2 of 3"), "{}", first.source);
    let more = CalibrationSet::from_npy(&path, Some(9)).unwrap();
    assert_eq!(more.len(), 3);
    assert!(more.source.contains("only 3 rows"), "{}", more.source);
    let cut = set.clone().truncated(3);
    assert_eq!(cut.seqlen(), 3);
    assert_eq!(cut.ids[1], values[5..8].to_vec());

    let path32 = dir.path().join("ids32.npy");
    let values32: Vec<u8> = (0..8i32).flat_map(|v| (v + 100).to_le_bytes()).collect();
    common::write_npy(&path32, "<i4", &[2, 4], &values32);
    let set32 = CalibrationSet::from_npy(&path32, None).unwrap();
    assert_eq!(set32.ids, vec![vec![100, 101, 102, 103], vec![104, 105, 106, 107]]);
}

#[test]
fn npy_with_the_wrong_type_or_rank_is_refused() {
    let dir = scratch();
    let floats = dir.path().join("floats.npy");
    common::write_npy(&floats, "<f4", &[2, 2], &[0u8; 16]);
    let message = CalibrationSet::from_npy(&floats, None).unwrap_err().to_string();
    assert!(
        message.contains("int64 or int32")
            && message.contains("float32")
            && message.contains("floats.npy"),
        "{message}"
    );

    let flat = dir.path().join("flat.npy");
    common::write_npy(&flat, "<i8", &[4], &i64_bytes(&[1, 2, 3, 4]));
    let message = CalibrationSet::from_npy(&flat, None).unwrap_err().to_string();
    assert!(message.contains("2-D") && message.contains("[4]"), "{message}");

    let negative = dir.path().join("negative.npy");
    common::write_npy(&negative, "<i8", &[1, 2], &i64_bytes(&[1, -5]));
    assert!(CalibrationSet::from_npy(&negative, None).unwrap_err().to_string().contains("-5"));

    let missing =
        CalibrationSet::from_npy(&dir.path().join("missing.npy"), None).unwrap_err().to_string();
    assert!(missing.contains("missing.npy"), "{missing}");
}

#[test]
fn tokenizer_is_the_flag_or_beside_the_model() {
    let dir = scratch();
    let model = dir.path().join("model.onnx");
    std::fs::write(&model, b"").unwrap();

    let error = find_tokenizer(&model, None, "--calib-ids FILE.npy").unwrap_err().to_string();
    let beside = dir.path().join("tokenizer.json");
    assert!(error.contains(&beside.display().to_string()), "names the path tried: {error}");
    assert!(
        error.contains("--tokenizer") && error.contains("--calib-ids"),
        "suggests the flags: {error}"
    );

    let explicit = fixture("_hf/llama/tokenizer.json");
    assert_eq!(find_tokenizer(&model, Some(&explicit), "--calib-ids FILE.npy").unwrap(), explicit);
    let absent = dir.path().join("nope.json");
    let error =
        find_tokenizer(&model, Some(&absent), "--calib-ids FILE.npy").unwrap_err().to_string();
    assert!(error.contains("nope.json") && error.contains("--tokenizer"), "{error}");

    std::fs::copy(&explicit, &beside).unwrap();
    assert_eq!(find_tokenizer(&model, None, "--ids FILE.npy").unwrap(), beside);

    std::fs::write(dir.path().join("broken.json"), "{not json").unwrap();
    let error = load_tokenizer(&dir.path().join("broken.json")).unwrap_err().to_string();
    assert!(error.contains("broken.json"), "{error}");
}

fn limit_of(rel: &str) -> Option<usize> {
    position_limit(&onnx_slice::onnx::load(fixture(rel)).unwrap())
}

#[test]
fn position_limit_of_learned_tables_and_configs() {
    // GPT-2: 128-row table read at positions 0.. ; OPT: 130 rows read at positions + 2.
    for exporter in ["ts14", "ts17", "dynamo", "dynamo23", "optimum", "optimum_past", "ortopt_l1"] {
        assert_eq!(limit_of(&format!("gpt2/{exporter}/model.onnx")), Some(128), "gpt2 {exporter}");
        assert_eq!(limit_of(&format!("opt/{exporter}/model.onnx")), Some(128), "opt {exporter}");
    }
    // Rotary models: no table; genai writes the context length into genai_config.json.
    assert_eq!(limit_of("llama/ts17/model.onnx"), None);
    assert_eq!(limit_of("llama/genai/model.onnx"), Some(128));

    // A config.json beside the model is read, and the smaller limit wins.
    let dir = scratch();
    let copy = |arch: &str| -> PathBuf {
        let target = dir.path().join(arch);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(fixture(&format!("{arch}/optimum/model.onnx")), target.join("model.onnx"))
            .unwrap();
        target
    };
    let llama = copy("llama");
    std::fs::write(llama.join("config.json"), r#"{"max_position_embeddings": 4096}"#).unwrap();
    assert_eq!(
        position_limit(&onnx_slice::onnx::load(llama.join("model.onnx")).unwrap()),
        Some(4096)
    );
    let gpt2 = copy("gpt2");
    std::fs::write(gpt2.join("config.json"), r#"{"n_positions": 64}"#).unwrap();
    assert_eq!(position_limit(&onnx_slice::onnx::load(gpt2.join("model.onnx")).unwrap()), Some(64));
}

#[test]
fn default_text_is_built_in() {
    let text = default_calibration_text();
    assert!((1_300_000..1_600_000).contains(&text.len()), "{} bytes", text.len());
    assert!(documents(text).count() > 3000);
    assert!(text.starts_with("0 is a number"));
}

/// Manual check with SmolLM2's tokenizer (not in the repository):
/// `cargo test --release --test calibration_data -- --ignored --nocapture`.
#[test]
#[ignore = "needs ~/.cache/onnx-slice-models/smollm2"]
fn default_text_holds_the_reference_calibration_set_for_smollm2() {
    let home = std::env::var("HOME").unwrap();
    let tokenizer = load_tokenizer(Path::new(&format!(
        "{home}/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/tokenizer.json"
    )))
    .unwrap();
    let start = std::time::Instant::now();
    let set = CalibrationSet::from_texts(
        &[default_calibration_text().to_string()],
        &tokenizer,
        128,
        2048,
        42,
    )
    .unwrap();
    eprintln!("{} ({:.1} s)", set.source, start.elapsed().as_secs_f64());
    assert_eq!(set.len(), 128);
}
