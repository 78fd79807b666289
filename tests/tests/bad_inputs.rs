//! Bad inputs: each loads correctly, or fails naming file, row (id) and column, with a
//! non-zero exit and no output recorded as complete.

use std::path::Path;

use arenaflow_tests::{arenaflow, text};
use serde_json::Value;

const HEADER: &str =
    "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";
const GOOD_ROW: &str =
    "11,gpt-4,claude-2,\"[\"\"What is 2+2?\"\"]\",\"[\"\"4\"\"]\",\"[\"\"Four.\"\"]\",0,0,1\n";

/// Runs prepare.sql on `csv` and returns (success, everything printed, manifest if any).
fn prepare(dir: &Path, name: &str, csv: &[u8]) -> (bool, String, Option<Value>) {
    let file = dir.join(name);
    std::fs::write(&file, csv).unwrap();
    let run_dir = dir.join(format!("run-{name}"));
    let output = arenaflow(&[
        "run",
        "plans/prepare.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("train={}", file.display()),
    ]);
    let manifest = std::fs::read_to_string(run_dir.join("manifest.json"))
        .ok()
        .map(|m| serde_json::from_str(&m).unwrap());
    (output.status.success(), text(&output), manifest)
}

fn assert_fails(dir: &Path, name: &str, csv: &[u8], expected: &[&str]) {
    let (ok, said, manifest) = prepare(dir, name, csv);
    assert!(!ok, "{name} must fail: {said}");
    for part in expected {
        assert!(said.contains(part), "{name}: expected {part:?} in:\n{said}");
    }
    let complete = manifest.map_or(0, |m| {
        m["outputs"]
            .as_object()
            .unwrap()
            .values()
            .filter(|o| o["status"] == "complete")
            .count()
    });
    assert_eq!(complete, 0, "{name}: nothing may be recorded complete");
    assert!(
        !dir.join(format!("run-{name}/prepare/comparisons.parquet"))
            .exists(),
        "{name}: no output may be left"
    );
}

#[test]
fn malformed_json_turns() {
    let dir = tempfile::tempdir().unwrap();
    let csv = format!(
        "{HEADER}{GOOD_ROW}12,a,b,\"[\"\"unterminated]\",\"[\"\"x\"\"]\",\"[\"\"y\"\"]\",1,0,0\n"
    );
    assert_fails(
        dir.path(),
        "malformed.csv",
        csv.as_bytes(),
        &["malformed.csv: row 2 (id 12), column prompt: malformed JSON list of turns"],
    );
}

#[test]
fn two_one_hot_columns_set() {
    let dir = tempfile::tempdir().unwrap();
    let csv =
        format!("{HEADER}{GOOD_ROW}13,a,b,\"[\"\"q\"\"]\",\"[\"\"x\"\"]\",\"[\"\"y\"\"]\",1,1,0\n");
    assert_fails(
        dir.path(),
        "twohot.csv",
        csv.as_bytes(),
        &[
            "twohot.csv: row 2 (id 13), column winner_model_a,winner_model_b,winner_tie",
            "got 1, 1, 0",
        ],
    );
}

#[test]
fn a_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = "id,model_a,model_b,prompt,response_a,winner_model_a,winner_model_b,winner_tie\n11,a,b,\"[]\",\"[]\",1,0,0\n";
    assert_fails(
        dir.path(),
        "missing.csv",
        csv.as_bytes(),
        &["missing.csv", "column response_b: missing column"],
    );
}

#[test]
fn non_utf8_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = format!("{HEADER}{GOOD_ROW}").into_bytes();
    csv.extend_from_slice(b"14,a,b,\"[\"\"q\"\"]\",\"[\"\"caf\xe9\"\"]\",\"[\"\"y\"\"]\",1,0,0\n");
    assert_fails(
        dir.path(),
        "latin1.csv",
        &csv,
        &["latin1.csv: row 2 (id 14), column response_a: invalid UTF-8"],
    );
}

#[test]
fn an_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        dir.path(),
        "empty.csv",
        b"",
        &["empty.csv: the file is empty"],
    );
}

#[test]
fn a_duplicate_id() {
    let dir = tempfile::tempdir().unwrap();
    let csv = format!("{HEADER}{GOOD_ROW}{GOOD_ROW}");
    assert_fails(
        dir.path(),
        "dup.csv",
        csv.as_bytes(),
        &["dup.csv: row 2 (id 11), column id: duplicate id"],
    );
}

#[test]
fn a_40000_character_response_loads() {
    let dir = tempfile::tempdir().unwrap();
    let long = "ab\\n".repeat(10_000);
    let csv = format!(
        "{HEADER}{GOOD_ROW}15,a,b,\"[\"\"q\"\"]\",\"[\"\"{long}\"\"]\",\"[\"\"y\"\"]\",1,0,0\n"
    );
    let (ok, said, manifest) = prepare(dir.path(), "long.csv", csv.as_bytes());
    assert!(ok, "{said}");
    let record = &manifest.unwrap()["outputs"]["prepare/comparisons.parquet"];
    assert_eq!(
        (record["status"].as_str(), record["rows"].as_i64()),
        (Some("complete"), Some(2))
    );
}

#[test]
fn skip_policy_counts_bad_rows_in_the_manifest_up_to_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.csv");
    std::fs::write(
        &file,
        format!("{HEADER}{GOOD_ROW}12,a,b,\"[\",\"[]\",\"[]\",1,0,0\n"),
    )
    .unwrap();
    let run = |run_dir: &str, extra: &[&str]| {
        let run_dir = dir.path().join(run_dir);
        let train = format!("train={}", file.display());
        let mut args = vec![
            "run",
            "plans/prepare.sql",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--set",
            &train,
            "--set",
            "on_error=skip",
        ];
        args.extend(extra);
        (arenaflow(&args), run_dir)
    };
    // One of two rows is over the default limit (1% of the rows).
    let (output, run_dir) = run("default", &[]);
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("1 of 2 rows do not parse, over max_skipped = 0.01"),
        "{said}"
    );
    assert!(!run_dir.join("prepare/comparisons.parquet").exists());

    let (output, run_dir) = run("half", &["--set", "max_skipped=0.5"]);
    assert!(output.status.success(), "{}", text(&output));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap())
            .unwrap();
    let record = &manifest["outputs"]["prepare/comparisons.parquet"];
    assert_eq!(record["rows"], 1);
    assert_eq!(record["skipped_rows"][file.to_str().unwrap()], 1);
    assert_eq!(record["params"]["max_skipped"], "0.5");
}

#[test]
fn a_file_without_data_rows_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, said, manifest) = prepare(dir.path(), "header_only.csv", HEADER.as_bytes());
    assert!(!ok, "{said}");
    assert!(
        said.contains("header_only.csv: the file has no data rows"),
        "{said}"
    );
    assert!(manifest.is_none_or(|m| m["outputs"]["prepare/comparisons.parquet"].is_null()));
}

/// Files that are not what their name says get a message that says what they are.
#[test]
fn wrong_kinds_of_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let csv = format!("{HEADER}{GOOD_ROW}");
    let mut utf16 = vec![0xff, 0xfe];
    utf16.extend(csv.encode_utf16().flat_map(u16::to_le_bytes));
    let (ok, said, _) = prepare(dir.path(), "utf16.csv", &utf16);
    assert!(
        !ok && said.contains("utf16.csv: the file is UTF-16 little-endian"),
        "{said}"
    );

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, csv.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let (ok, said, _) = prepare(dir.path(), "packed.csv", &gz);
    assert!(
        !ok && said.contains("packed.csv: the file is gzip-compressed; name it with .gz"),
        "{said}"
    );
    let (ok, said, manifest) = prepare(dir.path(), "packed.csv.gz", &gz);
    assert!(ok, "{said}");
    assert_eq!(
        manifest.unwrap()["outputs"]["prepare/comparisons.parquet"]["rows"],
        1
    );

    std::fs::create_dir(dir.path().join("folder.csv")).unwrap();
    let run_dir = dir.path().join("run-folder");
    let out = arenaflow(&[
        "run",
        "plans/prepare.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("train={}", dir.path().join("folder.csv").display()),
    ]);
    assert!(
        text(&out).contains("folder.csv: is a folder; give the file"),
        "{}",
        text(&out)
    );
}

/// S3 without credentials names the variables to set, not only the metadata service's
/// answer.
#[test]
fn s3_without_credentials_names_the_variables() {
    let dir = tempfile::tempdir().unwrap();
    let out = arenaflow_tests::arenaflow_with_env(
        &[
            "run",
            "plans/prepare.sql",
            "--run-dir",
            dir.path().join("run").to_str().unwrap(),
            "--set",
            "train=s3://arena/input/train.csv",
        ],
        &[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ],
    );
    let said = text(&out);
    assert!(!out.status.success());
    assert_eq!(
        said.matches("S3 has no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            .count(),
        1,
        "{said}"
    );
}
