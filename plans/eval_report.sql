-- The evaluation report over every fold's cv.sql predictions of one model: per fold and
-- overall, log loss, accuracy and expected calibration error (10 bins), ab order alone,
-- with TTA, and calibrated + TTA (fold k's logits calibrated by a fit on the other folds'
-- held-out logits, both orders, then symmetrized); the same per source. Every fold
-- 0..k-1 must have been scored. Writes the table as report/{model_name}/cv.csv.
--
-- stage eval_report
-- param model_name = student -- cv.sql's model_name: reads cv/{model_name}/predictions/
-- param k: int = 5 -- the number of folds that must be there
-- param method = temperature -- calibration: temperature (z / T) or vector (a z + b)
-- param space = probability -- where TTA averages the two orders: probability or logit

CREATE EXTERNAL TABLE predictions STORED AS PARQUET
LOCATION '${run_dir}/cv/${model_name}/predictions/';

SELECT ensure(count(DISTINCT fold) = ${k} AND min(fold) = 0 AND max(fold) = ${k} - 1,
              'eval_report: cv predictions of ' || CAST(count(DISTINCT fold) AS VARCHAR) || ' folds in cv/${model_name}/predictions/, expected folds 0 to ' || CAST(${k} - 1 AS VARCHAR)) AS all_folds,
       ensure(count(*) = count(DISTINCT id), 'eval_report: an id is scored in two folds') AS once
FROM predictions;

CREATE EXTERNAL TABLE cv_logits STORED AS PARQUET
LOCATION '${run_dir}/cv/${model_name}/logits/';

-- Each order's logits with the label in that order (ba: A and B swapped).
CREATE VIEW labelled_logits AS
    SELECT l.fold, l.id, l."order", l.logits,
           CASE WHEN l."order" = 'ab' THEN p.label ELSE swap_label(p.label) END AS label
    FROM cv_logits l JOIN predictions p ON l.id = p.id AND l.fold = p.fold;

-- For each fold, a calibration fitted on every other fold's held-out logits.
CREATE TABLE fits AS
    SELECT f.fold, fit_calibration(o.label, o.logits, '${method}') AS params
    FROM (SELECT DISTINCT fold FROM predictions) f JOIN labelled_logits o ON o.fold <> f.fold
    GROUP BY f.fold;

CREATE TABLE calibrated AS
    SELECT l.id, symmetrize(l.id, l."order", calibrate(l.logits, fits.params), '${space}') AS p
    FROM labelled_logits l JOIN fits ON l.fold = fits.fold
    GROUP BY l.id;

CREATE VIEW with_calibrated AS
    SELECT p.*, c.p[1] AS cal_p_a, c.p[2] AS cal_p_b, c.p[3] AS cal_p_tie
    FROM predictions p JOIN calibrated c ON p.id = c.id;

CREATE VIEW scored AS
    SELECT CAST(fold AS VARCHAR) AS part, * FROM with_calibrated
    UNION ALL
    SELECT 'all' AS part, * FROM with_calibrated;

COPY (
    SELECT part AS fold, count(*) AS rows,
           log_loss(label, ab_p_a, ab_p_b, ab_p_tie) AS ab_log_loss,
           log_loss(label, p_a, p_b, p_tie) AS tta_log_loss,
           log_loss(label, cal_p_a, cal_p_b, cal_p_tie) AS calibrated_tta_log_loss,
           avg(CASE WHEN argmax3(ab_p_a, ab_p_b, ab_p_tie) = label THEN 1.0 ELSE 0.0 END) AS ab_accuracy,
           avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END) AS tta_accuracy,
           expected_calibration_error(label, ab_p_a, ab_p_b, ab_p_tie) AS ab_ece,
           expected_calibration_error(label, p_a, p_b, p_tie) AS tta_ece,
           expected_calibration_error(label, cal_p_a, cal_p_b, cal_p_tie) AS calibrated_tta_ece
    FROM scored GROUP BY part ORDER BY part
) TO '${run_dir}/report/${model_name}/cv.csv' STORED AS CSV OPTIONS ('format.has_header' 'true');

CREATE EXTERNAL TABLE cv_table STORED AS CSV LOCATION '${run_dir}/report/${model_name}/cv.csv'
OPTIONS ('format.has_header' 'true');

SELECT * FROM cv_table ORDER BY fold;

SELECT source, count(*) AS rows,
       log_loss(label, ab_p_a, ab_p_b, ab_p_tie) AS ab_log_loss,
       log_loss(label, p_a, p_b, p_tie) AS tta_log_loss,
       log_loss(label, cal_p_a, cal_p_b, cal_p_tie) AS calibrated_tta_log_loss,
       expected_calibration_error(label, p_a, p_b, p_tie) AS tta_ece
FROM with_calibrated GROUP BY source ORDER BY source;
