//! Running `ip`, `sysctl` and plugins, with errors that show the command line and its stderr.
//!
//! Every namespace operation goes through iproute2 (`ip netns`, `ip -n`, `ip netns exec`): the
//! testbed never calls `setns` itself, so no thread of this process ever changes namespace.
use std::{
    io::{Read, Write},
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Where `ip netns add` puts its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// How long one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval while waiting for a child process.
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{cmd}`: {source} (is it installed and executable?)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {timeout:?}; it was killed")]
    Timeout { cmd: String, timeout: Duration },
    #[error("talking to `{cmd}`: {source}")]
    Io {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// A printable form of a command line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` to completion with `stdin` as its input, killing it (by pid) after `timeout`.
/// Returns the output whatever the exit status; see [`check`].
pub fn run_with_timeout(
    cmd: &mut Command,
    stdin: &[u8],
    timeout: Duration,
) -> Result<Output, CmdError> {
    let line = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CmdError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits without reading its stdin closes the pipe: not an error here, the
        // exit status tells what happened.
        let _ = input.write_all(stdin);
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CmdError::Timeout { cmd: line, timeout });
            }
            Err(source) => return Err(CmdError::Io { cmd: line, source }),
        }
    };
    let collect = |handle: Option<thread::JoinHandle<Vec<u8>>>| {
        handle.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Turns a non-zero exit into [`CmdError::Failed`].
pub fn check(cmd: &Command, output: Output) -> Result<Output, CmdError> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(CmdError::Failed {
            cmd: describe(cmd),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Runs `program args...` and fails unless it exits 0. Returns its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let output = run_with_timeout(&mut cmd, &[], IP_TIMEOUT)?;
    let output = check(&cmd, output)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) -> Result<String, CmdError> {
    run("ip", args)
}

/// `ip -n NETNS ARGS...`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Whether the named network namespace exists (its file under `/run/netns`).
pub fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// The path a CNI plugin gets as `CNI_NETNS`.
pub fn netns_path(name: &str) -> String {
    format!("{NETNS_DIR}/{name}")
}

/// Creates a network namespace and brings its loopback up.
pub fn netns_add(name: &str) -> Result<(), CmdError> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a network namespace if it exists.
pub fn netns_del(name: &str) -> Result<(), CmdError> {
    if netns_exists(name) {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// `sysctl -w KEY=VALUE` inside a network namespace (`/proc/sys/net` is per namespace).
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<(), CmdError> {
    let setting = format!("{key}={value}");
    run(
        "ip",
        &["netns", "exec", netns, "sysctl", "-q", "-w", &setting],
    )?;
    Ok(())
}

/// A command that runs `argv` inside a network namespace (`ip netns exec NETNS argv...`).
pub fn in_netns(netns: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(argv);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_stdout_and_reports_failures_with_the_command_line() {
        assert_eq!(run("echo", &["hi"]).expect("echo works"), "hi\n");
        let err = run("sh", &["-c", "echo nope >&2; exit 3"]).expect_err("exit 3 fails");
        let text = err.to_string();
        assert!(text.contains("sh -c") && text.contains("nope"), "{text}");
    }

    #[test]
    fn run_with_timeout_kills_a_hanging_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let started = Instant::now();
        let err = run_with_timeout(&mut cmd, &[], Duration::from_millis(100)).expect_err("killed");
        assert!(matches!(err, CmdError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_with_timeout_feeds_stdin() {
        let mut cmd = Command::new("cat");
        let out = run_with_timeout(&mut cmd, b"conf", Duration::from_secs(5)).expect("cat runs");
        assert_eq!(out.stdout, b"conf");
    }

    #[test]
    fn missing_programs_are_spawn_errors() {
        let err = run("/nonexistent/sluice-testbed-prog", &[]).expect_err("missing");
        assert!(matches!(err, CmdError::Spawn { .. }), "{err}");
    }
}
