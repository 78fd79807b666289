-- Scores one model on the labelled rows of one source that no fold trained on (prepare.sql's
-- PandaLM rows by default: only post-pretraining saw them), through the prediction path
-- (both orders tokenized at inference length, the model, symmetrize by id). This is where
-- models that saw every fold can be compared: fold averaging (average.sql's adapter or
-- merged folder) against each fold's model and their mean. Writes each id's probabilities,
-- order ab alone and with TTA, with its label, to scores/{model_name}/{source}/{variant}.parquet
-- for score_report.sql, and prints log loss and accuracy.
--
-- stage score
-- param comparisons = ${run_dir}/prepare/comparisons.parquet -- prepare.sql's output
-- param source = pandalm -- the rows scored: this source's labelled rows
-- param model -- the base model, or a merged folder (average.sql's delta): folder, .gguf file or hub id
-- param adapter = -- PEFT LoRA adapter folder (with the score head); empty for a merged model
-- param model_name = student -- names the output folder: scores/{model_name}/{source}/
-- param variant = fold0 -- this model's name in the report: fold0..fold{k-1} for the fold models, anything else for the others
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

CREATE EXTERNAL TABLE comparisons STORED AS PARQUET LOCATION '${comparisons}';

CREATE TABLE scored_rows AS
    SELECT id, source, prompt, response_a, response_b, label
    FROM comparisons WHERE source = '${source}' AND label IS NOT NULL;

SELECT ensure(count(*) > 0, 'score: no labelled rows of source ${source} in ${comparisons}') AS has_rows
FROM scored_rows;

CREATE VIEW tokens AS
    SELECT id, 'ab' AS "order", input_ids
    FROM tokenize('scored_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    UNION ALL
    SELECT id, 'ba' AS "order", input_ids
    FROM tokenize('scored_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ba', ${prompt_cap});

COPY (
    SELECT id, "order", logits
    FROM teacher_forward('tokens', '${model}', '${adapter}', '${dtype}', '${device}', ${max_batch_tokens}, 0, 'right', '${adapter_mode}')
) TO '${run_dir}/scores/${model_name}/${source}/logits/${variant}.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE order_logits STORED AS PARQUET
LOCATION '${run_dir}/scores/${model_name}/${source}/logits/${variant}.parquet';

COPY (
    SELECT '${variant}' AS variant, r.id, r.label, s.p[1] AS p_a, s.p[2] AS p_b, s.p[3] AS p_tie,
           ab.p[1] AS ab_p_a, ab.p[2] AS ab_p_b, ab.p[3] AS ab_p_tie
    FROM scored_rows r
    JOIN (SELECT id, symmetrize(id, "order", logits, '${space}') AS p FROM order_logits GROUP BY id) s
      ON r.id = s.id
    JOIN (SELECT id, softmax3(logits) AS p FROM order_logits WHERE "order" = 'ab') ab ON r.id = ab.id
    ORDER BY r.id
) TO '${run_dir}/scores/${model_name}/${source}/${variant}.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE scores STORED AS PARQUET
LOCATION '${run_dir}/scores/${model_name}/${source}/${variant}.parquet';

SELECT ensure((SELECT count(*) FROM scores) = (SELECT count(*) FROM scored_rows),
              'score: rows of ${source} without a prediction') AS covered;

SELECT '${variant}' AS variant, count(*) AS rows,
       log_loss(label, ab_p_a, ab_p_b, ab_p_tie) AS ab_log_loss,
       log_loss(label, p_a, p_b, p_tie) AS tta_log_loss,
       avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END) AS tta_accuracy
FROM scores;
