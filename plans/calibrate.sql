-- Stage 4.5: calibrate one teacher's logits, fold by fold. For fold k, fit_calibration
-- fits temperature (z / T) or vector (a z + b) scaling on the other folds' held-out,
-- out-of-fold logits (both orders), never on fold k's own rows, and calibrate() applies it
-- to all of fold k's logits: its training side (the distillation targets of distill.sql)
-- and its held-out side. Prints fold k's held-out log loss raw and calibrated. Every fold's
-- logits must exist (teacher_logits.sql, or teacher_merge.sql's shards, for each fold).
-- Writes teacher/{teacher}_{method}/fold{fold}/ in teacher_logits.sql's layout, so that
-- distill.sql takes it as a teacher: teachers={teacher}_{method}.
--
-- stage calibrate
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output: every row of every fold must have logits
-- param teacher = teacher -- teacher_logits.sql's model_name: its logits are teacher/{teacher}/fold{0..k-1}/
-- param k: int = 5 -- the number of folds (folds.sql's k)
-- param fold: int = 0 -- the fold to calibrate, with a fit on the other folds' held-out logits
-- param method = temperature -- temperature (z / T, 1 parameter) or vector (a z + b, 3 + 3)

SELECT ensure(${fold} >= 0 AND ${fold} < ${k}, 'calibrate: fold ${fold} is not one of the ${k} folds 0..k-1') AS fold_ok,
       ensure(${k} >= 2, 'calibrate: k = ${k}; out-of-fold calibration needs at least 2 folds') AS folds_ok;

CREATE VIEW all_logits AS
    SELECT * FROM fold_logits('${run_dir}/teacher/${teacher}/fold{fold}/', ${k});

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

SELECT ensure(count(DISTINCT fold) = ${k}, 'calibrate: ${folds} has ' || CAST(count(DISTINCT fold) AS VARCHAR) || ' folds, not k = ${k}') AS k_ok
FROM folds;

-- Coverage: every row of every fold (both orders) has the teacher's logits, so that the
-- fit sees all the out-of-fold rows and the output holds every distillation target.
CREATE TABLE missing AS
    SELECT e.fold, e.id, e."order", e.split
    FROM (SELECT CAST(f.fold AS INT) AS fold, f.id, o."order", f.split
          FROM folds f CROSS JOIN (VALUES ('ab'), ('ba')) AS o("order")
          WHERE f."order" = 'ab') e
    LEFT ANTI JOIN all_logits l
      ON e.fold = l.fold AND e.id = l.id AND e."order" = l."order" AND e.split = l.split
    ORDER BY e.fold, e.id, e."order" LIMIT 1;

SELECT ensure(count(*) = 0,
              'calibrate: teacher ${teacher} has no logits for id ' || coalesce(max(id), '') || ' (order '
              || coalesce(max("order"), '') || ', ' || coalesce(max(split), '') || ' side of fold '
              || coalesce(CAST(max(fold) AS VARCHAR), '') || ')') AS covered
FROM missing;

-- A logit that is NaN or infinite fails the plan, naming the row (NaN < inf is false).
CREATE TABLE not_finite AS
    SELECT fold, id, "order", split FROM all_logits
    WHERE NOT (abs(logits[1]) < 'Infinity'::double AND abs(logits[2]) < 'Infinity'::double
               AND abs(logits[3]) < 'Infinity'::double)
    ORDER BY fold, id, "order" LIMIT 1;

SELECT ensure(count(*) = 0,
              'calibrate: the logits of id ' || coalesce(max(id), '') || ' (order ' || coalesce(max("order"), '')
              || ', fold ' || coalesce(CAST(max(fold) AS VARCHAR), '') || ', ' || coalesce(max(split), '')
              || ') are not finite') AS finite
FROM not_finite;

SELECT ensure(count(*) FILTER (WHERE label IS NULL OR label NOT IN (0, 1, 2)) = 0,
              'calibrate: held-out rows with a label outside 0 (A), 1 (B), 2 (tie): id '
              || coalesce(min(id) FILTER (WHERE label IS NULL OR label NOT IN (0, 1, 2)), '')) AS labels_ok
FROM all_logits WHERE split = 'valid';

CREATE TABLE fit AS
    SELECT fit_calibration(label, logits, '${method}') AS params, count(*) AS fit_rows
    FROM all_logits WHERE split = 'valid' AND fold <> ${fold};

SELECT ensure(params IS NOT NULL, 'calibrate: no held-out logits outside fold ${fold} to fit on') AS fitted
FROM fit;

COPY (
    SELECT l.id, l."order", calibrate(l.logits, fit.params) AS logits, l.label, l.source, l.split
    FROM all_logits l CROSS JOIN fit
    WHERE l.fold = ${fold}
) TO '${run_dir}/teacher/${teacher}_${method}/fold${fold}/' STORED AS PARQUET PARTITIONED BY (split);

CREATE VIEW held_out AS
    SELECT count(*) AS held_out_rows,
           log_loss(l.label, softmax3(l.logits)[1], softmax3(l.logits)[2], softmax3(l.logits)[3]) AS raw_log_loss,
           log_loss(l.label, softmax3(calibrate(l.logits, fit.params))[1],
                    softmax3(calibrate(l.logits, fit.params))[2],
                    softmax3(calibrate(l.logits, fit.params))[3]) AS calibrated_log_loss
    FROM all_logits l CROSS JOIN fit
    WHERE l.fold = ${fold} AND l.split = 'valid';

SELECT ${fold} AS fold, '${method}' AS method, fit.params, fit.fit_rows, held_out.*
FROM fit CROSS JOIN held_out;
