//! Kernel mode: the baseline where the node namespace's kernel routes pod traffic, the way a
//! simple CNI does it, so `sluice-perf` can compare sluice against "the kernel doing the work".
//!
//! The same `sluice-cni` plugin creates the pod interfaces; instead of the sluice agent, a thread
//! of the testbed answers the plugin on the agent socket (one JSON `Request` line in, one
//! `Response` line out) and, for each `EndpointAdd`, configures the node namespace:
//! - the pods' gateway address on `lo` (/32), so the node answers ARP for it on every pod veth;
//! - `proxy_arp=1` on the pod's host veth;
//! - `ip route replace POD_IP/32 dev HOST_IFNAME`.
//!
//! The route disappears with the veth, so `EndpointDel` only needs an answer. The server exists
//! only while plugins run (ADDs at `up`, DELs at `down`).
//!
//! Between nodes, a kernel node does what Flannel's vxlan backend does ([`link_nodes`]): a vxlan
//! device (VNI 1, UDP 8472, as sluice) with the node's VTEP MAC, and for every other node
//! (sluice or kernel) a route to its pod CIDR via its VTEP, a permanent neighbour entry and a
//! forwarding entry to its InternalIP. No learning, no flooding. VTEP MACs follow the agents'
//! scheme (`control::overlay::vtep_mac`: the Node's `sluice.io/vtep-mac` annotation, else
//! `0a:58:` + the InternalIP's octets), so kernel and sluice nodes accept each other's frames.
//! Pods of a kernel node get the uplink MTU minus the VXLAN overhead ([`pod_mtu`], 1450 on a
//! 1500-byte fabric, as Flannel). A `kernel-wireguard` node ([`crate::wireguard`]) is the same
//! with its vxlan packets to other nodes routed into a wireguard-go tunnel: its vxlan device is
//! not bound to the uplink, and it and the pods get 1390 (uplink - 60 - 50).
//!
//! Services on kernel nodes are kube-proxy's job: [`install_services`] loads nftables rules shaped
//! like kube-proxy's nftables mode ([`crate::nft`]) into every kernel node's namespace, translated
//! by the same `control::services::translate` sluice's agents run. The testbed's pods get their
//! addresses from the CNI plugin's IPAM, not from the file's `status.podIP`, so the translation
//! sees the cluster file with every pod's `status.podIP` (and the addresses of explicit
//! EndpointSlices) replaced by the address the pod really has. Service addresses (ClusterIPs,
//! LoadBalancer and external IPs) get a /32 route to the uplink, standing in for a real node's
//! default route, so traffic to a Service without endpoints reaches kube-proxy's reject rule in
//! the forward hook instead of failing the route lookup.
use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::Ipv4Addr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use control::api::{CniConf, Endpoint, Request, Response};

use crate::{
    cmd::{self, CmdError},
    nft::{self, NftError, RulesetOptions},
    NodeKind, Testbed,
};

/// How often the accept loop checks for a stop request.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How long one connection may take to send its request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "cannot read the cluster file {path} of testbed instance {instance} for its Services: \
         {source}"
    )]
    ClusterFile {
        instance: String,
        path: PathBuf,
        #[source]
        source: Box<control::cluster::ClusterError>,
    },
    #[error("kernel node {node}: routing the service address {address} to the uplink: {source}")]
    ServiceRoute {
        node: String,
        address: Ipv4Addr,
        #[source]
        source: CmdError,
    },
    #[error("kernel node {node}: {source}")]
    Services {
        node: String,
        #[source]
        source: Box<NftError>,
    },
    #[error("cannot serve the agent socket {path} in kernel mode: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the kernel-mode socket thread for {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Outer IPv4, UDP, VXLAN and inner Ethernet headers: what the kernel's vxlan device needs.
pub const VXLAN_OVERHEAD_BYTES: u32 = 50;

/// The MTU of a kernel node's pods on an uplink of `uplink_mtu` bytes.
pub fn pod_mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(VXLAN_OVERHEAD_BYTES)
}

/// The CNI configuration the testbed writes for a kernel node.
pub fn conf(
    pod_cidr: ipnet::Ipv4Net,
    gateway: Ipv4Addr,
    node_state_dir: &Path,
    mtu: u32,
) -> CniConf {
    CniConf {
        cni_version: "1.0.0".into(),
        name: "sluice".into(),
        plugin_type: "sluice-cni".into(),
        mtu,
        pod_cidr: pod_cidr.to_string(),
        gateway,
        agent_socket: node_state_dir.join(control::api::SOCKET_NAME),
        data_dir: node_state_dir.join("ipam"),
        queues: 1,
    }
}

/// A thread answering the agent socket of one node. Stops (and removes the socket) on drop.
pub struct KernelServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl KernelServer {
    /// Binds `socket` (replacing a stale file) and starts answering requests for the node whose
    /// namespace is `node_netns`.
    pub fn start(socket: &Path, node_netns: &str, gateway: Ipv4Addr) -> Result<Self, KernelError> {
        if socket.exists() {
            std::fs::remove_file(socket).map_err(|source| KernelError::Bind {
                path: socket.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(socket).map_err(|source| KernelError::Bind {
            path: socket.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| KernelError::Bind {
                path: socket.to_path_buf(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let netns = node_netns.to_string();
            thread::Builder::new()
                .name(format!("kernel-{node_netns}"))
                .spawn(move || serve(&listener, &stop, &netns, gateway))
                .map_err(|source| KernelError::Thread {
                    path: socket.to_path_buf(),
                    source,
                })?
        };
        Ok(Self {
            socket: socket.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KernelServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(listener: &UnixListener, stop: &AtomicBool, netns: &str, gateway: Ipv4Addr) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let response = match read_request(&stream) {
                    Ok(request) => handle(&request, netns, gateway),
                    Err(message) => Response::error(message),
                };
                answer(stream, &response);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("socket setup: {e}"))?;
    stream
        .set_read_timeout(Some(CONNECTION_TIMEOUT))
        .map_err(|e| format!("socket setup: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading the request: {e}"))?;
    serde_json::from_str(line.trim_end()).map_err(|e| format!("not a request: {e}"))
}

fn answer(mut stream: UnixStream, response: &Response) {
    if let Ok(mut line) = serde_json::to_vec(response) {
        line.push(b'\n');
        // The plugin may have given up already; nothing else to do then.
        let _ = stream.set_write_timeout(Some(CONNECTION_TIMEOUT));
        let _ = stream.write_all(&line);
    }
}

fn handle(request: &Request, netns: &str, gateway: Ipv4Addr) -> Response {
    match request {
        Request::EndpointAdd { endpoint } => match route_endpoint(netns, gateway, endpoint) {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(format!(
                "kernel mode: routing pod {}/{} ({}) in {netns}: {e}",
                endpoint.pod_namespace, endpoint.pod_name, endpoint.ip
            )),
        },
        Request::EndpointDel { .. } | Request::Status => Response::ok(),
        Request::Histograms => {
            Response::error("kernel mode has no sluice workers, so no histograms")
        }
        Request::Services => Response::error("kernel mode has no sluice services table"),
        Request::PolicyTrace { .. } => Response::error("kernel mode has no sluice policy table"),
    }
}

/// The kernel-mode vxlan device in every node namespace.
pub const VXLAN_DEV: &str = "sluice-vx";
/// VNI and UDP port of the kernel-mode overlay (Cilium's and sluice's defaults).
pub const VXLAN_VNI: &str = "1";
pub const VXLAN_PORT: &str = "8472";

/// A node as [`link_nodes`] sees it.
pub struct OverlayNode<'a> {
    pub netns: &'a str,
    pub ip: Ipv4Addr,
    pub pod_cidr: ipnet::Ipv4Net,
    /// `aa:bb:cc:dd:ee:ff` (module doc).
    pub vtep_mac: &'a str,
    pub kind: NodeKind,
}

/// Flannel-style vxlan routing (module doc) on every kernel node of `nodes`, towards all the
/// others. Sluice nodes are only peers here: their agents do their side. Idempotent.
///
/// On a [`NodeKind::KernelWireguard`] node the device is not bound to `uplink` (a bound
/// device's outer route lookup skips the tunnel's routes, see [`crate::wireguard`]) and gets
/// the MTU left inside the tunnel ([`crate::wireguard::pod_mtu`] of `uplink_mtu`).
pub fn link_nodes(
    nodes: &[OverlayNode<'_>],
    uplink: &str,
    uplink_mtu: u32,
) -> Result<(), CmdError> {
    for node in nodes.iter().filter(|n| n.kind.is_kernel()) {
        let ip = node.ip.to_string();
        let mac = node.vtep_mac;
        if cmd::ip_in(node.netns, &["link", "show", VXLAN_DEV]).is_err() {
            let mut add = vec![
                "link",
                "add",
                VXLAN_DEV,
                "address",
                mac,
                "type",
                "vxlan",
                "id",
                VXLAN_VNI,
                "dstport",
                VXLAN_PORT,
                "local",
                &ip,
                "nolearning",
            ];
            if node.kind != NodeKind::KernelWireguard {
                add.extend(["dev", uplink]);
            }
            cmd::ip_in(node.netns, &add)?;
        }
        if node.kind == NodeKind::KernelWireguard {
            let mtu = crate::wireguard::pod_mtu(uplink_mtu).to_string();
            cmd::ip_in(node.netns, &["link", "set", VXLAN_DEV, "mtu", &mtu])?;
        }
        cmd::ip_in(node.netns, &["link", "set", VXLAN_DEV, "up"])?;
        let vtep = format!("{}/32", node.pod_cidr.network());
        cmd::ip_in(node.netns, &["addr", "replace", &vtep, "dev", VXLAN_DEV])?;
        for peer in nodes.iter().filter(|p| p.netns != node.netns) {
            let peer_vtep = peer.pod_cidr.network().to_string();
            let peer_mac = peer.vtep_mac;
            let cidr = peer.pod_cidr.to_string();
            cmd::ip_in(
                node.netns,
                &[
                    "route", "replace", &cidr, "via", &peer_vtep, "dev", VXLAN_DEV, "onlink",
                ],
            )?;
            cmd::ip_in(
                node.netns,
                &[
                    "neigh",
                    "replace",
                    &peer_vtep,
                    "lladdr",
                    peer_mac,
                    "dev",
                    VXLAN_DEV,
                    "nud",
                    "permanent",
                ],
            )?;
            let peer_ip = peer.ip.to_string();
            cmd::run(
                "bridge",
                &[
                    "-n", node.netns, "fdb", "replace", peer_mac, "dev", VXLAN_DEV, "dst", &peer_ip,
                ],
            )?;
        }
    }
    Ok(())
}

/// What [`install_services`] loaded on one kernel node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeServices {
    /// Node name.
    pub node: String,
    /// Node namespace the rules were loaded into.
    pub netns: String,
    /// Service ports translated for this node.
    pub service_ports: usize,
    /// Frontends (address, port, protocol) answered.
    pub frontends: usize,
    /// The ruleset loaded (`nft -f` input).
    pub ruleset: String,
}

/// The cluster file of `testbed` with every pod's `status.podIP` set to the address the testbed
/// gave it (module doc), and explicit EndpointSlice addresses mapped the same way.
pub fn cluster_as_built(testbed: &Testbed) -> Result<control::cluster::ClusterState, KernelError> {
    let path = testbed.cluster_file();
    let mut cluster =
        control::cluster::load_file(path).map_err(|source| KernelError::ClusterFile {
            instance: testbed.instance().to_string(),
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    let mut renamed = std::collections::BTreeMap::new();
    for pod in &mut cluster.pods {
        let key = control::cluster::ClusterState::pod_key(pod);
        let Some(handle) = testbed.pods().iter().find(|p| p.key == key) else {
            continue;
        };
        let status = std::sync::Arc::make_mut(pod)
            .status
            .get_or_insert_with(Default::default);
        if let Some(old) = status.pod_ip.as_deref() {
            renamed.insert(old.to_string(), handle.ip.to_string());
        }
        for old in status.pod_ips.iter().flatten() {
            renamed.insert(old.ip.clone(), handle.ip.to_string());
        }
        status.pod_ip = Some(handle.ip.to_string());
        status.pod_ips = None;
    }
    for slice in &mut cluster.endpoint_slices {
        for endpoint in &mut std::sync::Arc::make_mut(slice).endpoints {
            for address in &mut endpoint.addresses {
                if let Some(new) = renamed.get(address.as_str()) {
                    address.clone_from(new);
                }
            }
        }
    }
    Ok(cluster)
}

/// Loads kube-proxy-shaped nftables rules (module doc, [`crate::nft`]) for the cluster file's
/// Services into every kernel node of `testbed` (all nodes in [`crate::Mode::Kernel`]), replacing
/// earlier ones. Sluice nodes are left alone: their agents serve Services.
pub fn install_services(testbed: &Testbed) -> Result<Vec<NodeServices>, KernelError> {
    let cluster = cluster_as_built(testbed)?;
    let opts = RulesetOptions {
        pod_cidrs: testbed.nodes().iter().map(|n| n.pod_cidr).collect(),
    };
    let mut loaded = Vec::new();
    for node in testbed.nodes().iter().filter(|n| n.kind.is_kernel()) {
        let plan = control::services::translate(
            &cluster,
            &node.name,
            &control::services::ServiceOptions::default(),
        );
        let ruleset = nft::ruleset(&plan, &opts);
        nft::load(&node.netns, &ruleset).map_err(|source| KernelError::Services {
            node: node.name.clone(),
            source: Box::new(source),
        })?;
        // A real node routes service addresses by its default route, so packets to a frontend
        // without endpoints reach the forward hook (and kube-proxy's reject); testbed nodes have
        // no default route, so each such address gets a /32 towards the uplink instead.
        let addresses: std::collections::BTreeSet<Ipv4Addr> = plan
            .frontends
            .iter()
            .filter(|f| f.kind != control::services::FrontendKind::NodePort)
            .map(|f| f.address)
            .collect();
        for address in addresses {
            cmd::ip_in(
                &node.netns,
                &[
                    "route",
                    "replace",
                    &format!("{address}/32"),
                    "dev",
                    &node.uplink,
                ],
            )
            .map_err(|source| KernelError::ServiceRoute {
                node: node.name.clone(),
                address,
                source,
            })?;
        }
        loaded.push(NodeServices {
            node: node.name.clone(),
            netns: node.netns.clone(),
            service_ports: plan.services.len(),
            frontends: plan.frontends.len(),
            ruleset,
        });
    }
    Ok(loaded)
}

/// Kernel routing for one pod (module doc).
pub fn route_endpoint(netns: &str, gateway: Ipv4Addr, endpoint: &Endpoint) -> Result<(), CmdError> {
    let host = endpoint.host_ifname.as_str();
    cmd::ip_in(
        netns,
        &["addr", "replace", &format!("{gateway}/32"), "dev", "lo"],
    )?;
    // A route over a link that is down is refused; the plugin may not have set it up yet.
    cmd::ip_in(netns, &["link", "set", host, "up"])?;
    cmd::sysctl_in(netns, &format!("net.ipv4.conf.{host}.proxy_arp"), "1")?;
    cmd::ip_in(
        netns,
        &[
            "route",
            "replace",
            &format!("{}/32", endpoint.ip),
            "dev",
            host,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_pods_leave_room_for_vxlan() {
        assert_eq!(pod_mtu(1500), 1450);
        assert_eq!(pod_mtu(9000), 8950);
        assert_eq!(pod_mtu(20), 0);
    }

    #[test]
    fn conf_follows_the_kernel_mode_rules() {
        let dir = Path::new("/run/sluice-testbed/x/node1");
        let conf = conf(
            "10.244.1.0/24".parse().expect("cidr"),
            Ipv4Addr::new(10, 244, 1, 1),
            dir,
            1450,
        );
        assert_eq!(conf.queues, 1);
        assert_eq!(conf.mtu, 1450);
        assert_eq!(conf.gateway, Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(conf.agent_socket, dir.join("sluice.sock"));
        assert_eq!(conf.data_dir, dir.join("ipam"));
        assert_eq!(conf.pod_cidr, "10.244.1.0/24");
    }

    #[test]
    fn server_answers_requests_and_removes_its_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sluice.sock");
        std::fs::write(&socket, b"stale").expect("stale file");
        let server = KernelServer::start(&socket, "sl-unused-netns", Ipv4Addr::new(10, 244, 1, 1))
            .expect("binds");
        let timeout = Duration::from_secs(5);
        control::api::call(
            &socket,
            &Request::EndpointDel {
                container_id: "c".into(),
            },
            timeout,
        )
        .expect("DEL answered ok");
        control::api::call(&socket, &Request::Status, timeout).expect("status answered ok");
        drop(server);
        assert!(!socket.exists(), "socket removed on drop");
    }

    #[test]
    fn failed_routing_is_an_error_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sluice.sock");
        let _server = KernelServer::start(
            &socket,
            "sl-no-such-netns-for-testbed",
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .expect("binds");
        let endpoint = Endpoint {
            container_id: "c".into(),
            pod_ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "p".into(),
            host_ifname: "lxcnothere".into(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/none".into(),
        };
        let err = control::api::call(
            &socket,
            &Request::EndpointAdd { endpoint },
            Duration::from_secs(20),
        )
        .expect_err("routing in a missing namespace fails");
        assert!(err.to_string().contains("default/p"), "{err}");
    }
}
