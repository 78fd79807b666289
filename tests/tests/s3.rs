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

/// One writer at a time on S3: the lock is an object created only if absent, refreshed by
/// a heartbeat; a live holder is named, a dead one (stale heartbeat) is taken over, and a
/// finished run removes its lock.
#[test]
fn one_writer_at_a_time_on_s3() {
    let server = S3Server::start();
    server.put("arena", "", b"");
    let dir = tempfile::tempdir().unwrap();
    let train = arenaflow_tests::small_train(dir.path(), 60);
    server.put("arena", "input/train.csv", &std::fs::read(train).unwrap());
    let env = server.env();
    let args = [
        "run",
        "plans/prepare.sql",
        "--run-dir",
        "s3://arena/runs/locked",
        "--set",
        "train=s3://arena/input/train.csv",
    ];
    let lock_key = "runs/locked/.locks/main.lock";
    let holder = |heartbeat: &str| {
        format!(
            r#"{{"pid": 4242, "host": "node17", "since": "{heartbeat}", "command": "arenaflow run plans/prepare.sql", "heartbeat": "{heartbeat}"}}"#
        )
    };

    // A live holder: refused, naming it.
    let now = chrono::Utc::now().to_rfc3339();
    server.put("arena", lock_key, holder(&now).as_bytes());
    let refused = arenaflow_with_env(&args, &env);
    let said = text(&refused);
    assert!(!refused.status.success(), "{said}");
    for part in [
        "another run holds the lock s3://arena/runs/locked/.locks/main.lock",
        "pid 4242 on node17",
        "last heartbeat",
    ] {
        assert!(said.contains(part), "{part} missing:\n{said}");
    }
    assert!(!server.exists("arena", "runs/locked/manifest.json"));
    assert!(
        server.exists("arena", lock_key),
        "the other run's lock stays"
    );

    // A dead holder (its heartbeat stopped long ago): taken over, and removed at the end.
    let args = [
        "run",
        "plans/prepare.sql",
        "--run-dir",
        "s3://arena/runs/stale",
        "--set",
        "train=s3://arena/input/train.csv",
    ];
    let lock_key = "runs/stale/.locks/main.lock";
    server.put(
        "arena",
        lock_key,
        holder("2026-01-01T00:00:00+00:00").as_bytes(),
    );
    let took = arenaflow_with_env(&args, &env);
    let said = text(&took);
    assert!(took.status.success(), "{said}");
    assert!(said.contains("took over the lock"), "{said}");
    assert!(
        said.contains("wrote prepare/comparisons.parquet: 60 rows"),
        "{said}"
    );
    assert!(!server.exists("arena", lock_key), "the lock is released");

    // Two runs at once: never both write; whoever is refused says why.
    let mut force = args.to_vec();
    force.push("--force");
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let force = force.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let env = env.clone();
            std::thread::spawn(move || {
                let args: Vec<&str> = force.iter().map(|s| s.as_str()).collect();
                arenaflow_with_env(&args, &env)
            })
        })
        .collect();
    let outputs: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let succeeded = outputs.iter().filter(|o| o.status.success()).count();
    assert!(succeeded >= 1);
    for output in outputs.iter().filter(|o| !o.status.success()) {
        assert!(
            text(output).contains("another run holds the lock"),
            "{}",
            text(output)
        );
    }
    assert!(!server.exists("arena", lock_key), "the lock is released");
    // The manifest and the output agree: the rerun finds it up to date.
    let again = arenaflow_with_env(&args, &env);
    assert!(
        text(&again).contains("up to date: prepare/comparisons.parquet"),
        "{}",
        text(&again)
    );
}
