-- Stage 8: predict a comparisons file (Kaggle's test.csv by default) with a model, both
-- A/B orders averaged (TTA: symmetrize by id, never by position), written as a Kaggle
-- submission: id,winner_model_a,winner_model_b,winner_tie, one row per id in the input's
-- order. The model is a merged folder (arenaflow average --mode delta, or any
-- *ForSequenceClassification folder), or a base with a PEFT adapter (`adapter`).
-- A duplicate id in the input fails the plan (arena_csv names the file, row and id).
--
-- stage predict
-- param comparisons = ../shared/data/lmsys-arena/test.csv -- Kaggle-format CSV: test.csv (or train.csv: the labels are ignored)
-- param model -- the model: a folder (config.json + safetensors), a .gguf file, or a hub id org/name
-- param adapter = -- PEFT LoRA adapter folder (with the score head); empty for a merged model
-- param model_name = student -- names the output folder: predict/{model_name}/
-- param tokenizer -- the model's tokenizer.json (tokenizer_config.json beside it names EOS)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 2000 -- tokens per input at inference (the 1st place's 2,000), BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit
-- param space = probability -- where the two orders are averaged: probability or logit
-- param dtype = bf16 -- weights and activations: bf16, f16 or f32
-- param device = cpu -- cpu, cuda or cuda:N; a missing device fails the run
-- param max_batch_tokens: int = 8192 -- padded tokens per forward pass
-- param adapter_mode = separate -- separate (PEFT's unmerged forward) or merged (folded into the weights at load, as merge_and_unload: the base model's speed, the weights rounded to dtype)

CREATE TABLE test_rows AS
    SELECT id, prompt, response_a, response_b, row_number() OVER () AS position
    FROM arena_csv('${comparisons}', 'test', 'fail', 0);

CREATE VIEW tokens AS
    SELECT id, 'ab' AS "order", input_ids
    FROM tokenize('test_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    UNION ALL
    SELECT id, 'ba' AS "order", input_ids
    FROM tokenize('test_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ba', ${prompt_cap});

COPY (
    SELECT id, "order", logits
    FROM teacher_forward('tokens', '${model}', '${adapter}', '${dtype}', '${device}', ${max_batch_tokens}, 0, 'right', '${adapter_mode}')
) TO '${run_dir}/predict/${model_name}/logits.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE order_logits STORED AS PARQUET
LOCATION '${run_dir}/predict/${model_name}/logits.parquet';

CREATE TABLE predictions AS
    SELECT id, symmetrize(id, "order", logits, '${space}') AS p FROM order_logits GROUP BY id;

SELECT ensure(count(p.id) = count(*), 'predict: ids without a prediction: ' || coalesce(min(t.id) FILTER (WHERE p.id IS NULL), '')) AS covered
FROM test_rows t LEFT JOIN predictions p ON t.id = p.id;

COPY (
    SELECT t.id, p.p[1] AS winner_model_a, p.p[2] AS winner_model_b, p.p[3] AS winner_tie
    FROM test_rows t JOIN predictions p ON t.id = p.id
    ORDER BY t.position
) TO '${run_dir}/predict/${model_name}/submission.csv' STORED AS CSV OPTIONS ('format.has_header' 'true');

SELECT count(*) AS rows,
       min(p[1] + p[2] + p[3]) AS min_sum, max(p[1] + p[2] + p[3]) AS max_sum,
       avg(p[1]) AS mean_a, avg(p[2]) AS mean_b, avg(p[3]) AS mean_tie
FROM predictions;
