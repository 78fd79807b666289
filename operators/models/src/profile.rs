//! Where a forward pass spends its time, by section (projections, attention, norms, ...),
//! when profiling is on (`arenaflow logits --profile`). Each timed section synchronises the
//! device before and after, so GPU times are real but the pass runs a little slower; off,
//! it costs one atomic load per section.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::Result;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: parking_lot::Mutex<BTreeMap<&'static str, (Duration, u64)>> =
    parking_lot::Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, adding its time to `section` when profiling is on.
pub fn time<T>(device: &Device, section: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let started = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let mut totals = TOTALS.lock();
    let entry = totals.entry(section).or_default();
    entry.0 += started.elapsed();
    entry.1 += 1;
    Ok(out)
}

/// The totals so far (seconds, calls) by section, and clears them.
pub fn take() -> BTreeMap<String, (f64, u64)> {
    std::mem::take(&mut *TOTALS.lock())
        .into_iter()
        .map(|(k, (d, n))| (k.to_string(), (d.as_secs_f64(), n)))
        .collect()
}

/// Turns profiling on when `ARENAFLOW_PROFILE` is `1`, `on` or `true` (training reads it:
/// its sections then synchronise the device, so the run is a little slower); returns
/// whether it is on.
pub fn enable_from_env() -> bool {
    let on = matches!(
        std::env::var("ARENAFLOW_PROFILE").as_deref(),
        Ok("1") | Ok("on") | Ok("true")
    );
    if on {
        take();
        enable(true);
    }
    on
}

/// The sections so far as one line, largest first: `attention 1.23 s (4800), ...`.
pub fn report() -> String {
    let mut sections: Vec<(String, (f64, u64))> = take().into_iter().collect();
    sections.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    sections
        .iter()
        .map(|(name, (s, n))| format!("{name} {s:.2} s ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}
