-- Stage 6: the fold adapters of one model (train/{model_name}/fold{k}/adapter/, from
-- train_teacher.sql or distill.sql) averaged into one model (average_adapters): mode
-- `mean` writes the weighted mean of every lora_A, lora_B and score-head tensor as one
-- PEFT adapter (the 1st place's), mode `delta` a merged *ForSequenceClassification
-- folder, base `model` + the exact weighted mean of the folds' updates scale·B·A. Fold
-- weights: `uniform`, or `group_relative` by each fold's held-out log loss with TTA from
-- cv.sql (w_f ∝ exp((mean − log_loss_f) / tau): weak folds weigh less, none is dropped).
-- Every fold 0..k-1 must have been scored by cv.sql. Writes
-- average/{model_name}_{mode}_{weights}/: the weights (one row per fold) and adapter/
-- (mean) or model/ (delta); predict.sql takes it as `adapter=` (mean) or `model=` (delta).
--
-- stage average
-- param model_name = student -- the trained model's name: train/{model_name}/fold{k}/adapter/ and cv/{model_name}/
-- param k: int = 5 -- the number of folds
-- param mode = mean -- mean (one PEFT adapter) or delta (a merged folder; needs model)
-- param weights = uniform -- uniform or group_relative (by cv.sql's held-out log loss)
-- param tau: float = 0.05 -- group_relative's temperature: smaller weighs the best folds more
-- param model = -- delta: the base model the adapters were trained on; empty for mean
-- param dtype = f32 -- delta: the merged model's dtype (f32, bf16 or f16)

CREATE EXTERNAL TABLE predictions STORED AS PARQUET
LOCATION '${run_dir}/cv/${model_name}/predictions/';

CREATE TABLE fold_log_losses AS
    SELECT fold, log_loss(label, p_a, p_b, p_tie) AS log_loss, count(*) AS rows
    FROM predictions GROUP BY fold;

SELECT ensure(count(*) = ${k} AND min(fold) = 0 AND max(fold) = ${k} - 1,
              'average: cv.sql scored ' || CAST(count(*) AS VARCHAR) || ' folds of ${model_name}, expected folds 0 to ' || CAST(${k} - 1 AS VARCHAR)) AS all_folds
FROM fold_log_losses;

COPY (
    SELECT * FROM average_adapters('fold_log_losses',
        '${run_dir}/train/${model_name}/fold{fold}/adapter/', ${k},
        '${mode}', '${weights}', '${tau}', '${model}', '${dtype}')
) TO '${run_dir}/average/${model_name}_${mode}_${weights}/' STORED AS PARQUET;

CREATE EXTERNAL TABLE averaged STORED AS PARQUET
LOCATION '${run_dir}/average/${model_name}_${mode}_${weights}/';

SELECT fold, round(log_loss, 4) AS held_out_log_loss, round(weight, 4) AS weight, adapter
FROM averaged ORDER BY fold;
