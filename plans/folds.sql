-- Stratified k-fold split of the train rows (by label, seeded; an id's fold does not
-- depend on row order). For each fold: the held-out side ("valid") is that fold's train
-- rows only; the training side is the other folds' train rows plus every extra row, and
-- with swap on, an A/B-swapped copy of each ("order" = 'ba', label swapped).
-- The sources in `pretrain_only` (UltraFeedback by default: post-pretraining data) stay out
-- of the folds.
--
-- stage folds
-- param k: int = 5 -- number of folds
-- param seed: int = 2025 -- seed of the fold assignment
-- param swap: bool = true -- add the A/B-swapped copy of every training row
-- param comparisons = ${run_dir}/prepare/comparisons.parquet -- the canonical table from prepare.sql
-- param train_source = kaggle -- source whose rows are split into folds; other sources only train
-- param pretrain_only = ultrafeedback -- sources for post_pretrain.sql alone, never on a fold's training side (comma-separated)

CREATE EXTERNAL TABLE comparisons STORED AS PARQUET LOCATION '${comparisons}';

CREATE TABLE train_rows AS
    SELECT *, fold_of(id, ${k}, ${seed}) OVER (PARTITION BY label) AS row_fold
    FROM comparisons WHERE source = '${train_source}';

SELECT ensure(count(*) > 0, 'folds: no rows of source ${train_source}') AS has_rows,
       ensure(count(label) = count(*), 'folds: train rows without a label cannot be stratified') AS all_labelled
FROM train_rows;

CREATE VIEW fold_numbers AS SELECT CAST(value AS INT) AS fold FROM generate_series(0, ${k} - 1);

CREATE VIEW sides AS
    SELECT f.fold, CASE WHEN r.row_fold = f.fold THEN 'valid' ELSE 'train' END AS split,
           r.id, r.source, r.prompt, r.response_a, r.response_b, r.model_a, r.model_b, r.label
    FROM train_rows r CROSS JOIN fold_numbers f
    UNION ALL
    SELECT f.fold, 'train' AS split,
           c.id, c.source, c.prompt, c.response_a, c.response_b, c.model_a, c.model_b, c.label
    FROM comparisons c CROSS JOIN fold_numbers f
    WHERE c.source <> '${train_source}'
      AND NOT array_has(string_to_array(replace('${pretrain_only}', ' ', ''), ','), c.source);

COPY (
    SELECT fold, split, 'ab' AS "order", id, source, prompt, response_a, response_b, model_a, model_b, label FROM sides
    UNION ALL
    SELECT fold, split, 'ba' AS "order", id, source, prompt, response_b, response_a, model_b, model_a, swap_label(label)
    FROM sides WHERE split = 'train' AND ${swap}
) TO '${run_dir}/folds/k${k}_seed${seed}_swap${swap}/' STORED AS PARQUET PARTITIONED BY (fold);

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${run_dir}/folds/k${k}_seed${seed}_swap${swap}/';

SELECT fold, split,
       count(*) FILTER (WHERE label = 0) AS a_wins,
       count(*) FILTER (WHERE label = 1) AS b_wins,
       count(*) FILTER (WHERE label = 2) AS ties,
       count(*) AS total_rows,
       count(DISTINCT id) AS ids
FROM folds GROUP BY fold, split ORDER BY fold, split DESC;
