-- The report over score.sql's files of one model and source: each scored variant's log loss
-- and accuracy (order ab and TTA), and `fold mean`: the mean of the k fold models' TTA
-- probabilities per id (the ensemble that fold averaging replaces with one model); and each
-- variant's TTA log loss against the fold mean's, paired by row: the mean of the per-row
-- differences (negative: the variant is better) and its standard error. Writes
-- report/{model_name}/{source}.csv.
--
-- stage score_report
-- param model_name = student -- score.sql's model_name: reads scores/{model_name}/{source}/
-- param source = pandalm -- score.sql's source
-- param k: int = 5 -- the fold models fold0..fold{k-1} that must be there

CREATE EXTERNAL TABLE scores STORED AS PARQUET
LOCATION '${run_dir}/scores/${model_name}/${source}/';

SELECT ensure(count(DISTINCT variant) FILTER (WHERE variant ~ '^fold[0-9]+$') = ${k},
              'score_report: ' || CAST(count(DISTINCT variant) FILTER (WHERE variant ~ '^fold[0-9]+$') AS VARCHAR) ||
              ' fold models scored in scores/${model_name}/${source}/, expected fold0 to fold' || CAST(${k} - 1 AS VARCHAR)) AS all_folds,
       ensure(count(*) = count(DISTINCT variant) * count(DISTINCT id),
              'score_report: the variants did not score the same rows') AS same_rows
FROM scores;

CREATE TABLE fold_mean AS
    SELECT id, min(label) AS label, avg(ab_p_a) AS ab_p_a, avg(ab_p_b) AS ab_p_b,
           avg(ab_p_tie) AS ab_p_tie, avg(p_a) AS p_a, avg(p_b) AS p_b, avg(p_tie) AS p_tie
    FROM scores WHERE variant ~ '^fold[0-9]+$' GROUP BY id;

-- Each row's TTA log loss under each variant and under the fold mean (log_loss over the row
-- alone: the report's clipping), paired by id.
CREATE TABLE row_losses AS
    SELECT variant, id, log_loss(label, p_a, p_b, p_tie) AS loss FROM scores GROUP BY variant, id
    UNION ALL
    SELECT 'fold mean', id, log_loss(label, p_a, p_b, p_tie) FROM fold_mean GROUP BY id;

CREATE TABLE paired AS
    SELECT r.variant, avg(r.loss - m.loss) AS tta_diff,
           stddev_samp(r.loss - m.loss) / sqrt(CAST(count(*) AS DOUBLE)) AS tta_diff_se
    FROM row_losses r JOIN row_losses m ON r.id = m.id AND m.variant = 'fold mean'
    GROUP BY r.variant;

-- The fold models, then their mean, then the others (`rank`).
CREATE TABLE figures AS
    SELECT CASE WHEN variant ~ '^fold[0-9]+$' THEN 0 ELSE 2 END AS rank, variant, count(*) AS rows,
           log_loss(label, ab_p_a, ab_p_b, ab_p_tie) AS ab_log_loss,
           avg(CASE WHEN argmax3(ab_p_a, ab_p_b, ab_p_tie) = label THEN 1.0 ELSE 0.0 END) AS ab_accuracy,
           log_loss(label, p_a, p_b, p_tie) AS tta_log_loss,
           avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END) AS tta_accuracy
    FROM scores GROUP BY variant
    UNION ALL
    SELECT 1, 'fold mean', count(*),
           log_loss(label, ab_p_a, ab_p_b, ab_p_tie),
           avg(CASE WHEN argmax3(ab_p_a, ab_p_b, ab_p_tie) = label THEN 1.0 ELSE 0.0 END),
           log_loss(label, p_a, p_b, p_tie),
           avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END)
    FROM fold_mean;

COPY (
    SELECT f.variant, rows, ab_log_loss, ab_accuracy, tta_log_loss, tta_accuracy,
           tta_diff AS tta_vs_fold_mean, tta_diff_se AS tta_vs_fold_mean_se
    FROM figures f JOIN paired p ON f.variant = p.variant
    ORDER BY rank, f.variant
) TO '${run_dir}/report/${model_name}/${source}.csv' STORED AS CSV OPTIONS ('format.has_header' 'true');

SELECT f.variant, rows, round(ab_log_loss, 4) AS ab, round(tta_log_loss, 4) AS tta,
       round(tta_accuracy, 4) AS tta_accuracy, round(tta_diff, 4) AS tta_vs_fold_mean,
       round(tta_diff_se, 4) AS se
FROM figures f JOIN paired p ON f.variant = p.variant ORDER BY rank, f.variant;
