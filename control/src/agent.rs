//! The agent: `sluice run`. One control thread owns the cluster state, the dataplane (workers),
//! the XDP attachments and the endpoint table; it publishes immutable snapshots to the workers.
//!
//! ```text
//!  FileSource (poll) ---------+
//!  API thread (unix socket) --+--> control loop --> Snapshot --> Dataplane (workers)
//!  signals (SIGINT/SIGTERM) --+                 \-> XDP attach/XSKMAP per pod interface
//! ```
//!
//! State directory (`--state-dir`, default `/var/lib/sluice`):
//! - `sluice.sock`: the local API;
//! - `handover.sock`: where a next agent asks for the dataplane (hot restart, `hot`);
//! - `endpoints/<container-id>.json`: every attached endpoint, so a restarted agent re-attaches
//!   its pods before anything else and forwards again without waiting for CNI;
//! - `last-good-cluster.yaml`: the last cluster file that parsed, used when the file is broken
//!   at start-up;
//! - `ipam/`: the CNI plugin's address allocations (named in the CNI config it writes).
//!
//! A cluster file that stops parsing leaves the agent running on its last good state; the
//! error is logged and shown by `sluice status`.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::{
        fd::BorrowedFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use dataplane::{
    runtime::{Dataplane, DataplaneConfig},
    snapshot::{
        EndpointEntry, InterfaceEntry, InterfaceRole, NatConfig, OverlayConfig, SnapshotBuilder,
    },
    wire::Mac,
    xsk::{RingSizes, UmemConfig},
};
use xdp_redirect::{Attachment, MAX_QUEUES};

use crate::{
    api::{self, CniConf, Endpoint, Request, Response},
    cluster::{self, ChangedKinds, ClusterState, FileSource, NodeInfo},
    metrics, overlay,
    services::{self, ServiceOptions, ServicePlan},
    status::{self, InterfaceStatus, Status},
};

mod hot;

/// Bytes the overlay and encryption add (DESIGN.md): VXLAN 50 + WireGuard over IPv4 60.
pub const OVERLAY_OVERHEAD_BYTES: u32 = 50 + 60;
const REQUEST_MAX_BYTES: u64 = 64 * 1024;
/// The control loop wakes at least this often: neighbour learning (the XDP program's ARP map)
/// is picked up within one tick, so it bounds how long a new next hop stays unresolved.
const LOOP_TICK: Duration = Duration::from_millis(10);
/// Test hook: when set to a number of milliseconds, a hot-restarting agent fails that long
/// after its workers adopted the previous agent's, so that agent's rollback can be tested.
pub const HANDOVER_FAULT_ENV: &str = "SLUICE_TEST_HANDOVER_FAULT_MS";
/// A snooped neighbour not heard from for this long is no longer used; the next packet for it
/// sends a fresh ARP request.
const NEIGHBOR_STALE: Duration = Duration::from_secs(300);
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// `--source kubernetes`: the checkpoint is rewritten at most this often (a large state takes
/// seconds to serialise; a restart then starts from a state at most this old, and the first
/// full sync replaces it anyway).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// After removing a socket from the XSKMAP, frames already being redirected to it (in a NAPI
/// poll on another CPU) land within microseconds; wait this long before reclaiming its rings.
const REDIRECT_QUIESCE: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// `file:PATH` or `kubernetes`.
    pub source: String,
    /// `--source kubernetes`: an explicit API server URL (KubePrism: `https://127.0.0.1:7445`)
    /// and kubeconfig; both `None`: in-cluster config, else `$KUBECONFIG`.
    pub api_server: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// `--source kubernetes`: how long changes are gathered into one state after the first
    /// (`--api-batch-ms`; [`crate::kube::DEFAULT_BATCH`]).
    pub api_batch: Duration,
    pub node: String,
    pub state_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub workers: usize,
    pub cores: Option<Vec<usize>>,
    pub hugepages: bool,
    pub frames_per_worker: u32,
    /// Pod MTU; default: the uplink's MTU minus [`OVERLAY_OVERHEAD_BYTES`].
    pub mtu: Option<u32>,
    pub source_poll: Duration,
    /// Where to serve /metrics, /healthz and /readyz (None: not served).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// VXLAN UDP port and VNI.
    pub vxlan_port: u16,
    pub vni: u32,
    /// Maglev table size and backend selection.
    pub services: ServiceOptions,
    /// Conntrack entries per worker (a power of two).
    pub conntrack_capacity: usize,
    /// Masquerade pod traffic leaving the cluster to the node address.
    pub masquerade: bool,
    /// SNAT source ports (inclusive).
    pub snat_ports: (u16, u16),
    /// WireGuard between nodes (`--encryption wireguard`): its UDP port and strict mode.
    pub wireguard: Option<WgOptions>,
    /// Agent-wide audit mode and the host's failsafe ports (`--policy-audit`,
    /// `--host-failsafe`).
    pub policy: crate::policy::PolicyOptions,
}

/// `--encryption wireguard` settings.
#[derive(Clone, Debug)]
pub struct WgOptions {
    pub port: u16,
    pub strict: bool,
}

struct Attached {
    endpoint: Endpoint,
    attachment: Attachment,
    ifindex: u32,
    host_mac: Mac,
    pod_mac: Mac,
    queues: u32,
}

/// The node's uplink: VXLAN in and out, ARP snooped for next hops.
struct Uplink {
    ifname: String,
    ifindex: u32,
    mac: Mac,
    mtu: u16,
    attachment: Attachment,
    queues: u32,
}

struct Agent {
    opts: RunOptions,
    uplink: Option<Uplink>,
    /// Next hops learned on the uplink, as last published.
    neighbors: Vec<(Ipv4Addr, Mac)>,
    routes: Vec<overlay::Route>,
    dp: Dataplane,
    node: NodeInfo,
    cluster: ClusterState,
    source_error: Option<String>,
    /// `--source kubernetes`: the API source's last report.
    api_health: Option<crate::kube::ApiHealth>,
    endpoints: BTreeMap<String, Attached>,
    generation: u64,
    mtu: u32,
    /// The Services translated for this node (recomputed with every cluster change).
    services: Arc<ServicePlan>,
    /// Snapshot generation that last changed `services` (shown by `sluice service list`).
    services_generation: u64,
    /// `services` as the workers read it (shared by every snapshot until the plan changes).
    service_table: Arc<dataplane::services::ServiceTable>,
    /// The WireGuard slow path, when encryption is on.
    wg: Option<crate::wg_runtime::WgRuntime>,
    /// The WireGuard session generation last published.
    wg_published: u64,
    /// healthCheckNodePort listeners of `externalTrafficPolicy: Local` Services.
    health: services::health::HealthServer,
    /// This node's compiled NetworkPolicy / HostNetworkPolicy table (shared by every snapshot
    /// until the rules change; its generation moves only then).
    policy_table: Arc<dataplane::policy::PolicyTable>,
    /// The host firewall's re-injection pair and sockets, while a host policy selects this node.
    host_fw: Option<HostFw>,
    /// Local pods the policy table isolates (for status).
    isolated_pods: usize,
    /// Maglev tables kept across translations (only changed backend sets are recomputed).
    translate_cache: services::Cache,
    /// Pod views, identities and peer selections kept across policy compiles.
    policy_cache: crate::policy::Cache,
    /// `--source kubernetes`: the applied state still has to be checkpointed (written in the
    /// background, at most every [`CHECKPOINT_EVERY`], off the programming path).
    checkpoint_due: bool,
    last_checkpoint: Option<Instant>,
    checkpoint_writer: Option<std::thread::JoinHandle<()>>,
    /// Network programming latency, microseconds (see `metrics::Snapshot::programming`).
    programming: hdrhistogram::Histogram<u64>,
    /// Generations published for a cluster change, with when the source saw that change,
    /// until every worker reports running them.
    programming_pending: std::collections::VecDeque<(u64, Instant)>,
    /// Hot restart: XDP attachments handed over by the previous agent, by interface name,
    /// until the uplink or an endpoint claims them.
    inherited: BTreeMap<String, Attachment>,
    /// Hot restart: the previous agent's WireGuard socket and sessions, until started.
    inherited_wg: Option<(std::net::UdpSocket, crate::wg_runtime::WgHandover)>,
    /// While taking over: snapshots are built but not published until every handed-over
    /// interface is known again (a partial one would drop the traffic of the others).
    hold_publish: bool,
    /// Some healthCheckNodePorts could not be bound (retried at every reconcile).
    health_pending: bool,
}

/// The host firewall in force: the veth pair the workers re-inject admitted packets through,
/// the queues with a socket on its dataplane end, and the policy generation the uplink's XDP
/// program was last configured for.
struct HostFw {
    pair: crate::hostfw::HostPair,
    queues: u32,
    generation: u16,
}

/// Work for the control loop from the API and metrics threads.
enum Job {
    Api(Request, mpsc::SyncSender<Response>),
    Scrape(metrics::Scrape),
    /// The next agent asks for the dataplane (hot restart).
    Handover(UnixStream),
}

/// The state as a checkpoint the cluster-file reader accepts back: pods on a Node the state does
/// not have (skipped as invalid, or deleted before its pods) are left out, since the reader
/// refuses a `spec.nodeName` naming no Node.
fn checkpoint_state(c: &ClusterState) -> ClusterState {
    let mut c = c.clone();
    let nodes: std::collections::BTreeSet<String> = c
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    c.pods.retain(|p| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_none_or(|n| nodes.contains(n))
    });
    c
}

/// What to keep as the last good state (`last-good-cluster.yaml`) after applying one.
enum Checkpoint {
    /// The cluster file's own bytes.
    Bytes(Option<Vec<u8>>),
    /// The applied state, serialised (`--source kubernetes`).
    State,
}

/// Where cluster state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:PATH`, re-read on change.
    File(PathBuf),
    /// `kubernetes`: kube-rs watchers (`crate::kube`).
    Kubernetes,
}

/// Parses `--source`.
pub fn source_spec(source: &str) -> anyhow::Result<SourceSpec> {
    if source == "kubernetes" {
        return Ok(SourceSpec::Kubernetes);
    }
    file_source_path(source).map(SourceSpec::File)
}

/// Parses `file:PATH`.
pub fn file_source_path(source: &str) -> anyhow::Result<PathBuf> {
    match source.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => bail!(
            "--source {source:?} is not understood; use --source file:PATH or --source kubernetes"
        ),
    }
}

fn last_good_path(state_dir: &Path) -> PathBuf {
    state_dir.join("last-good-cluster.yaml")
}

/// First load: the file, or else the last good copy (with the file's error kept for status).
fn initial_cluster(
    path: &Path,
    state_dir: &Path,
) -> anyhow::Result<(ClusterState, Option<String>)> {
    match cluster::load_file(path) {
        Ok(c) => {
            if let Ok(bytes) = std::fs::read(path) {
                let _ = write_atomic(&last_good_path(state_dir), &bytes);
            }
            Ok((c, None))
        }
        Err(e) => {
            let fallback = last_good_path(state_dir);
            if fallback.exists() {
                let c = cluster::load_file(&fallback).with_context(|| {
                    format!(
                        "{e}; and the last good copy {} is unusable",
                        fallback.display()
                    )
                })?;
                tracing::error!(error = %e, fallback = %fallback.display(), "cluster file is broken; starting from the last good copy");
                Ok((c, Some(e.to_string())))
            } else {
                Err(anyhow::Error::new(e).context(
                    "cannot start: the cluster file is invalid and there is no last good copy",
                ))
            }
        }
    }
}

/// The running source.
enum Source {
    File(FileSource),
    Kube(crate::kube::KubeSource),
}

/// `--source kubernetes` at start-up: the checkpoint of the last applied state when there is
/// one (forwarding starts from it before the first sync completes; the first complete state
/// from the API replaces it), else the first complete state from the API (waited for: without
/// this node's Node object there is nothing to forward with).
fn initial_kube_cluster(
    kube: &crate::kube::KubeSource,
    opts: &RunOptions,
    stop: &AtomicBool,
) -> anyhow::Result<(ClusterState, bool)> {
    let checkpoint = last_good_path(&opts.state_dir);
    if checkpoint.exists() {
        match cluster::load_file(&checkpoint) {
            Ok(c) if c.node_info(&opts.node).is_ok() => {
                tracing::info!(checkpoint = %checkpoint.display(), "forwarding from the checkpoint until the API server's first full sync");
                return Ok((c, true));
            }
            Ok(_) => {
                tracing::warn!(checkpoint = %checkpoint.display(), node = %opts.node, "the checkpoint lacks this node; waiting for the API server")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the checkpoint is unusable; waiting for the API server")
            }
        }
    }
    let mut last_log = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("stopped before the first sync with the API server");
        }
        match kube.recv_timeout(Duration::from_millis(200)) {
            Some(crate::kube::SourceEvent::State { state, .. }) => {
                if state.node_info(&opts.node).is_ok() {
                    return Ok((state, false));
                }
                tracing::warn!(node = %opts.node, "the API server has no usable Node object for this node yet; waiting");
            }
            Some(crate::kube::SourceEvent::Health(_)) | None => {}
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            let h = kube.health();
            tracing::warn!(connected = h.connected, synced = ?h.kinds_synced, last_error = ?h.last_error, "still waiting for the first full sync with the API server");
            last_log = Instant::now();
        }
    }
}

pub fn run(opts: RunOptions, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let spec = source_spec(&opts.source)?;
    std::fs::create_dir_all(opts.state_dir.join("endpoints"))
        .with_context(|| format!("creating state directory {}", opts.state_dir.display()))?;
    let dp_config = DataplaneConfig {
        workers: opts.workers,
        cores: opts.cores.clone(),
        umem: UmemConfig {
            frames: opts.frames_per_worker,
            hugepages: opts.hugepages,
            ..UmemConfig::default()
        },
        rings: RingSizes::default(),
        conntrack_capacity: opts.conntrack_capacity,
        ..DataplaneConfig::default()
    };
    // The TSC calibration sleeps 20 ms: not while the previous agent's workers are stopped.
    let _ = dataplane::latency::CycleClock::get();
    // An agent running with this state directory hands its dataplane over (hot restart).
    let mut takeover = hot::take_over(&opts.state_dir, &opts.node, &dp_config)?;
    let handed_state = takeover.as_mut().map(|t| std::mem::take(&mut t.cluster));
    let (cluster, source_error, mut source) = match (&spec, handed_state) {
        (SourceSpec::File(path), Some(c)) => (
            c,
            None,
            Source::File(FileSource::new(path.clone(), opts.source_poll)),
        ),
        (SourceSpec::Kubernetes, Some(c)) => {
            let mut k = crate::kube::KubeOptions::new(opts.node.clone());
            k.api_server = opts.api_server.clone();
            k.kubeconfig = opts.kubeconfig.clone();
            k.batch = opts.api_batch;
            let kube =
                crate::kube::KubeSource::start(k).context("starting the Kubernetes API source")?;
            (
                c,
                Some(
                    "forwarding with the state handed over by the previous agent; the API \
                     server has not completed a sync yet"
                        .to_owned(),
                ),
                Source::Kube(kube),
            )
        }
        (SourceSpec::File(path), None) => {
            let (c, e) = initial_cluster(path, &opts.state_dir)?;
            (
                c,
                e,
                Source::File(FileSource::new(path.clone(), opts.source_poll)),
            )
        }
        (SourceSpec::Kubernetes, None) => {
            let mut k = crate::kube::KubeOptions::new(opts.node.clone());
            k.api_server = opts.api_server.clone();
            k.kubeconfig = opts.kubeconfig.clone();
            k.batch = opts.api_batch;
            let kube =
                crate::kube::KubeSource::start(k).context("starting the Kubernetes API source")?;
            let (c, from_checkpoint) = initial_kube_cluster(&kube, &opts, &stop)?;
            if !from_checkpoint {
                // The first state from the API is the checkpoint until the next change: an
                // agent restarted while the API is down forwards from it.
                match checkpoint_state(&c).to_yaml() {
                    Ok(y) => {
                        if let Err(e) = write_atomic(&last_good_path(&opts.state_dir), y.as_bytes())
                        {
                            tracing::warn!(error = %e, "checkpoint not written");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "checkpoint not written"),
                }
            }
            let note = from_checkpoint.then(|| {
                "forwarding from the checkpoint; the API server has not completed a sync yet"
                    .to_owned()
            });
            (c, note, Source::Kube(kube))
        }
    };
    let node = cluster.node_info(&opts.node).with_context(|| {
        format!(
            "node {:?} in the cluster state ({})",
            opts.node, opts.source
        )
    })?;
    let socket_path = opts.state_dir.join(api::SOCKET_NAME);
    if UnixStream::connect(&socket_path).is_ok() {
        bail!(
            "another sluice agent is already serving {}; stop it first",
            socket_path.display()
        );
    }
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("binding the API socket {}", socket_path.display()))?;

    let mtu = opts
        .mtu
        .unwrap_or_else(|| default_pod_mtu(node.internal_ip));
    let dp = match takeover.as_mut() {
        None => Dataplane::start(dp_config).context("starting the dataplane workers"),
        Some(t) => {
            let states = std::mem::take(&mut t.workers);
            Dataplane::adopt(dp_config, states, t.prepared.take())
                .context("continuing the previous agent's workers (hot restart)")
        }
    };
    let dp = match dp {
        Ok(dp) => dp,
        Err(e) => {
            if let Some(t) = &takeover {
                t.finish(Err(format!("{e:#}")));
            }
            return Err(e);
        }
    };
    if let Some(t) = &takeover {
        // Before the first snapshot: no worker has chosen a backend yet.
        match dp.import_affinity(&t.affinity, t.received.elapsed()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "session-affinity entries taken over"),
            Err(e) => tracing::error!(
                error = %e,
                "session-affinity entries not taken over: clients are placed afresh"
            ),
        }
        if let Some(ms) = std::env::var(HANDOVER_FAULT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Fault injection for the rollback test: fail after the workers run adopted.
            std::thread::sleep(Duration::from_millis(ms));
            let e = anyhow::anyhow!("{HANDOVER_FAULT_ENV}={ms}: hot restart failed on purpose");
            drop(dp); // our workers stop before the previous agent's take their rings back
            t.finish(Err(format!("{e:#}")));
            return Err(e);
        }
    }
    for r in dp.reports() {
        if !r.hugepages && opts.hugepages {
            tracing::warn!(
                worker = r.id,
                "worker UMEM is on normal pages (no hugepages reserved)"
            );
        }
    }
    let mut agent = Agent {
        opts,
        uplink: None,
        neighbors: Vec::new(),
        routes: Vec::new(),
        dp,
        node,
        cluster,
        source_error,
        api_health: None,
        endpoints: BTreeMap::new(),
        generation: 0,
        mtu,
        services: Arc::new(ServicePlan::default()),
        services_generation: 0,
        service_table: dataplane::services::ServiceTable::empty(),
        wg: None,
        wg_published: 0,
        health: services::health::HealthServer::start(
            Ipv4Addr::UNSPECIFIED,
            services::health::CLIENT_TIMEOUT,
        )?,
        policy_table: Arc::new(dataplane::policy::PolicyTable::empty()),
        host_fw: None,
        isolated_pods: 0,
        programming: hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
            .context("programming latency histogram")?,
        programming_pending: std::collections::VecDeque::new(),
        translate_cache: services::Cache::new(),
        policy_cache: crate::policy::Cache::new(),
        checkpoint_due: false,
        last_checkpoint: None,
        checkpoint_writer: None,
        inherited: BTreeMap::new(),
        inherited_wg: None,
        hold_publish: false,
        health_pending: false,
    };
    if let Some(t) = takeover.as_mut() {
        // Continue above the previous agent's generations (flows carry table tags).
        agent.generation = t.generation;
        agent.inherited = std::mem::take(&mut t.attachments);
        agent.inherited_wg = t.wireguard.take();
        agent.hold_publish = true;
    }
    let taking_over = std::time::Instant::now();
    agent.translate_services();
    agent.compile_policy();
    agent.start_wireguard()?;
    agent.publish();
    let uplink_result = agent.attach_uplink();
    if uplink_result.is_ok() {
        agent.sync_host_firewall();
    }
    if let Err(e) = uplink_result {
        tracing::error!(error = %format!("{e:#}"), "uplink not attached: pods on other nodes are unreachable");
    }
    agent.restore_endpoints();
    if let Some(t) = &takeover {
        // Next hops the previous agent learned are in the uplink's map: known at once.
        agent.poll_neighbors();
        for (ifname, _) in std::mem::take(&mut agent.inherited) {
            tracing::info!(%ifname, "handed-over interface no longer attached; detaching it");
        }
        let unclaimed = agent.dp.drop_unclaimed_adopted();
        agent.hold_publish = false;
        agent.publish();
        let forwarding_after = t.received.elapsed();
        t.finish(Ok(()));
        tracing::info!(
            from_pid = t.from_pid,
            generation = agent.generation,
            unclaimed_sockets = unclaimed,
            state_to_forwarding_ms = forwarding_after.as_secs_f64() * 1e3,
            tables_and_interfaces_ms = taking_over.elapsed().as_secs_f64() * 1e3,
            "took over the running agent's dataplane (hot restart)"
        );
    }
    let took_over = takeover.is_some();
    drop(takeover);
    agent.write_cni_conf()?;

    let (req_tx, req_rx) = mpsc::sync_channel::<Job>(16);
    if let Some(addr) = agent.opts.metrics_addr {
        // After a hot restart the previous agent frees the port as it exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        let metrics_listener = loop {
            match metrics::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let to_control = req_tx.clone();
        std::thread::Builder::new()
            .name("sluice-metrics".into())
            .spawn(move || {
                metrics::serve(metrics_listener, move |s| {
                    to_control.try_send(Job::Scrape(s)).is_ok()
                })
            })
            .context("starting the metrics thread")?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    hot::serve(&agent.opts.state_dir, req_tx.clone())?;
    let api_tx = req_tx.clone();
    std::thread::Builder::new()
        .name("sluice-api".into())
        .spawn(move || serve_api(listener, req_tx))
        .context("starting the API thread")?;
    let rebind_api = {
        let path = socket_path.clone();
        move || -> anyhow::Result<()> {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)
                .with_context(|| format!("binding the API socket {}", path.display()))?;
            let tx = api_tx.clone();
            std::thread::Builder::new()
                .name("sluice-api".into())
                .spawn(move || serve_api(listener, tx))
                .context("starting the API thread")?;
            Ok(())
        }
    };
    tracing::info!(
        node = %agent.node.name,
        pod_cidr = %agent.node.pod_cidr,
        gateway = %agent.node.gateway,
        workers = agent.dp.workers(),
        socket = %socket_path.display(),
        "sluice agent running"
    );

    if let Source::File(f) = &mut source {
        if !took_over {
            let _ = f.poll(); // the first read is the state we already have
        }
    }
    if let (Source::Kube(k), Some(w)) = (&source, &agent.wg) {
        // Other nodes learn this node's key from its Node object.
        k.annotate_node(
            crate::wg::keys::PUBLIC_KEY_ANNOTATION,
            &w.public_key().to_base64(),
        );
    }
    let mut last_reconcile = Instant::now();
    let mut handed_over = false;
    while !stop.load(Ordering::Relaxed) {
        match req_rx.recv_timeout(LOOP_TICK) {
            Ok(Job::Api(req, reply)) => {
                let resp = agent.handle(req);
                let _ = reply.send(resp);
            }
            Ok(Job::Handover(stream)) => {
                agent.write_checkpoint_if_due(true);
                if let hot::Outcome::Exit = agent.hand_over(stream, &socket_path, &rebind_api) {
                    handed_over = true;
                    break;
                }
            }
            Ok(Job::Scrape(metrics::Scrape::Ping(reply))) => {
                let _ = reply.send(());
            }
            Ok(Job::Scrape(metrics::Scrape::Ready(reply))) => {
                let _ = reply.send(agent.readiness());
            }
            Ok(Job::Scrape(metrics::Scrape::Metrics(reply))) => {
                let _ = reply.send(agent.render_metrics());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the API thread stopped"),
        }
        match &mut source {
            Source::File(f) => match f.poll() {
                None => {}
                Some(Ok(c)) => {
                    let seen = Instant::now();
                    let before = agent.generation;
                    let bytes = std::fs::read(f.path()).ok();
                    agent.apply_cluster(c, Checkpoint::Bytes(bytes), ChangedKinds::ALL);
                    agent.programming_started(before, seen);
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "cluster file update rejected; keeping the last good state");
                    agent.source_error = Some(e.to_string());
                }
            },
            Source::Kube(k) => {
                // Counters (relists, skipped objects) move without a Health event.
                let h = k.health();
                if agent.api_health.as_ref() != Some(&h) {
                    if h.connected != agent.api_health.as_ref().is_some_and(|a| a.connected) {
                        if h.connected {
                            tracing::info!(synced = h.all_synced, "API server reachable");
                        } else {
                            tracing::warn!(error = ?h.last_error, "API server unreachable: forwarding with the last state");
                        }
                    }
                    agent.api_health = Some(h);
                }
                // Bounded per tick: a flood of events must not starve the API and scrapes.
                for _ in 0..16 {
                    match k.try_recv() {
                        None => break,
                        Some(crate::kube::SourceEvent::State {
                            state,
                            first_change,
                            changed,
                        }) => {
                            let before = agent.generation;
                            agent.apply_cluster(state, Checkpoint::State, changed);
                            agent.programming_started(before, first_change);
                        }
                        // Read through `health()` above, every tick.
                        Some(crate::kube::SourceEvent::Health(_)) => {}
                    }
                }
            }
        }
        agent.track_programming();
        agent.write_checkpoint_if_due(false);
        agent.poll_neighbors();
        if let Some(g) = agent.wg.as_ref().map(|w| w.generation()) {
            if g != agent.wg_published {
                agent.wg_published = g;
                agent.publish();
            }
        }
        if last_reconcile.elapsed() >= RECONCILE_EVERY {
            agent.reconcile_interfaces();
            agent.refresh_routes();
            if agent.health_pending {
                agent.sync_health();
            }
            last_reconcile = Instant::now();
        }
    }
    if handed_over {
        // The next agent holds the XDP links, sockets and UMEM, and serves both sockets of
        // the state directory: drop our copies without detaching or unlinking anything.
        agent.health.stop();
        return Ok(());
    }
    tracing::info!("stopping: detaching XDP programs and stopping workers");
    let handover_socket = agent.opts.state_dir.join(crate::handover::SOCKET_NAME);
    agent.shutdown();
    let _ = std::fs::remove_file(&socket_path);
    let _ = std::fs::remove_file(handover_socket);
    Ok(())
}

fn serve_api(listener: UnixListener, to_control: mpsc::SyncSender<Job>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let read = BufReader::new((&stream).take(REQUEST_MAX_BYTES)).read_line(&mut line);
        let resp = match read {
            Err(e) => Response::error(format!("reading the request: {e}")),
            Ok(_) => match serde_json::from_str::<Request>(line.trim_end()) {
                Err(e) => {
                    Response::error(format!("bad request (expected one JSON request line): {e}"))
                }
                Ok(req) => {
                    let (tx, rx) = mpsc::sync_channel(1);
                    if to_control.send(Job::Api(req, tx)).is_err() {
                        return;
                    }
                    rx.recv_timeout(Duration::from_secs(30))
                        .unwrap_or_else(|_| {
                            Response::error("the agent's control loop did not answer in 30 s")
                        })
                }
            },
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        let _ = (&stream).write_all(&out);
    }
}

/// HdrHistogram V2 + deflate, base64 (the format of [`api::Histograms`]).
fn encode_histogram(h: &hdrhistogram::Histogram<u64>) -> anyhow::Result<String> {
    use base64::Engine as _;
    let mut buf = Vec::new();
    hdrhistogram::serialization::Serializer::serialize(
        &mut hdrhistogram::serialization::V2DeflateSerializer::new(),
        h,
        &mut buf,
    )
    .map_err(|e| anyhow::anyhow!("serialising a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// The XDP program's action counters of one interface, named (empty if the map is unreadable).
fn xdp_counters(attachment: &Attachment) -> Vec<(String, u64)> {
    attachment
        .counters()
        .map(|c| {
            xdp_redirect::Action::ALL
                .iter()
                .map(|x| (x.as_str().to_string(), c[*x as usize]))
                .collect()
        })
        .unwrap_or_default()
}

/// CLOCK_MONOTONIC in ns (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// `/sys/class/net/IF/address`.
fn read_mac(ifname: &str) -> anyhow::Result<Mac> {
    let p = format!("/sys/class/net/{ifname}/address");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    Mac::parse(s.trim()).with_context(|| format!("{p} holds {s:?}, not a MAC address"))
}

/// Number of rx queues of `ifname` (entries `rx-N` in `/sys/class/net/IF/queues`).
fn rx_queues(ifname: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{ifname}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}

/// The uplink is the interface holding the node's InternalIP; pods get its MTU minus the
/// overlay and encryption overhead (1390 on a 1500-byte network).
fn default_pod_mtu(internal_ip: Ipv4Addr) -> u32 {
    let uplink_mtu = uplink_of(internal_ip)
        .and_then(|ifname| std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu")).ok())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1500);
    uplink_mtu.saturating_sub(OVERLAY_OVERHEAD_BYTES).max(576)
}

fn uplink_of(ip: Ipv4Addr) -> Option<String> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr of its family.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == ip {
                    // SAFETY: ifa_name is a NUL-terminated string owned by the list.
                    found = Some(
                        unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                            .to_string_lossy()
                            .into_owned(),
                    );
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs returned.
    unsafe { libc::freeifaddrs(addrs) };
    found
}

impl Agent {
    fn endpoint_file(&self, container_id: &str) -> PathBuf {
        self.opts
            .state_dir
            .join("endpoints")
            .join(format!("{container_id}.json"))
    }

    /// Starts WireGuard when asked: the node key (created on first start, kept in the state
    /// directory with mode 0600), the handshake thread and its socket, the peers from the Nodes.
    fn start_wireguard(&mut self) -> anyhow::Result<()> {
        let Some(o) = self.opts.wireguard.clone() else {
            return Ok(());
        };
        let key = crate::wg::keys::load_or_create(&self.opts.state_dir)
            .context("the WireGuard node key")?;
        let rt = match self.inherited_wg.take() {
            // Hot restart: the previous agent's socket and sessions.
            Some((socket, state)) => crate::wg_runtime::WgRuntime::adopt(
                &key,
                crate::wg::timers::Timers::default(),
                socket,
                state,
            )?,
            None => crate::wg_runtime::WgRuntime::start(
                &key,
                self.node.internal_ip,
                o.port,
                crate::wg::timers::Timers::default(),
            )?,
        };
        tracing::info!(
            public_key = %rt.public_key().to_base64(),
            annotation = crate::wg::keys::PUBLIC_KEY_ANNOTATION,
            node = %self.node.name,
            port = o.port,
            strict = o.strict,
            "WireGuard on: publish the public key as this annotation on the Node"
        );
        self.wg = Some(rt);
        self.update_wireguard_peers();
        Ok(())
    }

    /// Gives the WireGuard thread the peers the Nodes name now.
    fn update_wireguard_peers(&mut self) {
        let Some(w) = &self.wg else { return };
        let found = crate::wg::keys::peers_from_cluster(&self.cluster, &self.node.name);
        for e in &found.invalid {
            tracing::error!(error = %e, "WireGuard peer ignored");
        }
        if !found.without_key.is_empty() {
            tracing::warn!(nodes = ?found.without_key, "Nodes without a WireGuard key: traffic to them is not encrypted");
        }
        w.set_peers(found.peers);
    }

    fn wireguard_status(&self) -> Option<status::WgStatus> {
        let w = self.wg.as_ref()?;
        let o = self.opts.wireguard.as_ref()?;
        let now = monotonic_ns();
        let state = w.state();
        let reports = self.dp.reports();
        let (completed, sent, failures) = w.counters();
        Some(status::WgStatus {
            public_key: w.public_key().to_base64(),
            listen_port: o.port,
            strict: o.strict,
            handshakes_completed: completed,
            initiations_sent: sent,
            handshake_failures: failures,
            peers: state
                .peers
                .iter()
                .map(|p| {
                    let slot = p.id as usize % dataplane::stats::WG_PEER_SLOTS;
                    let [tx, tx_bytes, rx, rx_bytes] =
                        reports.iter().fold([0u64; 4], |mut a, r| {
                            for (x, y) in a.iter_mut().zip(r.wg_peers[slot]) {
                                *x += y;
                            }
                            a
                        });
                    status::WgPeerStatus {
                        node: p.node.clone(),
                        public_key: p.public_key.to_base64(),
                        endpoint: p.endpoint.to_string(),
                        latest_handshake_s_ago: p
                            .latest_handshake_ns
                            .map(|t| now.saturating_sub(t) / 1_000_000_000),
                        has_session: p.send.is_some(),
                        tx_packets: tx,
                        tx_bytes,
                        rx_packets: rx,
                        rx_bytes,
                    }
                })
                .collect(),
        })
    }

    /// Recomputes the service plan from the cluster state; the generation moves only when the
    /// plan changed.
    fn translate_services(&mut self) {
        let plan = services::translate_cached(
            &self.cluster,
            &self.node.name,
            &self.opts.services,
            &mut self.translate_cache,
        );
        if *self.services != plan {
            let generation = self.generation + 1;
            match services::dataplane::service_table(&plan, generation) {
                Ok(t) => self.service_table = Arc::new(t),
                // Keeps the previous table (the services that worked keep working).
                Err(e) => tracing::error!(error = %e, "service plan not applied"),
            }
            self.services = Arc::new(plan);
            self.services_generation = generation;
            self.sync_uplink_claims();
        }
        self.sync_health();
    }

    /// Opens and updates the healthCheckNodePort listeners; a port that cannot be bound now
    /// (held by a previous agent during a hot restart, or by another process) is retried at
    /// every reconcile.
    fn sync_health(&mut self) {
        let errors = self.health.update(&self.services);
        if !errors.is_empty() && !self.health_pending {
            for e in &errors {
                tracing::error!(error = %e, "healthCheckNodePort not served (retrying)");
            }
        }
        if errors.is_empty() && self.health_pending {
            tracing::info!("every healthCheckNodePort is served");
        }
        self.health_pending = !errors.is_empty();
    }

    /// Recompiles the policy table; a new table (and policy generation, never 0) is kept only
    /// when the rules changed. A table the dataplane refuses leaves the previous one in force.
    fn compile_policy(&mut self) {
        let current = self.policy_table.generation();
        let next = current.wrapping_add(1).max(1);
        match crate::policy::compile_cached(
            &self.cluster,
            &self.node.name,
            &self.opts.policy,
            next,
            &mut self.policy_cache,
        ) {
            Ok(c) => {
                if !c.table.same_rules(&self.policy_table) {
                    for w in &c.warnings {
                        tracing::warn!(object = %w.object, field = %w.field, "policy: {}", w.message);
                    }
                    tracing::info!(
                        generation = next,
                        isolated_pods = c.isolated_pods,
                        host_isolated = c.host_isolated,
                        audit = self.opts.policy.audit,
                        "policy table compiled"
                    );
                    self.policy_table = Arc::new(c.table);
                    self.isolated_pods = c.isolated_pods;
                }
            }
            Err(e) => tracing::error!(error = %e, "policy not applied"),
        }
    }

    /// Turns the host firewall on, updates it, or off, as the policy table says (a host policy
    /// selects this node or not). On: the re-injection pair and a socket per worker on its
    /// dataplane end, a snapshot whose workers know the path, then the uplink's XDP program
    /// sends the node's unclaimed traffic to them. Off in the reverse order. A rule change
    /// empties the XDP flow map so established host flows are judged again.
    fn sync_host_firewall(&mut self) {
        let want = self.policy_table.host_isolated();
        let generation = self.policy_table.generation();
        if want && self.host_fw.is_none() {
            if let Err(e) = self.start_host_firewall() {
                tracing::error!(error = %format!("{e:#}"), "host firewall not started: the node stays open (host policies are not enforced)");
                return;
            }
        }
        if !want {
            if self.host_fw.is_some() {
                self.stop_host_firewall();
            }
            return;
        }
        let fw = self.host_firewall_config();
        let Some(u) = &mut self.uplink else { return };
        let Some(h) = &mut self.host_fw else { return };
        if h.generation == generation {
            return;
        }
        if let Err(e) = u.attachment.set_host_firewall(Some(&fw)) {
            tracing::error!(error = %e, "host firewall: the uplink program was not updated");
            return;
        }
        match u.attachment.clear_host_flows() {
            Ok(n) => tracing::info!(generation, flows_cleared = n, "host firewall rules changed"),
            Err(e) => tracing::warn!(error = %e, "host firewall: flow map not cleared"),
        }
        h.generation = generation;
    }

    /// What the uplink's XDP program needs: this node's addresses, every node's address (the
    /// failsafe ports between nodes) and the failsafe ports (the configured ones, plus this
    /// agent's VXLAN and WireGuard ports from nodes).
    fn host_firewall_config(&self) -> xdp_redirect::HostFirewall {
        let mut failsafe: Vec<xdp_redirect::Failsafe> = self
            .opts
            .policy
            .failsafe
            .iter()
            .filter_map(|f| {
                // SCTP failsafe ports are not XDP's: the compiler also allows every failsafe
                // port in the host endpoint's rules, so the workers admit them.
                let base = match f.protocol {
                    crate::policy::Protocol::Udp => xdp_redirect::Failsafe::udp(f.lo..=f.hi),
                    crate::policy::Protocol::Tcp => xdp_redirect::Failsafe::tcp(f.lo..=f.hi),
                    crate::policy::Protocol::Sctp => return None,
                };
                Some(if matches!(f.from, crate::policy::FailsafeFrom::Nodes) {
                    base.from_nodes_only()
                } else {
                    base
                })
            })
            .collect();
        failsafe.push(
            xdp_redirect::Failsafe::udp(self.opts.vxlan_port..=self.opts.vxlan_port)
                .from_nodes_only(),
        );
        if let Some(w) = &self.opts.wireguard {
            failsafe.push(xdp_redirect::Failsafe::udp(w.port..=w.port).from_nodes_only());
        }
        let cluster_nodes = self
            .cluster
            .nodes
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                self.cluster.node_info(name).ok().map(|i| i.internal_ip)
            })
            .collect();
        xdp_redirect::HostFirewall {
            node_addrs: services::dataplane::node_addresses(&self.services, self.node.internal_ip),
            cluster_nodes,
            failsafe,
        }
    }

    fn start_host_firewall(&mut self) -> anyhow::Result<()> {
        if self.uplink.is_none() {
            bail!("no uplink attached");
        }
        let workers = self.dp.workers() as u32;
        let pair = crate::hostfw::HostPair::ensure_with_queues(
            crate::hostfw::DEFAULT_HOST_IFNAME,
            crate::hostfw::DEFAULT_NET_IFNAME,
            workers,
        )?;
        for w in &pair.warnings {
            tracing::warn!("host firewall: {w}");
        }
        let queues = rx_queues(&pair.net.ifname).clamp(1, MAX_QUEUES);
        if (queues as usize) < self.dp.workers() {
            tracing::warn!(ifname = %pair.net.ifname, queues, "re-injection veth has fewer queues than workers: workers without one drop admitted host packets (no_tx_port)");
        }
        let mut added = Vec::new();
        for q in 0..queues {
            match self.port(pair.net.ifindex, q, dataplane::worker::PortKind::Endpoint) {
                Ok(_) => added.push(q),
                Err(e) => {
                    for q in added {
                        let _ = self.dp.remove_port(pair.net.ifindex, q);
                    }
                    return Err(anyhow::Error::new(e)
                        .context(format!("AF_XDP socket on {} queue {q}", pair.net.ifname)));
                }
            }
        }
        let fw = self.host_firewall_config();
        self.host_fw = Some(HostFw {
            pair,
            queues,
            generation: self.policy_table.generation(),
        });
        // Workers learn the path before XDP sends them anything for the host.
        self.publish();
        let Some(u) = &mut self.uplink else {
            bail!("no uplink attached");
        };
        if let Err(e) = u.attachment.set_host_firewall(Some(&fw)) {
            self.stop_host_firewall();
            return Err(anyhow::Error::new(e).context("configuring the uplink's XDP program"));
        }
        tracing::info!(
            host = crate::hostfw::DEFAULT_HOST_IFNAME,
            net = crate::hostfw::DEFAULT_NET_IFNAME,
            failsafe = fw.failsafe.len(),
            "host firewall on"
        );
        Ok(())
    }

    fn stop_host_firewall(&mut self) {
        if let Some(u) = &mut self.uplink {
            if let Err(e) = u.attachment.set_host_firewall(None) {
                tracing::warn!(error = %e, "host firewall: the uplink program was not reset");
            }
        }
        let Some(h) = self.host_fw.take() else { return };
        self.publish();
        for q in 0..h.queues {
            let _ = self.dp.remove_port(h.pair.net.ifindex, q);
        }
        if let Err(e) = h.pair.remove() {
            tracing::warn!(error = %e, "host firewall: re-injection pair not removed");
        }
        tracing::info!("host firewall off");
    }

    fn publish(&mut self) {
        self.generation += 1;
        if self.hold_publish {
            return;
        }
        let mut b = SnapshotBuilder::new(self.generation, self.node.gateway);
        for a in self.endpoints.values() {
            b.interface(InterfaceEntry {
                ifindex: a.ifindex,
                mac: a.host_mac,
                role: InterfaceRole::Pod,
            });
            b.endpoint(
                a.endpoint.ip,
                EndpointEntry {
                    ifindex: a.ifindex,
                    mac: a.pod_mac,
                },
            );
        }
        if let Some(u) = &self.uplink {
            b.interface(InterfaceEntry {
                ifindex: u.ifindex,
                mac: u.mac,
                role: InterfaceRole::Uplink,
            });
            let this = self.cluster.node(&self.node.name);
            b.overlay(OverlayConfig {
                node_ip: self.node.internal_ip,
                vtep_mac: this.map_or_else(
                    || dataplane::stages::encap::derived_vtep_mac(self.node.internal_ip),
                    |n| overlay::vtep_mac(n, self.node.internal_ip),
                ),
                uplink_ifindex: u.ifindex,
                uplink_mtu: u.mtu,
                port: self.opts.vxlan_port,
                vni: self.opts.vni,
            });
            let (remotes, _) = overlay::remote_nodes(&self.cluster, &self.node.name, &self.routes);
            for r in remotes {
                b.remote(r);
            }
            for (ip, mac) in &self.neighbors {
                b.neighbor(*ip, *mac);
            }
            let (uplink_net, uplink_prefix) = self
                .routes
                .iter()
                .filter(|r| {
                    r.gateway.is_unspecified()
                        && r.prefix_len > 0
                        && ipnet::Ipv4Net::new(r.dest, r.prefix_len)
                            .is_ok_and(|n| n.contains(&self.node.internal_ip))
                })
                .max_by_key(|r| r.prefix_len)
                .map_or((self.node.internal_ip, 32), |r| (r.dest, r.prefix_len));
            b.nat(NatConfig {
                node_addrs: services::dataplane::node_addresses(
                    &self.services,
                    self.node.internal_ip,
                ),
                hairpin_addr: services::dataplane::HAIRPIN_ADDR,
                ports: self.opts.snat_ports,
                pod_net: self.node.pod_cidr.network(),
                pod_prefix: self.node.pod_cidr.prefix_len(),
                masquerade: self.opts.masquerade,
                uplink_net,
                uplink_prefix,
                uplink_gateway: self
                    .routes
                    .iter()
                    .find(|r| r.prefix_len == 0 && !r.gateway.is_unspecified())
                    .map(|r| r.gateway),
            });
        }
        b.services(Arc::clone(&self.service_table));
        b.policy(Arc::clone(&self.policy_table));
        if let Some(h) = &self.host_fw {
            b.host_path(dataplane::snapshot::HostPath {
                ifindex: h.pair.net.ifindex,
                mac: Mac(h.pair.net.mac),
                kernel_mac: Mac(h.pair.host.mac),
            });
        }
        if let (Some(w), Some(o)) = (&self.wg, &self.opts.wireguard) {
            let state = w.state();
            b.wireguard(dataplane::snapshot::WireguardConfig {
                port: o.port,
                strict: o.strict,
                peers: state
                    .peers
                    .iter()
                    .map(|p| dataplane::snapshot::WgPeer {
                        node_ip: p.node_ip,
                        id: p.id,
                        send: p.send.clone(),
                    })
                    .collect(),
                sessions: state.table,
            });
        }
        let (snap, refused) = b.build_checked();
        for r in refused {
            tracing::error!(vtep = %r.vtep_ip, pod_cidr = %format!("{}/{}", r.pod_net, r.prefix_len), "node's pod CIDR overlaps another node's: not routed");
        }
        self.dp.publish(snap);
    }

    /// Makes the uplink's XDP program hand NodePorts, the SNAT port range and LoadBalancer /
    /// external IPs to the workers (only what changed is written).
    fn sync_uplink_claims(&mut self) {
        let Some(u) = &mut self.uplink else { return };
        let claims = services::dataplane::uplink_claims(&self.services, self.opts.snat_ports);
        let r = u
            .attachment
            .replace_ports(xdp_redirect::PortProtocol::Tcp, &claims.tcp)
            .and_then(|_| {
                u.attachment
                    .replace_ports(xdp_redirect::PortProtocol::Udp, &claims.udp)
            })
            .and_then(|_| {
                u.attachment.replace_ports(
                    xdp_redirect::PortProtocol::IcmpEchoId,
                    &claims.icmp_echo_ids,
                )
            })
            .and_then(|_| u.attachment.replace_dst_addrs(&claims.addrs));
        if let Err(e) = r {
            tracing::error!(error = %e, uplink = %u.ifname, "service ports and addresses not claimed on the uplink");
        }
    }

    /// Attaches the uplink (the interface holding the node's InternalIP): XDP passes everything
    /// to the kernel except VXLAN for us, and snoops ARP so the dataplane learns next hops.
    fn attach_uplink(&mut self) -> anyhow::Result<()> {
        let Some(ifname) = uplink_of(self.node.internal_ip) else {
            bail!(
                "no interface holds the node's InternalIP {}",
                self.node.internal_ip
            );
        };
        // The uplink's program keeps the host firewall's flow map (sized for the node's flows).
        let mut attachment = match self.inherited.remove(&ifname) {
            Some(a) => a,
            None => Attachment::attach_with(&ifname, &xdp_redirect::AttachOptions::uplink(true))
                .with_context(|| format!("attaching XDP to the uplink {ifname}"))?,
        };
        attachment.set_default(xdp_redirect::RuleAction::Pass)?;
        attachment.set_rule(
            xdp_redirect::PassKey::ipv4(17, self.opts.vxlan_port),
            xdp_redirect::RuleAction::Redirect,
        )?;
        attachment.set_arp_snooping(true)?;
        if let Some(w) = &self.opts.wireguard {
            // Transport messages to the workers, handshakes to the agent's socket.
            attachment.set_wireguard_port(w.port)?;
        }
        let ifindex = attachment.ifindex();
        let mac = read_mac(&ifname)?;
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(1500);
        let queues = rx_queues(&ifname).min(MAX_QUEUES);
        if (queues as usize) < self.dp.workers() {
            tracing::warn!(%ifname, queues, workers = self.dp.workers(), "uplink has fewer queues than workers: workers without a queue on it cannot send to other nodes");
        }
        let mut ports = Vec::new();
        for q in 0..queues {
            match self.port(ifindex, q, dataplane::worker::PortKind::Uplink) {
                Ok(p) => ports.push(p),
                Err(e) => {
                    drop(attachment);
                    for p in &ports {
                        let _ = self.dp.remove_port(ifindex, p.queue);
                    }
                    return Err(anyhow::Error::new(e)
                        .context(format!("AF_XDP socket on the uplink {ifname} queue {q}")));
                }
            }
        }
        self.routes = overlay::parse_proc_routes(
            &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
            &ifname,
        );
        tracing::info!(%ifname, ifindex, mtu, queues, xdp = attachment.mode().as_str(), port = self.opts.vxlan_port, vni = self.opts.vni, "uplink attached");
        self.uplink = Some(Uplink {
            ifname,
            ifindex,
            mac,
            mtu,
            attachment,
            queues,
        });
        self.publish();
        self.sync_uplink_claims();
        if let Some(u) = &mut self.uplink {
            for p in &ports {
                // SAFETY: as for endpoints: the worker keeps the socket until we remove it.
                let fd = unsafe { BorrowedFd::borrow_raw(p.fd) };
                u.attachment.register_socket(p.queue, fd)?;
            }
        }
        Ok(())
    }

    /// Picks up next hops the XDP program learned from ARP; republishes when they changed.
    fn poll_neighbors(&mut self) {
        let Some(u) = &self.uplink else { return };
        let now = monotonic_ns();
        let mut fresh: Vec<(Ipv4Addr, Mac)> = u
            .attachment
            .neighbors()
            .into_iter()
            .filter(|(_, _, seen)| now.saturating_sub(*seen) < NEIGHBOR_STALE.as_nanos() as u64)
            .map(|(ip, mac, _)| (ip, Mac(mac)))
            .collect();
        fresh.sort();
        if fresh != self.neighbors {
            tracing::debug!(neighbors = fresh.len(), "uplink neighbours changed");
            self.neighbors = fresh;
            self.publish();
        }
    }

    fn refresh_routes(&mut self) {
        let Some(u) = &self.uplink else { return };
        let routes = overlay::parse_proc_routes(
            &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
            &u.ifname,
        );
        if routes != self.routes {
            self.routes = routes;
            self.publish();
        }
    }

    fn write_cni_conf(&self) -> anyhow::Result<()> {
        let conf = CniConf {
            cni_version: "1.0.0".into(),
            name: "sluice".into(),
            plugin_type: "sluice-cni".into(),
            mtu: self.mtu,
            pod_cidr: self.node.pod_cidr.to_string(),
            gateway: self.node.gateway,
            agent_socket: self.opts.state_dir.join(api::SOCKET_NAME),
            data_dir: self.opts.state_dir.join("ipam"),
            queues: self.dp.workers() as u32,
        };
        std::fs::create_dir_all(&self.opts.cni_conf_dir).with_context(|| {
            format!(
                "creating the CNI config directory {}",
                self.opts.cni_conf_dir.display()
            )
        })?;
        let path = self.opts.cni_conf_dir.join(api::CNI_CONF_NAME);
        let mut bytes = serde_json::to_vec_pretty(&conf)?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)
            .with_context(|| format!("writing the CNI config {}", path.display()))
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status => match serde_json::to_value(self.status()) {
                Ok(v) => Response {
                    status: Some(v),
                    ..Response::ok()
                },
                Err(e) => Response::error(format!("encoding status: {e}")),
            },
            Request::Histograms => match self.histograms() {
                Ok(h) => Response {
                    histograms: Some(h),
                    ..Response::ok()
                },
                Err(e) => Response::error(format!("{e:#}")),
            },
            Request::EndpointAdd { endpoint } => match self.attach(endpoint) {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(format!("{e:#}")),
            },
            Request::EndpointDel { container_id } => {
                self.detach(&container_id);
                Response::ok()
            }
            Request::PolicyTrace {
                from,
                to,
                protocol,
                port,
            } => match crate::policy::reference::trace(
                &self.cluster,
                &self.opts.policy,
                &self.policy_table,
                &self.node.name,
                &from,
                &to,
                protocol,
                port,
            ) {
                Ok(report) => Response {
                    policy_trace: Some(report),
                    ..Response::ok()
                },
                Err(e) => Response::error(e.to_string()),
            },
            Request::Services => Response {
                services: Some(services::listing::listing(
                    &self.services,
                    self.services_generation,
                    self.opts.services.maglev_table_size(),
                    self.opts.services.selection(),
                )),
                ..Response::ok()
            },
        }
    }

    fn restore_endpoints(&mut self) {
        let dir = self.opts.state_dir.join("endpoints");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let ep = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<Endpoint>(&b).map_err(anyhow::Error::from));
            match ep {
                Ok(ep) if xdp_redirect::ifindex(&ep.host_ifname).is_ok() => {
                    let id = ep.container_id.clone();
                    if let Err(err) = self.attach(ep) {
                        tracing::error!(container = %id, error = %format!("{err:#}"), "could not restore endpoint");
                    } else {
                        tracing::info!(container = %id, "restored endpoint from the state directory");
                    }
                }
                Ok(ep) => {
                    tracing::info!(container = %ep.container_id, ifname = %ep.host_ifname, "endpoint's interface is gone; forgetting it");
                    let _ = std::fs::remove_file(&path);
                }
                Err(err) => {
                    tracing::error!(file = %path.display(), error = %err, "unreadable endpoint file; moving it aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
    }

    fn attach(&mut self, ep: Endpoint) -> anyhow::Result<()> {
        if !self.node.pod_cidr.contains(&ep.ip) || ep.ip == self.node.gateway {
            bail!(
                "endpoint {} address {} is not a pod address of {}",
                ep.container_id,
                ep.ip,
                self.node.pod_cidr
            );
        }
        let pod_mac = Mac::parse(&ep.mac)
            .with_context(|| format!("endpoint {}: mac {:?}", ep.container_id, ep.mac))?;
        if ep.container_id.is_empty()
            || ep.container_id.contains('/')
            || ep.container_id.contains("..")
        {
            bail!(
                "endpoint container id {:?} is not usable as a name",
                ep.container_id
            );
        }
        if let Some(cur) = self.endpoints.get(&ep.container_id) {
            if cur.endpoint == ep
                && xdp_redirect::ifindex(&ep.host_ifname).ok() == Some(cur.ifindex)
            {
                return Ok(()); // ADD retried: already attached
            }
            let id = ep.container_id.clone();
            self.detach(&id);
        }
        if let Some(other) = self.endpoints.values().find(|a| a.endpoint.ip == ep.ip) {
            bail!(
                "address {} is already used by container {}",
                ep.ip,
                other.endpoint.container_id
            );
        }
        let attachment = match self.inherited.remove(&ep.host_ifname) {
            Some(a) => a,
            None => Attachment::attach(&ep.host_ifname, true)
                .with_context(|| format!("attaching XDP to {}", ep.host_ifname))?,
        };
        let ifindex = attachment.ifindex();
        let host_mac = read_mac(&ep.host_ifname)?;
        let queues = rx_queues(&ep.host_ifname).min(MAX_QUEUES);
        if (queues as usize) < self.dp.workers() {
            tracing::warn!(
                ifname = %ep.host_ifname, queues, workers = self.dp.workers(),
                "interface has fewer queues than workers: workers without a queue on it cannot send to it"
            );
        }
        // Order matters. Persist first (a restart must know about every socket we create);
        // then the sockets; then publish the snapshot that knows the interface; only then put
        // the sockets in the XSKMAP, so the first frames redirected find a worker that knows
        // where they came from. Every failure undoes what was done.
        let file = self.endpoint_file(&ep.container_id);
        let bytes = serde_json::to_vec_pretty(&ep)?;
        write_atomic(&file, &bytes)
            .with_context(|| format!("persisting endpoint {}", ep.container_id))?;
        let mut ports = Vec::new();
        for q in 0..queues {
            match self.port(ifindex, q, dataplane::worker::PortKind::Endpoint) {
                Ok(info) => ports.push(info),
                Err(e) => {
                    drop(attachment);
                    for p in &ports {
                        let _ = self.dp.remove_port(ifindex, p.queue);
                    }
                    let _ = std::fs::remove_file(&file);
                    return Err(anyhow::Error::new(e)
                        .context(format!("AF_XDP socket on {} queue {q}", ep.host_ifname)));
                }
            }
        }
        let id = ep.container_id.clone();
        tracing::info!(
            container = %ep.container_id, pod = %format!("{}/{}", ep.pod_namespace, ep.pod_name),
            ifname = %ep.host_ifname, ip = %ep.ip, queues, xdp = attachment.mode().as_str(), "endpoint attached"
        );
        self.endpoints.insert(
            id.clone(),
            Attached {
                endpoint: ep,
                attachment,
                ifindex,
                host_mac,
                pod_mac,
                queues,
            },
        );
        self.publish();
        let mut failed = None;
        if let Some(a) = self.endpoints.get_mut(&id) {
            for p in &ports {
                // SAFETY: the worker keeps this socket open until we remove the port, which only
                // this thread does, after unregistering it (detach).
                let fd = unsafe { BorrowedFd::borrow_raw(p.fd) };
                if let Err(e) = a.attachment.register_socket(p.queue, fd) {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.detach(&id);
            return Err(anyhow::Error::new(e).context("registering AF_XDP sockets in the XSKMAP"));
        }
        Ok(())
    }

    /// The socket for (`ifindex`, `queue`): the one handed over by the previous agent (hot
    /// restart), else a new one.
    fn port(
        &self,
        ifindex: u32,
        queue: u32,
        kind: dataplane::worker::PortKind,
    ) -> Result<dataplane::worker::PortInfo, dataplane::runtime::RuntimeError> {
        match self.dp.take_adopted(ifindex, queue) {
            Some(p) => {
                // The previous agent's kind for it may be missing (an older agent) or other.
                self.dp.set_port_kind(ifindex, queue, kind)?;
                Ok(p)
            }
            None => self.dp.add_port_as(ifindex, queue, kind),
        }
    }

    fn detach(&mut self, container_id: &str) {
        let Some(mut a) = self.endpoints.remove(container_id) else {
            let _ = std::fs::remove_file(self.endpoint_file(container_id));
            return;
        };
        self.publish();
        for q in 0..a.queues {
            let _ = a.attachment.unregister_socket(q);
        }
        drop(a.attachment);
        std::thread::sleep(REDIRECT_QUIESCE);
        for q in 0..a.queues {
            if let Err(e) = self.dp.remove_port(a.ifindex, q) {
                tracing::error!(error = %e, "removing AF_XDP socket");
            }
        }
        let _ = std::fs::remove_file(self.endpoint_file(container_id));
        tracing::info!(container = %container_id, ifname = %a.endpoint.host_ifname, "endpoint detached");
    }

    /// Pods deleted while the agent could not hear about it: their interfaces are gone.
    fn reconcile_interfaces(&mut self) {
        let gone: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, a)| xdp_redirect::ifindex(&a.endpoint.host_ifname).ok() != Some(a.ifindex))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            tracing::info!(container = %id, "endpoint interface disappeared");
            self.detach(&id);
        }
    }

    /// Applies a new state; `kinds` says which kinds changed since the last one (the
    /// Kubernetes source knows, a file is taken as all), so only the tables they feed are
    /// rebuilt: an EndpointSlice change does not recompile the policy table, a policy change
    /// does not translate the Services again.
    fn apply_cluster(&mut self, c: ClusterState, checkpoint: Checkpoint, kinds: ChangedKinds) {
        match c.node_info(&self.opts.node) {
            Ok(node) => {
                let changed = node != self.node;
                let kinds = if changed { ChangedKinds::ALL } else { kinds };
                self.cluster = c;
                self.node = node;
                self.source_error = None;
                if kinds.services() {
                    self.translate_services();
                }
                if kinds.policy() {
                    self.compile_policy();
                }
                self.sync_host_firewall();
                self.update_wireguard_peers();
                match checkpoint {
                    Checkpoint::Bytes(Some(bytes)) => {
                        if let Err(e) = write_atomic(&last_good_path(&self.opts.state_dir), &bytes)
                        {
                            tracing::warn!(error = %e, "checkpoint not written");
                        }
                    }
                    Checkpoint::Bytes(None) => {}
                    // Serialising a large state takes seconds: done after publishing, in the
                    // background (`write_checkpoint_if_due`).
                    Checkpoint::State => self.checkpoint_due = true,
                }
                if changed {
                    if let Err(e) = self.write_cni_conf() {
                        tracing::error!(error = %format!("{e:#}"), "rewriting the CNI config");
                    }
                }
                self.publish();
                tracing::info!(
                    generation = self.generation,
                    pods = self.cluster.pods.len(),
                    "cluster state updated"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "cluster file update lacks this node; keeping the last good state");
                self.source_error = Some(e.to_string());
            }
        }
    }

    fn histograms(&self) -> anyhow::Result<api::Histograms> {
        let (per_worker, merged) = self.dp.histograms()?;
        let encode = |id: usize,
                      h: &dataplane::latency::LatencyHistograms|
         -> anyhow::Result<api::WorkerHistograms> {
            Ok(api::WorkerHistograms {
                id,
                batch_ns: encode_histogram(&h.batch_ns)?,
                packet_ns: encode_histogram(&h.packet_ns)?,
                batch_packets: encode_histogram(&h.batch_packets)?,
            })
        };
        Ok(api::Histograms {
            tsc_hz: dataplane::latency::CycleClock::get().hz(),
            workers: per_worker
                .iter()
                .enumerate()
                .map(|(i, h)| encode(i, h))
                .collect::<anyhow::Result<_>>()?,
            merged: encode(0, &merged)?,
        })
    }

    /// A cluster change seen at `seen` was applied: if it published a new generation (the
    /// agent's generation moved from `before`), time it until every worker runs it.
    fn programming_started(&mut self, before: u64, seen: Instant) {
        if self.generation != before {
            // Bounded: a worker that never reports (stuck) must not grow this forever.
            if self.programming_pending.len() >= 1024 {
                self.programming_pending.pop_front();
            }
            self.programming_pending.push_back((self.generation, seen));
        }
    }

    /// Writes the checkpoint of the applied API state in a background thread when one is due,
    /// the last write is at least [`CHECKPOINT_EVERY`] old and no write is in flight.
    fn write_checkpoint_if_due(&mut self, force: bool) {
        if let Some(w) = &self.checkpoint_writer {
            if !w.is_finished() && !force {
                return;
            }
            if let Some(w) = self.checkpoint_writer.take() {
                let _ = w.join();
            }
        }
        if !self.checkpoint_due
            || (!force
                && self
                    .last_checkpoint
                    .is_some_and(|t| t.elapsed() < CHECKPOINT_EVERY))
        {
            return;
        }
        self.checkpoint_due = false;
        self.last_checkpoint = Some(Instant::now());
        let state = checkpoint_state(&self.cluster);
        let path = last_good_path(&self.opts.state_dir);
        let write = move || match state.to_yaml() {
            Ok(y) => {
                if let Err(e) = write_atomic(&path, y.as_bytes()) {
                    tracing::warn!(error = %e, "checkpoint not written");
                }
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint not written"),
        };
        if force {
            write();
        } else {
            match std::thread::Builder::new()
                .name("sluice-checkpoint".into())
                .spawn(write)
            {
                Ok(h) => self.checkpoint_writer = Some(h),
                Err(e) => tracing::warn!(error = %e, "checkpoint thread not started"),
            }
        }
    }

    /// Records the programming latency of generations every worker now reports.
    fn track_programming(&mut self) {
        if self.programming_pending.is_empty() {
            return;
        }
        let Some(running) = self.dp.reports().iter().map(|r| r.generation).min() else {
            return;
        };
        while let Some(&(g, seen)) = self.programming_pending.front() {
            if g > running {
                break;
            }
            let us = seen.elapsed().as_micros().clamp(1, 600_000_000) as u64;
            let _ = self.programming.record(us);
            self.programming_pending.pop_front();
        }
    }

    /// `/readyz`: every worker runs a snapshot, and the uplink is attached when other nodes
    /// exist (else their pods are unreachable). The state in force is always complete: an
    /// agent serves only after its first full sync, or with a checkpoint or a hand-over.
    fn readiness(&self) -> Result<(), String> {
        if let Some(r) = self.dp.reports().iter().find(|r| r.generation == 0) {
            return Err(format!("worker {} runs no snapshot yet", r.id));
        }
        let others = self
            .cluster
            .nodes
            .iter()
            .filter(|n| n.metadata.name.as_deref() != Some(self.node.name.as_str()))
            .count();
        if self.uplink.is_none() && others > 0 {
            return Err(format!(
                "the uplink is not attached: pods on the {others} other nodes are unreachable"
            ));
        }
        Ok(())
    }

    fn render_metrics(&self) -> String {
        let status = self.status();
        let reports = self.dp.reports();
        let hists = self.dp.histograms().ok().map(|(w, _)| w);
        metrics::render(&metrics::Snapshot {
            node: &self.node.name,
            generation: self.generation,
            source_error: self.source_error.is_some(),
            endpoints: self.endpoints.len(),
            workers: &reports,
            interfaces: &status.interfaces,
            histograms: hists.as_deref(),
            programming: Some(&self.programming),
            wireguard: status.wireguard.as_ref(),
            api: status.api.as_ref(),
        })
    }

    fn status(&self) -> Status {
        let reports = self.dp.reports();
        let ports = self.dp.port_stats().unwrap_or_default();
        let mut totals = dataplane::stats::Counters::default();
        for r in &reports {
            totals.add(&r.counters);
        }
        let mut interfaces: Vec<InterfaceStatus> = self
            .endpoints
            .values()
            .map(|a| InterfaceStatus {
                name: a.endpoint.host_ifname.clone(),
                ifindex: a.ifindex,
                mac: a.host_mac.to_string(),
                xdp_mode: a.attachment.mode().as_str().into(),
                pod: Some(format!(
                    "{}/{}",
                    a.endpoint.pod_namespace, a.endpoint.pod_name
                )),
                ip: Some(a.endpoint.ip.to_string()),
                queues: ports
                    .iter()
                    .filter(|p| p.ifindex == a.ifindex)
                    .map(status::queue_status)
                    .collect(),
                xdp: xdp_counters(&a.attachment),
            })
            .collect();
        if let Some(u) = &self.uplink {
            interfaces.push(InterfaceStatus {
                name: u.ifname.clone(),
                ifindex: u.ifindex,
                mac: u.mac.to_string(),
                xdp_mode: u.attachment.mode().as_str().into(),
                pod: None,
                ip: Some(format!(
                    "{} (uplink, {} queues, {} neighbours)",
                    self.node.internal_ip,
                    u.queues,
                    self.neighbors.len()
                )),
                queues: ports
                    .iter()
                    .filter(|p| p.ifindex == u.ifindex)
                    .map(status::queue_status)
                    .collect(),
                xdp: xdp_counters(&u.attachment),
            });
        }
        Status {
            node: self.node.name.clone(),
            source: self.opts.source.clone(),
            generation: self.generation,
            source_error: self.source_error.clone(),
            gateway: self.node.gateway.to_string(),
            pod_cidr: self.node.pod_cidr.to_string(),
            workers: reports.iter().map(status::worker_status).collect(),
            interfaces,
            totals: status::counters_list(&totals),
            drops: status::drops_list(&totals),
            wireguard: self.wireguard_status(),
            api: self.api_health.as_ref().map(|h| status::ApiStatus {
                connected: h.connected,
                since_unix: h
                    .since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                last_error: h.last_error.clone(),
                kinds_synced: h.kinds_synced.clone(),
                all_synced: h.all_synced,
                relists: h.relists,
                skipped_objects: h.skipped_objects,
            }),
            policy: Some(status::PolicyStatus {
                generation: self.policy_table.generation(),
                isolated_pods: self.isolated_pods,
                host_isolated: self.policy_table.host_isolated(),
                host_firewall: self.host_fw.is_some(),
                audit: self.opts.policy.audit,
            }),
        }
    }

    fn shutdown(mut self) {
        // The last applied state must survive us.
        self.write_checkpoint_if_due(true);
        // Detach every program first (traffic falls back to the kernel), then stop workers.
        if self.host_fw.is_some() {
            self.stop_host_firewall();
        }
        for a in std::mem::take(&mut self.endpoints).into_values() {
            drop(a.attachment);
        }
        drop(self.uplink.take());
        self.health.stop();
        self.dp.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_even_with_pods_on_a_node_the_state_lacks() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/clusters/two-node.yaml"),
        )
        .expect("two-node.yaml");
        let mut state = cluster::parse_str(&text, "two-node.yaml").expect("parses");
        let pods = state.pods.len();
        // The API can send a pod whose Node was skipped or deleted first.
        let mut orphan = (*state.pods[0]).clone();
        orphan.metadata.name = Some("orphan".into());
        if let Some(spec) = orphan.spec.as_mut() {
            spec.node_name = Some("gone".into());
        }
        state.pods.push(std::sync::Arc::new(orphan));
        let raw = state.to_yaml().expect("yaml");
        assert!(
            cluster::parse_str(&raw, "raw").is_err(),
            "the reader refuses the raw state (what this guards against)"
        );
        let yaml = checkpoint_state(&state).to_yaml().expect("yaml");
        let back = cluster::parse_str(&yaml, "checkpoint").expect("the checkpoint reads back");
        assert_eq!(back.pods.len(), pods);
        assert_eq!(back.nodes, state.nodes);
    }
}
