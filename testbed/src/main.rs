//! `sluice-testbed`: build, inspect and tear down a cluster of network namespaces from a cluster
//! file. See the `testbed` crate doc for the topology.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use testbed::{Encryption, Mode, Testbed, TestbedError, UpOptions, DEFAULT_STATE_ROOT};

#[derive(Parser)]
#[command(
    name = "sluice-testbed",
    version,
    about = "A Kubernetes cluster made of network namespaces, from a cluster file"
)]
struct Cli {
    /// Where instances keep their state.
    #[arg(long, global = true, default_value = DEFAULT_STATE_ROOT)]
    state_root: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// A sluice agent per node.
    Sluice,
    /// No agent: kernel routing in the node namespaces (the baseline).
    Kernel,
}

#[derive(Clone, Copy, ValueEnum)]
enum EncryptionArg {
    /// VXLAN between nodes in clear.
    None,
    /// WireGuard between nodes (UDP 51871): agents get `--encryption wireguard`; with
    /// `--mode kernel`, every node's vxlan travels in wireguard-go. Nodes need keys in the
    /// cluster file (annotations sluice.io/testbed-wg-private-key, network.sluice.io/wg-pub-key).
    Wireguard,
}

#[derive(Clone, Copy, ValueEnum)]
enum RestartArg {
    Hot,
    Term,
    Kill,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the cluster and leave it running.
    Up {
        file: PathBuf,
        /// Instance name (default: derived from the file's path).
        #[arg(long)]
        instance: Option<String>,
        #[arg(long, value_enum, default_value = "sluice")]
        mode: ModeArg,
        /// Dataplane workers per agent (sluice mode).
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// The `sluice` binary (default: next to this executable).
        #[arg(long = "sluice")]
        sluice_bin: Option<PathBuf>,
        /// The `sluice-cni` binary (default: next to this executable).
        #[arg(long = "cni")]
        cni_bin: Option<PathBuf>,
        /// Extra arguments for every `sluice run`.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Encryption between nodes.
        #[arg(long, value_enum, default_value = "none")]
        encryption: EncryptionArg,
    },
    /// Tear down what `up` built (CNI DEL, stop agents, delete namespaces and state).
    Down {
        file: Option<PathBuf>,
        #[arg(long)]
        instance: Option<String>,
    },
    /// Show nodes, agents and pods.
    Status {
        file: Option<PathBuf>,
        #[arg(long)]
        instance: Option<String>,
    },
    /// Restart a node's agent: `hot` (the default) starts a new agent that takes the running
    /// one's dataplane over (the old one exits by itself); `term` and `kill` stop it with that
    /// signal and start a new one.
    Restart {
        node: String,
        #[arg(long, conflicts_with = "instance")]
        file: Option<PathBuf>,
        #[arg(long)]
        instance: Option<String>,
        #[arg(long, value_enum, default_value = "hot")]
        how: RestartArg,
    },
    /// Run a command in a pod's network namespace; its exit code is passed through.
    Exec {
        /// NAMESPACE/POD
        pod: String,
        #[arg(long, conflicts_with = "instance")]
        file: Option<PathBuf>,
        #[arg(long)]
        instance: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn instance(file: Option<&Path>, instance: Option<String>) -> Result<String> {
    match (instance, file) {
        (Some(name), _) => Ok(name),
        (None, Some(file)) => Ok(Testbed::instance_for_file(file)?),
        (None, None) => bail!("give the cluster file or --instance NAME"),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Up {
            file,
            instance,
            mode,
            workers,
            sluice_bin,
            cni_bin,
            agent_args,
            encryption,
        } => {
            let mut opts = UpOptions::new(&file);
            opts.instance = instance;
            opts.mode = match mode {
                ModeArg::Sluice => Mode::Sluice { workers },
                ModeArg::Kernel => Mode::Kernel,
            };
            opts.sluice_bin = sluice_bin.unwrap_or(opts.sluice_bin);
            opts.cni_bin = cni_bin.unwrap_or(opts.cni_bin);
            opts.state_root = cli.state_root;
            opts.agent_args = agent_args;
            opts.encryption = match encryption {
                EncryptionArg::None => Encryption::None,
                EncryptionArg::Wireguard => Encryption::Wireguard,
            };
            let testbed =
                Testbed::up(opts).with_context(|| format!("bringing up {}", file.display()))?;
            print_status(&testbed, &mut |_| None);
            println!(
                "\ntear down with: sluice-testbed down --instance {}",
                testbed.instance()
            );
            testbed.keep();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down {
            file,
            instance: name,
        } => {
            let name = instance(file.as_deref(), name)?;
            match Testbed::open(&cli.state_root, &name) {
                Ok(testbed) => {
                    testbed.down()?;
                    println!("instance {name} torn down");
                }
                Err(TestbedError::NotFound { .. }) => {
                    println!("no instance {name}: nothing to tear down")
                }
                Err(e) => return Err(e.into()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            file,
            instance: name,
        } => {
            let name = instance(file.as_deref(), name)?;
            let mut testbed = Testbed::open(&cli.state_root, &name)?;
            let alive: Vec<(String, bool)> = testbed
                .nodes()
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
                .into_iter()
                .map(|n| {
                    let alive = testbed.agent_alive(&n).unwrap_or(false);
                    (n, alive)
                })
                .collect();
            print_status(&testbed, &mut |node| {
                alive.iter().find(|(n, _)| n == node).map(|(_, a)| *a)
            });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restart {
            node,
            file,
            instance: name,
            how,
        } => {
            let name = instance(file.as_deref(), name)?;
            let mut testbed = Testbed::open(&cli.state_root, &name)?;
            let old = testbed.node(&node)?.agent_pid;
            let started = std::time::Instant::now();
            match how {
                RestartArg::Hot => {
                    let (ready, gone) = testbed.hot_restart_agent(&node)?;
                    println!(
                        "{node}: agent {} handed over to {} (new agent ready after {:?}, old one gone after {:?})",
                        old.map_or("-".into(), |p| p.to_string()),
                        testbed.node(&node)?.agent_pid.map_or("-".into(), |p| p.to_string()),
                        ready - started,
                        gone - started
                    );
                }
                RestartArg::Term | RestartArg::Kill => {
                    let signal = if matches!(how, RestartArg::Term) {
                        libc::SIGTERM
                    } else {
                        libc::SIGKILL
                    };
                    testbed.stop_agent(&node, signal)?;
                    testbed.start_agent(&node)?;
                    println!(
                        "{node}: agent {} stopped, {} ready after {:?}",
                        old.map_or("-".into(), |p| p.to_string()),
                        testbed
                            .node(&node)?
                            .agent_pid
                            .map_or("-".into(), |p| p.to_string()),
                        started.elapsed()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec {
            pod,
            file,
            instance: name,
            command,
        } => {
            let name = instance(file.as_deref(), name)?;
            let testbed = Testbed::open(&cli.state_root, &name)?;
            let argv: Vec<&str> = command.iter().map(String::as_str).collect();
            let status = testbed
                .pod_command(&pod, &argv)?
                .status()
                .with_context(|| format!("running {command:?} in pod {pod}"))?;
            let code = status.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + status.signal().unwrap_or(0)
            });
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

fn print_status(testbed: &Testbed, alive: &mut dyn FnMut(&str) -> Option<bool>) {
    let mode = match testbed.mode() {
        Mode::Sluice { workers } => format!("sluice, {workers} worker(s) per agent"),
        Mode::Kernel => "kernel (no agents)".to_string(),
    };
    println!(
        "instance {} ({mode}, encryption {}), cluster file {}",
        testbed.instance(),
        testbed.encryption().as_str(),
        testbed.cluster_file().display()
    );
    println!("state {}", testbed.state_dir().display());
    let external = testbed
        .external_ip()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "-".into());
    println!(
        "external client {external} in netns {}",
        testbed.external_netns()
    );
    println!("nodes:");
    for node in testbed.nodes() {
        let agent = match (node.agent_pid, alive(&node.name)) {
            (None, _) => match &node.wireguard {
                Some(t) => format!(
                    "wireguard-go {} pid {}",
                    t.ifname,
                    t.pid.map_or_else(|| "-".to_string(), |p| p.to_string())
                ),
                None => "no agent".to_string(),
            },
            (Some(pid), Some(true)) => format!("agent pid {pid} alive"),
            (Some(pid), Some(false)) => format!("agent pid {pid} NOT running"),
            (Some(pid), None) => format!("agent pid {pid}"),
        };
        println!(
            "  {:<16} {:<16} {:<15} pods {:<18} netns {:<28} {agent}",
            node.name,
            node.kind.as_str(),
            node.ip,
            node.pod_cidr,
            node.netns
        );
    }
    println!("pods:");
    for pod in testbed.pods() {
        println!(
            "  {:<32} {:<15} node {:<16} netns {} ({})",
            pod.key, pod.ip, pod.node, pod.netns, pod.host_ifname
        );
    }
}
