//! The tokenize stage from outside the library: `plans/tokenize.sql` on the real rows.
//! (The tokenizers and templates against their references: `operators/tests/tokenize.rs`;
//! SQL-level errors: `tests/slt/tokenize.slt`.)

use arenaflow_tests::{arenaflow, text};

/// prepare.sql then tokenize.sql on the real rows: every input fits, starts with BOS and
/// ends with EOS, both orders cover every id, and the swapped order swaps the label.
#[test]
fn tokenize_plan_on_the_real_rows() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run = arenaflow(&[
        "run",
        "plans/prepare.sql",
        "plans/tokenize.sql",
        "--set",
        "max_length=256",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains(
            "wrote tokenize/gemma2_blackpearl_256_balanced/tokens.parquet: 3964 rows, 1982 ids"
        ),
        "{}",
        text(&run)
    );
    let check = dir.path().join("check.sql");
    std::fs::write(
        &check,
        format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/tokenize/gemma2_blackpearl_256_balanced/tokens.parquet';\n\
             SELECT ensure(bool_and(n_tokens <= 256 AND array_length(input_ids) = n_tokens AND input_ids[1] = 2 AND input_ids[n_tokens] = 1), 'inputs fit, BOS first, EOS last') AS shape,\n\
                    ensure(count(DISTINCT id) FILTER (WHERE \"order\" = 'ab') = 1982 AND count(DISTINCT id) FILTER (WHERE \"order\" = 'ba') = 1982, 'both orders cover every id') AS coverage\n\
             FROM t;\n\
             SELECT ensure(bool_and(ab.label = swap_label(ba.label) AND ab.n_tokens = ba.n_tokens), 'swapped order swaps the label') AS swap\n\
             FROM t ab JOIN t ba ON ab.id = ba.id AND ab.\"order\" = 'ab' AND ba.\"order\" = 'ba';\n",
            run_dir.display()
        ),
    )
    .unwrap();
    let verify = arenaflow(&[
        "run",
        check.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    assert!(verify.status.success(), "{}", text(&verify));
}
