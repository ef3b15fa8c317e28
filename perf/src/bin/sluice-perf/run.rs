//! `sluice-perf run SCENARIO`: for each mode (the kernel baseline, then sluice), a testbed from
//! the scenario's cluster file, the scenario's traffic between its pods, the agents' status and
//! histograms, testbed down; then ratios, warnings, `report.json`, interval logs and a plot in
//! `--out DIR/<scenario>-<UTC timestamp>/`.
//!
//! The measuring programs are this same binary (`current_exe()`), started inside the pods'
//! namespaces through the testbed. They report through `--json-out` files in the mode's
//! subdirectory (their stderr goes to `*.log` files there); nothing waits without a bound, and a
//! testbed is torn down by its `Drop` whatever fails.
//!
//! A policy scenario (`Scenario::policies`) runs sluice twice instead of sluice and the kernel:
//! on the cluster file (mode `sluice`, policies off) and on the policies file (mode
//! `sluice-policy`), with ratios on / off. Before each sluice mode's traffic the client sends a
//! probe the policies deny, and the agents' counters must show the policies at work in the one
//! mode and absent in the other ([`perf::policy`]); otherwise the mode reports an error.
//!
//! A restart scenario (`Scenario::restart`) runs sluice only: during its UDP stream the agent of
//! the client's node (or `--restart-node`) is stopped with SIGTERM or SIGKILL (`--restart
//! term|kill`) at `--restart-at` and started again with the same arguments, or (`--restart hot`)
//! a second agent is started that takes the running one's dataplane over; the mode's report gets the
//! restart's instants and figures ([`perf::restart`]) and its table rows. The sink then runs
//! with an idle timeout longer than the traffic, so an outage does not end it.
//!
//! An encrypted scenario brings both testbeds up with its encryption (sluice agents with
//! WireGuard in strict mode; kernel-wireguard nodes, i.e. wireguard-go, for the baseline), waits
//! for the tunnels before the traffic and checks their counters after it ([`crate::wg`]).

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::de::DeserializeOwned;

use perf::hist::LatencyHistogram;
use perf::metrics::ratios;
use perf::report::{
    metrics_for, mode_warnings, render_table, run_warnings, utc_stamp, worker_cores, write_report,
    AgentRecord, Cores, MachineInfo, ModeReport, ModeResults, RunParameters, RunReport,
    ScenarioRecord, REPORT_SCHEMA_VERSION,
};
use perf::restart::{RestartHow, RestartRecord, RestartTimes};
use perf::scenario::{self, Encryption, Scenario, Target, Traffic};
use testbed::{Mode, Testbed, UpOptions};

use crate::seconds;

/// How long a child may take beyond its own `--duration` before it is killed.
const CHILD_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a server to bind.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const AGENT_API_TIMEOUT: Duration = Duration::from_secs(5);
/// Closed-loop request/response: how long one request may wait for its reply.
const REPLY_TIMEOUT_MS: u64 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BaselineArg {
    /// Also run the scenario with kernel routing and no agent, and report ratios.
    Kernel,
    /// sluice only.
    None,
}

/// How a restart scenario restarts the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestartArg {
    /// SIGTERM, then a new agent: a planned restart (upgrade).
    Term,
    /// SIGKILL, then a new agent: a crash.
    Kill,
    /// A new agent started alongside takes the running one's dataplane over (hot restart).
    Hot,
}

impl RestartArg {
    fn how(self) -> RestartHow {
        match self {
            RestartArg::Term => RestartHow::Term,
            RestartArg::Kill => RestartHow::Kill,
            RestartArg::Hot => RestartHow::Hot,
        }
    }
}

/// One mode only (kept for scripts written before the baseline ran in the same run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Sluice,
    Kernel,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Scenario name (`sluice-perf list`).
    scenario: String,
    /// Seconds of traffic per mode (default: the scenario's).
    #[arg(long, value_parser = seconds)]
    duration: Option<Duration>,
    /// UDP: Ethernet frame bytes, FCS included (64..=1518). TCP: bytes per write.
    #[arg(long)]
    size: Option<usize>,
    /// Packets (or requests) per second; leave out for closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// UDP source ports, or parallel TCP connections.
    #[arg(long)]
    flows: Option<u16>,
    /// Reports go to DIR/<scenario>-<UTC timestamp>/.
    #[arg(long, default_value = "perf-out")]
    out: PathBuf,
    /// sluice workers per node.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    #[arg(long, value_enum, default_value_t = BaselineArg::Kernel)]
    baseline: BaselineArg,
    /// Run this one mode only (no ratios); overrides --baseline.
    #[arg(long, value_enum, hide = true)]
    mode: Option<ModeArg>,
    /// Pin the client (generator, sender, requester) to this CPU.
    #[arg(long)]
    gen_cpu: Option<usize>,
    /// Pin the server (sink, receiver, responder) to this CPU.
    #[arg(long)]
    sink_cpu: Option<usize>,
    /// UDP generator: packets per sendmmsg.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Closed-loop request/response: stop after this many round trips (else the duration).
    #[arg(long, alias = "pingpong-count")]
    rr_count: Option<u64>,
    /// TCP: stop after this many bytes over all connections (else the duration).
    #[arg(long)]
    tcp_bytes: Option<u64>,
    /// Run sluice before the baseline (default: baseline first).
    #[arg(long)]
    sluice_first: bool,
    /// Cluster file instead of the scenario's.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Policy scenarios: the policies-on cluster file instead of the scenario's.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Testbed instance name prefix (default perf-PID); `-k`/`-s` is appended per mode.
    #[arg(long)]
    instance: Option<String>,
    /// Restart scenarios: how the agent is stopped before a new one starts (default term).
    #[arg(long, value_enum)]
    restart: Option<RestartArg>,
    /// Restart scenarios: seconds after the generator started at which the agent is signalled.
    #[arg(long, value_parser = seconds, default_value = "1.5")]
    restart_at: Duration,
    /// Restart scenarios: the node whose agent restarts (default: the client's node).
    #[arg(long)]
    restart_node: Option<String>,
}

/// A restart scenario's restart, as asked for.
#[derive(Clone, Debug)]
struct RestartPlan {
    how: RestartHow,
    at: Duration,
    node: Option<String>,
}

/// The parameters in force: the command line over the scenario's defaults.
#[derive(Clone, Debug)]
struct Params {
    duration: Duration,
    size: usize,
    rate: Option<u64>,
    flows: u16,
    batch: usize,
    gen_cpu: Option<usize>,
    sink_cpu: Option<usize>,
    rr_count: Option<u64>,
    tcp_bytes: Option<u64>,
}

impl Params {
    fn new(a: &RunArgs, s: &Scenario) -> Self {
        Self {
            duration: a
                .duration
                .unwrap_or(Duration::from_secs(u64::from(s.defaults.duration_s))),
            size: a.size.unwrap_or(s.defaults.size),
            rate: a.rate.or(s.defaults.rate_pps),
            flows: a.flows.unwrap_or(s.defaults.flows),
            batch: a.batch,
            gen_cpu: a.gen_cpu,
            sink_cpu: a.sink_cpu,
            rr_count: a.rr_count,
            tcp_bytes: a.tcp_bytes,
        }
    }

    /// Refuses what the programs would refuse, before any testbed exists.
    fn check(&self, s: &Scenario) -> Result<()> {
        if s.traffic != Traffic::TcpStream {
            perf::payload::payload_len_for_frame(self.size)
                .with_context(|| format!("--size {} for scenario {}", self.size, s.name))?;
        } else if !(1..=perf::tcp::MAX_WRITE_BYTES).contains(&self.size) {
            bail!(
                "--size {} (bytes per TCP write) is outside 1..={}",
                self.size,
                perf::tcp::MAX_WRITE_BYTES
            );
        }
        if self.rate == Some(0) {
            bail!("--rate 0 would never send; leave --rate out for closed loop");
        }
        if self.flows == 0 {
            bail!("--flows must be at least 1");
        }
        Ok(())
    }
}

/// A scenario's cluster file (`file`, relative to the repository root): as given, else from the
/// current directory, else from the source tree this binary was built from.
fn cluster_file(arg: Option<&Path>, file: &str) -> PathBuf {
    if let Some(p) = arg {
        return p.to_path_buf();
    }
    let here = PathBuf::from(file);
    if here.is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file)
}

/// One mode of a run: which dataplane, and for sluice which of the scenario's cluster files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunMode {
    /// Kernel routing, no agent: the baseline of ordinary scenarios.
    Kernel,
    /// sluice on the scenario's cluster file.
    Sluice,
    /// sluice on a policy scenario's policies file.
    SluicePolicy,
}

impl RunMode {
    fn name(self) -> &'static str {
        match self {
            RunMode::Kernel => "kernel",
            RunMode::Sluice => "sluice",
            RunMode::SluicePolicy => "sluice-policy",
        }
    }

    /// Appended to the testbed instance name.
    fn suffix(self) -> &'static str {
        match self {
            RunMode::Kernel => "k",
            RunMode::Sluice => "s",
            RunMode::SluicePolicy => "p",
        }
    }
}

/// The modes a run makes, in order (before `--sluice-first`).
fn modes_for(s: &Scenario, mode: Option<ModeArg>, baseline: BaselineArg) -> Result<Vec<RunMode>> {
    if s.restart {
        if mode == Some(ModeArg::Kernel) {
            bail!(
                "scenario {} restarts a sluice agent and has no kernel mode (the kernel path has \
                 no agent to restart)",
                s.name
            );
        }
        return Ok(vec![RunMode::Sluice]);
    }
    if s.policies.is_some() {
        return match (mode, baseline) {
            (Some(ModeArg::Kernel), _) => bail!(
                "scenario {} compares sluice with and without NetworkPolicies and has no kernel                  mode; run {} for sluice against the kernel",
                s.name,
                s.name.replacen("-policy", "", 1)
            ),
            (Some(ModeArg::Sluice), _) | (None, BaselineArg::None) => {
                Ok(vec![RunMode::SluicePolicy])
            }
            (None, BaselineArg::Kernel) => Ok(vec![RunMode::Sluice, RunMode::SluicePolicy]),
        };
    }
    Ok(match (mode, baseline) {
        (Some(ModeArg::Sluice), _) | (None, BaselineArg::None) => vec![RunMode::Sluice],
        (Some(ModeArg::Kernel), _) => vec![RunMode::Kernel],
        (None, BaselineArg::Kernel) => vec![RunMode::Kernel, RunMode::Sluice],
    })
}

/// A child process killed (by its pid, through `Child`) and reaped if still running on drop.
struct ChildGuard {
    child: Child,
    what: &'static str,
}

impl ChildGuard {
    /// Waits up to `limit` for the child to exit; kills it past that.
    fn wait(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for the {}", self.what))?
            {
                if !status.success() {
                    bail!(
                        "the {} exited with {status} (see its log in the output directory)",
                        self.what
                    );
                }
                return Ok(());
            }
            if start.elapsed() >= limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the {} was still running after {limit:?} and was killed",
                    self.what
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for_file(path: &Path, limit: Duration, guard: &mut ChildGuard) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(Some(status)) = guard.child.try_wait() {
            bail!("the {} exited ({status}) before it was ready", guard.what);
        }
        if start.elapsed() >= limit {
            bail!(
                "the {} did not create {} within {limit:?}",
                guard.what,
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(text.trim()).with_context(|| format!("parsing {}", path.display()))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// One mode's traffic on one testbed.
struct Ctx<'a> {
    tb: &'a Testbed,
    exe: String,
    /// This mode's directory (logs and the programs' JSON).
    dir: PathBuf,
    scenario: &'static Scenario,
    p: &'a Params,
}

impl Ctx<'_> {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Starts this binary with `argv` in `pod`; stdout discarded, stderr to `<argv[0]>.log`.
    fn spawn(&self, pod: &str, what: &'static str, argv: &[String]) -> Result<ChildGuard> {
        let stem = argv.first().map_or("child", String::as_str);
        self.spawn_logged(pod, what, stem, argv)
    }

    /// [`Ctx::spawn`] with stderr to `<stem>.log`.
    fn spawn_logged(
        &self,
        pod: &str,
        what: &'static str,
        stem: &str,
        argv: &[String],
    ) -> Result<ChildGuard> {
        let mut full: Vec<&str> = vec![&self.exe];
        full.extend(argv.iter().map(String::as_str));
        let mut cmd = self.tb.pod_command(pod, &full)?;
        let log = std::fs::File::create(self.dir.join(format!("{stem}.log")))
            .with_context(|| format!("creating {stem}.log in {}", self.dir.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the {what} in {pod}"))?;
        Ok(ChildGuard { child, what })
    }

    fn cpu(cpu: Option<usize>) -> Vec<String> {
        cpu.map(|c| vec!["--cpu".into(), c.to_string()])
            .unwrap_or_default()
    }

    /// Starts the server with `--ready-file`, waits until it is ready.
    fn start_server(&self, what: &'static str, mut argv: Vec<String>) -> Result<ChildGuard> {
        let ready = self.path(&format!("{}.ready", argv[0]));
        argv.extend(["--ready-file".into(), ready.clone()]);
        argv.extend(Self::cpu(self.p.sink_cpu));
        let mut g = self.spawn(self.scenario.server_pod, what, &argv)?;
        wait_for_file(Path::new(&ready), READY_TIMEOUT, &mut g)?;
        Ok(g)
    }

    /// Runs the client to completion.
    fn run_client(&self, what: &'static str, mut argv: Vec<String>) -> Result<()> {
        argv.extend(Self::cpu(self.p.gen_cpu));
        let mut g = self.spawn(self.scenario.client_pod, what, &argv)?;
        g.wait(self.p.duration + CHILD_GRACE)
    }

    fn secs(&self) -> String {
        self.p.duration.as_secs_f64().to_string()
    }

    /// The server's own bound: the traffic plus time to start and drain.
    fn server_secs(&self) -> String {
        (self.p.duration.as_secs_f64() + 5.0).to_string()
    }

    fn udp_stream(&self, dst: SocketAddrV4, r: &mut ModeResults) -> Result<()> {
        let mut run = self.start_udp_stream(dst, false)?;
        run.finish(self.p.duration, r)
    }

    /// Starts the sink, then the generator, and returns without waiting for them. With
    /// `outage_expected` the sink's idle timeout is longer than the traffic (an outage must
    /// not end it) and its own bound is the traffic plus two seconds.
    fn start_udp_stream(&self, dst: SocketAddrV4, outage_expected: bool) -> Result<UdpStreamRun> {
        let p = self.p;
        let count = p
            .rate
            .map(|rate| (rate as f64 * p.duration.as_secs_f64()).ceil() as u64);
        let sink_json = self.path("sink.json");
        let mut sink_argv = strings(&["sink", "--bind"]);
        sink_argv.extend([
            format!("0.0.0.0:{}", dst.port()),
            "--duration".into(),
            if outage_expected {
                (p.duration.as_secs_f64() + 2.0).to_string()
            } else {
                self.server_secs()
            },
            "--idle-timeout-ms".into(),
            if outage_expected {
                (p.duration.as_millis() + 2_000).to_string()
            } else {
                "500".into()
            },
            "--histogram".into(),
            "--json-out".into(),
            sink_json.clone(),
        ]);
        if let Some(c) = count {
            // Open loop: stop as soon as everything arrived.
            sink_argv.extend(["--expect".into(), c.to_string()]);
        }
        let sink = self.start_server("sink", sink_argv)?;
        let gen_json = self.path("gen.json");
        let mut gen_argv = strings(&["gen", "--dst"]);
        gen_argv.extend([
            dst.to_string(),
            "--size".into(),
            p.size.to_string(),
            "--count".into(),
            count.unwrap_or(u64::MAX).to_string(),
            "--duration".into(),
            self.secs(),
            "--flows".into(),
            p.flows.to_string(),
            "--batch".into(),
            p.batch.to_string(),
            "--json-out".into(),
            gen_json.clone(),
        ]);
        if let Some(rate) = p.rate {
            gen_argv.extend(["--rate".into(), rate.to_string()]);
        }
        gen_argv.extend(Self::cpu(p.gen_cpu));
        let started = Instant::now();
        let gen = self.spawn(self.scenario.client_pod, "generator", &gen_argv)?;
        Ok(UdpStreamRun {
            sink,
            gen,
            sink_json: PathBuf::from(sink_json),
            gen_json: PathBuf::from(gen_json),
            started,
        })
    }

    /// Policy scenarios: [`perf::policy::PROBE_PACKETS`] datagrams from the client to the
    /// server's [`perf::policy::PROBE_PORT`], which the policies deny (nothing listens there
    /// either way). Returns how many left the client.
    fn denied_probe(&self, server: std::net::Ipv4Addr) -> Result<u64> {
        let json = self.path("probe.json");
        let mut argv = strings(&["gen", "--dst"]);
        argv.extend([
            SocketAddrV4::new(server, perf::policy::PROBE_PORT).to_string(),
            "--size".into(),
            "64".into(),
            "--count".into(),
            perf::policy::PROBE_PACKETS.to_string(),
            "--rate".into(),
            "1000".into(),
            "--duration".into(),
            "1".into(),
            "--batch".into(),
            "1".into(),
            "--json-out".into(),
            json.clone(),
        ]);
        let mut g = self.spawn_logged(self.scenario.client_pod, "denied probe", "probe", &argv)?;
        g.wait(Duration::from_secs(1) + CHILD_GRACE)?;
        let report: perf::gen::GenReport = read_json(Path::new(&json))?;
        Ok(report.sent)
    }

    fn tcp_stream(&self, dst: SocketAddrV4, r: &mut ModeResults) -> Result<()> {
        let p = self.p;
        let recv_json = self.path("tcp-recv.json");
        let mut recv_argv = strings(&["tcp-recv", "--bind"]);
        recv_argv.extend([
            format!("0.0.0.0:{}", dst.port()),
            "--flows".into(),
            p.flows.to_string(),
            "--duration".into(),
            self.server_secs(),
            "--json-out".into(),
            recv_json.clone(),
        ]);
        let mut recv = self.start_server("TCP receiver", recv_argv)?;
        let send_json = self.path("tcp-send.json");
        let mut send_argv = strings(&["tcp-send", "--dst"]);
        send_argv.extend([
            dst.to_string(),
            "--flows".into(),
            p.flows.to_string(),
            "--duration".into(),
            self.secs(),
            "--write-bytes".into(),
            p.size.to_string(),
            "--json-out".into(),
            send_json.clone(),
        ]);
        if let Some(b) = p.tcp_bytes {
            send_argv.extend(["--bytes".into(), b.to_string()]);
        }
        self.run_client("TCP sender", send_argv)?;
        r.tcp_send = Some(read_json(Path::new(&send_json))?);
        recv.wait(p.duration + CHILD_GRACE)?;
        r.tcp_recv = Some(read_json(Path::new(&recv_json))?);
        Ok(())
    }

    fn request_response(&self, dst: SocketAddrV4, r: &mut ModeResults) -> Result<()> {
        let p = self.p;
        let mut server_argv = strings(&["pingpong-server", "--bind"]);
        server_argv.extend([
            format!("0.0.0.0:{}", dst.port()),
            "--duration".into(),
            self.server_secs(),
            "--json-out".into(),
            self.path("pingpong-server.json"),
        ]);
        let server = self.start_server("request/response server", server_argv)?;
        let json = self.path("pingpong.json");
        let mut argv = strings(&["pingpong", "--dst"]);
        argv.extend([
            dst.to_string(),
            "--count".into(),
            p.rr_count.unwrap_or(u64::MAX).to_string(),
            "--duration".into(),
            self.secs(),
            "--size".into(),
            p.size.to_string(),
            "--reply-timeout-ms".into(),
            REPLY_TIMEOUT_MS.to_string(),
            "--histogram".into(),
            "--json-out".into(),
            json.clone(),
        ]);
        if let Some(rate) = p.rate {
            argv.extend(["--rate".into(), rate.to_string()]);
        }
        self.run_client("request/response client", argv)?;
        // The server's own report is not needed: stop it now rather than at its deadline.
        drop(server);
        r.pingpong = Some(read_json(Path::new(&json))?);
        Ok(())
    }
}

/// A UDP stream under way: its two programs and where they report.
struct UdpStreamRun {
    sink: ChildGuard,
    gen: ChildGuard,
    sink_json: PathBuf,
    gen_json: PathBuf,
    /// When the generator was started.
    started: Instant,
}

impl UdpStreamRun {
    /// Waits for the generator, then the sink (each at most `duration` + [`CHILD_GRACE`]), and
    /// reads their reports.
    fn finish(&mut self, duration: Duration, r: &mut ModeResults) -> Result<()> {
        self.gen.wait(duration + CHILD_GRACE)?;
        r.gen = Some(read_json(&self.gen_json)?);
        self.sink.wait(duration + CHILD_GRACE)?;
        r.sink = Some(read_json(&self.sink_json)?);
        Ok(())
    }
}

/// Restarts `node`'s agent `at` after `started`: the signal, the old process reaped (SIGKILL
/// after `testbed::agent::STOP_GRACE`), a new agent with the same arguments, ready. Returns the
/// instants on `CLOCK_MONOTONIC` (the packets' clock) and the old and new pids.
fn restart_agent(
    tb: &mut Testbed,
    node: &str,
    how: RestartHow,
    at: Duration,
    started: Instant,
) -> Result<(u32, Option<u32>, RestartTimes)> {
    let old_pid = tb
        .node(node)?
        .agent_pid
        .ok_or_else(|| anyhow!("node {node} has no sluice agent to restart"))?;
    if let Some(left) = at.checked_sub(started.elapsed()) {
        std::thread::sleep(left);
    }
    let mut times = RestartTimes {
        signal_ns: perf::sys::monotonic_ns(),
        ..RestartTimes::default()
    };
    match how.signal() {
        Some(signal) => {
            tb.stop_agent(node, signal).with_context(|| {
                format!("stopping the agent of {node} (pid {old_pid}) with {how:?}")
            })?;
            times.exited_ns = perf::sys::monotonic_ns();
            tb.start_agent(node)
                .with_context(|| format!("starting the agent of {node} again"))?;
            times.ready_ns = perf::sys::monotonic_ns();
        }
        None => {
            // The new agent is ready (it has taken over) before the old one is seen gone.
            let (ready, exited) = tb
                .hot_restart_agent(node)
                .with_context(|| format!("hot restart of the agent of {node} (pid {old_pid})"))?;
            let now = perf::sys::monotonic_ns();
            times.ready_ns = now.saturating_sub(ready.elapsed().as_nanos() as u64);
            times.exited_ns = now.saturating_sub(exited.elapsed().as_nanos() as u64);
        }
    }
    Ok((old_pid, tb.node(node)?.agent_pid, times))
}

pub(crate) fn agent_call(
    tb: &Testbed,
    node: &str,
    req: &control::api::Request,
) -> Result<control::api::Response> {
    let n = tb.node(node)?;
    let resp = control::api::call(&n.agent_socket, req, AGENT_API_TIMEOUT)
        .with_context(|| format!("asking the agent at {}", n.agent_socket.display()))?;
    if !resp.ok {
        bail!(
            "the agent at {} refused: {}",
            n.agent_socket.display(),
            resp.error.unwrap_or_default()
        );
    }
    Ok(resp)
}

/// The decoded histograms a mode produced, for the interval logs and the plot.
#[derive(Default)]
pub struct ModeHistograms {
    /// One-way (UDP stream) or round trip (request/response).
    pub latency: Option<LatencyHistogram>,
    /// `(tag, batch_ns, packet_ns)` per agent worker and merged, sluice mode only.
    pub agent: Vec<(String, LatencyHistogram, LatencyHistogram)>,
}

struct ModeOutcome {
    report: ModeReport,
    hists: ModeHistograms,
}

/// Tags: `[mode/][node/]worker`, the mode for modes other than `sluice`, the node when there
/// are several.
fn decode_agent(
    mode: RunMode,
    node: &str,
    multi_node: bool,
    h: &control::api::Histograms,
) -> Result<Vec<(String, LatencyHistogram, LatencyHistogram)>> {
    let mut prefix = if mode == RunMode::Sluice {
        String::new()
    } else {
        format!("{}/", mode.name())
    };
    if multi_node {
        prefix.push_str(&format!("{node}/"));
    }
    let mut out = Vec::new();
    let all = std::iter::once(("merged".to_string(), &h.merged))
        .chain(h.workers.iter().map(|w| (format!("worker{}", w.id), w)));
    for (tag, w) in all {
        let b = LatencyHistogram::from_base64(&w.batch_ns)
            .with_context(|| format!("{node} {tag} batch_ns"))?;
        let p = LatencyHistogram::from_base64(&w.packet_ns)
            .with_context(|| format!("{node} {tag} packet_ns"))?;
        out.push((format!("{prefix}{tag}"), b, p));
    }
    Ok(out)
}

/// What every mode of a run shares.
struct Plan<'a> {
    /// The scenario's cluster file (policies off).
    cluster: &'a Path,
    /// A policy scenario's policies file.
    policies: Option<&'a Path>,
    workers: u32,
    scenario: &'static Scenario,
    p: &'a Params,
    run_start: Instant,
    /// A restart scenario's restart.
    restart: Option<&'a RestartPlan>,
}

/// Brings up a testbed in `mode`, runs the traffic, collects, tears down. Failures become
/// `errors` in the mode's report; the testbed goes away in every case.
fn run_mode(
    plan: &Plan<'_>,
    mode: RunMode,
    order: usize,
    instance: String,
    dir: &Path,
) -> ModeOutcome {
    let scenario = plan.scenario;
    let mut report = ModeReport {
        mode: mode.name().into(),
        order,
        instance: instance.clone(),
        server_addr: String::new(),
        traffic_start_s: 0.0,
        traffic_end_s: 0.0,
        results: ModeResults::default(),
        metrics: Vec::new(),
        agents: BTreeMap::new(),
        warnings: Vec::new(),
        errors: Vec::new(),
        policy: None,
        restart: None,
    };
    let mut hists = ModeHistograms::default();
    if let Err(e) = run_mode_inner(plan, mode, &instance, dir, &mut report, &mut hists) {
        report.errors.push(format!("{e:#}"));
    }
    report.metrics = metrics_for(scenario.traffic, &report.results);
    if let Some(o) = report.restart.as_ref().and_then(|r| r.outcome.as_ref()) {
        report.metrics.extend(perf::restart::metrics(o));
    }
    report
        .warnings
        .extend(mode_warnings(scenario.traffic, &report.results));
    hists.latency = report
        .results
        .sink
        .as_ref()
        .and_then(|s| s.histogram.as_deref())
        .or(report
            .results
            .pingpong
            .as_ref()
            .and_then(|x| x.histogram.as_deref()))
        .and_then(|b64| match LatencyHistogram::from_base64(b64) {
            Ok(h) => Some(h),
            Err(e) => {
                report.errors.push(format!("latency histogram: {e}"));
                None
            }
        });
    ModeOutcome { report, hists }
}

fn run_mode_inner(
    plan: &Plan<'_>,
    which: RunMode,
    instance: &str,
    dir: &Path,
    report: &mut ModeReport,
    hists: &mut ModeHistograms,
) -> Result<()> {
    let Plan {
        cluster,
        policies,
        workers,
        scenario,
        p,
        run_start,
        restart,
    } = *plan;
    let (mode, cluster) = match (which, policies) {
        (RunMode::Kernel, _) => (Mode::Kernel, cluster),
        (RunMode::Sluice, _) => (Mode::Sluice { workers }, cluster),
        (RunMode::SluicePolicy, Some(file)) => (Mode::Sluice { workers }, file),
        (RunMode::SluicePolicy, None) => bail!(
            "scenario {} has no policies file for the {} mode",
            scenario.name,
            which.name()
        ),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("finding this binary to run it in the pods")?;
    let mut opts = UpOptions::new(cluster);
    opts.mode = mode;
    opts.instance = Some(instance.to_string());
    let encrypted = scenario.encryption == Encryption::Wireguard;
    opts.encryption = scenario.encryption;
    if encrypted && matches!(mode, Mode::Sluice { .. }) {
        opts.agent_args.extend(
            crate::wg::SLUICE_AGENT_ARGS
                .iter()
                .map(|a| (*a).to_string()),
        );
    }
    let mut tb = Testbed::up(opts).with_context(|| {
        format!(
            "bringing up the {} testbed {instance} from {}",
            report.mode,
            cluster.display()
        )
    })?;
    tb.pod(scenario.client_pod)?;
    let dst = match scenario.target {
        Target::PodIp => SocketAddrV4::new(tb.pod(scenario.server_pod)?.ip, scenario.port),
        // Kernel nodes get kube-proxy-shaped nftables rules; sluice nodes' agents serve it.
        Target::ClusterIp { service } => {
            perf::service::prepare(
                &tb,
                service,
                scenario.port,
                scenario.traffic,
                scenario.client_pod,
                scenario.server_pod,
            )
            .with_context(|| format!("setting up the ClusterIP target {service}"))?
            .0
        }
    };
    report.server_addr = dst.to_string();
    let sluice = matches!(mode, Mode::Sluice { .. });
    // Nodes that run an agent (a cluster file may leave some nodes to the kernel).
    let nodes: Vec<String> = tb
        .nodes()
        .iter()
        .filter(|n| n.agent_pid.is_some())
        .map(|n| n.name.clone())
        .collect();
    if sluice {
        for node in &nodes {
            let mut a = AgentRecord::default();
            match agent_call(&tb, node, &control::api::Request::Status) {
                Ok(r) => {
                    a.worker_cores = r.status.as_ref().map(worker_cores).unwrap_or_default();
                    a.status_before = r.status;
                }
                Err(e) => report.errors.push(format!("agent status on {node}: {e:#}")),
            }
            report.agents.insert(node.clone(), a);
        }
    }
    let wg_before = if encrypted {
        let server_ip = tb.pod(scenario.server_pod)?.ip;
        crate::wg::wait_ready(&tb, scenario.client_pod, server_ip)
            .context("waiting for the WireGuard tunnels")?;
        Some(crate::wg::counters(&tb).context("reading the WireGuard counters")?)
    } else {
        None
    };
    let ctx = Ctx {
        tb: &tb,
        exe: exe.display().to_string(),
        dir: dir.to_path_buf(),
        scenario,
        p,
    };
    // Policy scenarios, both sluice modes: the probe the policies deny, before the traffic.
    let probe_sent = if sluice && scenario.policies.is_some() {
        let server_ip = tb.pod(scenario.server_pod)?.ip;
        match ctx.denied_probe(server_ip) {
            Ok(n) => n,
            Err(e) => {
                report.errors.push(format!("denied probe: {e:#}"));
                0
            }
        }
    } else {
        0
    };
    report.traffic_start_s = run_start.elapsed().as_secs_f64();
    let traffic = match (scenario.traffic, restart) {
        (Traffic::UdpStream, Some(plan)) => {
            let node = match &plan.node {
                Some(n) => n.clone(),
                None => tb.pod(scenario.client_pod)?.node.clone(),
            };
            let mut run = ctx.start_udp_stream(dst, true)?;
            let restarted = restart_agent(&mut tb, &node, plan.how, plan.at, run.started);
            let finished = run.finish(p.duration, &mut report.results);
            match restarted {
                Ok((old_pid, new_pid, times)) => {
                    let outcome = match (&report.results.gen, &report.results.sink) {
                        (Some(g), Some(s)) => Some(perf::restart::outcome(g, s, &times)),
                        _ => None,
                    };
                    if let Some(o) = &outcome {
                        eprintln!(
                            "sluice-perf: {} restart of {node}'s agent ({} -> {}): {} sent, {} \
                             lost; outage {} packets, {:.1} ms; agent gone after {:.0} ms, ready \
                             after {:.0} ms",
                            plan.how.as_str(),
                            old_pid,
                            new_pid.map_or("?".into(), |p| p.to_string()),
                            o.sent,
                            o.lost,
                            o.outage_packets,
                            o.outage_ms,
                            o.signal_to_exit_ms,
                            o.signal_to_ready_ms
                        );
                        report.warnings.extend(
                            perf::restart::warnings(o, &perf::restart::MARGINS)
                                .into_iter()
                                .map(|w| format!("restart: {w}")),
                        );
                    }
                    report.restart = Some(RestartRecord {
                        how: plan.how,
                        node,
                        old_pid,
                        new_pid,
                        planned_at_s: plan.at.as_secs_f64(),
                        times,
                        outcome,
                    });
                    finished
                }
                Err(e) => Err(e.context(format!("restarting the agent of {node}"))),
            }
        }
        (Traffic::UdpStream, None) => ctx.udp_stream(dst, &mut report.results),
        (Traffic::TcpStream, _) => ctx.tcp_stream(dst, &mut report.results),
        (Traffic::UdpRequestResponse, _) => ctx.request_response(dst, &mut report.results),
    };
    report.traffic_end_s = run_start.elapsed().as_secs_f64();
    if let Err(e) = traffic {
        report.errors.push(format!("traffic: {e:#}"));
    }
    if let Some(before) = &wg_before {
        let client_node = tb.pod(scenario.client_pod)?.node.clone();
        let checked = crate::wg::counters(&tb)
            .context("reading the WireGuard counters")
            .and_then(|after| crate::wg::check_and_record(dir, &client_node, before, &after));
        match checked {
            Ok(during) => {
                for (node, s) in &during {
                    eprintln!(
                        "sluice-perf: {} {node}: WireGuard sealed {} bytes{}, opened {} bytes \
                         during the traffic",
                        report.mode,
                        s.tx_bytes,
                        s.tx_packets
                            .map_or(String::new(), |p| format!(" ({p} packets)")),
                        s.rx_bytes
                    );
                }
            }
            Err(e) => report.errors.push(format!("encryption: {e:#}")),
        }
    }
    if sluice {
        let multi = nodes.len() > 1;
        for node in &nodes {
            let Some(a) = report.agents.get_mut(node) else {
                continue;
            };
            match agent_call(&tb, node, &control::api::Request::Status) {
                Ok(r) => a.status_after = r.status,
                Err(e) => report.errors.push(format!("agent status on {node}: {e:#}")),
            }
            let got = agent_call(&tb, node, &control::api::Request::Histograms).and_then(|r| {
                r.histograms
                    .ok_or_else(|| anyhow!("the answer carried no histograms"))
            });
            match got {
                Ok(h) => {
                    match decode_agent(which, node, multi, &h) {
                        Ok(d) => hists.agent.extend(d),
                        Err(e) => report
                            .warnings
                            .push(format!("agent histograms on {node} do not decode: {e:#}")),
                    }
                    a.histograms = Some(h);
                }
                Err(e) => {
                    let msg = format!("agent histograms unavailable on {node}: {e:#}");
                    report.warnings.push(msg.clone());
                    a.histograms_error = Some(msg);
                }
            }
        }
    }
    if sluice && scenario.policies.is_some() {
        let pairs: Vec<(&serde_json::Value, &serde_json::Value)> = report
            .agents
            .values()
            .filter_map(|a| Some((a.status_before.as_ref()?, a.status_after.as_ref()?)))
            .collect();
        if pairs.len() == nodes.len() {
            let e = perf::policy::evidence(which == RunMode::SluicePolicy, probe_sent, pairs);
            eprintln!(
                "sluice-perf: {}: {} flows tracked for policy, {} policy drops, {} probe \
                 datagrams sent",
                report.mode, e.policy_flows, e.policy_denied, e.probe_sent
            );
            if let Err(err) = perf::policy::check(&e) {
                report.errors.push(format!("policy: {err}"));
            }
            report.policy = Some(e);
        } else {
            report
                .errors
                .push("policy: agent status missing, the policies cannot be checked".into());
        }
    }
    tb.down()
        .with_context(|| format!("tearing down testbed {instance}"))?;
    Ok(())
}

/// A fresh directory `out/<scenario>-<stamp>[-N]`.
fn output_dir(out: &Path, scenario: &str, unix_s: u64) -> Result<PathBuf> {
    let base = format!("{scenario}-{}", utc_stamp(unix_s));
    for n in 0..100u32 {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let dir = out.join(name);
        match std::fs::create_dir_all(out).and_then(|()| std::fs::create_dir(&dir)) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating the output directory {}", dir.display()))
            }
        }
    }
    bail!(
        "100 output directories {base}-N already exist in {}",
        out.display()
    )
}

/// The restart a run makes: only restart scenarios take `--restart`, and their restart must
/// fall inside the traffic (on a node of the cluster file, checked when the testbed is up).
fn restart_plan(args: &RunArgs, s: &Scenario, p: &Params) -> Result<Option<RestartPlan>> {
    if !s.restart {
        if args.restart.is_some() || args.restart_node.is_some() {
            let names: Vec<&str> = scenario::SCENARIOS
                .iter()
                .filter(|x| x.restart)
                .map(|x| x.name)
                .collect();
            bail!(
                "--restart/--restart-node: scenario {} does not restart the agent; restart \
                 scenarios: {}",
                s.name,
                names.join(", ")
            );
        }
        return Ok(None);
    }
    if p.rate.is_none() {
        bail!(
            "scenario {} needs a fixed --rate (lost packets are then time)",
            s.name
        );
    }
    if args.restart_at >= p.duration {
        bail!(
            "--restart-at {:?} is not within the --duration {:?} of traffic; restart inside \
             it and leave time for the new agent (0.2-0.3 s on the testbed)",
            args.restart_at,
            p.duration
        );
    }
    Ok(Some(RestartPlan {
        how: args.restart.unwrap_or(RestartArg::Term).how(),
        at: args.restart_at,
        node: args.restart_node.clone(),
    }))
}

pub fn run(args: &RunArgs) -> Result<()> {
    let scenario = scenario::find(&args.scenario).ok_or_else(|| {
        anyhow!(
            "no scenario {:?}; known: {} (see `sluice-perf list`)",
            args.scenario,
            scenario::names().join(", ")
        )
    })?;
    let p = Params::new(args, scenario);
    p.check(scenario)?;
    let restart = restart_plan(args, scenario, &p)?;
    let mut modes = modes_for(scenario, args.mode, args.baseline)?;
    let cluster = cluster_file(args.cluster.as_deref(), scenario.cluster);
    let policies = match (scenario.policies, &args.policies) {
        (Some(file), arg) => Some(cluster_file(arg.as_deref(), file)),
        (None, Some(arg)) => bail!(
            "--policies {}: scenario {} is not a policy scenario",
            arg.display(),
            scenario.name
        ),
        (None, None) => None,
    };
    for file in std::iter::once(&cluster).chain(policies.as_ref()) {
        let plan = testbed::plan::load(file)
            .with_context(|| format!("reading the cluster file {}", file.display()))?;
        scenario::check_cluster(scenario, &file.display().to_string(), &plan)?;
    }
    let prefix = args
        .instance
        .clone()
        .unwrap_or_else(|| format!("perf-{}", std::process::id()));
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let dir = output_dir(&args.out, scenario.name, started.as_secs())?;
    let machine = MachineInfo::collect();
    if args.sluice_first {
        modes.reverse();
    }
    let plan = Plan {
        cluster: &cluster,
        policies: policies.as_deref(),
        workers: args.workers,
        scenario,
        p: &p,
        run_start: Instant::now(),
        restart: restart.as_ref(),
    };
    let mut outcomes = Vec::new();
    for (order, mode) in modes.into_iter().enumerate() {
        eprintln!("sluice-perf: {} with {} ...", scenario.name, mode.name());
        outcomes.push(run_mode(
            &plan,
            mode,
            order,
            format!("{prefix}-{}", mode.suffix()),
            &dir.join(mode.name()),
        ));
    }
    let get = |m: RunMode| outcomes.iter().find(|o| o.report.mode == m.name());
    let (ratios, ratio_of) = if scenario.policies.is_some() {
        match (get(RunMode::SluicePolicy), get(RunMode::Sluice)) {
            (Some(on), Some(off)) => (
                ratios(&on.report.metrics, &off.report.metrics),
                Some("sluice-policy / sluice (NetworkPolicies on / off)".to_string()),
            ),
            _ => (Vec::new(), None),
        }
    } else {
        match (get(RunMode::Sluice), get(RunMode::Kernel)) {
            (Some(s), Some(k)) => (ratios(&s.report.metrics, &k.report.metrics), None),
            _ => (Vec::new(), None),
        }
    };
    let cores = Cores {
        generator: p.gen_cpu,
        sink: p.sink_cpu,
        workers: get(RunMode::Sluice)
            .or(get(RunMode::SluicePolicy))
            .map(|s| {
                s.report
                    .agents
                    .values()
                    .flat_map(|a| a.worker_cores.iter().copied())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let warnings = run_warnings(
        &machine,
        &cores,
        &outcomes.iter().map(|o| &o.report).collect::<Vec<_>>(),
    );
    let mut errors = Vec::new();
    for o in &outcomes {
        errors.extend(
            o.report
                .errors
                .iter()
                .map(|e| format!("{}: {e}", o.report.mode)),
        );
    }
    let hists: Vec<(&str, &ModeHistograms, f64, f64)> = outcomes
        .iter()
        .map(|o| {
            (
                o.report.mode.as_str(),
                &o.hists,
                o.report.traffic_start_s,
                o.report.traffic_end_s - o.report.traffic_start_s,
            )
        })
        .collect();
    let files = match crate::export::write_all(&dir, scenario, started.as_secs_f64(), &hists) {
        Ok(f) => f,
        Err(e) => {
            errors.push(format!("exporting histograms: {e:#}"));
            Vec::new()
        }
    };
    let report = RunReport {
        schema_version: REPORT_SCHEMA_VERSION,
        tool: "sluice-perf".into(),
        started_unix_s: started.as_secs_f64(),
        machine,
        scenario: ScenarioRecord {
            policies_file: policies.as_ref().map(|f| f.display().to_string()),
            ..ScenarioRecord::new(scenario, &cluster)
        },
        parameters: RunParameters {
            duration_s: p.duration.as_secs_f64(),
            size: p.size,
            rate_pps: p.rate,
            flows: p.flows,
            batch: p.batch,
            workers: args.workers,
            baseline: match (args.mode, args.baseline) {
                _ if scenario.restart => "none (restart scenario: no agent to restart on the \
                                          kernel path)"
                    .into(),
                _ if scenario.policies.is_some() => {
                    if get(RunMode::Sluice).is_some() {
                        "sluice without policies".into()
                    } else {
                        "none".into()
                    }
                }
                (Some(ModeArg::Kernel), _) => "kernel only".into(),
                (Some(ModeArg::Sluice), _) | (None, BaselineArg::None) => "none".into(),
                (None, BaselineArg::Kernel) => "kernel".into(),
            },
            gen_cpu: p.gen_cpu,
            sink_cpu: p.sink_cpu,
            rr_count: p.rr_count,
            tcp_bytes: p.tcp_bytes,
        },
        modes: outcomes
            .into_iter()
            .map(|o| (o.report.mode.clone(), o.report))
            .collect(),
        ratios,
        ratio_of,
        cores,
        warnings,
        errors,
        files,
    };
    let path = write_report(&dir, &report)
        .with_context(|| format!("writing report.json into {}", dir.display()))?;
    print!("{}", render_table(&report));
    println!("report: {}", path.display());
    if !report.errors.is_empty() {
        bail!(
            "{} step(s) failed; see the errors above and the logs in {}",
            report.errors.len(),
            dir.display()
        );
    }
    Ok(())
}
