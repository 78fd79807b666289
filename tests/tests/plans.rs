//! Plan files: parameters, errors that point at file and line, describe.

use arenaflow_tests::{arenaflow, text};

fn plan(dir: &std::path::Path, name: &str, sql: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, sql).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn parameters_are_declared_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(dir.path(), "p.sql", "-- param n: int = 2 -- how many\n-- param word\nSELECT ${n} * 21 AS answer, '${word}' AS word;\n");
    let ok = arenaflow(&[
        "run",
        &p,
        "--set",
        "word=hi",
        "--run-dir",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("| 42     | hi   |"), "{}", text(&ok));

    let missing = arenaflow(&[
        "run",
        &p,
        "--run-dir",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("p.sql:2: parameter word has no default"),
        "{}",
        text(&missing)
    );

    // Values are typed, and go in as literals: a quote cannot end the string.
    let typed = arenaflow(&["run", &p, "--set", "word=hi", "--set", "n=abc"]);
    assert!(!typed.status.success());
    assert!(
        text(&typed).contains("p.sql:1: --set n: \"abc\" is not an integer (n is an int)"),
        "{}",
        text(&typed)
    );
    let quoted = arenaflow(&[
        "run",
        &p,
        "--set",
        "word=it's",
        "--run-dir",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(
        text(&quoted).contains("| 42     | it's |"),
        "{}",
        text(&quoted)
    );

    let unknown = arenaflow(&["run", &p, "--set", "word=hi", "--set", "wrod=x"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("--set wrod: no plan declares such a parameter"),
        "{}",
        text(&unknown)
    );
}

#[test]
fn errors_point_at_the_plan_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        dir.path(),
        "bad.sql",
        "SELECT 1;\n\n-- a comment\nSELECT nosuchfunction(1);\n",
    );
    let out = arenaflow(&[
        "run",
        &p,
        "--run-dir",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad.sql:4:"), "{}", text(&out));

    let p = plan(
        dir.path(),
        "syntax.sql",
        "SELECT 1;\nSELECT (1\n  + 2\n  FROM t;\n",
    );
    let out = arenaflow(&[
        "run",
        &p,
        "--run-dir",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("syntax.sql:2:") && text(&out).contains("(plan line 4)"),
        "{}",
        text(&out)
    );

    let p = plan(dir.path(), "quote.sql", "SELECT 1;\n\nSELECT 'abc;\n");
    let out = arenaflow(&[
        "run",
        &p,
        "--run-dir",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("quote.sql:3:")
            && text(&out).contains("Unterminated string literal")
            && text(&out).contains("(plan line 3)"),
        "{}",
        text(&out)
    );
}
