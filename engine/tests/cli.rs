//! The `arenaflow` command line. (Its presence also makes `cargo test --workspace` build
//! the binary with the test feature set, which the `tests/` crate then runs.)

use std::process::Command;

fn arenaflow(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_arenaflow"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run arenaflow");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn describe_lists_parameters_and_outputs() {
    let (ok, said) = arenaflow(&["describe", "plans/folds.sql"]);
    assert!(ok, "{said}");
    for expected in [
        "stage folds",
        "number of folds",
        "2025",
        "swap",
        "${run_dir}/folds/k5_seed2025_swaptrue/",
        "partitioned by fold",
    ] {
        assert!(
            said.contains(expected),
            "{expected:?} missing from:\n{said}"
        );
    }
    let (ok, said) = arenaflow(&["describe", "plans/prepare.sql"]);
    assert!(
        ok && said.contains("${run_dir}/prepare/comparisons.parquet")
            && said.contains("../shared/data/lmsys-arena/train_sample.csv"),
        "{said}"
    );
    // Every plan describes itself, shard parameters (built in) included.
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../plans")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sql") {
            let (ok, said) = arenaflow(&["describe", path.to_str().unwrap()]);
            assert!(
                ok && said.contains("outputs:"),
                "{}: {said}",
                path.display()
            );
        }
    }
    let (_, said) = arenaflow(&["describe", "plans/teacher_logits.sql"]);
    assert!(
        said.contains("shard=${shard_index}-of-${shard_count}"),
        "{said}"
    );
}

#[test]
fn a_missing_plan_file_is_an_error() {
    let (ok, said) = arenaflow(&["run", "plans/no_such_plan.sql"]);
    assert!(!ok);
    assert!(
        said.contains("plans/no_such_plan.sql") && said.contains("cannot read the plan file"),
        "{said}"
    );
}

#[test]
fn average_writes_the_folds_mean_and_names_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("averaged");
    let adapter = "tests/fixtures/models/llama/adapter";
    let out_arg = out.display().to_string();
    let (ok, said) = arenaflow(&[
        "average",
        "--adapter",
        adapter,
        "--adapter",
        adapter,
        "--adapter",
        adapter,
        "--output",
        &out_arg,
        "--weights",
        "group_relative",
        "--log-loss",
        "1.0,1.1,1.2",
        "--tau",
        "0.1",
    ]);
    assert!(ok, "{said}");
    // exp(1), exp(0), exp(-1), normalised.
    assert!(
        said.contains("0.665241") && said.contains("0.244728") && said.contains("0.090031"),
        "{said}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    let other = tmp.path().join("other").display().to_string();
    // Two adapters into `output`, with more flags.
    let average_two = |output: &str, flags: &[&str]| {
        let mut args = vec!["average", "--adapter", adapter, "--adapter", adapter];
        args.extend(["--output", output]);
        args.extend(flags);
        arenaflow(&args)
    };
    let (ok, said) = average_two(
        &other,
        &["--weights", "group_relative", "--log-loss", "1.0"],
    );
    assert!(
        !ok && said.contains("1 held-out log losses for 2 adapters"),
        "{said}"
    );
    let (ok, said) = arenaflow(&["average", "--adapter", adapter, "--output", &other]);
    assert!(!ok && said.contains("at least 2 adapters"), "{said}");
    let (ok, said) = average_two(&other, &["--mode", "delta"]);
    assert!(!ok && said.contains("--mode delta needs --model"), "{said}");
    let merged = tmp.path().join("merged");
    let merged_arg = merged.display().to_string();
    let (ok, said) = average_two(
        &merged_arg,
        &[
            "--mode",
            "delta",
            "--model",
            "tests/fixtures/models/llama/base",
        ],
    );
    assert!(ok && said.contains("merged model"), "{said}");
    assert!(merged.join("model.safetensors").is_file() && merged.join("config.json").is_file());
}

#[test]
fn merge_writes_a_classifier_folder_and_refuses_to_overwrite_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged").display().to_string();
    let args = [
        "merge",
        "--model",
        "tests/fixtures/models/llama/base",
        "--adapter",
        "tests/fixtures/models/llama/adapter",
        "--output",
        &out,
    ];
    let (ok, said) = arenaflow(&args);
    assert!(ok, "{said}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("merged/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    let (ok, said) = arenaflow(&args);
    assert!(!ok && said.contains("already exists"), "{said}");
}
