-- Stage 7: GPTQ of the final model (quantize): `model` with `adapter` merged (e.g.
-- average.sql's mean adapter, or none for its merged `delta` folder) quantized layer by
-- layer, calibrated on `rows` training rows of fold `fold` (drawn by a hash of id and
-- seed, through the same template and truncation as training), symmetric `bits`-bit codes
-- in groups of `group_size` input columns (0: one group per row; it must divide every
-- layer's width), damping `damp_percent` of H's mean diagonal (the reference's 0.01;
-- transformers' GPTQConfig uses 0.1). The score head stays in float. Writes
-- quantized/{model_name}/: model/ (a GPTQ checkpoint as transformers writes it:
-- config.json with quantization_config, qweight / qzeros / scales / g_idx) that
-- predict.sql and cv.sql take as `model=`, and one row per quantized projection.
--
-- stage quantize
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output
-- param fold: int = 0 -- the fold whose training side calibrates
-- param model -- the model: a folder (config.json + safetensors), a .gguf file, or a hub id org/name
-- param adapter = -- a PEFT adapter merged before quantizing; empty for none
-- param model_name = student_int8 -- names the output folder: quantized/{model_name}/
-- param tokenizer -- the model's tokenizer.json (tokenizer_config.json beside it names EOS)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 1024 -- tokens per input, BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit
-- param rows: int = 128 -- calibration rows
-- param seed: int = 2025 -- which rows calibrate
-- param bits: int = 8 -- 8 or 4 (or 2: what the checkpoint format packs)
-- param group_size: int = 128 -- input columns per scale (0: one per row)
-- param damp_percent: float = 0.01 -- damping, a fraction of H's mean diagonal
-- param act_order: bool = false -- quantize columns in order of decreasing H diagonal (desc_act)
-- param dtype = bf16 -- the forward that feeds each layer its inputs: bf16, f16 or f32
-- param device = cpu -- cpu, cuda or cuda:N; a missing device fails the run

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

CREATE TABLE calibration_rows AS
    SELECT "order", id, prompt, response_a, response_b
    FROM folds
    WHERE CAST(fold AS INT) = ${fold} AND split = 'train'
    ORDER BY md5(CAST(id AS VARCHAR) || '/' || "order" || '/${seed}')
    LIMIT ${rows};

SELECT ensure(count(*) > 0, 'quantize: fold ${fold} has no training rows in ${folds}') AS has_rows
FROM calibration_rows;

CREATE VIEW tokens AS
    SELECT id, "order", input_ids
    FROM tokenize('calibration_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap});

COPY (
    SELECT * FROM quantize('tokens', '${model}', '${adapter}', ${rows}, ${bits}, ${group_size},
                           ${damp_percent}, '${act_order}', '${dtype}', '${device}')
) TO '${run_dir}/quantized/${model_name}/' STORED AS PARQUET;

CREATE EXTERNAL TABLE quantized STORED AS PARQUET LOCATION '${run_dir}/quantized/${model_name}/';

SELECT count(*) AS projections, min(bits) AS bits, min(group_size) AS group_size,
       min(rows) AS calibration_rows, min(tokens) AS calibration_tokens
FROM quantized;
