//! Recipes: the whole pipeline as one file (TOML) listing plan files in order with one set
//! of parameters.
//!
//! ```toml
//! description = "..."
//!
//! [params]                      # the recipe's knobs; --set overrides them
//! k = 5
//! folds = "${run_dir}/folds/k${k}_seed2025_swaptrue/"   # may name other parameters
//! model = ".models/teacher.gguf"
//! teacher_steps = 40
//!
//! [[stages]]
//! plan = "../plans/prepare.sql"   # relative to the recipe file
//!
//! [[stages]]
//! plan = "../plans/train_teacher.sql"
//! per_fold = true                 # once per fold 0..k-1, with fold=N
//! set = { model_name = "teacher", max_steps = "${teacher_steps}" }
//! ```
//!
//! Plan paths are relative to the recipe file; paths in parameter values (data, models)
//! are used as they are, relative to the directory `arenaflow` runs in, as on the command
//! line.
//!
//! A stage's plan gets, for each parameter it declares: the stage's own `set` value (where
//! `${name}` names a recipe parameter, or `fold` in a per-fold stage; `${run_dir}` is left
//! for the plan), else the recipe parameter of that name, else a `--set` of a plan
//! parameter no recipe parameter has (for every stage that does not set it itself), else
//! the plan's default. Every recipe parameter must reach some stage, every `--set` must
//! name a knob, and every stage's values are checked against its plan's types before the
//! first stage runs. Running a recipe again runs each stage again, and each of its outputs
//! that is up to date is skipped (the runner's manifest): after kill -9 anywhere the same
//! command finishes the work and gives the same result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use crate::error::{EngineError, Result};
use crate::plan::{PlanFile, BUILTIN_PARAMS};

/// The parameter a per-fold stage gets the fold number in.
pub const FOLD_PARAM: &str = "fold";
/// The recipe parameter that says how many folds per-fold stages run.
pub const FOLDS_PARAM: &str = "k";

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeText {
    description: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    stages: Vec<StageText>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StageText {
    plan: String,
    #[serde(default)]
    per_fold: bool,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
}

/// One stage: a plan, run once or once per fold, with values of its own.
#[derive(Debug, Clone)]
pub struct Stage {
    pub plan: PlanFile,
    pub per_fold: bool,
    /// The stage's own values, `${...}` not yet expanded.
    pub sets: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Recipe {
    pub file: String,
    pub description: Option<String>,
    pub params: BTreeMap<String, String>,
    pub stages: Vec<Stage>,
}

/// One plan run of a recipe: stage `stage` (index), for `fold` if per fold, with the
/// values its plan gets.
#[derive(Debug, Clone)]
pub struct StageRun {
    pub stage: usize,
    pub fold: Option<u32>,
    pub sets: Vec<(String, String)>,
}

fn recipe_error(file: &str, message: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("recipe {file}: {message}"))
}

/// A TOML value as a parameter's text.
fn value_text(file: &str, name: &str, value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => {
            return Err(recipe_error(
                file,
                format!(
                    "{name}: a value is a string, a number or a boolean, not {other:?} (a {})",
                    other.type_str()
                ),
            ))
        }
    })
}

/// The `${name}` references of a text.
fn references(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        names.push(&after[..end]);
        rest = &after[end + 1..];
    }
    names
}

impl Recipe {
    /// Whether `path` names a recipe (a `.toml` file) rather than a plan.
    pub fn is_recipe(path: &str) -> bool {
        path.ends_with(".toml")
    }

    pub fn load(path: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Invalid(format!("recipe {path}: {e}")))?;
        let parsed: RecipeText = toml::from_str(&text).map_err(|e| recipe_error(path, e))?;
        let dir = Path::new(path).parent().unwrap_or(Path::new(""));
        let mut params = BTreeMap::new();
        for (name, value) in &parsed.params {
            if BUILTIN_PARAMS.contains(&name.as_str()) || name == FOLD_PARAM {
                return Err(recipe_error(
                    path,
                    format!("[params] {name}: set by the runner, not by a recipe"),
                ));
            }
            params.insert(name.clone(), value_text(path, name, value)?);
        }
        for (name, value) in &params {
            for reference in references(value) {
                if !params.contains_key(reference) && !BUILTIN_PARAMS.contains(&reference) {
                    return Err(recipe_error(
                        path,
                        format!("[params] {name} = {value:?} names ${{{reference}}}, which is not a recipe parameter"),
                    ));
                }
            }
        }
        if parsed.stages.is_empty() {
            return Err(recipe_error(path, "no [[stages]]"));
        }
        let mut stages = Vec::new();
        for (i, stage) in parsed.stages.iter().enumerate() {
            let plan_path = normalize(&dir.join(&stage.plan));
            let plan = PlanFile::load(&plan_path.display().to_string()).map_err(|e| {
                recipe_error(path, format!("stage {} ({}): {e}", i + 1, stage.plan))
            })?;
            let mut sets = BTreeMap::new();
            for (name, value) in &stage.set {
                if !plan.declares(name) {
                    return Err(recipe_error(
                        path,
                        format!(
                            "stage {} sets {name}, which {} does not declare",
                            i + 1,
                            plan.file
                        ),
                    ));
                }
                let value = value_text(path, name, value)?;
                for reference in references(&value) {
                    let known = params.contains_key(reference)
                        || BUILTIN_PARAMS.contains(&reference)
                        || (stage.per_fold && reference == FOLD_PARAM);
                    if !known {
                        return Err(recipe_error(
                            path,
                            format!(
                                "stage {} ({}): {name} = {value:?} names ${{{reference}}}, which is not a recipe parameter{}",
                                i + 1,
                                plan.file,
                                if reference == FOLD_PARAM { " (fold exists in per_fold stages)" } else { "" }
                            ),
                        ));
                    }
                }
                sets.insert(name.clone(), value);
            }
            if stage.per_fold && !plan.declares(FOLD_PARAM) {
                return Err(recipe_error(
                    path,
                    format!(
                        "stage {} runs per fold, but {} has no parameter {FOLD_PARAM}",
                        i + 1,
                        plan.file
                    ),
                ));
            }
            stages.push(Stage {
                plan,
                per_fold: stage.per_fold,
                sets,
            });
        }
        let recipe = Self {
            file: path.to_string(),
            description: parsed.description,
            params,
            stages,
        };
        for name in recipe.params.keys() {
            if !recipe.uses(name) {
                return Err(recipe_error(
                    path,
                    format!("[params] {name} reaches no stage: no stage's plan declares it (without setting it itself) and no stage's set names ${{{name}}}"),
                ));
            }
        }
        Ok(recipe)
    }

    /// Whether recipe parameter `name` reaches a stage, directly or through a recipe
    /// parameter that does.
    fn uses(&self, name: &str) -> bool {
        let direct = |name: &str| {
            (name == FOLDS_PARAM && self.stages.iter().any(|s| s.per_fold))
                || self.stages.iter().any(|s| {
                    (s.plan.declares(name) && !s.sets.contains_key(name))
                        || s.sets.values().any(|v| references(v).contains(&name))
                })
        };
        let mut seen = vec![name.to_string()];
        let mut next = 0;
        while next < seen.len() {
            let current = seen[next].clone();
            next += 1;
            if direct(&current) {
                return true;
            }
            for (other, value) in &self.params {
                if references(value).contains(&current.as_str()) && !seen.contains(other) {
                    seen.push(other.clone());
                }
            }
        }
        false
    }

    /// A recipe parameter that names itself through others (`a = "${b}"`, `b = "${a}"`).
    fn cycle(params: &BTreeMap<String, String>) -> Option<String> {
        fn visit<'a>(
            name: &'a str,
            params: &'a BTreeMap<String, String>,
            path: &mut Vec<&'a str>,
        ) -> Option<String> {
            if path.contains(&name) {
                return Some(name.to_string());
            }
            let value = params.get(name)?;
            path.push(name);
            for reference in references(value) {
                if let Some(found) = visit(reference, params, path) {
                    return Some(found);
                }
            }
            path.pop();
            None
        }
        params
            .keys()
            .find_map(|name| visit(name, params, &mut Vec::new()))
    }

    /// Every plan run, in order, with its values: the recipe's parameters with `overrides`
    /// (`--set`) applied. Checks every run's values against its plan before returning.
    pub fn runs(&self, overrides: &[(String, String)]) -> Result<Vec<StageRun>> {
        let mut params = self.params.clone();
        let mut plan_sets: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in overrides {
            if name == FOLD_PARAM && self.stages.iter().any(|s| s.per_fold) {
                return Err(recipe_error(
                    &self.file,
                    format!("--set {FOLD_PARAM}={value}: per-fold stages run every fold 0..k-1; run one fold with the stage's plan instead"),
                ));
            }
            if params.contains_key(name) {
                params.insert(name.clone(), value.clone());
                continue;
            }
            let declaring: Vec<&Stage> = self
                .stages
                .iter()
                .filter(|s| s.plan.declares(name))
                .collect();
            if declaring.is_empty() {
                return Err(recipe_error(
                    &self.file,
                    format!(
                        "--set {name}: neither a recipe parameter nor a parameter of its plans (arenaflow describe {} lists them)",
                        self.file
                    ),
                ));
            }
            if declaring.iter().all(|s| s.sets.contains_key(name)) {
                let sources: Vec<String> = declaring
                    .iter()
                    .map(|s| format!("{} sets {name} = {:?}", s.plan.file, s.sets[name]))
                    .collect();
                return Err(recipe_error(
                    &self.file,
                    format!(
                        "--set {name}: every stage that has it sets it itself ({}); set the recipe parameter it names",
                        sources.join("; ")
                    ),
                ));
            }
            plan_sets.insert(name.clone(), value.clone());
        }
        // A recipe parameter may name others (`folds = "${run_dir}/folds/k${k}/"`).
        if let Some(name) = Self::cycle(&params) {
            return Err(recipe_error(
                &self.file,
                format!(
                    "[params] {name} = {:?} names itself through other parameters",
                    params[&name]
                ),
            ));
        }
        for _ in 0..params.len() {
            let snapshot = params.clone();
            for value in params.values_mut() {
                *value = expand(value, &snapshot, None);
            }
        }
        let folds = if self.stages.iter().any(|s| s.per_fold) {
            let Some(k) = params.get(FOLDS_PARAM) else {
                return Err(recipe_error(
                    &self.file,
                    format!("per_fold stages need the recipe parameter {FOLDS_PARAM} (the number of folds)"),
                ));
            };
            match k.trim().parse::<u32>() {
                Ok(k) if k >= 2 => k,
                _ => {
                    return Err(recipe_error(
                        &self.file,
                        format!("{FOLDS_PARAM} = {k:?}: expected a number of folds, at least 2"),
                    ))
                }
            }
        } else {
            0
        };
        let mut runs = Vec::new();
        for (index, stage) in self.stages.iter().enumerate() {
            let folds: Vec<Option<u32>> = if stage.per_fold {
                (0..folds).map(Some).collect()
            } else {
                vec![None]
            };
            for fold in folds {
                let mut sets = Vec::new();
                for param in &stage.plan.params {
                    let name = &param.name;
                    let value = if let Some(value) = stage.sets.get(name) {
                        Some(expand(value, &params, fold))
                    } else if stage.per_fold && name == FOLD_PARAM {
                        fold.map(|f| f.to_string())
                    } else if let Some(value) = params.get(name) {
                        Some(value.clone())
                    } else {
                        plan_sets.get(name).cloned()
                    };
                    if let Some(value) = value {
                        sets.push((name.clone(), value));
                    }
                }
                stage.plan.resolve(&sets).map_err(|e| {
                    recipe_error(
                        &self.file,
                        format!("stage {}{}: {e}", index + 1, fold_text(fold)),
                    )
                })?;
                runs.push(StageRun {
                    stage: index,
                    fold,
                    sets,
                });
            }
        }
        Ok(runs)
    }
}

impl Recipe {
    /// The stage numbers (1-based, as `describe` lists them) of a selection such as
    /// `1-3,7,9-12`: `--stages` runs only those stages of a recipe (their outputs' inputs
    /// must exist, made by an earlier run of the same run directory or among the stages).
    pub fn select_stages(&self, text: &str) -> Result<BTreeSet<usize>> {
        let count = self.stages.len();
        let numbers = parse_list(text, "stage", 1, count).map_err(|(part, why)| {
            recipe_error(
                &self.file,
                format!("--stages {text}: {part:?} {why} (stage numbers 1-{count}, e.g. 1-3,7)"),
            )
        })?;
        Ok(numbers.into_iter().collect())
    }

    /// The folds (0-based) of a selection such as `0-2,4` among a recipe's `runs`:
    /// `--folds` runs its per-fold stages for those folds only (its other stages as
    /// selected), e.g. one fold per call where a machine is lent for minutes at a time.
    pub fn select_folds(&self, text: &str, runs: &[StageRun]) -> Result<BTreeSet<u32>> {
        let Some(k) = runs
            .iter()
            .filter_map(|r| r.fold)
            .max()
            .map(|f| f as usize + 1)
        else {
            return Err(recipe_error(
                &self.file,
                format!("--folds {text}: the recipe has no per_fold stage"),
            ));
        };
        let folds = parse_list(text, "fold", 0, k - 1).map_err(|(part, why)| {
            recipe_error(
                &self.file,
                format!(
                    "--folds {text}: {part:?} {why} (folds 0-{}, e.g. 0-2,4)",
                    k - 1
                ),
            )
        })?;
        Ok(folds.into_iter().map(|f| f as u32).collect())
    }
}

/// The numbers of a list such as `1-3,7` between `least` and `most`, or the part that is
/// wrong and why.
fn parse_list(
    text: &str,
    noun: &str,
    least: usize,
    most: usize,
) -> std::result::Result<Vec<usize>, (String, String)> {
    let mut selected = Vec::new();
    for part in text.split(',').map(str::trim) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let bad = |why: &str| (part.to_string(), why.to_string());
        let number = |n: &str| {
            let n = n.trim();
            let digits = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
            match n.parse::<usize>() {
                Ok(n) if digits && (least..=most).contains(&n) => Ok(n),
                Ok(n) if digits && n > most => {
                    Err(bad(&format!("goes past the last {noun} ({most})")))
                }
                _ => Err(bad("is not a number or range")),
            }
        };
        let (first, last) = (number(first)?, number(last)?);
        if first > last {
            return Err(bad("runs backwards"));
        }
        selected.extend(first..=last);
    }
    Ok(selected)
}

/// `path` without `.` and with `dir/..` removed (`recipes/../plans/a.sql` is
/// `plans/a.sql`), as the plan's name in output and manifest.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// ` (fold N)` or nothing.
pub fn fold_text(fold: Option<u32>) -> String {
    fold.map_or(String::new(), |f| format!(" (fold {f})"))
}

/// `value` with each `${name}` of a recipe parameter (and `${fold}`) replaced; built-ins
/// are left for the plan.
fn expand(value: &str, params: &BTreeMap<String, String>, fold: Option<u32>) -> String {
    let mut out = value.to_string();
    for name in references(value) {
        let replacement = match (params.get(name), fold) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) if name == FOLD_PARAM => f.to_string(),
            _ => continue,
        };
        out = out.replace(&format!("${{{name}}}"), &replacement);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.sql",
            "-- stage a\n-- param k: int = 5 -- folds\n-- param rows: int = 10 -- rows\nSELECT ${k}, ${rows};\n",
        );
        write(
            dir.path(),
            "b.sql",
            "-- stage b\n-- param fold: int -- the fold\n-- param name = x -- a name\n-- param steps: int = 1 -- steps\nSELECT ${fold}, ${name}, ${steps};\n",
        );
        dir
    }

    #[test]
    fn stages_select_by_number_and_range_and_reject_what_is_not_a_stage() {
        let dir = setup();
        let file = write(
            dir.path(),
            "r.toml",
            "[params]\nk = 2\n\n[[stages]]\nplan = \"a.sql\"\n\n[[stages]]\nplan = \"b.sql\"\nper_fold = true\n\n[[stages]]\nplan = \"a.sql\"\n",
        );
        let recipe = Recipe::load(&file).unwrap();
        let picked = |text: &str| {
            recipe
                .select_stages(text)
                .map(|s| s.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(picked("1-2").unwrap(), vec![1, 2]);
        assert_eq!(picked("3, 1").unwrap(), vec![1, 3]);
        assert_eq!(picked("2-2,2").unwrap(), vec![2]);
        for bad in ["0", "4", "1-4", "3-1", "a", "", "1,,2", "+3"] {
            let error = picked(bad).unwrap_err().to_string();
            assert!(
                error.contains("--stages") && error.contains("1-3"),
                "{bad}: {error}"
            );
        }
        let past = picked("2-9").unwrap_err().to_string();
        assert!(past.contains("goes past the last stage (3)"), "{past}");

        let runs = recipe.runs(&[]).unwrap();
        let folds = |text: &str| {
            recipe
                .select_folds(text, &runs)
                .map(|s| s.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(folds("1").unwrap(), vec![1]);
        assert_eq!(folds("1,0").unwrap(), vec![0, 1]);
        assert_eq!(folds("0-1").unwrap(), vec![0, 1]);
        for bad in ["2", "0-2", "1-0", "x", ""] {
            let error = folds(bad).unwrap_err().to_string();
            assert!(
                error.contains("--folds") && error.contains("folds 0-1"),
                "{bad}: {error}"
            );
        }
        let no_folds = write(dir.path(), "plain.toml", "[[stages]]\nplan = \"a.sql\"\n");
        let plain = Recipe::load(&no_folds).unwrap();
        let error = plain
            .select_folds("0", &plain.runs(&[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no per_fold stage"), "{error}");
    }

    fn sets(run: &StageRun) -> BTreeMap<&str, &str> {
        run.sets
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn stages_get_recipe_parameters_their_own_values_and_one_run_per_fold() {
        let dir = setup();
        let path = write(
            dir.path(),
            "r.toml",
            "[params]\nk = 3\nteacher_steps = 7\nrows = \"${k}0\"\n\n[[stages]]\nplan = \"a.sql\"\n\n[[stages]]\nplan = \"b.sql\"\nper_fold = true\nset = { name = \"teacher_${fold}\", steps = \"${teacher_steps}\" }\n",
        );
        let recipe = Recipe::load(&path).unwrap();
        let runs = recipe.runs(&[]).unwrap();
        assert_eq!(runs.len(), 4);
        assert_eq!(sets(&runs[0]), BTreeMap::from([("k", "3"), ("rows", "30")]));
        assert_eq!(
            sets(&runs[3]),
            BTreeMap::from([("fold", "2"), ("name", "teacher_2"), ("steps", "7")])
        );
        let runs = recipe
            .runs(&[
                ("teacher_steps".into(), "9".into()),
                ("k".into(), "2".into()),
            ])
            .unwrap();
        assert_eq!(runs.len(), 3);
        assert_eq!(sets(&runs[0]), BTreeMap::from([("k", "2"), ("rows", "20")]));
        assert_eq!(sets(&runs[1])["steps"], "9");
    }

    #[test]
    fn mistakes_are_named_before_anything_runs() {
        let dir = setup();
        let recipe = |text: &str| Recipe::load(&write(dir.path(), "r.toml", text));
        let stage_b = "[[stages]]\nplan = \"b.sql\"\nper_fold = true\n";
        let error = recipe(&format!("[params]\nk = 3\nunused = 1\n{stage_b}")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("[params] unused reaches no stage"),
            "{error}"
        );
        let error =
            recipe(&format!("[params]\nk = 3\n{stage_b}set = {{ nope = 1 }}\n")).unwrap_err();
        assert!(error.to_string().contains("sets nope, which"), "{error}");
        let error = recipe(&format!(
            "[params]\nk = 3\n{stage_b}set = {{ name = \"${{who}}\" }}\n"
        ))
        .unwrap_err();
        assert!(error.to_string().contains("names ${who}"), "{error}");
        let error = recipe("[[stages]]\nplan = \"a.sql\"\nper_fold = true\n").unwrap_err();
        assert!(
            error.to_string().contains("has no parameter fold"),
            "{error}"
        );

        let ok = recipe(&format!(
            "[params]\nk = 3\n{stage_b}set = {{ name = \"t\" }}\n"
        ))
        .unwrap();
        let error = ok.runs(&[("nope".into(), "1".into())]).unwrap_err();
        assert!(error.to_string().contains("--set nope: neither"), "{error}");
        let error = ok.runs(&[("name".into(), "1".into())]).unwrap_err();
        assert!(error.to_string().contains("sets it itself"), "{error}");
        let error = ok.runs(&[("steps".into(), "many".into())]).unwrap_err();
        assert!(error.to_string().contains("stage 1 (fold 0)"), "{error}");
        let error = ok.runs(&[("k".into(), "1".into())]).unwrap_err();
        assert!(error.to_string().contains("at least 2"), "{error}");
        let error = ok.runs(&[("fold".into(), "1".into())]).unwrap_err();
        assert!(
            error.to_string().contains("per-fold stages run every fold"),
            "{error}"
        );
        // A parameter that reaches a stage only through another one is used.
        recipe(&format!(
            "[params]\nk = 3\nbase = \"7\"\nsteps = \"${{base}}\"\n{stage_b}"
        ))
        .unwrap();

        let cycle = recipe(&format!("[params]\nk = 3\nsteps = \"${{rows}}\"\nrows = \"${{steps}}\"\n{stage_b}\n[[stages]]\nplan = \"a.sql\"\n")).unwrap();
        let error = cycle.runs(&[]).unwrap_err();
        assert!(error.to_string().contains("names itself"), "{error}");
    }
}
