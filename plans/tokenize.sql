-- Model input: every comparison of prepare.sql through one template and one truncation,
-- in both A/B orders (the swapped order for TTA and for the swapped training copies).
--
-- stage tokenize
-- param comparisons = ${run_dir}/prepare/comparisons.parquet -- the canonical table (prepare.sql's output)
-- param model_name = gemma2 -- names the output folder: the model family this input is for
-- param tokenizer = ../shared/tokenizers/gemma2/tokenizer.json -- Hugging Face tokenizer.json (tokenizer_config.json beside it names EOS)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 1024 -- tokens per input, BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit

CREATE EXTERNAL TABLE comparisons STORED AS PARQUET LOCATION '${comparisons}';

COPY (
    SELECT id, source, label, 'ab' AS "order", input_ids, n_tokens, truncated
    FROM tokenize('comparisons', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    UNION ALL
    SELECT id, source, swap_label(label) AS label, 'ba' AS "order", input_ids, n_tokens, truncated
    FROM tokenize('comparisons', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ba', ${prompt_cap})
) TO '${run_dir}/tokenize/${model_name}_${template}_${max_length}_${truncation}/tokens.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE tokens STORED AS PARQUET
LOCATION '${run_dir}/tokenize/${model_name}_${template}_${max_length}_${truncation}/tokens.parquet';

SELECT "order", count(*) AS rows, count(DISTINCT id) AS ids, sum(n_tokens) AS tokens,
       max(n_tokens) AS longest, sum(CAST(truncated AS INT)) AS truncated
FROM tokens
GROUP BY "order" ORDER BY "order";
