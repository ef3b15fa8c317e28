//! Calling the CNI plugin the way a container runtime does (CNI spec 1.0.0, "Execution
//! protocol"): parameters in `CNI_*` environment variables, the network configuration on stdin,
//! the result (or an error object and a non-zero exit) on stdout. The plugin runs in the node's
//! network namespace, which plays the host's part; `CNI_NETNS` is the pod's namespace file.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use serde::Deserialize;

use crate::cmd::{self, CmdError};

/// Longest a plugin call may take (ADD waits for the agent to attach the interface).
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The pod-side interface name.
pub const POD_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("running CNI plugin {plugin} ({command}) for pod {pod}: {source}")]
    Run {
        plugin: String,
        command: &'static str,
        pod: String,
        #[source]
        source: Box<CmdError>,
    },
    #[error("CNI plugin {plugin} {command} for pod {pod} failed ({status}): {message}")]
    Failed {
        plugin: String,
        command: &'static str,
        pod: String,
        status: String,
        message: String,
    },
    #[error(
        "CNI plugin {plugin} ADD for pod {pod} returned an unusable result ({problem}): {stdout}"
    )]
    BadResult {
        plugin: String,
        pod: String,
        problem: String,
        stdout: String,
    },
}

/// One plugin call's parameters.
pub struct Invocation<'a> {
    pub plugin: &'a Path,
    /// The network namespace the plugin runs in (the node's).
    pub node_netns: &'a str,
    /// The network configuration, passed on stdin as read from the node's CNI config directory.
    pub conf: &'a [u8],
    pub container_id: &'a str,
    /// Name of the pod's network namespace (`CNI_NETNS` is its path under `/run/netns`).
    pub pod_netns: &'a str,
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
    /// The address the pod must get (`IP=` in `CNI_ARGS`, host-local's key); `None`: the
    /// plugin's IPAM picks.
    pub requested_ip: Option<Ipv4Addr>,
}

impl Invocation<'_> {
    fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }

    /// `CNI_ARGS` as a runtime sets it for a Kubernetes pod, plus `IP=` when an address is
    /// requested.
    fn cni_args(&self) -> String {
        let mut args = format!(
            "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
            self.pod_namespace, self.pod_name
        );
        if let Some(ip) = self.requested_ip {
            args.push_str(&format!(";IP={ip}"));
        }
        args
    }

    fn command(&self, verb: &str) -> Command {
        let mut cmd = cmd::in_netns(self.node_netns, &[]);
        cmd.arg(self.plugin);
        let plugin_dir = self.plugin.parent().unwrap_or(Path::new("/"));
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", cmd::netns_path(self.pod_netns))
            .env("CNI_IFNAME", POD_IFNAME)
            .env("CNI_ARGS", self.cni_args())
            .env("CNI_PATH", plugin_dir);
        if let Some(log) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", log);
        }
        cmd
    }

    fn call(&self, verb: &'static str) -> Result<Output, CniError> {
        let mut command = self.command(verb);
        let output =
            cmd::run_with_timeout(&mut command, self.conf, PLUGIN_TIMEOUT).map_err(|source| {
                CniError::Run {
                    plugin: self.plugin.display().to_string(),
                    command: verb,
                    pod: self.pod(),
                    source: Box::new(source),
                }
            })?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(CniError::Failed {
                plugin: self.plugin.display().to_string(),
                command: verb,
                pod: self.pod(),
                status: output.status.to_string(),
                message: describe_failure(&output.stdout, &output.stderr),
            })
        }
    }
}

/// What the testbed needs from an ADD result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Added {
    pub ip: Ipv4Addr,
    /// `interfaces[0].name`: the host side of the pod's veth.
    pub host_ifname: String,
}

/// `CNI_COMMAND=ADD`. With [`Invocation::requested_ip`], a result with another address is an
/// error.
pub fn add(inv: &Invocation<'_>) -> Result<Added, CniError> {
    let output = inv.call("ADD")?;
    let bad = |problem: String| CniError::BadResult {
        plugin: inv.plugin.display().to_string(),
        pod: inv.pod(),
        problem,
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
    };
    let added = parse_add_result(&output.stdout).map_err(bad)?;
    match inv.requested_ip {
        Some(want) if want != added.ip => Err(bad(format!(
            "CNI_ARGS asked for IP={want}, the result gives {}",
            added.ip
        ))),
        _ => Ok(added),
    }
}

/// `CNI_COMMAND=DEL`.
pub fn del(inv: &Invocation<'_>) -> Result<(), CniError> {
    inv.call("DEL").map(|_| ())
}

#[derive(Deserialize)]
struct AddResult {
    #[serde(default)]
    interfaces: Vec<ResultInterface>,
    #[serde(default)]
    ips: Vec<ResultIp>,
}

#[derive(Deserialize)]
struct ResultInterface {
    name: String,
}

#[derive(Deserialize)]
struct ResultIp {
    address: String,
}

/// Reads `ips[0].address` (CIDR notation) and `interfaces[0].name` from an ADD result.
pub fn parse_add_result(stdout: &[u8]) -> Result<Added, String> {
    let result: AddResult =
        serde_json::from_slice(stdout).map_err(|e| format!("not a CNI result: {e}"))?;
    let address = result.ips.first().ok_or("no ips[0]")?.address.as_str();
    let ip_text = address.split('/').next().unwrap_or(address);
    let ip: Ipv4Addr = ip_text
        .parse()
        .map_err(|_| format!("ips[0].address {address:?} is not an IPv4 address"))?;
    let host_ifname = result
        .interfaces
        .first()
        .ok_or("no interfaces[0]")?
        .name
        .clone();
    if host_ifname.is_empty() {
        return Err("interfaces[0].name is empty".into());
    }
    Ok(Added { ip, host_ifname })
}

#[derive(Deserialize)]
struct ErrorResult {
    code: Option<u32>,
    msg: Option<String>,
    details: Option<String>,
}

/// The plugin's error object (`code`, `msg`, `details`) if it printed one, else its raw output.
pub fn describe_failure(stdout: &[u8], stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr).trim().to_string();
    let with_stderr = |text: String| {
        if stderr.is_empty() {
            text
        } else {
            format!("{text}; stderr: {stderr}")
        }
    };
    match serde_json::from_slice::<ErrorResult>(stdout) {
        Ok(ErrorResult {
            code,
            msg: Some(msg),
            details,
        }) => {
            let mut text = format!("{msg} (code {})", code.unwrap_or(0));
            if let Some(details) = details.filter(|d| !d.is_empty()) {
                text.push_str(": ");
                text.push_str(&details);
            }
            with_stderr(text)
        }
        _ => {
            let stdout = String::from_utf8_lossy(stdout).trim().to_string();
            if stdout.is_empty() && stderr.is_empty() {
                "no output".into()
            } else {
                with_stderr(format!("stdout: {stdout:?}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_result_gives_ip_and_host_interface() {
        let stdout = br#"{"cniVersion":"1.0.0",
            "interfaces":[{"name":"lxc1a2b3c4d5e6f","mac":"aa:bb:cc:dd:ee:ff"},
                          {"name":"eth0","sandbox":"/run/netns/x"}],
            "ips":[{"address":"10.244.1.5/32","gateway":"10.244.1.1","interface":1}]}"#;
        let added = parse_add_result(stdout).expect("valid result");
        assert_eq!(added.ip, Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(added.host_ifname, "lxc1a2b3c4d5e6f");
    }

    #[test]
    fn cni_args_carry_the_requested_address_only_when_there_is_one() {
        let mut inv = Invocation {
            plugin: Path::new("/opt/cni/bin/sluice-cni"),
            node_netns: "n",
            conf: b"{}",
            container_id: "c",
            pod_netns: "p",
            pod_namespace: "shop",
            pod_name: "web-0",
            requested_ip: None,
        };
        assert_eq!(inv.cni_args(), "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0");
        inv.requested_ip = Some(Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(
            inv.cni_args(),
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;IP=10.244.1.10"
        );
    }

    #[test]
    fn unusable_results_are_reported() {
        assert!(parse_add_result(b"").is_err());
        assert!(parse_add_result(br#"{"interfaces":[{"name":"lxc1"}],"ips":[]}"#).is_err());
        assert!(
            parse_add_result(br#"{"interfaces":[],"ips":[{"address":"10.0.0.1/32"}]}"#).is_err()
        );
        assert!(parse_add_result(
            br#"{"interfaces":[{"name":"l"}],"ips":[{"address":"fe80::1/64"}]}"#
        )
        .is_err());
    }

    #[test]
    fn failures_show_the_error_object_or_raw_output() {
        let text = describe_failure(
            br#"{"cniVersion":"1.0.0","code":11,"msg":"agent unreachable","details":"no socket"}"#,
            b"",
        );
        assert_eq!(text, "agent unreachable (code 11): no socket");
        assert_eq!(describe_failure(b"", b""), "no output");
        assert!(describe_failure(b"garbage", b"boom").contains("boom"));
    }
}
