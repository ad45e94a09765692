//! One microVM as the host agent sees it: its directory, its `vmm` process
//! and the vsock channel its runner agent dials.
//!
//! Order matters here. The agent binds the Unix socket on which the VMM
//! delivers guest-initiated vsock connections (`<uds>_<port>`, the
//! Firecracker convention) *before* it spawns the VMM, so the guest can never
//! dial before anyone listens. Everything the VM owns lives in its directory
//! (`<state_dir>/vms/<name>`), so teardown is: kill the process group, reap
//! it, remove the directory.

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
    /// Its network device, if it has one (the tap exists already).
    pub network: Option<crate::net::VmNetwork>,
}

/// The VMM arguments of the VM's network device (none without one).
fn network_args(spec: &VmSpec) -> Vec<String> {
    match &spec.network {
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
}

impl RunningVm {
    /// Creates the VM's directory, binds its vsock listener and spawns the VMM.
    pub async fn spawn(vmm: &Path, state_dir: &Path, spec: VmSpec) -> Result<RunningVm, VmError> {
        let dir = state_dir.join("vms").join(&spec.name);
        let prep = |what: &str| {
            let name = spec.name.clone();
            let what = what.to_string();
            move |source| VmError::Prepare { name, what, source }
        };
        std::fs::create_dir_all(&dir).map_err(prep("creating its directory"))?;
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(host_listener_path(&uds, RUNNER_AGENT_PORT))
            .map_err(prep("binding the runner-agent socket"))?;
        let log = std::fs::File::create(dir.join("vmm.log")).map_err(prep("creating vmm.log"))?;
        let log2 = log.try_clone().map_err(prep("creating vmm.log"))?;
        let mut cmd = Command::new(vmm);
        cmd.arg("--kernel")
            .arg(&spec.kernel)
            .arg("--cmdline")
            .arg(&spec.cmdline)
            .arg("--vcpus")
            .arg(spec.vcpus.to_string())
            .arg("--memory-mib")
            .arg(spec.memory_mib.to_string())
            .arg("--drive")
            .arg(format!("path={},ro", spec.image.display()))
            .arg("--vsock")
            .arg(format!("cid={},uds={}", spec.cid, uds.display()))
            .arg("--rng")
            .arg("--serial")
            .arg(format!("file:{}", dir.join("serial.log").display()))
            .arg("--boot-timer")
            .args(network_args(&spec))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            vmm: vmm.to_path_buf(),
            source,
        })?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(dir.join("vmm.pid"), pid.to_string());
        }
        Ok(RunningVm {
            spec,
            dir,
            started,
            child,
            listener,
        })
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
                status: status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                detail: self.log_tail(),
            }),
        }
    }

    /// Resolves when the VMM process exits, with its status as text.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown status ({e})"),
        }
    }

    /// The last lines the VMM wrote (its failure reason is there).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        if lines.is_empty() {
            String::new()
        } else {
            let tail: Vec<&str> = lines.into_iter().rev().collect();
            format!(": {}", tail.join(" / "))
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
        let _ = std::fs::remove_dir_all(&self.dir);
        t.elapsed()
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
