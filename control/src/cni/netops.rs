//! The network operations the plugin needs, behind a trait so that the ADD/DEL/CHECK logic in
//! [`super`] can be tested without root, and one real implementation, [`IpRoute`], that drives
//! iproute2.
//!
//! Why iproute2 and not netlink from Rust: every step is one well-known `ip` command, an operator
//! can replay it by hand, and `ip`'s own error text ("File exists", "Cannot find device") goes
//! into the CNI error unchanged. Commands run with arguments (never a shell); work inside the pod
//! uses `nsenter --net=<CNI_NETNS>` because `ip -n` only takes names under /var/run/netns, while
//! `ip link ... netns <arg>` takes a path whenever the argument contains a '/' (checked on
//! iproute2 6.1).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run `{command}`: {source} (is iproute2/util-linux installed on the node?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed something unexpected: {detail}")]
    Output { command: String, detail: String },
}

/// The veth pair to create for a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethSpec {
    /// Host side, in the node's namespace.
    pub host_ifname: String,
    /// Pod side, created directly inside `netns`.
    pub pod_ifname: String,
    /// Path of the pod's network namespace.
    pub netns: PathBuf,
    pub mtu: u32,
    /// numtxqueues and numrxqueues of both sides.
    pub queues: u32,
}

/// Addresses, routes and MAC of a pod interface as seen inside its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodLink {
    pub mac: String,
    pub up: bool,
    /// IPv4 addresses with their prefix length.
    pub addresses: Vec<(Ipv4Addr, u8)>,
    /// Gateway of the default route through this interface, if there is one.
    pub default_gateway: Option<Ipv4Addr>,
}

pub trait NetOps {
    /// Whether interface `ifname` exists in the node's namespace (`netns` None) or in `netns`.
    fn link_exists(&self, netns: Option<&Path>, ifname: &str) -> Result<bool, NetError>;
    /// Creates the veth pair, the pod side directly in the pod's namespace, and brings the host
    /// side up.
    fn create_veth(&self, spec: &VethSpec) -> Result<(), NetError>;
    /// Deletes an interface in the node's namespace (for a veth, both ends go).
    fn delete_link(&self, ifname: &str) -> Result<(), NetError>;
    /// Inside the pod: `lo` up, `ifname` up with `ip/32`, an on-link route to `gateway` and the
    /// default route via `gateway`.
    fn configure_pod(
        &self,
        netns: &Path,
        ifname: &str,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError>;
    /// MAC address of `ifname` in the node's namespace (`netns` None) or in `netns`.
    fn mac(&self, netns: Option<&Path>, ifname: &str) -> Result<String, NetError>;
    /// State of the pod interface, for CHECK.
    fn pod_link(&self, netns: &Path, ifname: &str) -> Result<PodLink, NetError>;
}

/// [`NetOps`] through `ip` and `nsenter` found on `PATH`.
#[derive(Clone, Debug, Default)]
pub struct IpRoute;

/// One entry of `ip -j link show` / `ip -j addr show`.
#[derive(Deserialize)]
struct IpLink {
    #[serde(default)]
    address: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
}

/// One entry of `ip -j route show`.
#[derive(Deserialize)]
struct IpRouteEntry {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
}

impl IpRoute {
    /// Runs `ip ARGS` in the node's namespace or, with `netns`, `nsenter --net=NETNS ip ARGS`.
    /// Returns stdout.
    fn ip(&self, netns: Option<&Path>, args: &[&str]) -> Result<String, NetError> {
        self.tool("ip", netns, args)
    }

    fn tool(&self, program: &str, netns: Option<&Path>, args: &[&str]) -> Result<String, NetError> {
        let mut command = match netns {
            None => Command::new(program),
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display())).arg(program);
                c
            }
        };
        command.args(args);
        let rendered = render(&command);
        let output = command.output().map_err(|source| NetError::Spawn {
            command: rendered.clone(),
            source,
        })?;
        if !output.status.success() {
            return Err(NetError::Failed {
                command: rendered,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        String::from_utf8(output.stdout).map_err(|e| NetError::Output {
            command: rendered,
            detail: format!("not UTF-8: {e}"),
        })
    }

    fn show_link(
        &self,
        netns: Option<&Path>,
        ifname: &str,
        what: &str,
    ) -> Result<IpLink, NetError> {
        let args = ["-j", what, "show", "dev", ifname];
        let stdout = self.ip(netns, &args)?;
        let command = format!("ip {}", args.join(" "));
        let mut links: Vec<IpLink> =
            serde_json::from_str(&stdout).map_err(|e| NetError::Output {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        if links.is_empty() {
            return Err(NetError::Output {
                command,
                detail: format!("no interface {ifname}"),
            });
        }
        Ok(links.swap_remove(0))
    }
}

fn render(command: &Command) -> String {
    let mut s = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

impl NetOps for IpRoute {
    fn link_exists(&self, netns: Option<&Path>, ifname: &str) -> Result<bool, NetError> {
        // `ip link show dev X` exits 1 with "does not exist" for a missing device; any other
        // failure (no such netns, no permission) is an error, not a "no".
        match self.ip(netns, &["-j", "link", "show", "dev", ifname]) {
            Ok(_) => Ok(true),
            Err(NetError::Failed { stderr, .. }) if stderr.contains("does not exist") => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn create_veth(&self, spec: &VethSpec) -> Result<(), NetError> {
        let mtu = spec.mtu.to_string();
        let queues = spec.queues.to_string();
        let netns = spec.netns.to_string_lossy();
        // `netns` must contain a '/' for iproute2 to take it as a path rather than a name.
        let netns = if netns.contains('/') {
            netns.into_owned()
        } else {
            format!("./{netns}")
        };
        #[rustfmt::skip]
        let args = [
            "link", "add", &spec.host_ifname,
            "mtu", &mtu, "numtxqueues", &queues, "numrxqueues", &queues,
            "type", "veth", "peer", "name", &spec.pod_ifname,
            "mtu", &mtu, "numtxqueues", &queues, "numrxqueues", &queues,
            "netns", &netns,
        ];
        self.ip(None, &args)?;
        self.ip(None, &["link", "set", "dev", &spec.host_ifname, "up"])?;
        Ok(())
    }

    fn delete_link(&self, ifname: &str) -> Result<(), NetError> {
        self.ip(None, &["link", "del", "dev", ifname]).map(drop)
    }

    fn configure_pod(
        &self,
        netns: &Path,
        ifname: &str,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        let netns = Some(netns);
        let address = format!("{ip}/32");
        let gateway_host = format!("{gateway}/32");
        let gateway = gateway.to_string();
        self.ip(netns, &["link", "set", "dev", "lo", "up"])?;
        self.ip(netns, &["link", "set", "dev", ifname, "up"])?;
        self.ip(netns, &["addr", "replace", &address, "dev", ifname])?;
        self.ip(
            netns,
            &[
                "route",
                "replace",
                &gateway_host,
                "dev",
                ifname,
                "scope",
                "link",
            ],
        )?;
        self.ip(
            netns,
            &[
                "route", "replace", "default", "via", &gateway, "dev", ifname,
            ],
        )?;
        // The pod's stack must compute its own L4 checksums: with offload on, veth hands
        // CHECKSUM_PARTIAL frames to XDP, and AF_XDP copies them to user space with the checksum
        // unfinished; the dataplane forwards bytes, so the receiver would drop them.
        self.tool("ethtool", netns, &["-K", ifname, "tx", "off"])?;
        Ok(())
    }

    fn mac(&self, netns: Option<&Path>, ifname: &str) -> Result<String, NetError> {
        let link = self.show_link(netns, ifname, "link")?;
        if link.address.is_empty() {
            return Err(NetError::Output {
                command: format!("ip -j link show dev {ifname}"),
                detail: "no link-layer address".into(),
            });
        }
        Ok(link.address)
    }

    fn pod_link(&self, netns: &Path, ifname: &str) -> Result<PodLink, NetError> {
        let link = self.show_link(Some(netns), ifname, "addr")?;
        let addresses = link
            .addr_info
            .iter()
            .filter(|a| a.family == "inet")
            .filter_map(|a| a.local.parse().ok().map(|ip| (ip, a.prefixlen)))
            .collect();
        let args = ["-j", "-4", "route", "show", "dev", ifname];
        let stdout = self.ip(Some(netns), &args)?;
        let routes: Vec<IpRouteEntry> =
            serde_json::from_str(&stdout).map_err(|e| NetError::Output {
                command: format!("nsenter --net={} ip {}", netns.display(), args.join(" ")),
                detail: e.to_string(),
            })?;
        let default_gateway = routes
            .iter()
            .find(|r| r.dst == "default")
            .and_then(|r| r.gateway.as_deref())
            .and_then(|g| g.parse().ok());
        Ok(PodLink {
            mac: link.address,
            up: link.flags.iter().any(|f| f == "UP"),
            addresses,
            default_gateway,
        })
    }
}
