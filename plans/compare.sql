-- The paired comparison of two models' held-out predictions on the same rows: each row's
-- log loss under A and under B, and their difference B - A with its standard error (the
-- rows are the same, so the difference is far less noisy than the two losses apart). Per
-- fold and over all rows; negative means B is better. Each side is a model and one of the
-- variants eval_report.sql scored (its report/{model}/rows.parquet): ab or ba (one order's
-- raw probabilities), ab_calibrated or ba_calibrated (calibrated out of fold), tta (both
-- orders averaged) or calibrated_tta; so `model_a = model_b` with `ab` against `tta`
-- measures TTA itself, and `tta` against `calibrated_tta` the calibration. Writes
-- report/compare/{model_b}_{variant_b}_vs_{model_a}_{variant_a}.csv.
--
-- stage compare
-- param model_a = teacher_raw -- eval_report.sql's model_name of the baseline: reads report/{model_a}/rows.parquet
-- param variant_a = tta -- ab, ba, ab_calibrated, ba_calibrated, tta or calibrated_tta
-- param model_b = teacher -- eval_report.sql's model_name of the other side
-- param variant_b = tta -- as variant_a

SELECT ensure('${variant_a}' IN ('ab', 'ba', 'ab_calibrated', 'ba_calibrated', 'tta', 'calibrated_tta')
              AND '${variant_b}' IN ('ab', 'ba', 'ab_calibrated', 'ba_calibrated', 'tta', 'calibrated_tta'),
              'compare: variant_a and variant_b must be one of ab, ba, ab_calibrated, ba_calibrated, tta, calibrated_tta, not ${variant_a} / ${variant_b}') AS variants;

CREATE EXTERNAL TABLE side_a STORED AS PARQUET LOCATION '${run_dir}/report/${model_a}/rows.parquet';
CREATE EXTERNAL TABLE side_b STORED AS PARQUET LOCATION '${run_dir}/report/${model_b}/rows.parquet';

-- Each row's log loss on each side (log_loss over the row alone: the same clipping as the
-- report's figures), from the side's chosen variant; labels in the ab order (ba rows carry
-- theirs swapped), to check that both sides hold the same rows.
CREATE VIEW losses_a AS
    SELECT fold, id, min(CASE WHEN variant LIKE 'ba%' THEN swap_label(label) ELSE label END) AS label,
           log_loss(label, p_a, p_b, p_tie) AS loss
    FROM side_a WHERE variant = replace('${variant_a}', '_', ' ') GROUP BY fold, id;

CREATE VIEW losses_b AS
    SELECT fold, id, min(CASE WHEN variant LIKE 'ba%' THEN swap_label(label) ELSE label END) AS label,
           log_loss(label, p_a, p_b, p_tie) AS loss
    FROM side_b WHERE variant = replace('${variant_b}', '_', ' ') GROUP BY fold, id;

CREATE TABLE row_losses AS
    SELECT a.fold, a.id, a.loss AS loss_a, b.loss AS loss_b, b.loss - a.loss AS diff,
           a.label = b.label AS same_label
    FROM losses_a a FULL JOIN losses_b b ON a.id = b.id;

SELECT ensure(count(*) = count(loss_a) AND count(*) = count(loss_b),
              'compare: ${model_a} and ${model_b} did not score the same ids (' ||
              CAST(count(*) - count(loss_a) AS VARCHAR) || ' only in ${model_b}, ' ||
              CAST(count(*) - count(loss_b) AS VARCHAR) || ' only in ${model_a})') AS same_rows,
       ensure(bool_and(same_label), 'compare: an id has two labels') AS same_labels
FROM row_losses;

CREATE TABLE comparison AS
    SELECT part, count(*) AS rows, avg(loss_a) AS log_loss_a, avg(loss_b) AS log_loss_b,
           avg(diff) AS diff, stddev_samp(diff) / sqrt(CAST(count(*) AS DOUBLE)) AS diff_se,
           avg(CASE WHEN diff < 0 THEN 1.0 ELSE 0.0 END) AS share_b_better
    FROM (SELECT CAST(fold AS VARCHAR) AS part, fold AS fold_rank, diff, loss_a, loss_b FROM row_losses
          UNION ALL
          SELECT 'all', NULL, diff, loss_a, loss_b FROM row_losses)
    GROUP BY part;

COPY (
    SELECT part AS fold, '${model_a} ${variant_a}' AS a, '${model_b} ${variant_b}' AS b, rows,
           log_loss_a, log_loss_b, diff, diff_se, share_b_better
    FROM comparison
    ORDER BY part = 'all', part
) TO '${run_dir}/report/compare/${model_b}_${variant_b}_vs_${model_a}_${variant_a}.csv'
STORED AS CSV OPTIONS ('format.has_header' 'true');

SELECT part AS fold, rows, round(log_loss_a, 4) AS a, round(log_loss_b, 4) AS b,
       round(diff, 4) AS "b - a", round(diff_se, 4) AS se,
       round(diff / diff_se, 1) AS z
FROM comparison ORDER BY part = 'all', part;
