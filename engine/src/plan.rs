//! Plan files: DataFusion SQL statements with declared parameters.
//!
//! ```sql
//! -- stage folds
//! -- param k: int = 5       -- number of folds
//! -- param model            -- required: no default (text)
//! -- param extra =          -- empty by default
//! SELECT ... % ${k} ... FROM '${model}';
//! ```
//! `${run_dir}` is always available (from `--run-dir`). Every `${name}` must be declared,
//! and every declared parameter used. A parameter has a type (`int`, `float`, `bool`, or
//! `text` when none is given); values are checked against it before anything runs. Values
//! go into the SQL as literals: inside a quoted string with its quotes doubled, outside one
//! as a number or boolean, or (text) as a quoted string of its own, so no value can change
//! the statement around it.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{EngineError, Result};

pub const RUN_DIR_PARAM: &str = "run_dir";
/// Built in: this process's shard (0-based) and the number of shards (`--shard i/n`, or
/// SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; 0 and 1 otherwise).
pub const SHARD_INDEX_PARAM: &str = "shard_index";
pub const SHARD_COUNT_PARAM: &str = "shard_count";
pub const BUILTIN_PARAMS: [&str; 3] = [RUN_DIR_PARAM, SHARD_INDEX_PARAM, SHARD_COUNT_PARAM];

/// The type of a plan parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Int,
    Float,
    Bool,
    Text,
}

impl ParamType {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "int" => Self::Int,
            "float" => Self::Float,
            "bool" => Self::Bool,
            "text" => Self::Text,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Int => "int",
            Self::Float => "float",
            Self::Bool => "bool",
            Self::Text => "text",
        }
    }

    /// The value in its canonical form, or why it is not one of this type.
    pub fn check(self, value: &str) -> std::result::Result<String, String> {
        let v = value.trim();
        match self {
            Self::Int => v
                .parse::<i64>()
                .map(|n| n.to_string())
                .map_err(|_| format!("{value:?} is not an integer")),
            Self::Float => match v.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(v.to_string()),
                _ => Err(format!("{value:?} is not a finite number")),
            },
            Self::Bool => match v.to_ascii_lowercase().as_str() {
                "true" => Ok("true".into()),
                "false" => Ok("false".into()),
                _ => Err(format!("{value:?} is not true or false")),
            },
            Self::Text => Ok(value.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamDecl {
    pub name: String,
    pub kind: ParamType,
    pub default: Option<String>,
    pub doc: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStatement {
    /// 1-based line of the statement's first token.
    pub line: usize,
    /// The statement without comments, starting at the beginning of `line`.
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct PlanFile {
    pub file: String,
    pub text: String,
    pub stage: String,
    pub params: Vec<ParamDecl>,
    pub statements: Vec<PlanStatement>,
}

fn plan_error(file: &str, line: usize, message: impl Into<String>) -> EngineError {
    EngineError::Plan {
        file: file.to_string(),
        line,
        message: message.into(),
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Splits SQL text into statements at `;`, outside quotes and comments, dropping comments.
pub fn split_statements(text: &str) -> Vec<PlanStatement> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let (mut line, mut start_line) = (1, None);
    let mut chars = text.chars().peekable();
    let mut finish = |current: &mut String, start_line: &mut Option<usize>| {
        if let Some(l) = start_line.take() {
            statements.push(PlanStatement {
                line: l,
                text: current.trim_end().to_string(),
            });
        }
        current.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        if start_line.is_some() {
                            current.push('\n');
                        }
                        break;
                    }
                }
                continue;
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        if start_line.is_some() {
                            current.push('\n');
                        }
                    }
                    if previous == '*' && c == '/' {
                        break;
                    }
                    previous = c;
                }
                if start_line.is_some() {
                    current.push(' ');
                }
                continue;
            }
            ';' => {
                finish(&mut current, &mut start_line);
                continue;
            }
            '\'' | '"' => {
                start_line.get_or_insert(line);
                current.push(c);
                while let Some(q) = chars.next() {
                    current.push(q);
                    if q == '\n' {
                        line += 1;
                    }
                    if q == c {
                        if chars.peek() == Some(&c) {
                            current.push(chars.next().unwrap_or(c));
                        } else {
                            break;
                        }
                    }
                }
                continue;
            }
            '\n' => line += 1,
            c if !c.is_whitespace() => {
                start_line.get_or_insert(line);
            }
            _ => {}
        }
        if start_line.is_some() {
            current.push(c);
        }
    }
    finish(&mut current, &mut start_line);
    statements
}

/// The names of `${name}` references, with their positions.
fn references(text: &str) -> Vec<(usize, &str)> {
    let mut found = Vec::new();
    let mut rest = 0;
    while let Some(at) = text[rest..].find("${") {
        let start = rest + at + 2;
        match text[start..].find('}') {
            Some(end) => {
                found.push((rest + at, &text[start..start + end]));
                rest = start + end + 1;
            }
            None => {
                found.push((rest + at, &text[start..]));
                break;
            }
        }
    }
    found
}

impl PlanFile {
    pub fn load(path: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| plan_error(path, 0, format!("cannot read the plan file: {e}")))?;
        Self::parse(path, &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Self> {
        let stem = std::path::Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plan");
        let mut stage = stem.to_string();
        let mut params: Vec<ParamDecl> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let Some(comment) = raw.trim().strip_prefix("--") else {
                continue;
            };
            let comment = comment.trim();
            if let Some(name) = comment.strip_prefix("stage ") {
                stage = name.trim().to_string();
                if !is_name(&stage) {
                    return Err(plan_error(
                        file,
                        i + 1,
                        format!("stage name {stage:?} must be lower_snake_case"),
                    ));
                }
                continue;
            }
            let Some(decl) = comment.strip_prefix("param ") else {
                continue;
            };
            let (decl, doc) = match decl.find(" -- ") {
                Some(at) => (&decl[..at], Some(decl[at + 4..].trim().to_string())),
                None => (decl, None),
            };
            let (name, default) = match decl.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().to_string())),
                None => (decl.trim(), None),
            };
            let (name, kind) = match name.split_once(':') {
                Some((name, kind)) => match ParamType::parse(kind.trim()) {
                    Some(kind) => (name.trim(), kind),
                    None => {
                        return Err(plan_error(
                            file,
                            i + 1,
                            format!(
                                "parameter {}: unknown type {:?} (int, float, bool or text)",
                                name.trim(),
                                kind.trim()
                            ),
                        ))
                    }
                },
                None => (name, ParamType::Text),
            };
            if !is_name(name) {
                return Err(plan_error(
                    file,
                    i + 1,
                    format!("parameter name {name:?} must be lower_snake_case"),
                ));
            }
            if BUILTIN_PARAMS.contains(&name) {
                return Err(plan_error(
                    file,
                    i + 1,
                    format!(
                        "{name} is built in (set it with --run-dir or --shard); do not declare it"
                    ),
                ));
            }
            if let Some(first) = params.iter().find(|p| p.name == name) {
                return Err(plan_error(
                    file,
                    i + 1,
                    format!(
                        "parameter {name} is declared twice (first on line {})",
                        first.line
                    ),
                ));
            }
            if let Some(default) = default.as_deref().filter(|d| !d.contains("${")) {
                if let Err(why) = kind.check(default) {
                    return Err(plan_error(
                        file,
                        i + 1,
                        format!("parameter {name}: the default {why}"),
                    ));
                }
            }
            params.push(ParamDecl {
                name: name.to_string(),
                kind,
                default,
                doc,
                line: i + 1,
            });
        }
        let statements = split_statements(text);
        if statements.is_empty() {
            return Err(plan_error(file, 1, "the plan has no SQL statements"));
        }
        let mut used = BTreeSet::new();
        for statement in &statements {
            for (offset, name) in references(&statement.text) {
                let line = statement.line + statement.text[..offset].matches('\n').count();
                if !BUILTIN_PARAMS.contains(&name) && !params.iter().any(|p| p.name == name) {
                    return Err(plan_error(file, line, format!("${{{name}}} is not a declared parameter (declare it with `-- param {name} = DEFAULT`)")));
                }
                used.insert(name);
            }
        }
        if let Some(unused) = params.iter().find(|p| !used.contains(p.name.as_str())) {
            return Err(plan_error(
                file,
                unused.line,
                format!("parameter {} is declared but never used", unused.name),
            ));
        }
        Ok(Self {
            file: file.to_string(),
            text: text.to_string(),
            stage,
            params,
            statements,
        })
    }

    /// Whether the plan picks its rows by shard (`${shard_index}`).
    pub fn uses_shard(&self) -> bool {
        self.statements.iter().any(|s| {
            references(&s.text)
                .iter()
                .any(|(_, name)| *name == SHARD_INDEX_PARAM)
        })
    }

    pub fn declares(&self, name: &str) -> bool {
        self.params.iter().any(|p| p.name == name)
    }

    /// Parameter values: `--set` values over defaults. Every `--set` must name a declared
    /// parameter and every parameter must end up with a value.
    pub fn resolve(&self, sets: &[(String, String)]) -> Result<BTreeMap<String, String>> {
        let mut values = BTreeMap::new();
        for (name, value) in sets {
            if !self.declares(name) {
                let known: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                return Err(plan_error(
                    &self.file,
                    0,
                    format!(
                        "--set {name}: {} declares no such parameter (it has: {})",
                        self.file,
                        known.join(", ")
                    ),
                ));
            }
            values.insert(name.clone(), value.clone());
        }
        for param in &self.params {
            if let Some(value) = values.get_mut(&param.name) {
                *value = param.kind.check(value).map_err(|why| {
                    plan_error(
                        &self.file,
                        param.line,
                        format!(
                            "--set {}: {why} ({} is {} {})",
                            param.name,
                            param.name,
                            if param.kind == ParamType::Int {
                                "an"
                            } else {
                                "a"
                            },
                            param.kind.name()
                        ),
                    )
                })?;
            }
        }
        for param in &self.params {
            if !values.contains_key(&param.name) {
                match &param.default {
                    Some(default) => {
                        values.insert(param.name.clone(), default.clone());
                    }
                    None => {
                        return Err(plan_error(&self.file, param.line, format!("parameter {} has no default and was not given: pass --set {}=VALUE", param.name, param.name)));
                    }
                }
            }
        }
        Ok(values)
    }

    /// The type of parameter `name` (built-ins included).
    fn kind_of(&self, name: &str) -> ParamType {
        match name {
            SHARD_INDEX_PARAM | SHARD_COUNT_PARAM => ParamType::Int,
            _ => self
                .params
                .iter()
                .find(|p| p.name == name)
                .map_or(ParamType::Text, |p| p.kind),
        }
    }

    /// A statement's text with each `${name}` replaced by its value as a literal: inside a
    /// quoted string with its quotes doubled; outside one as it is for numbers and booleans
    /// (checked by [`PlanFile::resolve`]) and as a quoted string for text. `run_dir` comes
    /// with the values.
    pub fn substitute(
        &self,
        statement: &PlanStatement,
        values: &BTreeMap<String, String>,
    ) -> Result<String> {
        let text = &statement.text;
        let mut out = String::with_capacity(text.len());
        let (mut rest, mut quoted) = (0, false);
        for (offset, name) in references(text) {
            let value = values.get(name).ok_or_else(|| {
                plan_error(
                    &self.file,
                    statement.line,
                    format!("${{{name}}} has no value"),
                )
            })?;
            let before = &text[rest..offset];
            quoted ^= before.matches('\'').count() % 2 == 1;
            out.push_str(before);
            let escaped = value.replace('\'', "''");
            match (quoted, self.kind_of(name)) {
                (true, _) => out.push_str(&escaped),
                (false, ParamType::Text) => {
                    out.push('\'');
                    out.push_str(&escaped);
                    out.push('\'');
                }
                (false, _) => out.push_str(value),
            }
            rest = offset + name.len() + 3;
        }
        out.push_str(&text[rest.min(text.len())..]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = "-- param k = 5 -- number of folds\n-- param model\n\nSELECT ${k}; -- trailing\n/* block\n */ SELECT ';${model}'\n  ;\n";

    #[test]
    fn splits_statements_with_their_lines() {
        let plan = PlanFile::parse("p.sql", PLAN).unwrap();
        let lines: Vec<usize> = plan.statements.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![4, 6]);
        assert_eq!(plan.params[0].doc.as_deref(), Some("number of folds"));
        let values = plan.resolve(&[("model".into(), "m".into())]).unwrap();
        assert_eq!(
            plan.substitute(&plan.statements[1], &values).unwrap(),
            "SELECT ';m'"
        );
    }

    #[test]
    fn values_are_typed_and_go_in_as_literals() {
        let plan = PlanFile::parse(
            "p.sql",
            "-- param fold: int = 0\n-- param path\n-- param name = x\n\
             SELECT * FROM t('${path}', ${fold}) WHERE name = ${name} AND '${path}' <> '';",
        )
        .unwrap();
        let set = |fold: &str, path: &str| {
            plan.resolve(&[("fold".into(), fold.into()), ("path".into(), path.into())])
        };
        let bad = set("abc", "p").unwrap_err().to_string();
        assert!(
            bad.contains("p.sql:1: --set fold: \"abc\" is not an integer (fold is an int)"),
            "{bad}"
        );
        let mut values = set(" 3", "it's', on_error => 'skip").unwrap();
        values.insert("name".into(), "o'brien".into());
        assert_eq!(
            plan.substitute(&plan.statements[0], &values).unwrap(),
            "SELECT * FROM t('it''s'', on_error => ''skip', 3) WHERE name = 'o''brien' AND 'it''s'', on_error => ''skip' <> ''"
        );
        let wrong_default = PlanFile::parse("p.sql", "-- param k: int = five\nSELECT ${k};")
            .unwrap_err()
            .to_string();
        assert!(
            wrong_default.contains("p.sql:1: parameter k: the default \"five\" is not an integer"),
            "{wrong_default}"
        );
        let unknown = PlanFile::parse("p.sql", "-- param k: number = 5\nSELECT ${k};")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown type \"number\""), "{unknown}");
    }

    #[test]
    fn parameter_mistakes_are_errors() {
        let plan = PlanFile::parse("p.sql", PLAN).unwrap();
        assert!(plan
            .resolve(&[])
            .unwrap_err()
            .to_string()
            .contains("p.sql:2: parameter model has no default"));
        assert!(plan.resolve(&[("m0del".into(), "x".into())]).is_err());
        let undeclared = PlanFile::parse("p.sql", "SELECT 1;\nSELECT ${x};")
            .unwrap_err()
            .to_string();
        assert!(
            undeclared.starts_with("p.sql:2: ${x} is not a declared parameter"),
            "{undeclared}"
        );
        let unused = PlanFile::parse("p.sql", "-- param x = 1\nSELECT 1;")
            .unwrap_err()
            .to_string();
        assert!(
            unused.contains("p.sql:1: parameter x is declared but never used"),
            "{unused}"
        );
    }
}
