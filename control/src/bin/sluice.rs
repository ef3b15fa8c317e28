//! `sluice`: the node agent and its operator commands.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use clap::{Parser, Subcommand};
use control::{
    agent::{self, RunOptions},
    api::{self, Request},
    status::Status,
};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "sluice: an AF_XDP Kubernetes node dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
enum Cmd {
    /// Run the agent on this node.
    Run {
        /// Where cluster state comes from: `file:PATH` (multi-document Kubernetes YAML, re-read
        /// on change) or `kubernetes` (watch the API server: in-cluster config, else
        /// --kubeconfig / $KUBECONFIG, else --api-server).
        #[arg(long)]
        source: String,
        /// `--source kubernetes`: the API server's URL, overriding the config's (Talos
        /// KubePrism: https://127.0.0.1:7445).
        #[arg(long)]
        api_server: Option<String>,
        /// `--source kubernetes`: a kubeconfig file (default: in-cluster, else $KUBECONFIG).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// `--source kubernetes`: milliseconds changes are gathered into one state after the
        /// first of them (0-1000; 0: a state per change, at the price of more rebuilds during a
        /// burst).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=1000))]
        api_batch_ms: u64,
        /// This node's name (a Node object in the source). Default: $NODE_NAME, else hostname.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "/var/lib/sluice")]
        state_dir: PathBuf,
        /// Where to write the CNI network config for sluice-cni.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// Worker threads (each owns queue q of every interface where q % workers == its id).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Cores to pin workers to: `auto` (the last cores of the machine, worker 0 on the
        /// last one, leaving core 0 to the kernel and control), `none`, or a list `2,3`.
        #[arg(long, default_value = "auto")]
        cores: String,
        /// Do not try 2 MiB hugepages for the UMEM.
        #[arg(long)]
        no_hugepages: bool,
        /// UMEM frames per worker (4 KiB each).
        #[arg(long, default_value_t = 8192)]
        frames: u32,
        /// Pod MTU (default: uplink MTU minus 110 for VXLAN + WireGuard).
        #[arg(long)]
        mtu: Option<u32>,
        /// Serve /metrics, /healthz and /readyz here (`none` to disable). Inside the node's
        /// network namespace; 9962 is Cilium's agent metrics port.
        #[arg(long, default_value = "127.0.0.1:9962")]
        metrics_addr: String,
        /// VXLAN UDP port (8472: Cilium's and Flannel's default).
        #[arg(long, default_value_t = control::overlay::DEFAULT_VXLAN_PORT)]
        vxlan_port: u16,
        /// VXLAN network identifier (24 bits).
        #[arg(long, default_value_t = control::overlay::DEFAULT_VNI, value_parser = clap::value_parser!(u32).range(0..=0xff_ffff))]
        vni: u32,
        /// Entries in each service port's Maglev table: a prime (Cilium's default 16381).
        #[arg(long, default_value_t = control::services::DEFAULT_TABLE_SIZE)]
        maglev_table_size: u32,
        /// How workers choose a backend for a new flow: `maglev` (consistent hashing) or
        /// `random` (flow hash modulo the backends).
        #[arg(long, default_value = "maglev")]
        lb_selection: String,
        /// Conntrack entries per worker (a power of two; about 100 bytes each).
        #[arg(long, default_value_t = 1 << 18)]
        conntrack_size: usize,
        /// Do not masquerade pod traffic leaving the cluster (the network must route pod CIDRs).
        #[arg(long)]
        no_masquerade: bool,
        /// Source ports for SNAT (masquerade, NodePort to remote backends, hairpin): LO-HI,
        /// outside the kernel's ephemeral range and the NodePort range.
        #[arg(long, default_value = "61000-65535")]
        snat_ports: String,
        /// Encrypt pod traffic between nodes: `none` or `wireguard` (VXLAN inside WireGuard, as
        /// Cilium's WireGuard mode).
        #[arg(long, default_value = "none")]
        encryption: String,
        /// WireGuard UDP port (Cilium's 51871).
        #[arg(long, default_value_t = control::wg::keys::WIREGUARD_PORT)]
        wg_port: u16,
        /// Drop pod traffic to a node without a WireGuard session (and clear VXLAN from a
        /// WireGuard peer) instead of sending it in clear.
        #[arg(long)]
        wg_strict: bool,
        /// How often to check the cluster file for changes, in milliseconds.
        #[arg(long, default_value_t = 500)]
        source_poll_ms: u64,
        /// Put every NetworkPolicy and HostNetworkPolicy in audit mode: nothing is dropped by
        /// policy, what would be is counted and reported as audit (one policy: annotate it
        /// `policy.sluice.io/audit: "true"`).
        #[arg(long)]
        policy_audit: bool,
        /// Ports of this node that host policies never close: comma-separated
        /// PROTO:PORT[-END][@nodes] (`@nodes`: only from the cluster's node InternalIPs), or
        /// `none`.
        #[arg(
            long,
            default_value = "tcp:22,tcp:6443,tcp:7445,tcp:10250,tcp:50000-50001,tcp:2379-2380,udp:8472@nodes,udp:51871@nodes"
        )]
        host_failsafe: String,
    },
    /// Show workers, interfaces, counters and drop reasons of the running agent.
    Status {
        #[arg(long, default_value = "/var/lib/sluice")]
        state_dir: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Print `OK` when the node is healthy, else what is wrong, a line each (exit status
        /// 1), like `cilium status --brief`.
        #[arg(long, conflicts_with = "json")]
        brief: bool,
    },
    /// Services as the running agent serves them on this node.
    Service {
        #[command(subcommand)]
        command: ServiceCmd,
    },
    /// WireGuard between nodes.
    Wg {
        #[command(subcommand)]
        command: WgCmd,
    },
    /// Network policy as the running agent enforces it.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Explain the verdict for one connection: which policies isolate each end, which rule
    /// allowed it (policy, rule, peer and port indices), and this node's compiled verdict.
    Trace {
        /// Source: NAMESPACE/POD or an IPv4 address.
        #[arg(long)]
        from: String,
        /// Destination: NAMESPACE/POD or an IPv4 address (a node address for the host
        /// firewall).
        #[arg(long)]
        to: String,
        /// Destination port: N, N/tcp, N/udp or N/sctp (TCP when not given).
        #[arg(long)]
        port: String,
        #[arg(long, default_value = "/var/lib/sluice")]
        state_dir: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum WgCmd {
    /// Peers, endpoints, latest handshakes and transfer, like `wg show`.
    Peers {
        #[arg(long, default_value = "/var/lib/sluice")]
        state_dir: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Frontends, backends (state, Maglev share) and skipped Services, like `cilium service
    /// list`.
    List {
        #[arg(long, default_value = "/var/lib/sluice")]
        state_dir: PathBuf,
        /// Print the listing as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `LO-HI` with 1 <= LO <= HI.
fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once('-')?;
    let (lo, hi) = (
        lo.trim().parse::<u16>().ok()?,
        hi.trim().parse::<u16>().ok()?,
    );
    (lo >= 1 && lo <= hi).then_some((lo, hi))
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run {
            source,
            api_server,
            kubeconfig,
            api_batch_ms,
            node,
            state_dir,
            cni_conf_dir,
            workers,
            cores,
            no_hugepages,
            frames,
            mtu,
            source_poll_ms,
            metrics_addr,
            vxlan_port,
            vni,
            maglev_table_size,
            lb_selection,
            conntrack_size,
            no_masquerade,
            snat_ports,
            encryption,
            wg_port,
            wg_strict,
            policy_audit,
            host_failsafe,
        } => {
            let failsafe = control::policy::parse_failsafe(&host_failsafe)?;
            let wireguard = match encryption.as_str() {
                "none" => None,
                "wireguard" => Some(control::agent::WgOptions {
                    port: wg_port,
                    strict: wg_strict,
                }),
                other => anyhow::bail!("--encryption {other:?}: expected none or wireguard"),
            };
            let snat_ports = parse_port_range(&snat_ports).ok_or_else(|| {
                anyhow::anyhow!(
                    "--snat-ports {snat_ports:?}: expected LO-HI with 1 <= LO <= HI <= 65535"
                )
            })?;
            if !conntrack_size.is_power_of_two() {
                anyhow::bail!(
                    "--conntrack-size {conntrack_size}: must be a power of two (e.g. 262144)"
                );
            }
            let selection = match lb_selection.as_str() {
                "maglev" => control::services::SelectionMode::Maglev,
                "random" => control::services::SelectionMode::Random,
                other => anyhow::bail!("--lb-selection {other:?}: expected maglev or random"),
            };
            let services = control::services::ServiceOptions::new(maglev_table_size, selection)
                .map_err(|e| anyhow::anyhow!("--maglev-table-size {maglev_table_size}: {e}"))?;
            let metrics_addr = match metrics_addr.as_str() {
                "none" => None,
                a => Some(a.parse().map_err(|e| {
                    anyhow::anyhow!("--metrics-addr {a:?}: {e} (host:port or none)")
                })?),
            };
            let node = match node.or_else(|| std::env::var("NODE_NAME").ok()) {
                Some(n) => n,
                None => hostname()?,
            };
            let cores = parse_cores(&cores, workers)?;
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, Arc::clone(&stop))?;
            }
            agent::run(
                RunOptions {
                    api_server,
                    kubeconfig,
                    api_batch: Duration::from_millis(api_batch_ms),
                    source,
                    node,
                    state_dir,
                    cni_conf_dir,
                    workers,
                    cores,
                    hugepages: !no_hugepages,
                    frames_per_worker: frames,
                    mtu,
                    source_poll: Duration::from_millis(source_poll_ms),
                    metrics_addr,
                    vxlan_port,
                    vni,
                    services,
                    conntrack_capacity: conntrack_size,
                    masquerade: !no_masquerade,
                    snat_ports,
                    wireguard,
                    policy: control::policy::PolicyOptions {
                        audit: policy_audit,
                        failsafe,
                    },
                },
                stop,
            )
        }
        Cmd::Policy {
            command:
                PolicyCmd::Trace {
                    from,
                    to,
                    port,
                    state_dir,
                    json,
                },
        } => {
            let (protocol, port) = control::policy::reference::parse_port_spec(&port)
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
            let resp = api::call(
                &state_dir.join(api::SOCKET_NAME),
                &Request::PolicyTrace {
                    from,
                    to,
                    protocol,
                    port,
                },
                Duration::from_secs(10),
            )?;
            let report = resp
                .policy_trace
                .ok_or_else(|| anyhow::anyhow!("the agent sent no policy trace"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Cmd::Status {
            state_dir,
            json,
            brief,
        } => {
            let resp = api::call(
                &state_dir.join(api::SOCKET_NAME),
                &Request::Status,
                Duration::from_secs(10),
            )?;
            let value = resp
                .status
                .ok_or_else(|| anyhow::anyhow!("the agent sent no status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else if brief {
                let status: Status = serde_json::from_value(value)?;
                let problems = status.problems();
                if problems.is_empty() {
                    println!("OK");
                } else {
                    for p in &problems {
                        println!("{p}");
                    }
                    std::process::exit(1);
                }
            } else {
                let status: Status = serde_json::from_value(value)?;
                print!("{}", status.render());
            }
            Ok(())
        }
        Cmd::Wg {
            command: WgCmd::Peers { state_dir, json },
        } => {
            let resp = api::call(
                &state_dir.join(api::SOCKET_NAME),
                &Request::Status,
                Duration::from_secs(10),
            )?;
            let value = resp
                .status
                .ok_or_else(|| anyhow::anyhow!("the agent sent no status"))?;
            let status: Status = serde_json::from_value(value)?;
            let Some(wg) = status.wireguard else {
                anyhow::bail!(
                    "WireGuard is off on this agent (start it with --encryption wireguard)"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&wg)?);
            } else {
                print!("{}", control::status::render_wireguard(&wg));
            }
            Ok(())
        }
        Cmd::Service {
            command: ServiceCmd::List { state_dir, json },
        } => {
            let resp = api::call(
                &state_dir.join(api::SOCKET_NAME),
                &Request::Services,
                Duration::from_secs(10),
            )?;
            let listing = resp
                .services
                .ok_or_else(|| anyhow::anyhow!("the agent sent no service listing"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", control::services::listing::render(&listing));
            }
            Ok(())
        }
    }
}

/// `auto`: worker i on core `ncpus - 1 - (i % ncpus)`; `none`: unpinned; else a list.
fn parse_cores(spec: &str, workers: usize) -> anyhow::Result<Option<Vec<usize>>> {
    let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match spec {
        "none" => Ok(None),
        "auto" => Ok(Some(
            (0..workers).map(|i| ncpus - 1 - (i % ncpus)).collect(),
        )),
        list => {
            let cores = list
                .split(',')
                .map(|c| c.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    anyhow::anyhow!("--cores {list:?}: {e}; use auto, none or a list like 2,3")
                })?;
            if cores.len() < workers {
                anyhow::bail!(
                    "--cores {list:?} names {} cores for {workers} workers",
                    cores.len()
                );
            }
            if let Some(c) = cores.iter().find(|c| **c >= ncpus) {
                anyhow::bail!(
                    "--cores {list:?}: core {c} does not exist (this machine has {ncpus})"
                );
            }
            Ok(Some(cores))
        }
    }
}

fn hostname() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } != 0 {
        anyhow::bail!("cannot read the hostname; pass --node NAME");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Cmd};

    fn batch_ms(args: &[&str]) -> Result<u64, String> {
        let argv = ["sluice", "run", "--source", "kubernetes"]
            .into_iter()
            .chain(args.iter().copied());
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Cmd::Run { api_batch_ms, .. } => Ok(api_batch_ms),
            _ => Err("not run".into()),
        }
    }

    #[test]
    fn the_api_batch_window_defaults_to_30_ms_and_is_bounded() {
        assert_eq!(batch_ms(&[]), Ok(30));
        assert_eq!(batch_ms(&["--api-batch-ms", "0"]), Ok(0));
        assert_eq!(batch_ms(&["--api-batch-ms", "5"]), Ok(5));
        let e = batch_ms(&["--api-batch-ms", "5000"]).expect_err("out of range");
        assert!(e.contains("--api-batch-ms"), "{e}");
    }
}
