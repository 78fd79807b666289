//! The one argument parser of arenaflow's SQL table functions (the operators and the
//! engine's readers): literal arguments by position, checked against the function's usage
//! line, the input table by name, and the input files recorded for the run manifest.

use std::sync::Arc;

use datafusion::catalog::{Session, TableFunctionArgs, TableProvider};
use datafusion::common::{plan_err, Result, ScalarValue, TableReference};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;

use crate::run_state::RunInputs;

/// The arguments of one table-function call. `usage` is the function's usage line, e.g.
/// `tokenize(table, tokenizer, template, max_length [, truncation])`: the names before the
/// first `[` are required, and the line says how many there may be at most.
pub struct Args<'a> {
    usage: &'static str,
    exprs: &'a [Expr],
    session: &'a dyn Session,
}

impl<'a> Args<'a> {
    pub fn new(usage: &'static str, args: &TableFunctionArgs<'a, 'a>) -> Result<Self> {
        let exprs = args.exprs();
        let (required, most) = arity(usage);
        if exprs.len() < required || exprs.len() > most {
            return plan_err!("{usage}: got {} arguments", exprs.len());
        }
        Ok(Self {
            usage,
            exprs,
            session: args.session(),
        })
    }

    /// The function's name, from its usage line.
    pub fn function(&self) -> &'static str {
        self.usage.split('(').next().unwrap_or(self.usage)
    }

    /// Whether argument `i` was given.
    pub fn has(&self, i: usize) -> bool {
        i < self.exprs.len()
    }

    /// A string literal at `i` (a required argument, or None when left out).
    pub fn string(&self, i: usize, name: &str) -> Result<Option<String>> {
        match self.exprs.get(i) {
            None => Ok(None),
            Some(Expr::Literal(
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)),
                _,
            )) => Ok(Some(s.clone())),
            Some(other) => plan_err!(
                "{}: {name} must be a string literal, got {other}",
                self.function()
            ),
        }
    }

    /// A required string literal at `i` ([`Args::new`] checked that it is there).
    pub fn required_string(&self, i: usize, name: &str) -> Result<String> {
        match self.string(i, name)? {
            Some(s) => Ok(s),
            None => plan_err!("{}: {name} is required", self.usage),
        }
    }

    /// An integer literal at `i`, at least `min`.
    pub fn integer(&self, i: usize, name: &str, min: i64) -> Result<Option<i64>> {
        match self.exprs.get(i) {
            None => Ok(None),
            Some(Expr::Literal(ScalarValue::Int64(Some(n)), _)) if *n >= min => Ok(Some(*n)),
            Some(other) => {
                let kind = match min {
                    0 => "a non-negative integer literal".to_string(),
                    1 => "a positive integer literal".to_string(),
                    m => format!("an integer literal of at least {m}"),
                };
                plan_err!("{}: {name} must be {kind}, got {other}", self.function())
            }
        }
    }

    /// A number literal at `i` between 0 and 1 (a share).
    pub fn fraction(&self, i: usize, name: &str) -> Result<Option<f64>> {
        let value = match self.exprs.get(i) {
            None => return Ok(None),
            Some(Expr::Literal(ScalarValue::Float64(Some(x)), _)) => Some(*x),
            Some(Expr::Literal(ScalarValue::Int64(Some(n)), _)) => Some(*n as f64),
            Some(_) => None,
        };
        match value {
            Some(x) if (0.0..=1.0).contains(&x) => Ok(Some(x)),
            _ => plan_err!(
                "{}: {name} must be a number from 0 to 1, got {}",
                self.function(),
                self.exprs[i]
            ),
        }
    }

    /// A positive integer literal at `i` (a count or a size).
    pub fn count(&self, i: usize, name: &str) -> Result<Option<usize>> {
        Ok(self.integer(i, name, 1)?.map(|n| n as usize))
    }

    /// A non-negative integer literal at `i`.
    pub fn size(&self, i: usize, name: &str) -> Result<Option<usize>> {
        Ok(self.integer(i, name, 0)?.map(|n| n as usize))
    }

    /// A string literal at `i` that must be one of `choices` (by name).
    pub fn choice<T: Copy>(
        &self,
        i: usize,
        name: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>> {
        let Some(given) = self.string(i, name)? else {
            return Ok(None);
        };
        match choices.iter().find(|(n, _)| *n == given) {
            Some((_, value)) => Ok(Some(*value)),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("'{n}'")).collect();
                plan_err!(
                    "{}: {name} must be {}, got '{given}'",
                    self.function(),
                    names.join(" or ")
                )
            }
        }
    }

    /// The table or view named by the string at `i`. Registered tables and views resolve
    /// at once, so blocking on the catalog's lookup does not stall planning.
    pub fn table(&self, i: usize) -> Result<Arc<dyn TableProvider>> {
        let name = self.required_string(i, "table")?;
        let Some(state) = self.session.as_any().downcast_ref::<SessionState>() else {
            return plan_err!("{}: not called from a SQL session", self.function());
        };
        let reference = TableReference::from(name.as_str());
        let provider = futures::executor::block_on(async {
            state
                .schema_for_ref(reference.clone())?
                .table(reference.table())
                .await
        })?;
        match provider {
            Some(input) => Ok(input),
            None => plan_err!("{}: no table or view named {name}", self.function()),
        }
    }

    /// Notes a file the call reads, for the run manifest's input hashes.
    pub fn record_input(&self, location: &str) {
        if let Some(inputs) = self.session.config().get_extension::<RunInputs>() {
            inputs.record(location);
        }
    }
}

/// (required, at most) arguments of a usage line.
fn arity(usage: &str) -> (usize, usize) {
    let inner = usage
        .split_once('(')
        .map_or("", |(_, rest)| rest.trim_end_matches(')'));
    let names = |text: &str| text.split(',').filter(|n| !n.trim().is_empty()).count();
    let required = names(inner.split('[').next().unwrap_or(""));
    let most = names(&inner.replace(['[', ']'], ""));
    (required, most)
}

#[cfg(test)]
mod tests {
    use super::arity;

    #[test]
    fn arity_from_usage_lines() {
        assert_eq!(
            arity("tokenize(table, tokenizer, template, max_length [, truncation [, order [, prompt_cap]]])"),
            (4, 7)
        );
        assert_eq!(arity("hh_rlhf(path, seed [, on_error])"), (2, 3));
        assert_eq!(arity("arena_csv(path [, source [, on_error]])"), (1, 3));
        assert_eq!(arity("pandalm(path [, on_error])"), (1, 2));
    }
}
