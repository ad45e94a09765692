//! One microVM as the host agent sees it: its directory, its `vmm` process
//! and the vsock channel its runner agent dials.
//!
//! Order matters here. The agent binds the Unix socket on which the VMM
//! delivers guest-initiated vsock connections (`<uds>_<port>`, the
//! Firecracker convention) *before* it spawns the VMM, so the guest can never
//! dial before anyone listens. Everything the VM owns lives in its directory
//! (`<state_dir>/vms/<name>`), so teardown is: kill the process group, reap
//! it, remove the directory.
//!
//! That directory belongs to the VM's uid (and is bound into its jail), so
//! the agent, which runs as root, writes nothing there after the VMM
//! started and reads nothing there by name: the VMM's log is read through
//! the descriptor the agent opened before the spawn ([`VmmLog`]), and what
//! a later clean-up needs (pid and start time, VM id) goes to the agent's
//! own record ([`crate::records`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use protocol::frame::{FrameDecoder, FrameError, encode_frame};
use protocol::message::{GuestHello, GuestMessage, HostMessage};
use protocol::ports::{RUNNER_AGENT_PORT, host_listener_path};
use protocol::session::{HostSession, SessionError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use crate::jail::JailSpec;
use crate::process::ProcessIdentity;
use crate::records::{self, VmRecord};
use crate::vmm_log::VmmLog;

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Preparing the VM's directory or socket failed.
    #[error("preparing VM {name}: {what}: {source}")]
    Prepare {
        /// The VM.
        name: String,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {vmm}: {source}")]
    Spawn {
        /// The VMM binary.
        vmm: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM exited before the runner agent said `Hello`.
    #[error("vm exited with {status} before the runner agent said Hello{detail}")]
    ExitedBeforeHello {
        /// How it exited.
        status: String,
        /// The tail of its stderr, if any.
        detail: String,
    },
    /// No `Hello` within the boot deadline.
    #[error("no Hello within {0:?}")]
    BootTimeout(Duration),
    /// The guest broke the protocol or the channel failed.
    #[error("runner-agent channel: {0}")]
    Channel(#[from] ChannelError),
}

/// Errors on the vsock channel to the runner agent.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be decoded (bad frame: the channel is closed).
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The guest sent a message out of order.
    #[error("protocol violation: {0}")]
    Session(#[from] SessionError),
    /// The guest closed the connection.
    #[error("the guest closed the channel")]
    Closed,
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique name on this host (also the directory name).
    pub name: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Read-only root image.
    pub image: PathBuf,
    /// Full kernel command line.
    pub cmdline: String,
    /// Guest vsock CID.
    pub cid: u32,
    /// The jail the VMM runs in (`None`: started directly, unconfined).
    pub jail: Option<JailSpec>,
    /// Its network device, if it has one (the tap exists already).
    pub network: Option<crate::net::VmNetwork>,
}

/// The VMM arguments of the VM's network device (none without one). A
/// jailed VMM runs in an empty network namespace: its jailer attaches the
/// tap in the host's and hands it over as fd [`crate::jail::TAP_FD`].
fn network_args(spec: &VmSpec) -> Vec<String> {
    match &spec.network {
        Some(net) if spec.jail.is_some() => {
            vec!["--net".into(), net.vmm_arg_with_fd(crate::jail::TAP_FD)]
        }
        Some(net) => vec!["--net".into(), net.vmm_arg()],
        None => Vec::new(),
    }
}

/// The base kernel command line of every VM: serial console, reset through
/// the i8042 so the VM ends on reboot, the read-only erofs root, and the
/// runner agent as init.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet \
root=/dev/vda ro rootfstype=erofs init=/sbin/runner-agent";

/// A VM whose VMM process is running.
pub struct RunningVm {
    /// Its spec.
    pub spec: VmSpec,
    /// Its directory.
    pub dir: PathBuf,
    /// When the VMM was spawned.
    pub started: Instant,
    child: Child,
    listener: UnixListener,
    log: VmmLog,
    records_dir: PathBuf,
    record: VmRecord,
}

impl RunningVm {
    /// Creates the VM's directory and record, binds its vsock listener and
    /// spawns the VMM. On failure, nothing of the VM is left.
    pub async fn spawn(vmm: &Path, state_dir: &Path, spec: VmSpec) -> Result<RunningVm, VmError> {
        let name = spec.name.clone();
        let result = Self::start(vmm, state_dir, spec);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(state_dir.join("vms").join(&name));
            let _ = records::remove(&records::records_dir(state_dir), &name);
        }
        result
    }

    fn start(vmm: &Path, state_dir: &Path, spec: VmSpec) -> Result<RunningVm, VmError> {
        let dir = state_dir.join("vms").join(&spec.name);
        let prep = |what: &str| {
            let name = spec.name.clone();
            let what = what.to_string();
            move |source| VmError::Prepare { name, what, source }
        };
        std::fs::create_dir_all(&dir).map_err(prep("creating its directory"))?;
        // The record exists before the VMM does: a crash right after the
        // spawn still leaves the clean-up the VM's name (its cgroup).
        let records_dir = records::records_dir(state_dir);
        let mut record = VmRecord {
            name: spec.name.clone(),
            process: None,
            vm_id: None,
        };
        records::write(&records_dir, &record)
            .map_err(|e| prep("recording it")(std::io::Error::other(e)))?;
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(host_listener_path(&uds, RUNNER_AGENT_PORT))
            .map_err(prep("binding the runner-agent socket"))?;
        let log = VmmLog::create(&dir.join("vmm.log")).map_err(prep("creating vmm.log"))?;
        let stdout = log.writer().map_err(prep("creating vmm.log"))?;
        let stderr = log.writer().map_err(prep("creating vmm.log"))?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "--kernel".into(),
            spec.kernel.clone().into(),
            "--cmdline".into(),
            spec.cmdline.clone().into(),
            "--vcpus".into(),
            spec.vcpus.to_string().into(),
            "--memory-mib".into(),
            spec.memory_mib.to_string().into(),
            "--drive".into(),
            format!("path={},ro", spec.image.display()).into(),
            "--vsock".into(),
            format!("cid={},uds={}", spec.cid, uds.display()).into(),
            "--rng".into(),
            "--serial".into(),
            format!("file:{}", dir.join("serial.log").display()).into(),
            "--boot-timer".into(),
        ];
        args.extend(network_args(&spec).into_iter().map(Into::into));
        let (program, args) = match &spec.jail {
            Some(jail) => {
                let sockets = [host_listener_path(&uds, RUNNER_AGENT_PORT)];
                jailed_command(jail, state_dir, vmm, &spec, &dir, &sockets, &args)
                    .map_err(|e| prep("preparing the jail")(std::io::Error::other(e)))?
            }
            None => (vmm.to_path_buf(), args),
        };
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            vmm: program.clone(),
            source,
        })?;
        record.process = child.id().and_then(|pid| ProcessIdentity::of(pid as i32));
        if let Err(e) = records::write(&records_dir, &record) {
            tracing::warn!(vm = %spec.name, "cannot record the VMM's process: {e}");
        }
        Ok(RunningVm {
            spec,
            dir,
            started,
            child,
            listener,
            log,
            records_dir,
            record,
        })
    }

    /// Records the VM's orchestrator id, so that a clean-up after a crash
    /// of this agent deregisters it.
    pub fn record_vm_id(&mut self, vm_id: &str) -> Result<(), records::RecordError> {
        self.record.vm_id = Some(vm_id.to_string());
        records::write(&self.records_dir, &self.record)
    }

    /// The process the agent spawned (the VMM, or its jailer), as recorded.
    pub fn process(&self) -> Option<ProcessIdentity> {
        self.record.process
    }

    /// Waits for the runner agent to dial in and complete the handshake
    /// (`Hello` answered with `HelloAck`), failing early if the VMM exits.
    pub async fn wait_hello(&mut self, timeout: Duration) -> Result<GuestChannel, VmError> {
        let accept = async {
            let (stream, _) = self.listener.accept().await.map_err(ChannelError::Io)?;
            GuestChannel::handshake(stream).await
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, accept) => match r {
                Ok(channel) => Ok(channel?),
                Err(_) => Err(VmError::BootTimeout(timeout)),
            },
            status = self.child.wait() => Err(VmError::ExitedBeforeHello {
                status: status.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string()),
                detail: self.log_tail(),
            }),
        }
    }

    /// Resolves when the VMM process exits, with its status as text.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(s) => describe_exit(&s),
            Err(e) => format!("unknown status ({e})"),
        }
    }

    /// The last lines the VMM wrote (its failure reason is there), as
    /// `": line / line"`, or empty. Bounded, and read through the agent's
    /// own descriptor (see [`VmmLog`]), whatever the VMM did to the name.
    pub fn log_tail(&self) -> String {
        let tail = self.log.tail();
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    }

    /// Kills the VMM's process group, reaps it and removes the VM's directory.
    /// Returns how long that took.
    pub async fn destroy(mut self) -> Duration {
        let t = Instant::now();
        if let Some(pid) = self.child.id() {
            let pgid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill().await;
        if let Some(jail) = self.spec.jail.clone() {
            // The jailer removes it when it outlives the VMM; after SIGKILL
            // of the whole group it cannot. Removal retries while the last
            // processes finish exiting: off the async workers.
            let _ = tokio::task::spawn_blocking(move || jail.remove_cgroup()).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Last: until here, a clean-up after a crash needs the record.
        if let Err(e) = records::remove(&self.records_dir, &self.spec.name) {
            tracing::warn!(vm = %self.spec.name, "cannot remove the VM's record: {e}");
        }
        t.elapsed()
    }
}

/// Turns the VMM command into the jailer command for `spec`'s jail: the
/// VM directory and its bound sockets go to the VM's uid, the kernel and
/// image are bound read-only, `/dev/kvm` is the only device (a tap, when
/// the VM has one, is attached by the jailer and inherited as an fd).
fn jailed_command(
    jail: &JailSpec,
    state_dir: &Path,
    vmm: &Path,
    spec: &VmSpec,
    dir: &Path,
    sockets: &[PathBuf],
    args: &[std::ffi::OsString],
) -> Result<(PathBuf, Vec<std::ffi::OsString>), crate::jail::JailError> {
    jail.prepare_dir(dir, sockets)?;
    let mount_point = state_dir.join("jail-root");
    let read_only = [spec.kernel.as_path(), spec.image.as_path()];
    let tap = spec.network.as_ref().map(|net| net.link.tap_name());
    Ok(jail.command(&crate::jail::JailedVmm {
        id: &spec.name,
        mount_point: &mount_point,
        vmm,
        args,
        read_only: &read_only,
        dir,
        devices: &["kvm"],
        tap: tap.as_deref(),
    }))
}

/// The reason a job carries when seccomp killed the VMM.
pub const SECCOMP_KILL_REASON: &str =
    "vmm killed by seccomp (a syscall outside its allow-list; see the VMM's threat model)";

/// A VMM exit status as text. Death by `SIGSYS` is the seccomp filter's
/// verdict (`SECCOMP_RET_KILL_PROCESS`): it is named as such, because it
/// means the VMM (possibly driven by a hostile guest) tried something its
/// allow-list forbids.
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if status.signal() == Some(nix::libc::SIGSYS) {
        format!("{status}: {SECCOMP_KILL_REASON}")
    } else {
        status.to_string()
    }
}

/// The established channel to one runner agent.
pub struct GuestChannel {
    stream: UnixStream,
    decoder: FrameDecoder<GuestMessage>,
    session: HostSession,
    buf: Vec<u8>,
    /// The guest's `Hello`.
    pub hello: GuestHello,
}

impl GuestChannel {
    async fn handshake(stream: UnixStream) -> Result<GuestChannel, ChannelError> {
        let mut channel = GuestChannel {
            stream,
            decoder: FrameDecoder::new(),
            session: HostSession::new(),
            buf: vec![0; 64 * 1024],
            hello: GuestHello {
                protocol_version: 0,
                agent_version: String::new(),
                boot_id: String::new(),
                kernel_release: String::new(),
            },
        };
        match channel.recv().await {
            Ok(GuestMessage::Hello(hello)) => channel.hello = hello,
            Ok(other) => {
                return Err(ChannelError::Session(SessionError::UnexpectedMessage {
                    got: protocol::message::WireMessage::kind(&other),
                    phase: protocol::session::Phase::AwaitingHello,
                }));
            }
            Err(ChannelError::Frame(err)) => {
                if let Some(reject) = HostSession::rejection_for(&err) {
                    let _ = channel.send_raw(&reject).await;
                }
                return Err(ChannelError::Frame(err));
            }
            Err(e) => return Err(e),
        }
        Ok(channel)
    }

    /// The next message from the guest, checked against the conversation.
    /// Cancel-safe: a partially read frame stays in the decoder.
    pub async fn recv(&mut self) -> Result<GuestMessage, ChannelError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                if let Some(reply) = self.session.on_guest_message(&msg)? {
                    self.send_raw(&reply).await?;
                }
                return Ok(msg);
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Err(ChannelError::Closed);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }

    /// Waits for the guest's `Ready` (its setup is done; it can take a job).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), ChannelError> {
        let wait = async {
            loop {
                if let GuestMessage::Ready = self.recv().await? {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            ChannelError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no Ready from the guest",
            ))
        })?
    }

    /// Sends the job (checked against the session first).
    pub async fn send_job(&mut self, job: &protocol::message::Job) -> Result<(), ChannelError> {
        self.session.on_job_sent(job)?;
        self.send_raw(&HostMessage::Job(job.clone())).await
    }

    /// Sends a message that needs no session bookkeeping (Cancel, Shutdown).
    pub async fn send_raw(&mut self, msg: &HostMessage) -> Result<(), ChannelError> {
        let frame = encode_frame(msg)?;
        self.stream.write_all(&frame).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn death_by_sigsys_is_reported_as_a_seccomp_kill() {
        let sigsys = std::process::ExitStatus::from_raw(nix::libc::SIGSYS);
        let text = describe_exit(&sigsys);
        assert!(text.contains("SIGSYS"), "{text}");
        assert!(text.contains("vmm killed by seccomp"), "{text}");
        let sigkill = std::process::ExitStatus::from_raw(nix::libc::SIGKILL);
        assert!(!describe_exit(&sigkill).contains("seccomp"));
        let exit1 = std::process::ExitStatus::from_raw(1 << 8);
        assert_eq!(describe_exit(&exit1), "exit status: 1");
    }
}
