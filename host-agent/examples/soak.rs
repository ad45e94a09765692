//! Soak driver: boots N VMs (a few at a time) with our VMM or with
//! Firecracker, runs one job with steady output in each through the runner
//! agent, and classifies every VM: ok, boot hang, job hang, triple fault or
//! other failure. It answers "do guests that go silent mid-job hang in our
//! VMM or in the emulator under it?" by running the same load under both.
//!
//! ```text
//! soak run --vmm ours|firecracker --bin PATH --kernel vmlinux --image rootfs.erofs \
//!          --count 10 [--parallel 2] [--first 0] [--results FILE]
//! soak summary FILE...
//! ```
//!
//! `run` prints one `SOAK ...` line per VM (and appends it to `--results`);
//! `summary` turns such lines into one table per VMM. Meant to run inside
//! the nested harness's L1 (see `scripts/soak.sh`), unjailed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use host_agent::vm::BASE_CMDLINE;
use protocol::FrameDecoder;
use protocol::frame::encode_frame;
use protocol::message::{GuestMessage, HostMessage, Job, JobId, JobResult, JobStep, OutputStream};
use protocol::ports::{RUNNER_AGENT_PORT, host_listener_path};
use protocol::session::HostSession;

/// Command line.
#[derive(Parser)]
#[command(about = "Boot-job-teardown soak of a VMM (ours or Firecracker)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs `count` VMs, `parallel` at a time, one `SOAK` line each.
    Run(RunArgs),
    /// Prints the per-VMM table of the `SOAK` lines in the given files.
    Summary {
        /// Files holding `SOAK` lines (other lines are ignored).
        files: Vec<PathBuf>,
    },
}

/// Which VMM to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Vmm {
    /// Ours (`vmm`), with the host agent's arguments.
    Ours,
    /// Firecracker, from a JSON config, without its API.
    Firecracker,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ours => "ours",
            Vmm::Firecracker => "firecracker",
        }
    }
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Which VMM.
    #[arg(long, value_enum)]
    vmm: Vmm,
    /// Its binary.
    #[arg(long)]
    bin: PathBuf,
    /// Guest kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest root image (the minimal erofs image, runner agent as PID 1).
    #[arg(long)]
    image: PathBuf,
    /// VMs to run.
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// VMs at once.
    #[arg(long, default_value_t = 2)]
    parallel: u32,
    /// Number of the first VM (for unique names across batches).
    #[arg(long, default_value_t = 0)]
    first: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 192)]
    memory_mib: u32,
    /// Seconds to wait for the guest's Hello (and then Ready).
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Seconds without any guest message while the job runs that make a hang.
    #[arg(long, default_value_t = 30)]
    silence: u64,
    /// Lines the job prints, one every 10 ms.
    #[arg(long, default_value_t = 300)]
    lines: u32,
    /// Directory for the VMs' sockets, configs and logs.
    #[arg(long, default_value = "/tmp/soak")]
    work: PathBuf,
    /// File to append the `SOAK` lines to.
    #[arg(long)]
    results: Option<PathBuf>,
}

/// How one VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Ok,
    BootHang,
    JobHang,
    TripleFault,
    Other,
}

impl Class {
    const ALL: [Class; 5] = [
        Class::Ok,
        Class::BootHang,
        Class::JobHang,
        Class::TripleFault,
        Class::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::BootHang => "boot-hang",
            Class::JobHang => "job-hang",
            Class::TripleFault => "triple-fault",
            Class::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// The outcome of one VM.
struct Outcome {
    class: Class,
    boot: Option<Duration>,
    job: Option<Duration>,
    detail: String,
}

/// Bytes of each burst the job prints after every 100th line.
const BURST: usize = 4096;

/// The job's script: `lines` numbered lines, one every 10 ms, with a
/// `BURST`-byte line of `x` after every 100th.
fn job_script(lines: u32) -> String {
    format!(
        "i=1; while [ $i -le {lines} ]; do echo \"soak line $i\"; \
         if [ $((i % 100)) -eq 0 ]; then head -c {BURST} /dev/zero | tr '\\0' x; echo; fi; \
         sleep 0.01; i=$((i + 1)); done"
    )
}

/// What the job's stdout must be, byte for byte.
fn expected_output(lines: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=lines {
        out.extend_from_slice(format!("soak line {i}\n").as_bytes());
        if i % 100 == 0 {
            out.extend(std::iter::repeat_n(b'x', BURST));
            out.push(b'\n');
        }
    }
    out
}

/// Per-thread CPU time of `pid`, in clock ticks: (tid, name, state, utime+stime).
fn thread_cpu(pid: u32) -> Vec<(u32, String, String, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ... utime stime ...": the comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let state = rest.first().copied().unwrap_or("?").to_string();
        out.push((tid, comm, state, ticks(11) + ticks(12)));
    }
    out.sort();
    out
}

/// What can be seen of a hung VMM from outside: per-thread CPU over 2 s and
/// in total, and the tail of its log.
fn hang_dump(pid: u32, log: &Path) -> String {
    let before = thread_cpu(pid);
    std::thread::sleep(Duration::from_secs(2));
    let after = thread_cpu(pid);
    let mut text = String::from("threads (name state cpu-total-ticks cpu-last-2s-ticks):");
    for (tid, comm, state, total) in &after {
        let prev = before
            .iter()
            .find(|(t, ..)| t == tid)
            .map(|b| b.3)
            .unwrap_or(0);
        text.push_str(&format!(
            " [{tid} {comm} {state} {total} {}]",
            total.saturating_sub(prev)
        ));
    }
    text.push_str(" | log tail: ");
    text.push_str(&log_tail(log, 6).join(" / "));
    text
}

/// The last `n` non-empty lines of a file.
fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.chars().take(200).collect())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The first few lines of a file that hold one of `words` (the reason a
/// VMM stopped, or the guest's panic when its console shares the log).
fn log_grep(path: &Path, words: &[&str]) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let hits: Vec<String> = text
        .lines()
        .filter(|l| words.iter().any(|w| l.contains(w)))
        .take(4)
        .map(|l| l.chars().take(200).collect())
        .collect();
    hits.join(" / ")
}

/// Whether the VMM's log says the guest triple-faulted (ours:
/// "triple fault (KVM_EXIT_SHUTDOWN)"; Firecracker logs the exit by name too).
fn saw_triple_fault(log: &Path) -> bool {
    let bytes = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&bytes).contains("KVM_EXIT_SHUTDOWN")
}

/// One VM's VMM process and files.
struct Vm {
    child: Child,
    log: PathBuf,
}

impl Vm {
    /// Spawns the VMM for VM `n` in `dir`, its vsock at `dir/v.sock`.
    fn spawn(args: &RunArgs, n: u32, dir: &Path) -> std::io::Result<Vm> {
        let uds = dir.join("v.sock");
        let log = dir.join("vmm.log");
        let cid = 3 + n;
        let mut cmd = Command::new(&args.bin);
        match args.vmm {
            Vmm::Ours => {
                cmd.arg("--kernel")
                    .arg(&args.kernel)
                    .args(["--cmdline", BASE_CMDLINE, "--vcpus", "1", "--memory-mib"])
                    .arg(args.memory_mib.to_string())
                    .arg("--drive")
                    .arg(format!("path={},ro", args.image.display()))
                    .arg("--vsock")
                    .arg(format!("cid={cid},uds={}", uds.display()))
                    .arg("--rng")
                    .arg("--serial")
                    .arg(format!("file:{}", dir.join("serial.log").display()))
                    .arg("--boot-timer");
            }
            Vmm::Firecracker => {
                let config = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": args.kernel,
                        "boot_args": BASE_CMDLINE,
                    },
                    "drives": [{
                        "drive_id": "rootfs",
                        "path_on_host": args.image,
                        "is_root_device": true,
                        "is_read_only": true,
                    }],
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": args.memory_mib},
                    "vsock": {"guest_cid": cid, "uds_path": uds},
                    "entropy": {},
                });
                let path = dir.join("fc.json");
                std::fs::write(&path, config.to_string())?;
                cmd.args(["--no-api", "--config-file"]).arg(&path);
            }
        }
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        Ok(Vm {
            child: cmd.spawn()?,
            log,
        })
    }

    /// The exit status, if the VMM has exited.
    fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }

    /// Kills the VMM's process group and reaps it.
    fn kill(mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's side of one runner agent's channel (blocking, with a short
/// read timeout so that the VMM's exit is noticed while waiting).
struct Channel {
    stream: UnixStream,
    decoder: FrameDecoder<GuestMessage>,
    session: HostSession,
}

/// Why waiting for a guest message ended without one.
enum WaitEnd {
    Silent,
    Exited(String),
    Error(String),
}

impl Channel {
    /// The next guest message within `limit`, answering what the protocol
    /// requires; ends early when the VMM exits.
    fn recv(&mut self, vm: &mut Vm, limit: Duration) -> Result<GuestMessage, WaitEnd> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.decoder.next_message() {
                Ok(Some(msg)) => {
                    match self.session.on_guest_message(&msg) {
                        Ok(Some(reply)) => self.send(&reply)?,
                        Ok(None) => {}
                        Err(e) => return Err(WaitEnd::Error(format!("protocol: {e}"))),
                    }
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) => return Err(WaitEnd::Error(format!("frame: {e}"))),
            }
            if Instant::now() >= deadline {
                return Err(WaitEnd::Silent);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // The guest closed: wait briefly for the VMM to exit so
                    // that a triple fault is told apart from a plain close.
                    std::thread::sleep(Duration::from_millis(300));
                    return Err(match vm.exited() {
                        Some(status) => WaitEnd::Exited(status),
                        None => WaitEnd::Error("the guest closed the channel".into()),
                    });
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(status) = vm.exited() {
                        return Err(WaitEnd::Exited(status));
                    }
                }
                Err(e) => return Err(WaitEnd::Error(format!("read: {e}"))),
            }
        }
    }

    fn send(&mut self, msg: &HostMessage) -> Result<(), WaitEnd> {
        let frame = encode_frame(msg).map_err(|e| WaitEnd::Error(format!("encode: {e}")))?;
        self.stream
            .write_all(&frame)
            .map_err(|e| WaitEnd::Error(format!("write: {e}")))
    }
}

/// Accepts the runner agent's connection within `limit`; ends early when
/// the VMM exits.
fn accept(listener: &UnixListener, vm: &mut Vm, limit: Duration) -> Result<UnixStream, WaitEnd> {
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(WaitEnd::Error(format!("accept: {e}"))),
        }
        if let Some(status) = vm.exited() {
            return Err(WaitEnd::Exited(status));
        }
        if Instant::now() >= deadline {
            return Err(WaitEnd::Silent);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots VM `n`, runs the job in it, tears it down and classifies it.
fn run_one(args: &RunArgs, n: u32) -> Outcome {
    let dir = args.work.join(format!("{}-{n}", args.vmm.name()));
    let _ = std::fs::remove_dir_all(&dir);
    let fail = |class, detail: String| Outcome {
        class,
        boot: None,
        job: None,
        detail,
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return fail(Class::Other, format!("creating {}: {e}", dir.display()));
    }
    let listener =
        match UnixListener::bind(host_listener_path(&dir.join("v.sock"), RUNNER_AGENT_PORT)) {
            Ok(l) => l,
            Err(e) => return fail(Class::Other, format!("binding the listener: {e}")),
        };
    if let Err(e) = listener.set_nonblocking(true) {
        return fail(Class::Other, format!("listener: {e}"));
    }
    let started = Instant::now();
    let mut vm = match Vm::spawn(args, n, &dir) {
        Ok(vm) => vm,
        Err(e) => {
            return fail(
                Class::Other,
                format!("spawning {}: {e}", args.bin.display()),
            );
        }
    };
    let outcome = drive(args, n, &listener, &mut vm, started);
    let log = vm.log.clone();
    vm.kill();
    if outcome.class == Class::Ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        // Keep the VMM's log for a look; the rest is noise.
        let _ = std::fs::copy(&log, args.work.join(format!("{}-{n}.log", args.vmm.name())));
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

/// The part of [`run_one`] between spawn and kill.
fn drive(
    args: &RunArgs,
    n: u32,
    listener: &UnixListener,
    vm: &mut Vm,
    started: Instant,
) -> Outcome {
    let boot_limit = Duration::from_secs(args.boot_timeout);
    let silence = Duration::from_secs(args.silence);
    let mut out = Outcome {
        class: Class::Ok,
        boot: None,
        job: None,
        detail: String::new(),
    };
    // Classifies how a wait ended; `hang` is the class of silence.
    let ended = |vm: &mut Vm, end: WaitEnd, hang: Class, what: &str, out: &mut Outcome| match end {
        WaitEnd::Silent => {
            out.class = hang;
            out.detail = format!("{what}: {}", hang_dump(vm.child.id(), &vm.log));
        }
        WaitEnd::Exited(status) => {
            out.class = if saw_triple_fault(&vm.log) {
                Class::TripleFault
            } else {
                Class::Other
            };
            out.detail = format!(
                "{what}: vmm exited ({status}): {} | {}",
                log_grep(&vm.log, &["panic", "KVM_EXIT", "error", "ERROR", "fault"]),
                log_tail(&vm.log, 4).join(" / ")
            );
        }
        WaitEnd::Error(e) => {
            out.class = if saw_triple_fault(&vm.log) {
                Class::TripleFault
            } else {
                Class::Other
            };
            out.detail = format!("{what}: {e}");
        }
    };

    let stream = match accept(listener, vm, boot_limit) {
        Ok(s) => s,
        Err(end) => {
            ended(vm, end, Class::BootHang, "no Hello", &mut out);
            return out;
        }
    };
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(Duration::from_millis(100))))
    {
        out.class = Class::Other;
        out.detail = format!("stream: {e}");
        return out;
    }
    let mut ch = Channel {
        stream,
        decoder: FrameDecoder::new(),
        session: HostSession::new(),
    };
    // Hello (answered by the session), then Ready.
    for want in ["Hello", "Ready"] {
        loop {
            let left = boot_limit.saturating_sub(started.elapsed());
            match ch.recv(vm, left) {
                Ok(GuestMessage::Hello(_)) if want == "Hello" => break,
                Ok(GuestMessage::Ready) if want == "Ready" => break,
                Ok(_) => {}
                Err(end) => {
                    ended(vm, end, Class::BootHang, &format!("no {want}"), &mut out);
                    return out;
                }
            }
        }
    }
    out.boot = Some(started.elapsed());

    let job = Job {
        id: JobId(format!("soak-{n}")),
        name: format!("soak {n}"),
        steps: vec![JobStep {
            name: "steady output".into(),
            run: job_script(args.lines),
            working_directory: None,
            env: BTreeMap::new(),
            timeout_secs: None,
        }],
        env: BTreeMap::new(),
        secrets: Default::default(),
        timeout_secs: 300,
    };
    if let Err(e) = ch.session.on_job_sent(&job) {
        out.class = Class::Other;
        out.detail = format!("job refused by the session: {e}");
        return out;
    }
    let job_start = Instant::now();
    if let Err(end) = ch.send(&HostMessage::Job(job)) {
        ended(vm, end, Class::JobHang, "sending the job", &mut out);
        return out;
    }
    let mut stdout = Vec::new();
    let mut messages = 0u64;
    let result = loop {
        match ch.recv(vm, silence) {
            Ok(GuestMessage::LogChunk(chunk)) => {
                messages += 1;
                if chunk.stream == OutputStream::Stdout {
                    stdout.extend_from_slice(&chunk.data);
                }
            }
            Ok(GuestMessage::JobFinished(f)) => break f.result,
            Ok(_) => messages += 1,
            Err(end) => {
                let what = format!(
                    "silent {}s into the job after {messages} messages, {} stdout bytes",
                    job_start.elapsed().as_secs(),
                    stdout.len()
                );
                ended(vm, end, Class::JobHang, &what, &mut out);
                return out;
            }
        }
    };
    out.job = Some(job_start.elapsed());
    if result != JobResult::Succeeded {
        out.class = Class::Other;
        out.detail = format!("job result {result:?}");
        return out;
    }
    let expected = expected_output(args.lines);
    if stdout != expected {
        let at = stdout
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(stdout.len().min(expected.len()));
        out.class = Class::Other;
        out.detail = format!(
            "output differs at byte {at} (got {} bytes, expected {})",
            stdout.len(),
            expected.len()
        );
    }
    out
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

fn run(args: RunArgs) -> std::process::ExitCode {
    let next = Arc::new(AtomicU32::new(args.first));
    let end = args.first + args.count;
    let results = args.results.clone();
    let write_lock = Arc::new(std::sync::Mutex::new(()));
    let workers: Vec<_> = (0..args.parallel.max(1))
        .map(|_| {
            let args = args.clone();
            let next = Arc::clone(&next);
            let results = results.clone();
            let write_lock = Arc::clone(&write_lock);
            std::thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= end {
                        break;
                    }
                    let o = run_one(&args, n);
                    let line = format!(
                        "SOAK {} {n} {} boot={} job={} {}",
                        args.vmm.name(),
                        o.class.name(),
                        secs(o.boot),
                        secs(o.job),
                        o.detail.replace('\n', " ")
                    );
                    let _guard = write_lock.lock();
                    println!("{line}");
                    if let Some(path) = &results {
                        let _ = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(path)
                            .and_then(|mut f| writeln!(f, "{line}"));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    std::process::ExitCode::SUCCESS
}

/// Median of some seconds, as text.
fn median(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    format!("{m:.2}")
}

/// Per-VMM counts of `SOAK` lines.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<&'static str, u32>,
    total: u32,
    boots: Vec<f64>,
    jobs: Vec<f64>,
}

fn summary(files: &[PathBuf]) -> std::process::ExitCode {
    let mut by_vmm: BTreeMap<String, Tally> = BTreeMap::new();
    // The harness repeats an ended attempt's output in its warning: the
    // same line (same timings) is counted once.
    let mut seen = std::collections::HashSet::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return std::process::ExitCode::FAILURE;
            }
        };
        for line in text.lines() {
            // The harness may prefix the scenario's lines.
            let Some(at) = line.find("SOAK ") else {
                continue;
            };
            let soak = line[at..].trim_end();
            if !seen.insert(soak.to_string()) {
                continue;
            }
            let f: Vec<&str> = soak.split_whitespace().collect();
            let (Some(vmm), Some(class)) = (f.get(1), f.get(3).and_then(|c| Class::parse(c)))
            else {
                continue;
            };
            let t = by_vmm.entry(vmm.to_string()).or_default();
            t.total += 1;
            *t.counts.entry(class.name()).or_default() += 1;
            let val = |key: &str| {
                f.iter()
                    .find_map(|x| x.strip_prefix(key))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if let Some(b) = val("boot=") {
                t.boots.push(b);
            }
            if class == Class::Ok
                && let Some(j) = val("job=")
            {
                t.jobs.push(j);
            }
        }
    }
    println!(
        "| VMM         | VMs | ok  | boot hangs | job hangs | triple faults | other | median boot (s) | median job (s) |"
    );
    println!(
        "|-------------|-----|-----|------------|-----------|---------------|-------|-----------------|----------------|"
    );
    for (vmm, t) in by_vmm {
        let c = |class: Class| t.counts.get(class.name()).copied().unwrap_or(0);
        println!(
            "| {vmm:<11} | {:>3} | {:>3} | {:>10} | {:>9} | {:>13} | {:>5} | {:>15} | {:>14} |",
            t.total,
            c(Class::Ok),
            c(Class::BootHang),
            c(Class::JobHang),
            c(Class::TripleFault),
            c(Class::Other),
            median(t.boots),
            median(t.jobs)
        );
    }
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args),
        Cmd::Summary { files } => summary(&files),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_output_matches_what_the_script_prints() {
        let out = Command::new("sh")
            .args(["-c", &job_script(205)])
            .output()
            .unwrap();
        assert_eq!(out.stdout, expected_output(205));
    }

    #[test]
    fn summary_lines_parse_back() {
        assert_eq!(Class::parse("job-hang"), Some(Class::JobHang));
        assert_eq!(Class::parse("nope"), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), "2.00");
        assert_eq!(median(vec![1.0, 2.0]), "1.50");
    }
}
