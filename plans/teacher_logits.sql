-- Stage 4: a teacher's logits (3 x f32, not probabilities) for every row of one fold's
-- training and held-out sides, in both A/B orders: the distillation targets of that fold
-- (training side) and the teacher's out-of-fold predictions (held-out side).
-- Rows are split between the shards of an array job by a hash of their id (--shard i/n or
-- SLURM_ARRAY_TASK_ID/COUNT; one shard by default); teacher_merge.sql checks and joins the
-- shards. Batches are committed as they finish: after kill -9 the same command goes on.
--
-- stage teacher_logits
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output (its k, seed and swap are in the path)
-- param fold: int = 0 -- the fold: its training side (the other folds and extra rows) and held-out side
-- param model -- the teacher: a model folder (config.json + safetensors), a .gguf file, or a hub id org/name
-- param model_name = teacher -- names the output folder: teacher/{model_name}/fold{fold}/
-- param adapter = -- PEFT LoRA adapter folder (with the score head); empty for none
-- param tokenizer -- the teacher's tokenizer.json (tokenizer_config.json beside it names EOS)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 1024 -- tokens per input, BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit
-- param dtype = bf16 -- weights and activations: bf16, f16 or f32
-- param device = cpu -- cpu, cuda or cuda:N; a missing device fails the run
-- param max_batch_tokens: int = 8192 -- padded tokens per forward pass
-- param adapter_mode = separate -- separate (PEFT's unmerged forward) or merged (folded into the weights at load, as merge_and_unload: the base model's speed, the weights rounded to dtype)
-- param sort_window: int = 0 -- rows sorted by length together; 0 sorts the whole shard

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

CREATE VIEW fold_rows AS
    SELECT split, id, source, prompt, response_a, response_b, label
    FROM folds
    WHERE CAST(fold AS INT) = ${fold} AND "order" = 'ab'
      AND shard_of(id, ${shard_count}) = ${shard_index};

SELECT ensure(count(*) > 0 OR ${shard_count} > 1, 'teacher_logits: fold ${fold} has no rows in ${folds}') AS has_rows
FROM fold_rows;

CREATE VIEW tokens AS
    SELECT split, id, source, label, 'ab' AS "order", input_ids
    FROM tokenize('fold_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    UNION ALL
    SELECT split, id, source, swap_label(label) AS label, 'ba' AS "order", input_ids
    FROM tokenize('fold_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ba', ${prompt_cap});

COPY (
    SELECT id, "order", logits, label, source, split
    FROM teacher_forward('tokens', '${model}', '${adapter}', '${dtype}', '${device}', ${max_batch_tokens}, ${sort_window}, 'right', '${adapter_mode}')
) TO '${run_dir}/teacher/${model_name}/fold${fold}/shard=${shard_index}-of-${shard_count}/'
  STORED AS PARQUET PARTITIONED BY (split);

CREATE EXTERNAL TABLE teacher_logits STORED AS PARQUET
LOCATION '${run_dir}/teacher/${model_name}/fold${fold}/shard=${shard_index}-of-${shard_count}/';

-- Coverage: every row of the fold (this shard's) has logits in both orders, once.
CREATE VIEW expected AS
    SELECT r.id, r.split, o."order"
    FROM fold_rows r CROSS JOIN (VALUES ('ab'), ('ba')) AS o("order");

CREATE VIEW got AS
    SELECT id, split, "order", count(*) AS n FROM teacher_logits GROUP BY id, split, "order";

SELECT ensure(count(*) FILTER (WHERE got.n IS NULL) = 0, 'teacher_logits: rows of fold ${fold} without logits') AS covered,
       ensure(count(*) FILTER (WHERE got.n > 1) = 0, 'teacher_logits: rows with logits more than once') AS once,
       ensure((SELECT count(*) FROM teacher_logits) = count(*), 'teacher_logits: logits for rows that are not in fold ${fold}') AS nothing_else,
       count(*) AS rows
FROM expected LEFT JOIN got
  ON expected.id = got.id AND expected.split = got.split AND expected."order" = got."order";

SELECT split, "order", count(*) AS rows,
       log_loss(label, softmax3(logits)[1], softmax3(logits)[2], softmax3(logits)[3]) AS teacher_log_loss
FROM teacher_logits
GROUP BY split, "order" ORDER BY split DESC, "order";
