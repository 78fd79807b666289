//! One worker per device over one plan (`arenaflow run PLAN --devices cuda:0,cuda:1`): the
//! plan's rows split by `shard_of` into as many shards as devices, each shard run by its own
//! `arenaflow run --shard i/n --set device=D` process side by side in the same run
//! directory (each shard keeps its own manifest file, as an array job's tasks do), so that
//! every GPU of a host scores its share of a teacher's rows. The shards are then merged and
//! their coverage checked by the plan's merge (`plans/teacher_merge.sql --set shards=n`).
//! A worker that fails leaves the others' outputs; the same command again finishes the work
//! (finished shards are up to date).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{EngineError, Result};
use crate::plan::PlanFile;

/// The parameter of a plan that names its device.
const DEVICE_PARAM: &str = "device";

/// The devices of a `--devices` list (`cpu`, `cuda` or `cuda:N`, comma-separated, each at
/// most once), checked.
pub fn parse_devices(text: &str) -> Result<Vec<String>> {
    let bad = |why: String| EngineError::Invalid(format!("--devices {text}: {why}"));
    let devices: Vec<String> = text.split(',').map(|d| d.trim().to_string()).collect();
    for device in &devices {
        let ok = device == "cpu"
            || device == "cuda"
            || device
                .strip_prefix("cuda:")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(bad(format!(
                "{device:?} is not a device (cpu, cuda or cuda:N)"
            )));
        }
    }
    // `cuda` is `cuda:0`.
    let gpus: Vec<&str> = devices
        .iter()
        .filter(|d| d.as_str() != "cpu")
        .map(|d| if d == "cuda" { "cuda:0" } else { d.as_str() })
        .collect();
    for (i, d) in gpus.iter().enumerate() {
        if gpus[..i].contains(d) {
            return Err(bad(format!(
                "{d} is listed twice: one worker per GPU (repeat cpu for several CPU workers)"
            )));
        }
    }
    Ok(devices)
}

/// Runs `plan` as `devices.len()` shards, shard i on `devices[i]`, through `exe` (this
/// program), side by side; their output lines are printed prefixed with the shard. Every
/// worker runs to its end; an error names each one that failed.
pub fn run_workers(
    exe: &Path,
    plan: &str,
    sets: &[(String, String)],
    run_dir: &str,
    force: bool,
    devices: &[String],
) -> Result<()> {
    let file = PlanFile::load(plan)?;
    let n = devices.len();
    if !file.declares(DEVICE_PARAM) {
        return Err(EngineError::Invalid(format!(
            "--devices: {plan} has no parameter {DEVICE_PARAM} to run each worker on its device"
        )));
    }
    if n > 1 && !file.uses_shard() {
        return Err(EngineError::Invalid(format!(
            "--devices: {plan} does not split its rows by ${{shard_index}}: every worker would write the same outputs"
        )));
    }
    if sets.iter().any(|(name, _)| name == DEVICE_PARAM) {
        return Err(EngineError::Invalid(
            "--devices gives each worker its device: drop --set device".into(),
        ));
    }
    let mut children: Vec<(
        usize,
        String,
        std::process::Child,
        [std::thread::JoinHandle<()>; 2],
    )> = Vec::with_capacity(n);
    for (i, device) in devices.iter().enumerate() {
        let mut command = Command::new(exe);
        command
            .args(["run", plan, "--run-dir", run_dir, "--shard"])
            .arg(format!("{i}/{n}"))
            .arg("--set")
            .arg(format!("{DEVICE_PARAM}={device}"));
        for (name, value) in sets {
            command.arg("--set").arg(format!("{name}={value}"));
        }
        if force {
            command.arg("--force");
        }
        // An explicit --shard wins over an array job's variables; clear them anyway, so
        // that a worker is never mistaken for an array task.
        for var in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT",
            "SLURM_ARRAY_TASK_MIN",
        ] {
            command.env_remove(var);
        }
        let mut child = match command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                // The workers already started would run on unattended: stop them.
                for (_, _, started, _) in &mut children {
                    let _ = started.kill();
                    let _ = started.wait();
                }
                return Err(EngineError::Invalid(format!(
                    "cannot start worker {i} ({}): {e}",
                    exe.display()
                )));
            }
        };
        let label = format!("[shard {i}/{n} {device}]");
        let out = echo(child.stdout.take(), label.clone(), false);
        let err = echo(child.stderr.take(), label, true);
        children.push((i, device.clone(), child, [out, err]));
    }
    let mut failed = Vec::new();
    // Every worker is waited for: one that cannot be waited for is killed, and counts as
    // failed.
    for (i, device, mut child, echoes) in children {
        let status = child.wait().inspect_err(|_| {
            let _ = child.kill();
        });
        for echo in echoes {
            let _ = echo.join();
        }
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => failed.push(format!("shard {i}/{n} on {device} ({status})")),
            Err(e) => failed.push(format!("shard {i}/{n} on {device} (cannot wait: {e})")),
        }
    }
    if !failed.is_empty() {
        return Err(EngineError::Invalid(format!(
            "{plan}: {} of {n} workers failed: {}; the others' outputs are kept, the same command again finishes the work",
            failed.len(),
            failed.join(", ")
        )));
    }
    Ok(())
}

/// Prints each line of a worker's stream with its label, on a thread of its own.
fn echo(
    stream: Option<impl Read + Send + 'static>,
    label: String,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(stream) = stream else { return };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{label} {line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{label} {line}");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_checked() {
        assert_eq!(
            parse_devices("cuda:0, cuda:1").unwrap(),
            vec!["cuda:0", "cuda:1"]
        );
        assert_eq!(parse_devices("cpu,cpu").unwrap(), vec!["cpu", "cpu"]);
        for (bad, why) in [
            ("cuda:0,cuda:0", "listed twice"),
            ("cuda,cuda:0", "cuda:0 is listed twice"),
            ("gpu0", "is not a device"),
            ("cuda:", "is not a device"),
            ("cuda:0,", "is not a device"),
        ] {
            let error = parse_devices(bad).unwrap_err().to_string();
            assert!(
                error.contains(why) && error.contains("--devices"),
                "{bad}: {error}"
            );
        }
    }
}
