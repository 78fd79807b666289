-- Data preparation: every source into the canonical comparison table.
-- Train rows are kept as they are; extra rows whose prompt equals a train prompt are
-- dropped (the recipe's deduplication of chatbot_arena_conversations against train).
--
-- stage prepare
-- param train = ../shared/data/lmsys-arena/train_sample.csv -- Kaggle train.csv (JSON-encoded turn lists, one-hot winner columns)
-- param train_source = kaggle -- source name of the train rows (the held-out side of the folds)
-- param conversations = -- chatbot_arena_conversations (Parquet, JSON or JSON lines); empty leaves it out
-- param pandalm = -- PandaLM test set JSON; empty leaves it out
-- param hh_rlhf = -- HH-RLHF JSON lines, optionally .gz; empty leaves it out
-- param hh_rlhf_seed: int = 2025 -- seed of HH-RLHF's chosen/rejected A/B order
-- param ultrafeedback = -- UltraFeedback in Kaggle format, for post-pretraining (never in the folds); empty leaves it out
-- param on_error = fail -- fail: the first bad row stops the run; skip: bad rows are left out and counted in the manifest
-- param max_skipped: float = 0.01 -- with on_error = skip: the share of a file's rows that may be left out before the run fails
-- param max_rows: int = 0 -- at most this many rows per source (a reproducible choice: the ids first by MD5); 0 keeps every row

CREATE TABLE train_rows AS SELECT * FROM arena_csv('${train}', '${train_source}', '${on_error}', ${max_skipped});

CREATE TABLE extra_rows AS
    SELECT * FROM arena_conversations('${conversations}', '${on_error}', ${max_skipped})
    UNION ALL SELECT * FROM pandalm('${pandalm}', '${on_error}', ${max_skipped})
    UNION ALL SELECT * FROM hh_rlhf('${hh_rlhf}', ${hh_rlhf_seed}, '${on_error}', ${max_skipped});

COPY (
    SELECT * EXCLUDE (id_rank) FROM (
        SELECT *, row_number() OVER (PARTITION BY source ORDER BY md5(id), id) AS id_rank FROM (
            SELECT * FROM train_rows
            UNION ALL
            SELECT e.* FROM extra_rows e LEFT ANTI JOIN train_rows t ON e.prompt = t.prompt
            UNION ALL
            SELECT * FROM arena_csv('${ultrafeedback}', 'ultrafeedback', '${on_error}', ${max_skipped})))
    WHERE ${max_rows} = 0 OR id_rank <= ${max_rows}
) TO '${run_dir}/prepare/comparisons.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE comparisons STORED AS PARQUET LOCATION '${run_dir}/prepare/comparisons.parquet';

SELECT ensure(count(*) = count(DISTINCT id), 'prepare: ids are not unique across sources') AS ids_unique FROM comparisons;

SELECT source,
       count(*) FILTER (WHERE label = 0) AS a_wins,
       count(*) FILTER (WHERE label = 1) AS b_wins,
       count(*) FILTER (WHERE label = 2) AS ties,
       count(*) FILTER (WHERE label IS NULL) AS unlabelled,
       count(*) AS total_rows
FROM comparisons GROUP BY source ORDER BY source;
