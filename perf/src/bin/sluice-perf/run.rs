//! `sluice-perf run SCENARIO`: testbed up, sink + generator, ping-pong, testbed down, report.
//!
//! The measuring programs are this same binary (`current_exe()`), started inside the pods'
//! namespaces through the testbed. They report through `--json-out` files in the run's output
//! directory (their stderr goes to `*.log` files there); nothing waits without a bound.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::de::DeserializeOwned;

use perf::gen::GenReport;
use perf::pingpong::PingReport;
use perf::report::{
    caveats, render_table, write_report, MachineInfo, RunParameters, RunReport, RunResults,
    ScenarioRecord, REPORT_SCHEMA_VERSION,
};
use perf::scenario::{self, Scenario};
use perf::sink::SinkReport;
use testbed::{Mode, Testbed, UpOptions};

use crate::seconds;

/// How long a child may take beyond its own `--duration` before it is killed.
const CHILD_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a server to bind.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const AGENT_API_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_CLUSTER: &str = "testbed/clusters/demo.yaml";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// sluice agents move the packets.
    Sluice,
    /// Kernel routing, no agent (the baseline).
    Kernel,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Scenario name (see `perf::scenario::SCENARIOS`): pod-to-pod.
    scenario: String,
    #[arg(long, value_enum, default_value_t = ModeArg::Sluice)]
    mode: ModeArg,
    /// sluice workers per node (sluice mode).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Ethernet frame size in bytes, FCS included.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds of generator traffic (and the ping-pong's bound).
    #[arg(long, default_value = "5", value_parser = seconds)]
    duration: Duration,
    /// Generator target rate in packets per second; closed loop without.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value_t = 1)]
    flows: u16,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Pin the generator and the ping-pong client to this CPU.
    #[arg(long)]
    gen_cpu: Option<usize>,
    /// Pin the sink and the ping-pong server to this CPU.
    #[arg(long)]
    sink_cpu: Option<usize>,
    #[arg(long, default_value_t = 10_000)]
    pingpong_count: u64,
    /// Cluster file (default testbed/clusters/demo.yaml, from the current directory or the
    /// source tree).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Testbed instance name (default perf-PID).
    #[arg(long)]
    instance: Option<String>,
    #[arg(long, default_value = "perf-out")]
    out: PathBuf,
}

fn cluster_file(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_path_buf();
    }
    let here = PathBuf::from(DEFAULT_CLUSTER);
    if here.is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_CLUSTER)
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
            std::thread::sleep(Duration::from_millis(20));
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
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(text.trim()).with_context(|| format!("parsing {}", path.display()))
}

struct Ctx<'a> {
    tb: &'a Testbed,
    exe: String,
    dir: PathBuf,
    scenario: &'static Scenario,
    args: &'a RunArgs,
}

impl Ctx<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Starts `argv` (after this binary) in `pod`, stdout discarded, stderr to `argv[0].log`
    /// (the subcommand's name).
    fn spawn(&self, pod: &str, name: &'static str, argv: &[String]) -> Result<ChildGuard> {
        let stem = argv.first().map_or("child", String::as_str);
        let mut full: Vec<&str> = vec![&self.exe];
        full.extend(argv.iter().map(String::as_str));
        let mut cmd = self.tb.pod_command(pod, &full)?;
        let log = std::fs::File::create(self.path(&format!("{stem}.log")))
            .with_context(|| format!("creating {stem}.log in {}", self.dir.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} in {pod}"))?;
        Ok(ChildGuard { child, what: name })
    }

    fn cpu_args(cpu: Option<usize>) -> Vec<String> {
        cpu.map(|c| vec!["--cpu".into(), c.to_string()])
            .unwrap_or_default()
    }

    fn load_phase(&self, server_ip: std::net::Ipv4Addr) -> Result<(GenReport, SinkReport)> {
        let a = self.args;
        let s = self.scenario;
        let secs = a.duration.as_secs_f64();
        let (ready, sink_json) = (self.path_str("sink.ready"), self.path_str("sink.json"));
        let mut sink_argv: Vec<String> = vec![
            "sink".into(),
            "--bind".into(),
            format!("0.0.0.0:{}", s.sink_port),
            "--duration".into(),
            format!("{}", secs + 5.0),
            "--idle-timeout-ms".into(),
            "1000".into(),
            "--histogram".into(),
            "--ready-file".into(),
            ready.clone(),
            "--json-out".into(),
            sink_json.clone(),
        ];
        sink_argv.extend(Self::cpu_args(a.sink_cpu));
        let mut sink = self.spawn(s.server_pod, "sink", &sink_argv)?;
        wait_for_file(Path::new(&ready), READY_TIMEOUT, &mut sink)?;
        // Open loop sends exactly rate x duration; closed loop is bounded by the duration.
        let count = a.rate.map_or(u64::MAX, |r| (r as f64 * secs).ceil() as u64);
        let gen_json = self.path_str("gen.json");
        let mut gen_argv: Vec<String> = vec![
            "gen".into(),
            "--dst".into(),
            SocketAddrV4::new(server_ip, s.sink_port).to_string(),
            "--size".into(),
            a.size.to_string(),
            "--count".into(),
            count.to_string(),
            "--duration".into(),
            secs.to_string(),
            "--flows".into(),
            a.flows.to_string(),
            "--batch".into(),
            a.batch.to_string(),
            "--json-out".into(),
            gen_json.clone(),
        ];
        if let Some(r) = a.rate {
            gen_argv.extend(["--rate".into(), r.to_string()]);
        }
        gen_argv.extend(Self::cpu_args(a.gen_cpu));
        let mut gen = self.spawn(s.client_pod, "generator", &gen_argv)?;
        gen.wait(a.duration + CHILD_GRACE)?;
        let gen_report: GenReport = read_json(Path::new(&gen_json))?;
        // The sink stops 1 s after the last packet (idle timeout).
        sink.wait(a.duration + CHILD_GRACE)?;
        let sink_report: SinkReport = read_json(Path::new(&sink_json))?;
        Ok((gen_report, sink_report))
    }

    fn latency_phase(&self, server_ip: std::net::Ipv4Addr) -> Result<PingReport> {
        let a = self.args;
        let s = self.scenario;
        let secs = a.duration.as_secs_f64();
        let ready = self.path_str("pingpong-server.ready");
        let mut server_argv: Vec<String> = vec![
            "pingpong-server".into(),
            "--bind".into(),
            format!("0.0.0.0:{}", s.pingpong_port),
            "--duration".into(),
            format!("{}", secs + 5.0),
            "--ready-file".into(),
            ready.clone(),
            "--json-out".into(),
            self.path_str("pingpong-server.json"),
        ];
        server_argv.extend(Self::cpu_args(a.sink_cpu));
        let mut server = self.spawn(s.server_pod, "ping-pong server", &server_argv)?;
        wait_for_file(Path::new(&ready), READY_TIMEOUT, &mut server)?;
        let json = self.path_str("pingpong.json");
        let mut argv: Vec<String> = vec![
            "pingpong".into(),
            "--dst".into(),
            SocketAddrV4::new(server_ip, s.pingpong_port).to_string(),
            "--count".into(),
            a.pingpong_count.to_string(),
            "--duration".into(),
            secs.to_string(),
            "--size".into(),
            a.size.to_string(),
            "--histogram".into(),
            "--json-out".into(),
            json.clone(),
        ];
        argv.extend(Self::cpu_args(a.gen_cpu));
        let mut client = self.spawn(s.client_pod, "ping-pong client", &argv)?;
        client.wait(a.duration + CHILD_GRACE)?;
        // The server's own report is not needed: stop it now rather than at its deadline.
        drop(server);
        read_json(Path::new(&json))
    }
}

fn agent_status(tb: &Testbed, pod: &str) -> Result<serde_json::Value> {
    let node = tb.node(&tb.pod(pod)?.node)?;
    let resp = control::api::call(
        &node.agent_socket,
        &control::api::Request::Status,
        AGENT_API_TIMEOUT,
    )
    .with_context(|| {
        format!(
            "asking the agent at {} for its status",
            node.agent_socket.display()
        )
    })?;
    if !resp.ok {
        return Err(anyhow!(
            "the agent refused Status: {}",
            resp.error.unwrap_or_default()
        ));
    }
    Ok(resp.status.unwrap_or(serde_json::Value::Null))
}

pub fn run(args: &RunArgs) -> Result<()> {
    let scenario = scenario::find(&args.scenario).ok_or_else(|| {
        anyhow!(
            "no scenario {:?}; known: {}",
            args.scenario,
            scenario::names().join(", ")
        )
    })?;
    let exe = std::env::current_exe().context("finding this binary to run it in the pods")?;
    let cluster = cluster_file(args.cluster.as_deref());
    let instance = args
        .instance
        .clone()
        .unwrap_or_else(|| format!("perf-{}", std::process::id()));
    let dir = args.out.join(format!("{}-{}", scenario.name, instance));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the output directory {}", dir.display()))?;
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let machine = MachineInfo::collect();

    let mut opts = UpOptions::new(&cluster);
    opts.mode = match args.mode {
        ModeArg::Sluice => Mode::Sluice {
            workers: args.workers,
        },
        ModeArg::Kernel => Mode::Kernel,
    };
    opts.instance = Some(instance.clone());
    let tb = Testbed::up(opts)
        .with_context(|| format!("bringing up the testbed from {}", cluster.display()))?;

    let mut errors = Vec::new();
    let server_ip = tb.pod(scenario.server_pod)?.ip;
    tb.pod(scenario.client_pod)?;
    let sluice = args.mode == ModeArg::Sluice;
    let status = |errors: &mut Vec<String>, when: &str| {
        if !sluice {
            return None;
        }
        agent_status(&tb, scenario.server_pod)
            .map_err(|e| errors.push(format!("agent status {when}: {e:#}")))
            .ok()
    };
    let agent_status_before = status(&mut errors, "before");
    let ctx = Ctx {
        tb: &tb,
        exe: exe.display().to_string(),
        dir: dir.clone(),
        scenario,
        args,
    };
    let mut results = RunResults::default();
    match ctx.load_phase(server_ip) {
        Ok((g, s)) => {
            results.gen = Some(g);
            results.sink = Some(s);
        }
        Err(e) => errors.push(format!("load phase: {e:#}")),
    }
    match ctx.latency_phase(server_ip) {
        Ok(p) => results.pingpong = Some(p),
        Err(e) => errors.push(format!("latency phase: {e:#}")),
    }
    let agent_status_after = status(&mut errors, "after");
    if let Err(e) = tb.down() {
        errors.push(format!("testbed teardown: {e:#}"));
    }

    let report = RunReport {
        schema_version: REPORT_SCHEMA_VERSION,
        tool: "sluice-perf".into(),
        started_unix_s,
        caveats: caveats(&results, machine.nproc),
        machine,
        scenario: ScenarioRecord {
            name: scenario.name.into(),
            description: scenario.description.into(),
            client_pod: scenario.client_pod.into(),
            server_pod: scenario.server_pod.into(),
            server_addr: SocketAddrV4::new(server_ip, scenario.sink_port).to_string(),
        },
        parameters: RunParameters {
            mode: match args.mode {
                ModeArg::Sluice => "sluice".into(),
                ModeArg::Kernel => "kernel".into(),
            },
            workers: sluice.then_some(args.workers as usize),
            cluster_file: cluster.display().to_string(),
            frame_bytes: args.size,
            duration_s: args.duration.as_secs_f64(),
            rate_pps: args.rate,
            flows: args.flows,
            batch: args.batch,
            gen_cpu: args.gen_cpu,
            sink_cpu: args.sink_cpu,
            pingpong_count: args.pingpong_count,
        },
        results,
        agent_status_before,
        agent_status_after,
        errors,
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
