//! What the operators' SQL table functions share: literal arguments, the input table by
//! name, and projection over an operator's output.

use std::sync::{Arc, Weak};

use datafusion::catalog::TableProvider;
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::ExecutionPlan;

/// A string literal argument of `function`.
pub fn string_arg(function: &str, what: &str, expr: &Expr) -> Result<String> {
    match expr {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
            _,
        ) => Ok(s.clone()),
        other => plan_err!("{function}: {what} must be a string literal, got {other}"),
    }
}

/// A positive integer literal argument of `function`.
pub fn count_arg(function: &str, what: &str, expr: &Expr) -> Result<usize> {
    match expr {
        Expr::Literal(ScalarValue::Int64(Some(n)), _) if *n > 0 => Ok(*n as usize),
        other => plan_err!("{function}: {what} must be a positive integer literal, got {other}"),
    }
}

/// A non-negative integer literal argument of `function`.
pub fn size_arg(function: &str, what: &str, expr: &Expr) -> Result<usize> {
    match expr {
        Expr::Literal(ScalarValue::Int64(Some(n)), _) if *n >= 0 => Ok(*n as usize),
        other => {
            plan_err!("{function}: {what} must be a non-negative integer literal, got {other}")
        }
    }
}

/// The table or view `name` of the session. Registered tables and views resolve at once,
/// so blocking on the lookup does not stall planning.
pub fn resolve_table(
    function: &str,
    state: &Weak<parking_lot::RwLock<SessionState>>,
    name: &str,
) -> Result<Arc<dyn TableProvider>> {
    let Some(state) = state.upgrade() else {
        return exec_err!("{function}: the session is gone");
    };
    let state = state.read().clone();
    let reference = datafusion::common::TableReference::from(name);
    let provider = futures::executor::block_on(async {
        state
            .schema_for_ref(reference.clone())?
            .table(reference.table())
            .await
    })?;
    match provider {
        Some(input) => Ok(input),
        None => plan_err!("{function}: no table or view named {name}"),
    }
}

/// `exec` with only the `projection` columns, as a table provider's scan returns it.
pub fn project(
    exec: Arc<dyn ExecutionPlan>,
    projection: Option<&Vec<usize>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(columns) = projection else {
        return Ok(exec);
    };
    let schema = exec.schema();
    let exprs = columns
        .iter()
        .map(|&i| {
            let name = schema.field(i).name().clone();
            let column: Arc<dyn PhysicalExpr> = Arc::new(
                datafusion::physical_expr::expressions::Column::new(&name, i),
            );
            (column, name)
        })
        .collect::<Vec<_>>();
    Ok(Arc::new(ProjectionExec::try_new(exprs, exec)?))
}
