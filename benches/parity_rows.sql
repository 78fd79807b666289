-- The rows of one fold as train_teacher.sql feeds them to distill_step (its training side
-- with the swapped copies, its held-out side as dev), tokenized, for the training parity
-- bench (benches/train_parity.sh): both sides read this one file in its order. Writes
-- parity/fold{fold}_{max_length}.parquet: split, id, order, label, input_ids.
--
-- stage parity_rows
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output
-- param fold: int = 0 -- the fold held out as dev
-- param tokenizer -- the model's tokenizer (tokenizer.json or the GGUF)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 512 -- tokens per input, BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

CREATE VIEW fold_rows AS
    SELECT CASE WHEN split = 'valid' THEN 'dev' ELSE 'train' END AS split,
           "order", id, source, prompt, response_a, response_b, label
    FROM folds
    WHERE CAST(fold AS INT) = ${fold};

COPY (
    SELECT split, id, "order", label, input_ids
    FROM tokenize('fold_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    ORDER BY split DESC, id, "order"
) TO '${run_dir}/parity/fold${fold}_${max_length}.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE parity STORED AS PARQUET
LOCATION '${run_dir}/parity/fold${fold}_${max_length}.parquet';

SELECT split, count(*) AS rows, count(DISTINCT id) AS ids, sum(cardinality(input_ids)) AS tokens
FROM parity GROUP BY split ORDER BY split DESC;
