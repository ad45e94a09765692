//! Building blocks of the end-to-end scenarios that run Kindling's own
//! binaries (`host-agent`, `orchestrator`, `vmm`) on real VMs inside the
//! harness.
//!
//! * [`scenario`] assembles a [`Scenario`]: the script, the workspace
//!   binaries it calls, the guest kernel and minimal image, and job files
//!   written to a temporary directory, all under `$ASSETS`.
//! * [`SHELL_HELPERS`] and [`FLEET_HELPERS`] are shell preludes for the
//!   scripts: timing, fact lines, polling with a limit, and for scenarios
//!   that run the daemons, an orchestrator plus a host agent on loopback
//!   ([`FLEET_HELPERS`]' `start_fleet`) with helpers to submit jobs and
//!   inspect what the host agent left behind.
//! * [`Facts`] reads back the `@ SUBJECT key=value ...` fact lines the
//!   scripts print (`fact SUBJECT key=value ...`), which the tests assert
//!   on.
//!
//! A test puts the preludes before its own script:
//! `format!("{SHELL_HELPERS}{FLEET_HELPERS}{SCRIPT}")`.

use std::path::PathBuf;
use std::time::Duration;

use crate::assets::kernel_and_minimal_image;
use crate::{Asset, HarnessError, Scenario, workspace_binary};

/// The field whose value is the rest of its fact line, spaces included
/// (a reason, an error message); no field can follow it.
pub const REST_OF_LINE_KEY: &str = "why";

/// Assembles a scenario named `name` that runs `script` within `timeout`.
///
/// `bins` are installed on the scenario's `PATH`: a plain name is a binary
/// of this workspace ([`workspace_binary`]), a name with a `/` a file of
/// this host taken as it is (`/usr/sbin/nft`). The guest kernel and the
/// minimal image are `$ASSETS/vmlinux` and `$ASSETS/minimal.erofs`
/// ([`kernel_and_minimal_image`]); each of `jobs`, a (file name, text)
/// pair, is written to a temporary directory of this run and becomes
/// `$ASSETS/<file name>`.
pub fn scenario(
    name: &str,
    script: &str,
    timeout: Duration,
    bins: &[&str],
    jobs: &[(&str, &str)],
) -> Result<Scenario, HarnessError> {
    let mut sc = Scenario::new(name, script);
    sc.timeout = timeout;
    sc.bins = bins
        .iter()
        .map(|bin| {
            if bin.contains('/') {
                Ok(PathBuf::from(bin))
            } else {
                workspace_binary(bin)
            }
        })
        .collect::<Result<_, _>>()?;
    sc.assets = kernel_and_minimal_image()?;
    if !jobs.is_empty() {
        let dir = std::env::temp_dir().join(format!("kindling-{name}-jobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::Io(format!("creating {}", dir.display()), e))?;
        for (file, text) in jobs {
            let path = dir.join(file);
            std::fs::write(&path, text)
                .map_err(|e| HarnessError::Io(format!("writing {}", path.display()), e))?;
            sc.assets.push(Asset {
                host_path: path,
                name: (*file).into(),
            });
        }
    }
    Ok(sc)
}

/// Shell helpers for every scenario script (busybox `sh`), to put first.
///
/// Sets `set -u` and `T0` (when the script started), and defines:
/// * `now`: seconds since boot; `since T [UNTIL]`: seconds from `T` (a
///   `now`) to `UNTIL` (another, or now), two decimals; `say TEXT...`:
///   TEXT after the seconds since `T0`;
/// * `fact SUBJECT key=value ...`: a fact line for [`Facts`];
/// * `die TEXT...`: says `FATAL: TEXT`, runs `dump` (a no-op here, which a
///   script with logs to show redefines; [`FLEET_HELPERS`] does) and exits
///   1;
/// * `wait_for SECONDS WHAT COMMAND...`: runs COMMAND every 0.3 s until it
///   succeeds, then sets `WAITED_UNTIL` to that moment (a `now`, for
///   timings that saying must not lengthen) and says WHAT and how long it
///   took; after SECONDS, says what it timed out on and returns 1.
pub const SHELL_HELPERS: &str = r#"
set -u
now() { cut -d' ' -f1 /proc/uptime; }
T0=$(now)
since() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.2f", b - a }'; }
say() { echo "[$(since $T0) s] $*"; }
fact() { echo "@ $*"; }
dump() { :; }
die() { say "FATAL: $*"; dump; exit 1; }
wait_for() {
    local limit="$1" what="$2" start
    shift 2
    start=$(now)
    while ! "$@"; do
        if [ "$(awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { print (b - a >= l) }')" = 1 ]; then
            say "timed out after $limit s waiting for: $what"
            return 1
        fi
        sleep 0.3
    done
    WAITED_UNTIL=$(now)
    say "$what ($(since $start $WAITED_UNTIL) s)"
}
"#;

/// Shell helpers for scenarios that run the daemons: an orchestrator and a
/// host agent on loopback, with their files under `$W` (which the script
/// sets; job files in `$W/jobs`). Goes after [`SHELL_HELPERS`].
///
/// Sets the credentials `HC` (host) and `CC` (client) and exports the
/// client CLI's server and credential, and defines:
/// * `start_fleet SECONDS READY...`: writes `$W/agent.toml`, the common
///   settings (host id, state under `$W/state`, the `vmm` on `PATH`,
///   metrics on 127.0.0.1:9100, the orchestrator, limits of 2 vCPUs and
///   512 MiB) followed by the text on its standard input (pools, and any
///   other top-level setting or table); starts `orchestrator serve` (pid
///   in `ORCH`, log `$W/orch.log`) and, once it answers, the host agent
///   (`start_agent`); then waits up to SECONDS for the command READY (its
///   pools idle, say). Dies if either does not come up;
/// * `start_agent`: `host-agent serve` with `$W/agent.toml`, log appended
///   to `$W/agent.log`, pid in `AGENT`;
/// * `agent_log`: that log without colour codes; `dump`: the tails of both
///   logs; on exit, the log's `guest hang:` lines are printed (an `EXIT`
///   trap: a script that sets its own must call `report_hangs`);
/// * `agent_metrics`: the host agent's metrics; `orch_metric NAME`: the
///   value of one of the orchestrator's; `idle POOL [COUNT]`: POOL has
///   COUNT (1 if not given) idle VMs;
/// * `submit NAME [ARGS...]`: `orchestrator submit $W/jobs/NAME.yaml
///   --follow ARGS...` in the background, stdout to `$W/jobs/NAME.out`,
///   stderr to `$W/jobs/NAME.err`, exit code to `$W/jobs/NAME.rc` when it
///   ends; `ended NAME`: it has ended;
/// * `vmm_procs`: processes running the VMM binary, as `PID STATE` lines
///   (`Z`: a zombie); `live_vmms`, `zombie_vmms`: how many of each;
/// * `freeze_vmms`: freezes every live VMM in the cgroup v2
///   `/sys/fs/cgroup/wedged` (which the script removes once they are
///   gone). A healthy guest powers off when its host agent vanishes, and
///   a stopped VMM would get SIGHUP once its process group is orphaned:
///   frozen VMMs stand for wedged ones, which a clean-up must kill.
pub const FLEET_HELPERS: &str = r#"
HC=host-credential-0123456789abcdef
CC=client-credential-0123456789abcdef
export KINDLING_SERVER=http://127.0.0.1:8080 KINDLING_CLIENT_CREDENTIAL=$CC
agent_log() { tr -d '\033' < $W/agent.log | sed 's/\[[0-9;]*m//g'; }
# When the script ends, however it ends: the host agent's reports of wedged
# guests, for the harness to see (`run::l2_hangs`), which reruns such a run.
report_hangs() {
    [ -f $W/agent.log ] && agent_log | grep 'guest hang:' | sed 's/^/@@ host-agent: /'
    return 0
}
trap report_hangs EXIT
dump() {
    echo "--- host-agent log (tail) ---"; agent_log | tail -40
    echo "--- orchestrator log (tail) ---"; tail -20 $W/orch.log
}
agent_metrics() { timeout 10 wget -q -O - http://127.0.0.1:9100/metrics 2>/dev/null; }
orch_metric() { timeout 10 wget -q -O - http://127.0.0.1:8080/metrics 2>/dev/null | sed -n "s/^$1 //p"; }
orch_up() { [ -n "$(orch_metric kindling_orchestrator_vms)" ]; }
idle() { agent_metrics | grep -q "kindling_host_agent_vms{pool=\"$1\",state=\"idle\"} ${2:-1}"; }
start_agent() {
    RUST_LOG=info host-agent serve --config $W/agent.toml >> $W/agent.log 2>&1 &
    AGENT=$!
}
start_fleet() {
    local limit="$1"
    shift
    {
        cat <<END_OF_HEADER
host_id = "l1-host"
state_dir = "$W/state"
vmm = "$(command -v vmm)"
metrics_listen = "127.0.0.1:9100"
orchestrator = { url = "http://127.0.0.1:8080", host_credential = "$HC" }
limits = { vcpus = 2, memory_mib = 512 }
END_OF_HEADER
        cat
    } > $W/agent.toml
    orchestrator serve --listen 127.0.0.1:8080 --archive $W/archive \
        --host-credential $HC --client-credential $CC > $W/orch.log 2>&1 &
    ORCH=$!
    wait_for 15 "orchestrator up" orch_up || die "no orchestrator"
    start_agent
    wait_for "$limit" "host agent ready: $*" "$@" || die "host agent not ready: $*"
}
submit() {
    local name="$1"
    shift
    ( orchestrator submit $W/jobs/$name.yaml --follow "$@" > $W/jobs/$name.out 2> $W/jobs/$name.err
      echo $? > $W/jobs/$name.rc ) &
}
ended() { [ -s $W/jobs/$1.rc ]; }
vmm_procs() {
    for p in /proc/[0-9]*; do
        [ "$(cat $p/comm 2>/dev/null)" = vmm ] || continue
        echo "${p#/proc/} $(sed 's/^.*) //' $p/stat 2>/dev/null | cut -d' ' -f1)"
    done
}
live_vmms() { vmm_procs | grep -vc ' Z$'; }
zombie_vmms() { vmm_procs | grep -c ' Z$'; }
freeze_vmms() {
    mkdir -p /sys/fs/cgroup/wedged || die "no cgroup v2 in the L1"
    for pid in $(vmm_procs | grep -v ' Z$' | cut -d' ' -f1); do
        echo $pid > /sys/fs/cgroup/wedged/cgroup.procs
    done
    echo 1 > /sys/fs/cgroup/wedged/cgroup.freeze
    wait_for 10 "VMMs frozen" grep -q '^frozen 1' /sys/fs/cgroup/wedged/cgroup.events ||
        die "cannot freeze the VMMs"
}
"#;

/// The fact lines of a scenario's output: `@ SUBJECT key=value ...`, as
/// the scripts' `fact` prints them.
///
/// A subject may have several lines (one per job, per moment, ...); a
/// lookup by subject and key takes the first of its lines with that key.
/// Values end at whitespace, except that of [`REST_OF_LINE_KEY`] (`why=`),
/// which is the rest of its line.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// (subject, its fields), in output order.
    lines: Vec<(&'a str, &'a str)>,
}

impl<'a> Facts<'a> {
    /// The fact lines of `output` (other lines are ignored).
    pub fn parse(output: &'a str) -> Facts<'a> {
        let lines = output
            .lines()
            .filter_map(|l| l.trim().strip_prefix("@ "))
            .map(|l| {
                let l = l.trim_start();
                l.split_once(char::is_whitespace)
                    .map_or((l, ""), |(subject, fields)| (subject, fields.trim_start()))
            })
            .collect();
        Facts { lines }
    }

    /// The fields of every line of `subject` (what follows the subject), in
    /// output order.
    pub fn lines(&self, subject: &str) -> Vec<&'a str> {
        self.lines
            .iter()
            .filter(|(s, _)| *s == subject)
            .map(|(_, fields)| *fields)
            .collect()
    }

    /// The value of `key` on the first line of `subject` that has it.
    pub fn get(&self, subject: &str, key: &str) -> Option<&'a str> {
        self.lines(subject)
            .into_iter()
            .find_map(|fields| field(fields, key))
    }

    /// [`Facts::get`], for a fact that must be there.
    ///
    /// # Panics
    /// When no line of `subject` has `key`.
    pub fn value(&self, subject: &str, key: &str) -> &'a str {
        self.get(subject, key).unwrap_or_else(|| {
            panic!(
                "no fact {key}= for {subject}; its lines: {:?}",
                self.lines(subject)
            )
        })
    }

    /// The number in `seconds=` of `subject`.
    ///
    /// # Panics
    /// When there is none, or it is not a number.
    pub fn seconds(&self, subject: &str) -> f64 {
        let value = self.value(subject, "seconds");
        value
            .parse()
            .unwrap_or_else(|_| panic!("{subject} seconds={value} is not a number"))
    }

    /// The fields after `key=value` on the first line of `subject` that
    /// has exactly that field: for lines that name a moment first
    /// (`@ state when=warm taps=2 ...`), what was seen then.
    pub fn after(&self, subject: &str, key: &str, value: &str) -> Option<&'a str> {
        let wanted = format!("{key}={value}");
        self.lines(subject).into_iter().find_map(|fields| {
            words(fields)
                .find(|(word, _)| *word == wanted)
                .map(|(word, from)| from[word.len()..].trim_start())
        })
    }
}

/// The value of `key` in whitespace-separated `key=value` fields (a fact
/// line's fields, or any line written that way); [`REST_OF_LINE_KEY`]'s
/// value is the rest of the line, and ends the search.
pub fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    for (word, from) in words(fields) {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        if k == REST_OF_LINE_KEY {
            return (key == REST_OF_LINE_KEY).then(|| &from[k.len() + 1..]);
        }
        if k == key {
            return Some(v);
        }
    }
    None
}

/// The whitespace-separated words of `text`, each with the text from its
/// start to the end.
fn words(text: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = text.trim_start();
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let from = rest;
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest = rest[end..].trim_start();
        Some((&from[..end], from))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
booting
@ job name=fetch rc=0
[fetch] @ job name=not-a-fact rc=9
@ job name=offline rc=1
  @ ns mnt=own
@ ns pid=shared\r
@ gpu state=queued why=no idle VM with labels [linux, gpu]: none  rc=7
@ state when=warm taps=2  dirs=2
@ state when=stopped taps=0 dirs=0
@ stop agent_rc=0 seconds=21.35
@ bare
";

    #[test]
    fn a_lookup_takes_the_first_line_of_the_subject_with_the_key() {
        let f = Facts::parse(OUTPUT);
        assert_eq!(f.get("job", "rc"), Some("0"));
        assert_eq!(f.get("job", "name"), Some("fetch"));
        assert_eq!(f.get("ns", "mnt"), Some("own"));
        assert_eq!(f.get("ns", "pid"), Some("shared"));
        assert_eq!(f.value("stop", "agent_rc"), "0");
        assert_eq!(f.seconds("stop"), 21.35);
        assert_eq!(f.get("job", "missing"), None);
        assert_eq!(f.get("nobody", "rc"), None);
        assert_eq!(f.lines("bare"), [""]);
    }

    #[test]
    fn a_repeated_subject_keeps_every_line_in_order() {
        let f = Facts::parse(OUTPUT);
        assert_eq!(f.lines("job"), ["name=fetch rc=0", "name=offline rc=1"]);
        assert_eq!(f.lines("nobody"), Vec::<&str>::new());
        assert_eq!(f.after("state", "when", "warm"), Some("taps=2  dirs=2"));
        assert_eq!(f.after("state", "when", "stopped"), Some("taps=0 dirs=0"));
        assert_eq!(f.after("state", "when", "war"), None);
    }

    #[test]
    fn why_takes_the_rest_of_its_line() {
        let f = Facts::parse(OUTPUT);
        assert_eq!(f.get("gpu", "state"), Some("queued"));
        assert_eq!(
            f.get("gpu", "why"),
            Some("no idle VM with labels [linux, gpu]: none  rc=7")
        );
        // What follows why= is its text, not a field.
        assert_eq!(f.get("gpu", "rc"), None);
        assert_eq!(field("why=", "why"), Some(""));
    }

    #[test]
    fn fields_of_any_line() {
        let line = "bytes=131072 start=10.5 end=11.5";
        assert_eq!(field(line, "start"), Some("10.5"));
        assert_eq!(field(line, "end"), Some("11.5"));
        assert_eq!(field(line, "tart"), None);
        assert_eq!(field("plain words here", "words"), None);
    }

    #[test]
    #[should_panic(expected = "no fact rc= for nobody")]
    fn a_missing_fact_that_must_be_there_panics() {
        Facts::parse(OUTPUT).value("nobody", "rc");
    }
}
