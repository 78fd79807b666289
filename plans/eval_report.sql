-- The evaluation report over every fold's cv.sql predictions of one model (stage 9). Per
-- fold and overall, and per source: log loss, accuracy and expected calibration error (10
-- bins) of each variant of the predictions: each order alone (ab, ba: the model's raw
-- probabilities), each order calibrated out of fold (fold k's logits through a `method`
-- fit on the other folds' held-out logits, both orders), TTA (the two orders averaged by
-- id: what predict.sql submits) and calibrated + TTA. Writes, under report/{model_name}/:
-- cv.csv and sources.csv (the figures, one row per part and variant), rows.parquet (every
-- held-out row's probabilities under every variant, for compare.sql), reliability.png
-- (TTA's reliability diagram: 10 bins per class, with the rows in each), loss_curves.png
-- (every fold's training loss and dev log loss, from train/{model_name}/fold{k}/), and
-- report.md (the tables, linking the pictures). Every fold 0..k-1 must have been scored.
--
-- stage eval_report
-- param model_name = student -- cv.sql's model_name: reads cv/{model_name}/ and train/{model_name}/fold{k}/
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

-- Each order's probabilities, raw and calibrated, in that order's A/B with its label.
CREATE TABLE per_order AS
    SELECT l.fold, l.id, l."order", l.label, p.source,
           softmax3(l.logits) AS raw, softmax3(calibrate(l.logits, fits.params)) AS cal
    FROM labelled_logits l JOIN fits ON l.fold = fits.fold JOIN predictions p ON p.id = l.id;

-- Every variant's probabilities, one row per id and variant (`rank` orders the variants).
CREATE VIEW variants AS
    SELECT 1 AS rank, 'ab' AS variant, fold, id, source, label, raw[1] AS p_a, raw[2] AS p_b, raw[3] AS p_tie
    FROM per_order WHERE "order" = 'ab'
    UNION ALL
    SELECT 2, 'ba', fold, id, source, label, raw[1], raw[2], raw[3] FROM per_order WHERE "order" = 'ba'
    UNION ALL
    SELECT 3, 'ab calibrated', fold, id, source, label, cal[1], cal[2], cal[3] FROM per_order WHERE "order" = 'ab'
    UNION ALL
    SELECT 4, 'ba calibrated', fold, id, source, label, cal[1], cal[2], cal[3] FROM per_order WHERE "order" = 'ba'
    UNION ALL
    SELECT 5, 'tta', fold, id, source, label, p_a, p_b, p_tie FROM predictions
    UNION ALL
    SELECT 6, 'calibrated tta', p.fold, p.id, p.source, p.label, c.p[1], c.p[2], c.p[3]
    FROM predictions p JOIN calibrated c ON p.id = c.id;

-- Every row's probabilities under every variant (each order's in that order's A/B, with
-- its label), for paired comparisons between variants and models (compare.sql).
COPY (
    SELECT fold, id, variant, label, p_a, p_b, p_tie FROM variants ORDER BY rank, fold, id
) TO '${run_dir}/report/${model_name}/rows.parquet' STORED AS PARQUET;

CREATE TABLE figures AS
    SELECT part, rank, variant, count(*) AS rows,
           log_loss(label, p_a, p_b, p_tie) AS log_loss,
           avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END) AS accuracy,
           expected_calibration_error(label, p_a, p_b, p_tie) AS ece
    FROM (SELECT CAST(fold AS VARCHAR) AS part, * FROM variants
          UNION ALL
          SELECT 'all' AS part, * FROM variants)
    GROUP BY part, rank, variant;

CREATE TABLE source_figures AS
    SELECT source, rank, variant, count(*) AS rows,
           log_loss(label, p_a, p_b, p_tie) AS log_loss,
           avg(CASE WHEN argmax3(p_a, p_b, p_tie) = label THEN 1.0 ELSE 0.0 END) AS accuracy,
           expected_calibration_error(label, p_a, p_b, p_tie) AS ece
    FROM variants GROUP BY source, rank, variant;

COPY (
    SELECT part AS fold, variant, rows, log_loss, accuracy, ece FROM figures
    ORDER BY part = 'all', CASE WHEN part = 'all' THEN NULL ELSE CAST(part AS BIGINT) END, rank
) TO '${run_dir}/report/${model_name}/cv.csv' STORED AS CSV OPTIONS ('format.has_header' 'true');

COPY (
    SELECT source, variant, rows, log_loss, accuracy, ece FROM source_figures ORDER BY source, rank
) TO '${run_dir}/report/${model_name}/sources.csv' STORED AS CSV OPTIONS ('format.has_header' 'true');

-- TTA's reliability: per class, rows binned by the predicted probability of that class.
COPY (
    SELECT class AS series, class_rank, bin, avg(p) AS x, avg(hit) AS y, count(*) AS rows
    FROM (SELECT class, class_rank, p, hit, least(CAST(floor(p * 10) AS BIGINT), 9) AS bin
          FROM (SELECT 'A wins' AS class, 0 AS class_rank, p_a AS p,
                       CASE WHEN label = 0 THEN 1.0 ELSE 0.0 END AS hit FROM predictions
                UNION ALL
                SELECT 'B wins', 1, p_b, CASE WHEN label = 1 THEN 1.0 ELSE 0.0 END FROM predictions
                UNION ALL
                SELECT 'tie', 2, p_tie, CASE WHEN label = 2 THEN 1.0 ELSE 0.0 END FROM predictions))
    GROUP BY class, class_rank, bin
    ORDER BY class_rank, bin
) TO '${run_dir}/report/${model_name}/reliability.png' STORED AS PNG
OPTIONS ('chart' 'reliability', 'bins' '10',
         'title' 'reliability of ${model_name} (TTA, out of fold)');

COPY (
    SELECT series, x, y, 'fold ' || CAST(fold AS VARCHAR) AS colour FROM (
        SELECT fold, 0 AS kind_rank, 'fold ' || CAST(fold AS VARCHAR) || ' train loss' AS series,
               CAST(step AS DOUBLE) AS x, loss AS y
        FROM fold_metrics('${run_dir}/train/${model_name}/fold{fold}/', ${k})
        WHERE kind = 'step' AND abs(loss) < 'Infinity'::double
        UNION ALL
        SELECT fold, 1, 'fold ' || CAST(fold AS VARCHAR) || ' dev log loss', CAST(step AS DOUBLE), dev_log_loss
        FROM fold_metrics('${run_dir}/train/${model_name}/fold{fold}/', ${k})
        WHERE kind = 'eval' AND abs(dev_log_loss) < 'Infinity'::double)
    ORDER BY fold, kind_rank, x
) TO '${run_dir}/report/${model_name}/loss_curves.png' STORED AS PNG
OPTIONS ('title' 'training of ${model_name}: loss per step, dev log loss per evaluation',
         'x_label' 'optimizer step', 'y_label' 'loss');

-- Log loss per fold and variant, one column per variant.
CREATE VIEW log_loss_table AS
    SELECT part, max(rows) AS rows,
           max(CASE WHEN rank = 1 THEN log_loss END) AS ab,
           max(CASE WHEN rank = 2 THEN log_loss END) AS ba,
           max(CASE WHEN rank = 3 THEN log_loss END) AS ab_calibrated,
           max(CASE WHEN rank = 4 THEN log_loss END) AS ba_calibrated,
           max(CASE WHEN rank = 5 THEN log_loss END) AS tta,
           max(CASE WHEN rank = 6 THEN log_loss END) AS calibrated_tta
    FROM figures GROUP BY part;

COPY (
    SELECT line FROM (
        SELECT 0 AS section, 0 AS n, '# Evaluation report: ${model_name}' AS line
        UNION ALL SELECT 0, 1, ''
        UNION ALL SELECT 0, 2, 'Out-of-fold predictions of ' || CAST(count(*) AS VARCHAR) || ' held-out rows over ${k} folds (`cv.sql`), each scored by the model trained without its fold. Variants: each A/B order alone (ab, ba), each order calibrated by a `${method}` fit on the other folds'' held-out logits, the two orders averaged per id (TTA: cv.sql''s predictions, what `predict.sql` submits), and calibrated + TTA (averaged in ${space} space). Figures: `cv.csv`, `sources.csv`.' FROM predictions
        UNION ALL SELECT 1, 0, ''
        UNION ALL SELECT 1, 1, '## Log loss per fold'
        UNION ALL SELECT 1, 2, ''
        UNION ALL SELECT 1, 3, markdown_row('fold', 'rows', 'ab', 'ba', 'ab calibrated', 'ba calibrated', 'TTA', 'calibrated + TTA')
        UNION ALL SELECT 1, 4, '|---|---:|---:|---:|---:|---:|---:|---:|'
        UNION ALL SELECT 1, 10 + CASE WHEN part = 'all' THEN 1000000 ELSE CAST(part AS BIGINT) END,
                         markdown_row(part, rows, ab, ba, ab_calibrated, ba_calibrated, tta, calibrated_tta)
                  FROM log_loss_table
        UNION ALL SELECT 2, 0, ''
        UNION ALL SELECT 2, 1, '## All folds'
        UNION ALL SELECT 2, 2, ''
        UNION ALL SELECT 2, 3, markdown_row('variant', 'rows', 'log loss', 'accuracy', 'ECE (10 bins)')
        UNION ALL SELECT 2, 4, '|---|---:|---:|---:|---:|'
        UNION ALL SELECT 2, 10 + rank, markdown_row(variant, rows, log_loss, accuracy, ece)
                  FROM figures WHERE part = 'all'
        UNION ALL SELECT 3, 0, ''
        UNION ALL SELECT 3, 1, '## Per source'
        UNION ALL SELECT 3, 2, ''
        UNION ALL SELECT 3, 3, markdown_row('source', 'variant', 'rows', 'log loss', 'accuracy', 'ECE (10 bins)')
        UNION ALL SELECT 3, 4, '|---|---|---:|---:|---:|---:|'
        UNION ALL SELECT 3, 10 + row_number() OVER (ORDER BY source, rank),
                         markdown_row(source, variant, rows, log_loss, accuracy, ece)
                  FROM source_figures
        UNION ALL SELECT 4, 0, ''
        UNION ALL SELECT 4, 1, '## Pictures'
        UNION ALL SELECT 4, 2, ''
        UNION ALL SELECT 4, 3, 'Reliability of the TTA predictions (per class: observed frequency against mean predicted probability in 10 bins; below, the rows in each bin):'
        UNION ALL SELECT 4, 4, ''
        UNION ALL SELECT 4, 5, '![reliability diagram](reliability.png)'
        UNION ALL SELECT 4, 6, ''
        UNION ALL SELECT 4, 7, 'Training of each fold (the training loss per optimizer step; the dev log loss at each evaluation, the one at step 0, when there is one, being the untrained score head''s):'
        UNION ALL SELECT 4, 8, ''
        UNION ALL SELECT 4, 9, '![loss curves](loss_curves.png)')
    ORDER BY section, n
) TO '${run_dir}/report/${model_name}/report.md' STORED AS MD;

SELECT part AS fold, rows, round(ab, 4) AS ab, round(ba, 4) AS ba,
       round(ab_calibrated, 4) AS ab_calibrated, round(ba_calibrated, 4) AS ba_calibrated,
       round(tta, 4) AS tta, round(calibrated_tta, 4) AS calibrated_tta
FROM log_loss_table
ORDER BY part = 'all', CASE WHEN part = 'all' THEN NULL ELSE CAST(part AS BIGINT) END;

SELECT variant, rows, round(log_loss, 4) AS log_loss, round(accuracy, 4) AS accuracy,
       round(ece, 4) AS ece
FROM figures WHERE part = 'all' ORDER BY rank;
