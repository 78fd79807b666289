//! Post-hoc calibration of 3-class logits (recipe stage 4.5).
//!
//! - `fit_calibration(label, logits, method)`, an aggregate: the parameters that minimise
//!   the mean log loss of `softmax(f(z))` over the rows, to a gradient norm of at most
//!   [`GRADIENT_TOLERANCE`], by Newton's method with a backtracking line search (both
//!   problems are convex: in 1/T, and in (a, b)). Methods:
//!   - `temperature`: f(z) = z / T. Returns `[T]`.
//!   - `vector`: f(z) = a ⊙ z + b (per class scale and bias). Returns
//!     `[a_A, a_B, a_tie, b_A, b_B, b_tie]`, with b centred (Σ b = 0): softmax does not
//!     see a constant added to every bias, so this is the one representative.
//! - `calibrate(logits, params)`: f(z) for `params` from `fit_calibration` (a list of 1 or
//!   6 numbers), in the element type of `logits`.
//!
//! Rows with a null label or null logits are ignored by the fit; a label outside 0..2, a
//! row without 3 logits, or a logit that is not finite fails the query.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Builder, ListBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{exec_datafusion_err, exec_err, plan_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature,
    Volatility,
};

use crate::lists::{float64_list, float64_list_scalar, list_of};
use crate::softmax::{finite_logits, softmax3};

/// The fit stops when the gradient of the mean log loss has at most this norm.
pub const GRADIENT_TOLERANCE: f64 = 1e-9;
const MAX_NEWTON_STEPS: usize = 200;

/// What `fit_calibration` fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// z / T.
    Temperature,
    /// a ⊙ z + b.
    Vector,
}

impl Method {
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name.trim() {
            "temperature" => Ok(Self::Temperature),
            "vector" => Ok(Self::Vector),
            other => Err(format!(
                "calibration method `{other}`: expected temperature or vector"
            )),
        }
    }
}

/// One row of a fit: the label (0 = A, 1 = B, 2 = tie) and the three logits.
pub type Row = (usize, [f64; 3]);

/// The parameters of `method` that minimise the mean log loss over `rows`.
pub fn fit(method: Method, rows: &[Row]) -> std::result::Result<Vec<f64>, String> {
    if rows.is_empty() {
        return Err("no rows to fit on".into());
    }
    match method {
        Method::Temperature => fit_temperature(rows),
        Method::Vector => fit_vector(rows),
    }
}

/// f(z) for fitted parameters: `[T]` or `[a_A, a_B, a_tie, b_A, b_B, b_tie]`.
pub fn apply(params: &[f64], z: [f64; 3]) -> std::result::Result<[f64; 3], String> {
    match params {
        [t] if *t > 0.0 && t.is_finite() => Ok(z.map(|v| v / t)),
        [t] => Err(format!("temperature {t} is not a positive number")),
        [a0, a1, a2, b0, b1, b2] => Ok([a0 * z[0] + b0, a1 * z[1] + b1, a2 * z[2] + b2]),
        other => Err(format!(
            "{} parameters: expected 1 (temperature) or 6 (vector: a, b)",
            other.len()
        )),
    }
}

fn log_sum_exp(u: [f64; 3]) -> f64 {
    let max = u[0].max(u[1]).max(u[2]);
    max + u.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Mean log loss of softmax(u(row)) over the rows.
fn mean_loss(rows: &[Row], u: impl Fn(&[f64; 3]) -> [f64; 3]) -> f64 {
    rows.iter()
        .map(|(y, z)| {
            let u = u(z);
            log_sum_exp(u) - u[*y]
        })
        .sum::<f64>()
        / rows.len() as f64
}

/// Newton on s = 1/T: L(s) = mean(lse(s z) - s z_y), L' = mean(E_p[z] - z_y),
/// L'' = mean(Var_p[z]).
fn fit_temperature(rows: &[Row]) -> std::result::Result<Vec<f64>, String> {
    let n = rows.len() as f64;
    if rows.iter().all(|(_, z)| z[0] == z[1] && z[1] == z[2]) {
        return Err("every row's three logits are equal: no temperature changes the loss".into());
    }
    // L is convex in s, so its minimiser is positive exactly when L'(0) < 0.
    let slope_at_zero = rows
        .iter()
        .map(|(y, z)| (z[0] + z[1] + z[2]) / 3.0 - z[*y])
        .sum::<f64>()
        / n;
    if slope_at_zero >= 0.0 {
        return Err(format!(
            "the best 1/T is not positive (the loss rises from 1/T = 0 at slope {slope_at_zero:.3e}): the logits rank the classes no better than chance"
        ));
    }
    let loss = |s: f64| mean_loss(rows, |z| z.map(|v| s * v));
    let mut s = 1.0;
    for _ in 0..MAX_NEWTON_STEPS {
        let (mut g, mut h) = (0.0, 0.0);
        for (y, z) in rows {
            let p = softmax3(z.map(|v| s * v));
            let mean: f64 = (0..3).map(|c| p[c] * z[c]).sum();
            let second: f64 = (0..3).map(|c| p[c] * z[c] * z[c]).sum();
            g += mean - z[*y];
            h += second - mean * mean;
        }
        let (g, h) = (g / n, h / n);
        if g.abs() <= GRADIENT_TOLERANCE {
            return Ok(vec![1.0 / s]);
        }
        if h <= 0.0 || !h.is_finite() {
            return Err(format!(
                "temperature: the loss is flat at 1/T = {s:.3e} (the logits separate the classes perfectly: T -> 0)"
            ));
        }
        let mut step = -g / h;
        // Stay on the positive side, where the minimiser is.
        while s + step <= 0.0 {
            step *= 0.5;
        }
        s += step * backtrack(&loss, s, step, g * step);
    }
    Err(format!(
        "temperature: no convergence in {MAX_NEWTON_STEPS} Newton steps"
    ))
}

/// The step length (1, 1/2, ...) along `direction` that lowers `loss` enough (Armijo),
/// tolerating the rounding of a loss that no longer changes.
fn backtrack<P: Copy + Step>(loss: &impl Fn(P) -> f64, at: P, direction: P, slope: f64) -> f64 {
    let start = loss(at);
    let mut t = 1.0;
    while t > 1e-10 {
        let value = loss(at.advance(direction, t));
        if value <= start + 1e-4 * t * slope + 1e-15 * start.abs() {
            return t;
        }
        t *= 0.5;
    }
    t
}

trait Step {
    fn advance(self, direction: Self, t: f64) -> Self;
}

impl Step for f64 {
    fn advance(self, direction: Self, t: f64) -> Self {
        self + t * direction
    }
}

impl Step for [f64; 5] {
    fn advance(self, direction: Self, t: f64) -> Self {
        std::array::from_fn(|i| self[i] + t * direction[i])
    }
}

/// u = a ⊙ z + b with θ = (a_A, a_B, a_tie, b_A, b_B) and b_tie = 0 (the fit's gauge; the
/// result is centred afterwards).
fn vector_logits(theta: &[f64; 5], z: &[f64; 3]) -> [f64; 3] {
    [
        theta[0] * z[0] + theta[3],
        theta[1] * z[1] + theta[4],
        theta[2] * z[2],
    ]
}

/// Newton on θ: gradient Jᵀ(p - e_y), Hessian Jᵀ(diag p - p pᵀ)J, J = ∂u/∂θ.
fn fit_vector(rows: &[Row]) -> std::result::Result<Vec<f64>, String> {
    let n = rows.len() as f64;
    let loss = |theta: [f64; 5]| mean_loss(rows, |z| vector_logits(&theta, z));
    let mut theta = [1.0, 1.0, 1.0, 0.0, 0.0];
    for _ in 0..MAX_NEWTON_STEPS {
        let mut g = [0.0; 5];
        let mut g_bias_tie = 0.0;
        let mut h = [[0.0; 5]; 5];
        for (y, z) in rows {
            let p = softmax3(vector_logits(&theta, z));
            let r: [f64; 3] = std::array::from_fn(|c| p[c] - f64::from(u8::from(c == *y)));
            // J[c] = ∂u_c/∂θ.
            let jacobian: [[f64; 5]; 3] = [
                [z[0], 0.0, 0.0, 1.0, 0.0],
                [0.0, z[1], 0.0, 0.0, 1.0],
                [0.0, 0.0, z[2], 0.0, 0.0],
            ];
            for c in 0..3 {
                for i in 0..5 {
                    g[i] += jacobian[c][i] * r[c];
                }
            }
            g_bias_tie += r[2];
            for c in 0..3 {
                for d in 0..3 {
                    let w = p[c] * (f64::from(u8::from(c == d)) - p[d]);
                    if w == 0.0 {
                        continue;
                    }
                    for i in 0..5 {
                        for j in 0..5 {
                            h[i][j] += jacobian[c][i] * w * jacobian[d][j];
                        }
                    }
                }
            }
        }
        let g = g.map(|v| v / n);
        let g_bias_tie = g_bias_tie / n;
        let norm = (g.iter().map(|v| v * v).sum::<f64>() + g_bias_tie * g_bias_tie).sqrt();
        if norm <= GRADIENT_TOLERANCE {
            let b = [theta[3], theta[4], 0.0];
            let centre = b.iter().sum::<f64>() / 3.0;
            return Ok(vec![
                theta[0],
                theta[1],
                theta[2],
                b[0] - centre,
                b[1] - centre,
                b[2] - centre,
            ]);
        }
        let h = h.map(|row| row.map(|v| v / n));
        let step = solve_damped(h, g.map(|v| -v)).ok_or_else(|| {
            "vector: the Hessian is singular (a class whose logits are constant?)".to_string()
        })?;
        let slope: f64 = (0..5).map(|i| g[i] * step[i]).sum();
        theta = theta.advance(step, backtrack(&loss, theta, step, slope));
    }
    Err(format!(
        "vector: no convergence in {MAX_NEWTON_STEPS} Newton steps (does every class occur among the labels?)"
    ))
}

/// Solves H x = b by Cholesky; if H is not positive definite (rounding near a flat
/// direction), adds the smallest multiple of the identity that makes it so.
fn solve_damped(h: [[f64; 5]; 5], b: [f64; 5]) -> Option<[f64; 5]> {
    let scale = (0..5).map(|i| h[i][i]).fold(0.0, f64::max).max(1e-300);
    let mut damping = 0.0;
    for _ in 0..40 {
        let mut m = h;
        for (i, row) in m.iter_mut().enumerate() {
            row[i] += damping;
        }
        if let Some(x) = cholesky_solve(m, b) {
            return Some(x);
        }
        damping = if damping == 0.0 {
            scale * 1e-12
        } else {
            damping * 10.0
        };
    }
    None
}

fn cholesky_solve(m: [[f64; 5]; 5], b: [f64; 5]) -> Option<[f64; 5]> {
    let mut l = [[0.0; 5]; 5];
    for i in 0..5 {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = m[i][i] - sum;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i][i] = d.sqrt();
            } else {
                l[i][j] = (m[i][j] - sum) / l[j][j];
            }
        }
    }
    let mut y = [0.0; 5];
    for i in 0..5 {
        y[i] = (b[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
    }
    let mut x = [0.0; 5];
    for i in (0..5).rev() {
        x[i] = (y[i] - (i + 1..5).map(|k| l[k][i] * x[k]).sum::<f64>()) / l[i][i];
    }
    Some(x)
}

/// Any list of numbers (List, LargeList, FixedSizeList) as List<Float64>, to read rows from.
fn as_float64_lists(array: &ArrayRef) -> Result<datafusion::arrow::array::ListArray> {
    Ok(cast(array, &float64_list())?.as_list::<i32>().clone())
}

/// Three finite logits of row `row`, or None for a null row.
fn logits_at(
    lists: &datafusion::arrow::array::ListArray,
    row: usize,
    what: &str,
) -> Result<Option<[f64; 3]>> {
    finite_logits(lists, row, what, &format!("row {row} of the batch"))
}

/// The logits' type as the function takes it: f32 and f64 lists (a teacher's
/// FixedSizeList(3 x f32) included) as they are, other numbers as List<Float64>.
fn list_coercion(name: &str, t: &DataType) -> Result<DataType> {
    match t {
        DataType::List(f) | DataType::FixedSizeList(f, 3)
            if matches!(f.data_type(), DataType::Float32 | DataType::Float64) =>
        {
            Ok(t.clone())
        }
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _)
            if f.data_type().is_numeric() =>
        {
            Ok(float64_list())
        }
        DataType::Null => Ok(float64_list()),
        other => plan_err!("{name}: expected a list of three logits, got {other:?}"),
    }
}

/// `fit_calibration(label, logits, method)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct FitCalibration {
    signature: Signature,
}

impl Default for FitCalibration {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for FitCalibration {
    fn name(&self) -> &str {
        "fit_calibration"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [label, logits, method]
                if (label.is_integer() || label.is_null())
                    && (method.is_string() || method.is_null()) =>
            {
                Ok(vec![
                    DataType::Int64,
                    list_coercion("fit_calibration", logits)?,
                    DataType::Utf8,
                ])
            }
            other => plan_err!(
                "fit_calibration takes (label 0/1/2, logits, 'temperature' | 'vector'), got {other:?}"
            ),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(float64_list())
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::<FitAccumulator>::default())
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}[labels]", args.name),
                list_of(DataType::Int64),
                true,
            )),
            Arc::new(Field::new(
                format!("{}[logits]", args.name),
                float64_list(),
                true,
            )),
            Arc::new(Field::new(
                format!("{}[method]", args.name),
                DataType::Utf8,
                true,
            )),
        ])
    }
}

#[derive(Debug, Default)]
struct FitAccumulator {
    rows: Vec<Row>,
    method: Option<String>,
}

impl FitAccumulator {
    fn note_method(&mut self, method: &str) -> Result<()> {
        match &self.method {
            Some(m) if m != method => {
                exec_err!("fit_calibration: one fit has two methods, {m} and {method}")
            }
            Some(_) => Ok(()),
            None => {
                Method::parse(method).map_err(|e| exec_datafusion_err!("fit_calibration: {e}"))?;
                self.method = Some(method.to_string());
                Ok(())
            }
        }
    }
}

impl Accumulator for FitAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let labels = cast(&values[0], &DataType::Int64)?;
        let labels = labels.as_primitive::<Int64Type>();
        let logits = as_float64_lists(&values[1])?;
        let logits = &logits;
        let methods = cast(&values[2], &DataType::Utf8)?;
        let methods = methods.as_string::<i32>();
        for row in 0..labels.len() {
            if !methods.is_null(row) {
                self.note_method(methods.value(row))?;
            }
            if labels.is_null(row) {
                continue;
            }
            let Some(z) = logits_at(logits, row, "fit_calibration")? else {
                continue;
            };
            let label = labels.value(row);
            if !(0..=2).contains(&label) {
                return exec_err!("fit_calibration: label {label} is not 0 (A), 1 (B) or 2 (tie)");
            }
            self.rows.push((label as usize, z));
        }
        Ok(())
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        if self.rows.is_empty() {
            // No rows (or only nulls): no fit, as other aggregates give NULL.
            return float64_list_scalar(None);
        }
        let method = Method::parse(self.method.as_deref().unwrap_or_default())
            .map_err(|e| exec_datafusion_err!("fit_calibration: {e}"))?;
        // The rows in one order whatever order the partitions merged in: the fit's sums,
        // and so its parameters, are the same bits every run.
        self.rows.sort_by(|(ya, za), (yb, zb)| {
            ya.cmp(yb)
                .then_with(|| za.map(f64::to_bits).cmp(&zb.map(f64::to_bits)))
        });
        let params =
            fit(method, &self.rows).map_err(|e| exec_datafusion_err!("fit_calibration: {e}"))?;
        float64_list_scalar(Some(&params))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.rows.capacity() * std::mem::size_of::<Row>()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let labels: Vec<ScalarValue> = self
            .rows
            .iter()
            .map(|(y, _)| ScalarValue::Int64(Some(*y as i64)))
            .collect();
        let logits: Vec<f64> = self.rows.iter().flat_map(|(_, z)| *z).collect();
        Ok(vec![
            ScalarValue::List(ScalarValue::new_list_nullable(&labels, &DataType::Int64)),
            float64_list_scalar(Some(&logits))?,
            ScalarValue::Utf8(self.method.clone()),
        ])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let labels = states[0].as_list::<i32>();
        let logits = states[1].as_list::<i32>();
        let methods = states[2].as_string::<i32>();
        for row in 0..labels.len() {
            if !methods.is_null(row) {
                self.note_method(methods.value(row))?;
            }
            if labels.is_null(row) || logits.is_null(row) {
                continue;
            }
            let y = labels.value(row);
            let y = y.as_primitive::<Int64Type>();
            let z = logits.value(row);
            let z = z.as_primitive::<Float64Type>();
            for i in 0..y.len() {
                self.rows.push((
                    y.value(i) as usize,
                    [z.value(3 * i), z.value(3 * i + 1), z.value(3 * i + 2)],
                ));
            }
        }
        Ok(())
    }
}

/// `calibrate(logits, params)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Calibrate {
    signature: Signature,
}

impl Default for Calibrate {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Calibrate {
    fn name(&self) -> &str {
        "calibrate"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [logits, params] => Ok(vec![
                list_coercion("calibrate", logits)?,
                match list_coercion("calibrate", params) {
                    Ok(_) => float64_list(),
                    Err(_) => {
                        return plan_err!(
                            "calibrate: params must be fit_calibration's list, got {params:?}"
                        )
                    }
                },
            ]),
            other => plan_err!("calibrate takes (logits, params), got {other:?}"),
        }
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let input = args.args[0].to_array(n)?;
        let logits = as_float64_lists(&input)?;
        let params = as_float64_lists(&args.args[1].to_array(n)?)?;
        let mut out: Vec<Option<[f64; 3]>> = Vec::with_capacity(n);
        for row in 0..n {
            let z = logits_at(&logits, row, "calibrate")?;
            let (Some(z), false) = (z, params.is_null(row)) else {
                out.push(None);
                continue;
            };
            let p = params.value(row);
            let p: Vec<f64> = p
                .as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.unwrap_or(f64::NAN))
                .collect();
            out.push(Some(apply(&p, z).map_err(|e| {
                exec_datafusion_err!("calibrate: row {row} of the batch: {e}")
            })?));
        }
        // Back in the input's type (a teacher's FixedSizeList(3 x f32) stays one).
        let mut builder = ListBuilder::new(Float64Builder::with_capacity(3 * n));
        for z in out {
            match z {
                Some(z) => {
                    builder.values().append_slice(&z);
                    builder.append(true);
                }
                None => builder.append_null(),
            }
        }
        let array: ArrayRef = Arc::new(builder.finish());
        Ok(ColumnarValue::Array(cast(&array, input.data_type())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient_free_check(method: Method, rows: &[Row], params: &[f64]) {
        // The loss is lowest at the fit: any small move raises it.
        let loss = |p: &[f64]| {
            rows.iter()
                .map(|(y, z)| {
                    let u = apply(p, *z).unwrap();
                    log_sum_exp(u) - u[*y]
                })
                .sum::<f64>()
        };
        let best = loss(params);
        for i in 0..params.len() {
            for delta in [-1e-4, 1e-4] {
                let mut moved = params.to_vec();
                moved[i] += delta;
                assert!(
                    loss(&moved) >= best,
                    "{method:?}: moving {i} lowers the loss"
                );
            }
        }
    }

    fn rows() -> Vec<Row> {
        vec![
            (0, [2.0, 0.5, 0.1]),
            (1, [0.3, 1.9, 0.2]),
            (2, [0.9, 1.0, 0.4]),
            (0, [0.2, 1.5, 0.3]),
            (1, [1.1, 0.2, 0.9]),
            (2, [0.5, 0.4, 1.2]),
            (0, [3.0, -1.0, 0.0]),
            (2, [1.0, 1.0, 1.0]),
        ]
    }

    #[test]
    fn fits_are_minima() {
        for method in [Method::Temperature, Method::Vector] {
            let params = fit(method, &rows()).unwrap();
            gradient_free_check(method, &rows(), &params);
        }
    }

    #[test]
    fn temperature_of_already_calibrated_logits_is_one() {
        // Rows drawn so that softmax(z) is the true frequency: label counts 2:1:1 for
        // logits (ln 2, 0, 0).
        let z = [2f64.ln(), 0.0, 0.0];
        let rows = vec![(0, z), (0, z), (1, z), (2, z)];
        let t = fit(Method::Temperature, &rows).unwrap();
        assert!((t[0] - 1.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn degenerate_fits_fail_clearly() {
        let flat = vec![(0, [1.0, 1.0, 1.0]), (1, [0.0, 0.0, 0.0])];
        let e = fit(Method::Temperature, &flat).unwrap_err();
        assert!(e.contains("equal"), "{e}");
        assert!(fit(Method::Vector, &[]).is_err());
        assert!(apply(&[1.0, 2.0], [0.0; 3]).is_err());
        assert!(apply(&[-1.0], [0.0; 3]).is_err());
    }
}
