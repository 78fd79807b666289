//! Models from outside the library: `arenaflow logits` (the `teacher_forward` operator
//! through the CLI) on the committed tiny checkpoints against transformers' logits, its
//! errors on bad input, and hub ids.

use std::path::Path;
use std::sync::Arc;

use arenaflow_tests::{arenaflow, read_logits, repo_root, text, write_parquet};
use datafusion::arrow::array::{Array, Int32Builder, ListBuilder, RecordBatch, StringArray};

fn write_tokens(path: &Path, rows: &[(String, Vec<i32>)]) {
    let ids = StringArray::from(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>());
    let mut tokens = ListBuilder::new(Int32Builder::new());
    for (_, row) in rows {
        tokens.values().append_slice(row);
        tokens.append(true);
    }
    let batch = RecordBatch::try_from_iter(vec![
        ("id", Arc::new(ids) as Arc<dyn Array>),
        ("input_ids", Arc::new(tokens.finish()) as Arc<dyn Array>),
    ])
    .unwrap();
    write_parquet(path, &[batch]);
}

#[test]
fn logits_command_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["llama", "qwen2", "gemma2"] {
        let fixture = repo_root().join("tests/fixtures/models").join(family);
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
                .unwrap();
        let rows: Vec<(String, Vec<i32>)> = reference["rows"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let tokens = r
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap() as i32)
                    .collect();
                (format!("row{i}"), tokens)
            })
            .collect();
        let input = dir.path().join(format!("{family}.parquet"));
        write_tokens(&input, &rows);
        // The adapter as PEFT runs it, and folded into the weights at load (--merge-adapter).
        for (padding, adapter, merge) in [
            ("right", false, false),
            ("left", true, false),
            ("right", true, true),
        ] {
            let output = dir
                .path()
                .join(format!("{family}_{padding}_{merge}_out.parquet"));
            let mut args = vec![
                "logits".to_string(),
                "--model".into(),
                fixture.join("base").display().to_string(),
                "--input".into(),
                input.display().to_string(),
                "--output".into(),
                output.display().to_string(),
                "--padding".into(),
                padding.into(),
                // Two rows per pass: several batches, sorted by length, put back in order.
                "--max-batch-tokens".into(),
                "26".into(),
            ];
            if adapter {
                args.push("--adapter".into());
                args.push(fixture.join("adapter").display().to_string());
            }
            if merge {
                args.push("--merge-adapter".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run = arenaflow(&args);
            assert!(run.status.success(), "{}", text(&run));
            let got = read_logits(&output);
            let want = &reference[if adapter { "adapter" } else { "base" }][padding];
            let mut worst = 0f32;
            for (i, (id, logits)) in got.iter().enumerate() {
                assert_eq!(id, &format!("row{i}"), "rows come back in input order");
                for (a, b) in logits.iter().zip(want[i].as_array().unwrap()) {
                    worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
                }
            }
            assert_eq!(got.len(), rows.len());
            assert!(
                worst <= 1e-4,
                "{family} {padding} merged {merge}: max |diff| {worst}"
            );
        }
    }
}

/// `arenaflow logits --model MODEL --input INPUT --output OUTPUT`.
fn logits(model: &Path, input: &Path, output: &Path) -> std::process::Output {
    arenaflow(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ])
}

#[test]
fn logits_command_rejects_bad_rows_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.parquet");
    write_tokens(
        &input,
        &[
            ("ok".into(), vec![1, 2, 3]),
            ("too-big".into(), vec![4, 500, 6]),
        ],
    );
    let output = dir.path().join("out.parquet");
    let model = repo_root().join("tests/fixtures/models/llama/base");
    let run = logits(&model, &input, &output);
    assert!(!run.status.success());
    assert!(
        text(&run).contains("bad.parquet: ")
            && text(&run).contains("teacher_forward: input row 2 (id too-big, order ab), column input_ids: token 500 at position 1 is outside the vocabulary (0..97)"),
        "{}",
        text(&run)
    );
    assert!(!output.exists());

    // A missing tensor names itself.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 4.into();
    std::fs::write(broken.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        model.join("model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    write_tokens(&input, &[("ok".into(), vec![1, 2, 3])]);
    let run = logits(&broken, &input, &output);
    assert!(!run.status.success());
    assert!(
        text(&run).contains("missing tensor(s): model.layers.3."),
        "{}",
        text(&run)
    );
    assert!(!output.exists());
}

/// A hub id resolves through the local Hugging Face cache; offline, a file the cache lacks
/// is named in the error.
#[test]
fn hub_ids_use_the_cache_and_offline_mode_names_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    let repo = home.join("hub/models--arena--tiny-llama");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let fixture = repo_root().join("tests/fixtures/models/llama");
    std::fs::copy(
        fixture.join("base/config.json"),
        snapshot.join("config.json"),
    )
    .unwrap();
    let input = dir.path().join("in.parquet");
    write_tokens(&input, &[("a".into(), vec![5, 17, 33])]);
    let output = dir.path().join("out.parquet");
    let env = [
        ("HF_HOME", home.display().to_string()),
        ("HF_HUB_OFFLINE", "1".to_string()),
    ];
    let args = [
        "logits",
        "--model",
        "arena/tiny-llama",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    let run = arenaflow_tests::arenaflow_with_env(&args, &env);
    assert!(!run.status.success());
    assert!(
        text(&run).contains("arena/tiny-llama: HF_HUB_OFFLINE is set and the cache")
            && text(&run).contains("lacks: model.safetensors"),
        "{}",
        text(&run)
    );
    std::fs::copy(
        fixture.join("base/model.safetensors"),
        snapshot.join("model.safetensors"),
    )
    .unwrap();
    let run = arenaflow_tests::arenaflow_with_env(&args, &env);
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(read_logits(&output).len(), 1);
}
