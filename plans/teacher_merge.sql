-- Joins the shards of one fold's teacher logits (teacher_logits.sql run as an array job)
-- into one table, after checking that the shards cover every row of the fold, in both
-- orders, exactly once, and that all `shards` shards of one array job are there.
--
-- stage teacher_merge
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output
-- param fold: int = 0 -- the fold
-- param model_name = teacher -- the teacher's output folder name
-- param shards: int = 1 -- how many shards the array job ran

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

CREATE VIEW fold_rows AS
    SELECT split, id FROM folds WHERE CAST(fold AS INT) = ${fold} AND "order" = 'ab';

CREATE EXTERNAL TABLE shard_logits STORED AS PARQUET
LOCATION '${run_dir}/teacher/${model_name}/fold${fold}/';

SELECT ensure(count(DISTINCT shard) = ${shards}, 'teacher_merge: expected ${shards} shards of fold ${fold}, found ' || CAST(count(DISTINCT shard) AS VARCHAR)) AS all_shards,
       ensure(bool_and(shard LIKE '%-of-${shards}'), 'teacher_merge: shards of another array job (not -of-${shards}) are in the folder') AS one_job
FROM shard_logits;

CREATE VIEW expected AS
    SELECT r.id, r.split, o."order"
    FROM fold_rows r CROSS JOIN (VALUES ('ab'), ('ba')) AS o("order");

CREATE VIEW got AS
    SELECT id, split, "order", count(*) AS n FROM shard_logits GROUP BY id, split, "order";

SELECT ensure(count(*) FILTER (WHERE got.n IS NULL) = 0, 'teacher_merge: rows of fold ${fold} without logits in any shard') AS covered,
       ensure(count(*) FILTER (WHERE got.n > 1) = 0, 'teacher_merge: rows with logits in more than one shard') AS once,
       ensure((SELECT count(*) FROM shard_logits) = count(*), 'teacher_merge: logits for rows that are not in fold ${fold}') AS nothing_else,
       count(*) AS rows
FROM expected LEFT JOIN got
  ON expected.id = got.id AND expected.split = got.split AND expected."order" = got."order";

COPY (
    SELECT id, "order", logits, label, source, split, ${fold} AS fold
    FROM shard_logits ORDER BY split, id, "order"
) TO '${run_dir}/teacher/${model_name}/fold${fold}.parquet' STORED AS PARQUET;
