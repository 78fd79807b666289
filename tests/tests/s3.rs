//! Plans reading and writing Parquet on a real S3-compatible server (moto) on loopback.

use arenaflow_tests::{arenaflow_with_env, shared, text, S3Server};

#[test]
fn prepare_and_folds_on_s3() {
    let server = S3Server::start();
    server.put("arena", "", b"");
    let csv = std::fs::read(shared("data/lmsys-arena/train_sample.csv")).unwrap();
    server.put("arena", "input/train.csv", &csv);
    let env = server.env();
    let args = [
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        "s3://arena/runs/r1",
        "--set",
        "train=s3://arena/input/train.csv",
    ];
    let output = arenaflow_with_env(&args, &env);
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("wrote prepare/comparisons.parquet: 1982 rows, 1982 ids"),
        "{said}"
    );
    assert!(
        said.contains("wrote folds/k5_seed2025_swaptrue: 17838 rows, 1982 ids"),
        "{said}"
    );

    // Read back from S3 through a plan: the written Parquet and the manifest's idempotence.
    let dir = tempfile::tempdir().unwrap();
    let check = dir.path().join("check.sql");
    std::fs::write(&check, "CREATE EXTERNAL TABLE c STORED AS PARQUET LOCATION 's3://arena/runs/r1/prepare/comparisons.parquet';\nSELECT label, count(*) AS n FROM c GROUP BY label ORDER BY label;\n").unwrap();
    let read = arenaflow_with_env(
        &[
            "run",
            check.to_str().unwrap(),
            "--run-dir",
            "s3://arena/runs/check",
        ],
        &env,
    );
    let said = text(&read);
    assert!(read.status.success(), "{said}");
    for row in ["| 0     | 690 |", "| 1     | 692 |", "| 2     | 600 |"] {
        assert!(said.contains(row), "{row} missing:\n{said}");
    }
    let again = arenaflow_with_env(&args, &env);
    assert!(
        text(&again).contains("up to date: prepare/comparisons.parquet"),
        "{}",
        text(&again)
    );

    let missing = arenaflow_with_env(
        &[
            "run",
            "plans/prepare.sql",
            "--run-dir",
            "s3://arena/runs/r2",
            "--set",
            "train=s3://arena/input/nope.csv",
        ],
        &env,
    );
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("s3://arena/input/nope.csv"),
        "{}",
        text(&missing)
    );
}
