-- Stage 8 on the held-out side: fold k's held-out rows through the same path as
-- predict.sql (both orders tokenized at inference length, the model, symmetrize by id),
-- so that cross-validation scores exactly what a submission would be. The model is `model`
-- with the fold's adapter from train_teacher.sql or distill.sql
-- (train/{model_name}/fold{fold}/adapter/). Prints the fold's log loss and accuracy in the
-- ab order alone and with TTA (and TTA's expected calibration error); writes each held-out
-- id's probabilities, ab alone and with TTA, with its label and source for eval_report.sql.
--
-- stage cv
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output
-- param fold: int = 0 -- the fold whose held-out side is scored
-- param model -- the base model the fold's adapter was trained on: folder, .gguf file or hub id
-- param model_name = student -- the trained model's name: its adapter is train/{model_name}/fold{fold}/adapter/
-- param tokenizer -- the model's tokenizer.json (tokenizer_config.json beside it names EOS)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 2000 -- tokens per input at inference, BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit
-- param space = probability -- where the two orders are averaged: probability or logit
-- param dtype = bf16 -- weights and activations: bf16, f16 or f32
-- param device = cpu -- cpu, cuda or cuda:N; a missing device fails the run
-- param max_batch_tokens: int = 8192 -- padded tokens per forward pass
-- param adapter_mode = separate -- separate (PEFT's unmerged forward) or merged (folded into the weights at load, as merge_and_unload: the base model's speed, the weights rounded to dtype)

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

CREATE TABLE held_out AS
    SELECT id, source, prompt, response_a, response_b, label
    FROM folds WHERE CAST(fold AS INT) = ${fold} AND split = 'valid' AND "order" = 'ab';

SELECT ensure(count(*) > 0, 'cv: fold ${fold} has no held-out rows in ${folds}') AS has_rows,
       ensure(count(label) = count(*), 'cv: held-out rows without a label') AS labelled
FROM held_out;

CREATE VIEW tokens AS
    SELECT id, 'ab' AS "order", input_ids
    FROM tokenize('held_out', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    UNION ALL
    SELECT id, 'ba' AS "order", input_ids
    FROM tokenize('held_out', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ba', ${prompt_cap});

COPY (
    SELECT ${fold} AS fold, id, "order", logits
    FROM teacher_forward('tokens', '${model}', '${run_dir}/train/${model_name}/fold${fold}/adapter', '${dtype}', '${device}', ${max_batch_tokens}, 0, 'right', '${adapter_mode}')
) TO '${run_dir}/cv/${model_name}/logits/fold${fold}.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE order_logits STORED AS PARQUET
LOCATION '${run_dir}/cv/${model_name}/logits/fold${fold}.parquet';

COPY (
    SELECT ${fold} AS fold, h.id, h.source, h.label, s.p[1] AS p_a, s.p[2] AS p_b, s.p[3] AS p_tie,
           ab.p[1] AS ab_p_a, ab.p[2] AS ab_p_b, ab.p[3] AS ab_p_tie
    FROM held_out h
    JOIN (SELECT id, symmetrize(id, "order", logits, '${space}') AS p FROM order_logits GROUP BY id) s
      ON h.id = s.id
    JOIN (SELECT id, softmax3(logits) AS p FROM order_logits WHERE "order" = 'ab') ab ON h.id = ab.id
    ORDER BY h.id
) TO '${run_dir}/cv/${model_name}/predictions/fold${fold}.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE predictions STORED AS PARQUET
LOCATION '${run_dir}/cv/${model_name}/predictions/fold${fold}.parquet';

SELECT ensure((SELECT count(*) FROM predictions) = (SELECT count(*) FROM held_out),
              'cv: held-out ids of fold ${fold} without a prediction') AS covered;

CREATE VIEW ab_only AS
    SELECT h.label, softmax3(l.logits) AS p
    FROM held_out h JOIN order_logits l ON h.id = l.id AND l."order" = 'ab';

SELECT ${fold} AS fold, count(*) AS rows,
       (SELECT log_loss(label, p[1], p[2], p[3]) FROM ab_only) AS ab_log_loss,
       log_loss(label, p_a, p_b, p_tie) AS tta_log_loss,
       expected_calibration_error(label, p_a, p_b, p_tie) AS tta_ece,
       (SELECT avg(CASE WHEN argmax3(p[1], p[2], p[3]) = label THEN 1.0 ELSE 0.0 END) FROM ab_only) AS ab_accuracy,
       avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END) AS tta_accuracy
FROM predictions;
