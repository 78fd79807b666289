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

/// `arenaflow logits` of `model` (with `adapter`) over the token rows of `input`, written to
/// `output`; the rows' logits.
fn cli_logits(
    model: &Path,
    adapter: Option<&Path>,
    input: &Path,
    output: &Path,
) -> Vec<(String, Vec<f32>)> {
    let s = |p: &Path| p.display().to_string();
    let mut args = vec!["logits".to_string(), "--model".into(), s(model)];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), s(a)]);
    }
    args.extend([
        "--input".to_string(),
        s(input),
        "--output".into(),
        s(output),
    ]);
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let run = arenaflow(&refs);
    assert!(run.status.success(), "{}", text(&run));
    read_logits(output)
}

/// The largest logit gap between two runs over the same rows, and the largest |logit| of
/// the first.
fn logit_gap(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, f32) {
    let ids = |rows: &[(String, Vec<f32>)]| rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    assert_eq!(ids(a), ids(b), "the two runs scored other rows");
    for (id, logits) in a.iter().chain(b) {
        assert!(logits.iter().all(|v| v.is_finite()), "{id}: {logits:?}");
    }
    let worst = a
        .iter()
        .zip(b)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0f32, f32::max);
    let scale = a
        .iter()
        .flat_map(|(_, a)| a.iter().map(|x| x.abs()))
        .fold(0.0f32, f32::max);
    (worst, scale)
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

/// `arenaflow quantize`: GPTQ of the llama fixture with its adapter merged, calibrated on
/// 12 rows of token ids, then `arenaflow logits` of the written checkpoint against the
/// float model's (base + adapter); bad input fails naming the file, row and column, and
/// leaves no folder.
#[test]
fn quantize_command_writes_a_gptq_checkpoint_that_logits_reads() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = repo_root().join("tests/fixtures/models/llama");
    let (base, adapter) = (fixture.join("base"), fixture.join("adapter"));
    let rows: Vec<(String, Vec<i32>)> = (0..12)
        .map(|i| {
            (
                format!("r{i}"),
                (0..14).map(|t| 3 + (i * 7 + t * 5) % 90).collect(),
            )
        })
        .collect();
    let input = dir.path().join("rows.parquet");
    write_tokens(&input, &rows);
    let out = dir.path().join("gptq");
    let s = |p: &Path| p.display().to_string();
    let quantize = |extra: &[&str], input: &Path, out: &Path| {
        let mut args = vec![
            "quantize".to_string(),
            "--model".into(),
            s(&base),
            "--adapter".into(),
            s(&adapter),
            "--input".into(),
            s(input),
            "--output".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        arenaflow(&refs)
    };
    let run = quantize(&["--group-size", "24", "--act-order"], &input, &out);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains("21 projections, 12 calibration rows (168 tokens)"),
        "{}",
        text(&run)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bits"], 8);
    assert_eq!(config["quantization_config"]["group_size"], 24);
    assert_eq!(config["quantization_config"]["desc_act"], true);
    let float = cli_logits(
        &base,
        Some(&adapter),
        &input,
        &dir.path().join("float.parquet"),
    );
    let int8 = cli_logits(&out, None, &input, &dir.path().join("int8.parquet"));
    let (worst, scale) = logit_gap(&float, &int8);
    eprintln!(
        "8-bit GPTQ logits within {worst:.4} of the float model's (largest logit {scale:.2})"
    );
    // The fixture's merged adapter has large outliers, which set each group's grid: 8-bit
    // round-to-nearest is 0.63 off on these rows, GPTQ 0.46 without act-order and 0.75 with
    // it (measured through the library). What this checks is the command's plumbing (a
    // broken packing or an unquantized pass-through would be far off or exactly equal);
    // the algorithm is checked against the reference in operators/models/tests/gptq.rs.
    assert!(
        worst > 0.0 && worst < 0.3 * scale,
        "8-bit logits off by {worst} (largest {scale})"
    );

    // An output that exists is refused; a token outside the vocabulary names file, row and
    // column; a group size of 0 is refused; none leaves a folder.
    let again = quantize(&["--group-size", "24"], &input, &out);
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));
    let bad = dir.path().join("bad.parquet");
    let mut bad_rows = rows.clone();
    bad_rows[2].1[3] = 500;
    write_tokens(&bad, &bad_rows);
    let failed = dir.path().join("failed");
    let run = quantize(&["--group-size", "24"], &bad, &failed);
    assert!(!run.status.success());
    assert!(
        text(&run).contains(&format!(
            "{}: row 2, column input_ids: token id 500 outside the model's vocabulary of 97",
            bad.display()
        )),
        "{}",
        text(&run)
    );
    let run = quantize(&["--group-size", "0"], &input, &failed);
    assert!(text(&run).contains("--group-size 0"), "{}", text(&run));
    assert!(!failed.exists());
}

/// Stage 7 from its plan: `plans/quantize.sql` quantizes the tiny teacher on 16 training
/// rows of fold 0 (through the template), records the checkpoint in the run directory and
/// `arenaflow logits` reads it, near the float model's logits and not equal to them; run
/// again it is up to date; a group size that does not divide a layer's width fails naming
/// the tensor and records nothing.
#[test]
fn quantize_plan_writes_a_checkpoint_into_the_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let train = arenaflow_tests::small_train(dir.path(), 30);
    let run = |plan: &str, sets: &[String]| {
        let mut args = vec![
            "run".to_string(),
            plan.to_string(),
            "--run-dir".into(),
            run_dir.display().to_string(),
        ];
        for set in sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let ok = |plan: &str, sets: &[String]| {
        let out = run(plan, sets);
        assert!(out.status.success(), "{plan}: {}", text(&out));
        text(&out)
    };
    ok("plans/prepare.sql", &[format!("train={}", train.display())]);
    ok("plans/folds.sql", &["k=3".to_string()]);
    let model = "tests/fixtures/teacher/model";
    let sets = |model_name: &str, group_size: usize| {
        vec![
            format!("folds={}/folds/k3_seed2025_swaptrue/", run_dir.display()),
            format!("model={model}"),
            "tokenizer=tests/fixtures/teacher/tokenizer.json".to_string(),
            format!("model_name={model_name}"),
            "max_length=64".to_string(),
            "rows=16".to_string(),
            format!("group_size={group_size}"),
            "dtype=f32".to_string(),
        ]
    };
    let log = ok("plans/quantize.sql", &sets("int8", 16));
    // 2 layers x 7 projections, 16 rows of at most 64 tokens.
    assert!(
        log.contains("| 14          | 8    | 16         | 16"),
        "{log}"
    );
    let checkpoint = run_dir.join("quantized/int8/model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "gptq");
    assert_eq!(config["quantization_config"]["group_size"], 16);
    let again = ok("plans/quantize.sql", &sets("int8", 16));
    assert!(again.contains("up to date: quantized/int8"), "{again}");

    let rows: Vec<(String, Vec<i32>)> = (0..6)
        .map(|i| {
            (
                format!("r{i}"),
                (0..20).map(|t| 3 + (i * 11 + t * 7) % 250).collect(),
            )
        })
        .collect();
    let input = dir.path().join("rows.parquet");
    write_tokens(&input, &rows);
    let float = cli_logits(
        &repo_root().join(model),
        None,
        &input,
        &dir.path().join("float.parquet"),
    );
    let int8 = cli_logits(&checkpoint, None, &input, &dir.path().join("int8.parquet"));
    let (worst, scale) = logit_gap(&float, &int8);
    eprintln!("quantize.sql: 8-bit logits within {worst:.5} of float (largest {scale:.3})");
    assert!(
        worst > 0.0 && worst < 0.05 * scale.max(0.1),
        "{worst} (largest {scale})"
    );

    // Stage 8 through the quantized checkpoint: predict.sql takes its folder as `model`.
    let log = ok(
        "plans/predict.sql",
        &[
            format!("comparisons={}", train.display()),
            format!("model={}", checkpoint.display()),
            "model_name=int8".to_string(),
            "tokenizer=tests/fixtures/teacher/tokenizer.json".to_string(),
            "max_length=64".to_string(),
            "dtype=f32".to_string(),
        ],
    );
    let submission = std::fs::read_to_string(run_dir.join("predict/int8/submission.csv")).unwrap();
    let lines: Vec<&str> = submission.lines().collect();
    assert_eq!(
        lines[0], "id,winner_model_a,winner_model_b,winner_tie",
        "{log}"
    );
    assert_eq!(lines.len(), 31, "30 rows and the header: {log}");
    for line in &lines[1..] {
        let p: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(
            p.iter().all(|x| (0.0..=1.0).contains(x)) && (p.iter().sum::<f64>() - 1.0).abs() < 1e-5,
            "{line}"
        );
    }

    let failed = run("plans/quantize.sql", &sets("bad", 20));
    assert!(!failed.status.success());
    assert!(
        text(&failed).contains("model.layers.0.self_attn.q_proj") && text(&failed).contains("20"),
        "{}",
        text(&failed)
    );
    let manifest = std::fs::read_to_string(run_dir.join("manifest.json")).unwrap();
    assert!(!manifest.contains("quantized/bad"), "{manifest}");
    assert!(!run_dir.join("quantized/bad/model/config.json").exists());
}
