//! Runs a scenario directly on this host (hardware KVM): the same script,
//! with `$ASSETS` and `PATH` laid out in the work directory as the L1 would
//! lay them out.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::pump::{Markers, Pump};
use crate::run::HarnessError;
use crate::scenario::{Scenario, Status, Timings};

/// Runs `sc` under `sh` with a timeout; the whole process group is killed
/// when the timeout expires.
pub fn run(
    sc: &Scenario,
    workdir: &Path,
    nonce: &str,
) -> Result<(Status, String, Timings), HarnessError> {
    let started = Instant::now();
    let assets = workdir.join("assets");
    let bin = workdir.join("bin");
    for d in [&assets, &bin] {
        std::fs::create_dir_all(d)
            .map_err(|e| HarnessError::Io(format!("creating {}", d.display()), e))?;
    }
    for a in &sc.assets {
        let target = std::fs::canonicalize(&a.host_path)
            .map_err(|e| HarnessError::Io(format!("asset {}", a.host_path.display()), e))?;
        std::os::unix::fs::symlink(target, assets.join(&a.name))
            .map_err(|e| HarnessError::Io(format!("linking asset {}", a.name), e))?;
    }
    for b in &sc.bins {
        let target = std::fs::canonicalize(b)
            .map_err(|e| HarnessError::Io(format!("binary {}", b.display()), e))?;
        let name = target.file_name().map(|n| n.to_owned()).unwrap_or_default();
        std::os::unix::fs::symlink(&target, bin.join(name))
            .map_err(|e| HarnessError::Io(format!("linking binary {}", b.display()), e))?;
    }
    let markers = Markers::new(nonce);
    let script = format!(
        "echo {ready}\n(\n{body}\n)\necho {exit} $?\n",
        ready = markers.ready,
        body = sc.script,
        exit = markers.exit
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    let (reader, writer) =
        std::io::pipe().map_err(|e| HarnessError::Io("creating a pipe".into(), e))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| HarnessError::Io("cloning a pipe".into(), e))?;
    let prepare = started.elapsed();
    let run_start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("ASSETS", &assets)
        .env("PATH", path)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0)
        .spawn()
        .map_err(|e| HarnessError::Spawn {
            what: "sh".into(),
            source: e,
        })?;
    let pump = Pump::start(reader, &workdir.join("output.log"), markers, sc.echo)
        .map_err(|e| HarnessError::Io("starting the output reader".into(), e))?;
    let deadline = run_start + sc.timeout.saturating_sub(prepare);
    let mut timed_out = false;
    loop {
        if child
            .try_wait()
            .map_err(|e| HarnessError::Io("waiting for sh".into(), e))?
            .is_some()
        {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = Instant::now();
    let seen = pump.finish();
    let status = match (seen.exit, timed_out) {
        (Some((_, code)), _) => Status::Exited(code),
        (None, true) => Status::TimedOut,
        (None, false) => Status::Died("the shell ended without an exit code".into()),
    };
    let timings = Timings {
        prepare,
        l1_boot: Some(Duration::ZERO),
        scenario: seen.exit.map(|(e, _)| e - run_start),
        shutdown: seen.exit.map(|(e, _)| end.saturating_duration_since(e)),
        total: Duration::ZERO,
    };
    Ok((status, seen.output, timings))
}
