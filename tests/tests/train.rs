//! Training through the plans and the CLI on the CPU (the tiny teacher of
//! tests/fixtures/teacher, f32): a killed run continues from its checkpoint and ends with
//! the adapter an uninterrupted run writes, byte for byte; `arenaflow train` does the same;
//! two data-parallel `arenaflow train` processes end with one process's adapter; bad
//! settings and rows fail with messages naming them.

use std::path::Path;

use arenaflow_tests::{
    arenaflow, arenaflow_bin, kill_at_pause, parquet_batches, parquet_files, repo_root,
    small_train, text,
};

const MODEL: &str = "tests/fixtures/teacher/model";
const TOKENIZER: &str = "tests/fixtures/teacher/tokenizer.json";

fn arenaflow_strings(args: &[String]) -> std::process::Output {
    arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn run_ok(args: &[String]) -> String {
    let out = arenaflow_strings(args);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    log
}

fn prepare(run_dir: &Path, rows: usize) {
    let dir = run_dir.parent().unwrap();
    let train = small_train(dir, rows);
    run_ok(&[
        "run".into(),
        "plans/prepare.sql".into(),
        "plans/folds.sql".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
        "--set".into(),
        format!("train={}", train.display()),
    ]);
}

/// 20 prepared rows tokenized at 64 tokens for the tiny teacher: `arenaflow train`'s input.
fn tokenized_rows(run_dir: &Path) -> std::path::PathBuf {
    prepare(run_dir, 20);
    run_ok(&[
        "run".into(),
        "plans/tokenize.sql".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
        "--set".into(),
        format!("tokenizer={TOKENIZER}"),
        "--set".into(),
        "model_name=tiny".into(),
        "--set".into(),
        "max_length=64".into(),
    ]);
    run_dir.join("tokenize/tiny_blackpearl_64_balanced/tokens.parquet")
}

/// `arenaflow train` on `rows` into `out`: the tiny teacher in f32, LoRA r 4, steps of 8
/// rows in file order, then `extra`.
fn cli_train_args(rows: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        MODEL,
        "--input",
        rows.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
        "--lora-r",
        "4",
        "--batch-rows",
        "8",
        "--no-shuffle",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train_args(run_dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "plans/train_teacher.sql".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ];
    for set in [
        format!("model={MODEL}"),
        format!("tokenizer={TOKENIZER}"),
        "max_length=64".into(),
        "dtype=f32".into(),
        "batch_rows=6".into(),
        "max_batch_tokens=200".into(),
        "epochs=2".into(),
        "lr=0.002".into(),
        "lora_r=4".into(),
        "eval_every=3".into(),
        "checkpoint_every=1".into(),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args
}

fn adapter_bytes(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("train/teacher/fold0/adapter/adapter_model.safetensors")).unwrap()
}

/// The object holding `key`, anywhere in `value`.
fn find_key<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) if map.contains_key(key) => Some(value),
        serde_json::Value::Object(map) => map.values().find_map(|v| find_key(v, key)),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

#[test]
fn a_killed_training_run_continues_and_ends_with_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole/run");
    let killed = tmp.path().join("killed/run");
    for dir in [&whole, &killed] {
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        prepare(dir, 30);
    }
    let log = run_ok(&train_args(&whole));
    assert!(log.contains("wrote train/teacher/fold0"), "{log}");
    assert!(log.contains("dev log loss"), "{log}");
    let steps: usize = log
        .lines()
        .find_map(|l| {
            l.split(" steps (")
                .next()?
                .rsplit(", ")
                .next()?
                .parse()
                .ok()
        })
        .expect("the step count");
    assert!(steps >= 8, "{log}");
    // The loss curve beside the adapter, and the run's figures in the manifest.
    let png = std::fs::read(whole.join("train/teacher/fold0/loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("manifest.json")).unwrap())
            .unwrap();
    let text = manifest.to_string();
    let figures = find_key(&manifest, "computed_steps").expect(&text);
    assert_eq!(figures["steps"], steps, "{figures}");
    assert_eq!(figures["computed_steps"], steps, "{figures}");
    assert_eq!(figures["keep"], "last", "{figures}");
    assert!(
        figures["tokens_per_second"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    assert!(
        figures["peak_memory_bytes"].as_u64().unwrap() > 0,
        "{figures}"
    );
    assert!(
        figures["kept_dev_log_loss"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    let shares: f64 = ["forward_share", "backward_share", "optimizer_share"]
        .iter()
        .map(|k| figures[k].as_f64().unwrap())
        .sum();
    assert!(shares > 0.5 && shares <= 1.0 + 1e-9, "{figures}");
    assert_eq!(figures["settings"]["lora_r"], "4", "{figures}");

    // Killed twice (after a checkpoint in each epoch), resumed each time.
    for step in [2, steps - 2] {
        kill_at_pause(
            &train_args(&killed),
            ("ARENAFLOW_TEST_PAUSE_AFTER_STEPS", step),
            &format!("paused after step {step}"),
        );
    }
    let log = run_ok(&train_args(&killed));
    assert!(
        log.contains(&format!("resuming after step {}", steps - 2)),
        "{log}"
    );
    assert_eq!(
        adapter_bytes(&killed),
        adapter_bytes(&whole),
        "adapters differ"
    );
    // The metrics cover every step and evaluation once.
    let rows = |dir: &Path| -> usize {
        parquet_files(&dir.join("train/teacher/fold0"))
            .iter()
            .flat_map(|f| parquet_batches(f))
            .map(|b| b.num_rows())
            .sum()
    };
    assert_eq!(rows(&killed), rows(&whole));
    // Up to date on a rerun; the checkpoints are gone.
    let again = run_ok(&train_args(&killed));
    assert!(again.contains("up to date: train/teacher/fold0"), "{again}");
    let resume = killed.join(".resume");
    let left = std::fs::read_dir(&resume).map_or(0, |d| d.count());
    assert_eq!(left, 0, "resume folders left in {}", resume.display());
}

#[test]
fn arenaflow_train_resumes_and_refuses_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = tokenized_rows(&tmp.path().join("run"));
    let args =
        |out: &Path| cli_train_args(&rows, out, &["--max-steps", "5", "--checkpoint-every", "1"]);
    let whole = tmp.path().join("whole");
    let log = run_ok(&args(&whole));
    assert!(log.contains("metrics.parquet: 5 rows"), "{log}");
    let killed = tmp.path().join("killed");
    kill_at_pause(
        &args(&killed),
        ("ARENAFLOW_TEST_PAUSE_AFTER_STEPS", 3),
        "paused after step 3",
    );
    let log = run_ok(&args(&killed));
    assert!(log.contains("resuming after step 3 of 5"), "{log}");
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&killed), bytes(&whole));
    assert!(!tmp.path().join(".killed.checkpoint").exists());

    let out = arenaflow_strings(&cli_train_args(
        &rows,
        &tmp.path().join("x"),
        &["--lr", "fast"],
    ));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("lr = \"fast\": not a number"),
        "{}",
        text(&out)
    );
    let out = arenaflow_strings(&cli_train_args(
        &rows,
        &tmp.path().join("x"),
        &["--teacher", "logits"],
    ));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no teacher column logits"),
        "{}",
        text(&out)
    );
    let help = arenaflow(&["train", "--help"]);
    for flag in [
        "--lora-r",
        "--kl-weight",
        "--warmup-steps",
        "--no-shuffle",
        "--gradient-checkpointing",
        "[default: 0.0002]",
    ] {
        assert!(text(&help).contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn distill_joins_every_named_teacher_and_names_the_one_a_row_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    prepare(&run_dir, 30);
    let dir = run_dir.display().to_string();
    let set = |args: &mut Vec<String>, values: &[&str]| {
        for v in values {
            args.push("--set".into());
            args.push(v.to_string());
        }
    };
    let model = format!("model={MODEL}");
    let tokenizer = format!("tokenizer={TOKENIZER}");
    for (name, length) in [("alpha", "64"), ("beta", "80")] {
        let mut args: Vec<String> = vec!["run".into(), "plans/teacher_logits.sql".into()];
        args.extend(["--run-dir".into(), dir.clone()]);
        let name = format!("model_name={name}");
        let length = format!("max_length={length}");
        set(
            &mut args,
            &[&model, &tokenizer, &name, &length, "dtype=f32"],
        );
        run_ok(&args);
    }
    let distill = |student: &str| {
        let mut args: Vec<String> = vec!["run".into(), "plans/distill.sql".into()];
        args.extend(["--run-dir".into(), dir.clone()]);
        let student = format!("model_name={student}");
        set(
            &mut args,
            &[
                &model,
                &tokenizer,
                &student,
                "teachers=alpha,beta",
                "max_length=64",
                "dtype=f32",
                "batch_rows=6",
                "max_steps=3",
                "lora_r=4",
                "temperature=2",
            ],
        );
        arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = distill("student");
    assert!(out.status.success(), "{}", text(&out));
    let mut steps = 0;
    for file in parquet_files(&run_dir.join("train/student/fold0")) {
        for batch in parquet_batches(&file) {
            let kind = batch.column_by_name("kind").unwrap();
            let kind = kind
                .as_any()
                .downcast_ref::<datafusion::arrow::array::StringArray>()
                .unwrap();
            for column in ["kl_alpha", "cos_alpha", "kl_beta", "cos_beta"] {
                let values = batch.column_by_name(column).expect(column);
                let values = values
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Float64Array>()
                    .unwrap();
                for r in 0..batch.num_rows() {
                    if kind.value(r) == "step" {
                        assert!(values.value(r) >= 0.0 && values.value(r).is_finite());
                    }
                }
            }
            steps += (0..batch.num_rows())
                .filter(|&r| kind.value(r) == "step")
                .count();
        }
    }
    assert_eq!(steps, 3);

    // Teacher beta loses its training-side logits: the run fails naming the teacher.
    let beta = run_dir.join("teacher/beta/fold0");
    let train_files: Vec<_> = parquet_files(&beta)
        .into_iter()
        .filter(|f| f.display().to_string().contains("split=train"))
        .collect();
    assert!(!train_files.is_empty(), "{}", beta.display());
    for file in train_files {
        std::fs::remove_file(file).unwrap();
    }
    let out = distill("student2");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("column beta"), "{said}");
    assert!(
        said.contains("every training row needs this teacher's logits"),
        "{said}"
    );
    assert!(!run_dir.join("train/student2/fold0/adapter").exists());
}

/// A port nobody listens on now (bound, then released): rank 0's.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The f32 tensors of a safetensors file, by name (the format: an 8-byte header length, a
/// JSON header of dtype, shape and data offsets, the data).
fn safetensors_f32(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}");
            let (a, b) = (
                v["data_offsets"][0].as_u64().unwrap() as usize,
                v["data_offsets"][1].as_u64().unwrap() as usize,
            );
            let values = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.clone(), values)
        })
        .collect()
}

/// `arenaflow train` under a launcher's environment (torchrun's variables): two processes,
/// one command line, each a rank that trains on half of every step's rows; rank 0 writes the
/// adapter (rank 1 says it did not), and it is the one process's within f32 rounding (1e-4
/// relative, per tensor). After kill -9 of a rank the same command resumes and ends with
/// the uninterrupted run's adapter.
#[test]
fn two_data_parallel_train_processes_write_one_process_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = tokenized_rows(&tmp.path().join("run"));
    let args = |out: &Path| {
        cli_train_args(
            &rows,
            out,
            &[
                "--max-batch-tokens",
                "200",
                "--max-steps",
                "4",
                "--lora-dropout",
                "0",
            ],
        )
    };
    let alone = tmp.path().join("alone");
    run_ok(&args(&alone));
    let port = free_port();
    let launch = |out: &Path, rank: usize, port: u16, pause: Option<usize>| {
        let mut command = std::process::Command::new(arenaflow_bin());
        command
            .args(args(out))
            .args(["--checkpoint-every", "1"])
            .current_dir(repo_root())
            .env("WORLD_SIZE", "2")
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(step) = pause {
            command.env("ARENAFLOW_TEST_PAUSE_AFTER_STEPS", step.to_string());
        }
        command.spawn().unwrap()
    };
    let finish = |ranks: Vec<std::process::Child>| -> Vec<String> {
        ranks
            .into_iter()
            .map(|child| {
                let out = child.wait_with_output().unwrap();
                let log = text(&out);
                assert!(out.status.success(), "{log}");
                log
            })
            .collect()
    };
    let together = tmp.path().join("together");
    let logs = finish((0..2).map(|r| launch(&together, r, port, None)).collect());
    assert!(
        logs[0].contains("rank 0 of 2, joining rank 0"),
        "{}",
        logs[0]
    );
    assert!(logs[0].contains("metrics.parquet: 4 rows"), "{}", logs[0]);
    assert!(
        logs[1].contains("rank 1 of 2: done; rank 0 writes"),
        "{}",
        logs[1]
    );
    let (want, got) = (
        safetensors_f32(&alone.join("adapter_model.safetensors")),
        safetensors_f32(&together.join("adapter_model.safetensors")),
    );
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    let mut worst = 0f32;
    for (name, w) in &want {
        let g = &got[name];
        let norm = w.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
        let diff = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(diff / norm);
    }
    // 7.3e-6 (per tensor, relative to its largest value): the sums' order differs.
    eprintln!("two data-parallel processes: adapter within {worst:.2e} of one process");
    assert!(worst < 1e-4, "{worst}");

    // kill -9 of a rank: rank 0 stops after its step-2 checkpoint, rank 1 waits for it in
    // step 3's sum and is killed, then rank 0 (a launcher takes every rank down). The same
    // command again resumes both from rank 0's checkpoint and ends with the uninterrupted
    // run's adapter, byte for byte.
    let port = free_port();
    let resumed = tmp.path().join("resumed");
    let mut leader = launch(&resumed, 0, port, Some(2));
    let mut follower = launch(&resumed, 1, port, None);
    let stderr = std::io::BufReader::new(leader.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(stderr) {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("paused after step 2") {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("paused after step 2")),
        "{seen:?}"
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
    leader.kill().unwrap();
    leader.wait().unwrap();
    assert!(!resumed.join("adapter_model.safetensors").exists());
    let logs = finish((0..2).map(|r| launch(&resumed, r, port, None)).collect());
    for log in &logs {
        assert!(log.contains("resuming after step 2 of 4"), "{log}");
    }
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&resumed), bytes(&together));
}
