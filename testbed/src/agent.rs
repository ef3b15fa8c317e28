//! Starting, probing and stopping a node's sluice agent. Processes are addressed by pid only, and
//! a pid read back from `state.json` is only signalled after `/proc/PID/cmdline` shows it still
//! runs the recorded binary (pids are reused).
use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use control::api::{self, ApiError, Request};

use crate::cmd;

/// How long an agent may take to write its CNI config and open its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Readiness poll interval.
pub const READY_POLL: Duration = Duration::from_millis(50);
/// How long an agent gets to exit after a signal before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lines of the agent log shown when it fails.
const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create the agent log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the sluice agent for node {node} ({command}): {source}")]
    Spawn {
        node: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// `tail` starts with the log's path ([`log_tail`]).
    #[error("the sluice agent of node {node} exited early ({status}); {tail}")]
    Exited {
        node: String,
        status: String,
        tail: String,
    },
    #[error(
        "the sluice agent of node {node} (pid {pid}) did not write {conf} and answer on {socket} \
         within {READY_TIMEOUT:?}; {tail}"
    )]
    NotReady {
        node: String,
        pid: u32,
        conf: PathBuf,
        socket: PathBuf,
        tail: String,
    },
    #[error("the sluice agent of node {node} (pid {pid}) is still alive after SIGKILL")]
    Unkillable { node: String, pid: u32 },
    #[error("sending signal {signal} to the sluice agent of node {node} (pid {pid}): {source}")]
    Signal {
        node: String,
        pid: u32,
        signal: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Everything needed to start one node's agent.
pub struct AgentSpec<'a> {
    pub node: &'a str,
    pub netns: &'a str,
    pub sluice_bin: &'a Path,
    /// What the agent reads (`--source file:`), unless `extra_args` carry their own `--source`.
    pub cluster_file: &'a Path,
    pub state_dir: &'a Path,
    pub cni_conf_dir: &'a Path,
    pub workers: u32,
    pub extra_args: &'a [String],
}

impl AgentSpec<'_> {
    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join(api::SOCKET_NAME)
    }
    pub fn conf(&self) -> PathBuf {
        self.cni_conf_dir.join(api::CNI_CONF_NAME)
    }
}

/// Starts the agent in the node's namespace (`ip netns exec` execs it, so the child's pid is the
/// agent's) with its output appended to `STATE/NODE/agent.log`, and waits until it is ready.
/// An agent that fails to get ready is killed before the error is returned.
pub fn start(spec: &AgentSpec<'_>) -> Result<Child, AgentError> {
    let log_path = spec.log_path();
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| AgentError::Log {
            path: log_path.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| AgentError::Log {
        path: log_path.clone(),
        source,
    })?;
    // A socket left by an earlier agent would look like a ready one.
    let _ = std::fs::remove_file(spec.socket());
    let mut command = cmd::in_netns(spec.netns, &[]);
    command.arg(spec.sluice_bin).arg("run");
    // An explicit `--source` among the extra arguments (`--source kubernetes --api-server URL`,
    // see [`crate::AgentSource`]) replaces the cluster file.
    if !spec.extra_args.iter().any(|a| a.starts_with("--source")) {
        command
            .arg("--source")
            .arg(format!("file:{}", spec.cluster_file.display()));
    }
    command
        .arg("--node")
        .arg(spec.node)
        .arg("--state-dir")
        .arg(spec.state_dir)
        .arg("--cni-conf-dir")
        .arg(spec.cni_conf_dir)
        .arg("--workers")
        .arg(spec.workers.to_string())
        .args(spec.extra_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C meant for the testbed CLI does not reach the agent.
        .process_group(0);
    let mut child = command.spawn().map_err(|source| AgentError::Spawn {
        node: spec.node.to_string(),
        command: cmd::describe(&command),
        source,
    })?;
    match wait_ready(spec, &mut child) {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn wait_ready(spec: &AgentSpec<'_>, child: &mut Child) -> Result<(), AgentError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let (conf, socket, log) = (spec.conf(), spec.socket(), spec.log_path());
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(AgentError::Exited {
                node: spec.node.to_string(),
                status: status.to_string(),
                tail: log_tail(&log),
            });
        }
        if conf.exists() && socket_answers(&socket) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(AgentError::NotReady {
                node: spec.node.to_string(),
                pid: child.id(),
                conf,
                socket,
                tail: log_tail(&log),
            });
        }
        thread::sleep(READY_POLL);
    }
}

/// Whether something answers on the agent socket (any answer, even a refusal, counts).
pub fn socket_answers(socket: &Path) -> bool {
    if !socket.exists() {
        return false;
    }
    !matches!(
        api::call(socket, &Request::Status, Duration::from_secs(1)),
        Err(ApiError::Connect { .. })
    )
}

/// "last lines of PATH:" and the last lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path) -> String {
    format!("last lines of {}:\n{}", path.display(), tail_lines(path))
}

fn tail_lines(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            let tail = lines[start..].join("\n");
            if tail.is_empty() {
                "(empty log)".into()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Whether `pid` is a live (not zombie) process running `binary`: its `argv[0]`, or `argv[1]` when
/// `binary` is a script run by an interpreter.
pub fn runs_binary(pid: u32, binary: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let binary = binary.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).take(2).any(|arg| arg == binary) && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3, after the parenthesised command name (which may itself contain spaces).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        == Some("Z")
}

/// Sends `signal` to the agent and waits (bounded) for it to exit, then SIGKILL if it has not.
/// With `child`, the exit is reaped; without, liveness comes from `/proc` and `binary`.
pub fn stop(
    node: &str,
    pid: u32,
    child: Option<&mut Child>,
    binary: &Path,
    signal: i32,
) -> Result<(), AgentError> {
    let mut child = child;
    let alive = |child: &mut Option<&mut Child>| match child {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => runs_binary(pid, binary),
    };
    if !alive(&mut child) {
        return Ok(());
    }
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| AgentError::Signal {
        node: node.into(),
        pid,
        signal,
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let send = |sig: i32| -> Result<(), AgentError> {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is the agent's (checked
        // alive just above, or our own unreaped child, which cannot be reused).
        if unsafe { libc::kill(raw_pid, sig) } == 0 {
            Ok(())
        } else {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ESRCH) {
                Ok(())
            } else {
                Err(AgentError::Signal {
                    node: node.into(),
                    pid,
                    signal: sig,
                    source,
                })
            }
        }
    };
    send(signal)?;
    for (grace, then_kill) in [(STOP_GRACE, true), (Duration::from_secs(2), false)] {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !alive(&mut child) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        if then_kill {
            send(libc::SIGKILL)?;
        }
    }
    if alive(&mut child) {
        Err(AgentError::Unkillable {
            node: node.into(),
            pid,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.log");
        let text: String = (0..30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).expect("write log");
        let tail = log_tail(&path);
        assert!(
            tail.starts_with("last lines of ") && tail.contains(":\nline 10\n"),
            "{tail}"
        );
        assert!(
            tail.ends_with("\nline 29") && !tail.contains(":\nline 9\n"),
            "{tail}"
        );
        assert!(log_tail(&dir.path().join("missing")).contains("cannot read"));
    }

    #[test]
    fn stop_terminates_our_child_and_reaps_it() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let pid = child.id();
        stop(
            "n",
            pid,
            Some(&mut child),
            Path::new("/bin/sleep"),
            libc::SIGTERM,
        )
        .expect("stops");
        assert!(child.try_wait().expect("wait").is_some(), "child exited");
    }

    #[test]
    fn a_pid_running_another_binary_is_not_ours() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let pid = child.id();
        // Until the child has exec'd, its cmdline is still this test's.
        for _ in 0..200 {
            if runs_binary(pid, Path::new("sleep")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(runs_binary(pid, Path::new("sleep")));
        assert!(!runs_binary(pid, Path::new("/usr/bin/not-sleep")));
        // Not ours by binary: stop must not signal it.
        stop(
            "n",
            pid,
            None,
            Path::new("/usr/bin/not-sleep"),
            libc::SIGKILL,
        )
        .expect("no-op");
        assert!(child.try_wait().expect("wait").is_none(), "still running");
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(!runs_binary(pid, Path::new("sleep")));
    }
}
