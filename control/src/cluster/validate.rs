//! Rules beyond types that the rest of sluice relies on. Each check names the field by its path
//! in the object (as `kubectl explain` would) and says what to change.
//!
//! sluice's dataplane is IPv4-only: node addresses, pod CIDRs, pod IPs, cluster IPs and IPv4
//! EndpointSlice addresses must be IPv4. IPv6 entries are accepted only where Kubernetes lists
//! them beside the IPv4 one (`spec.podCIDRs`, extra `InternalIP`s, `status.podIPs`).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Container, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::error::{ClusterError, Location};

/// `NodeAddress.type` of the address other nodes reach this node at.
pub const INTERNAL_IP: &str = "InternalIP";

pub(crate) fn node(node: &Node, at: &Location) -> Result<(), ClusterError> {
    if let Some(spec) = &node.spec {
        if let Some(cidr) = spec.pod_cidr.as_deref().filter(|c| !c.is_empty()) {
            pod_cidr(cidr).map_err(|reason| ClusterError::invalid(at, "spec.podCIDR", reason))?;
        }
        for (i, cidr) in spec.pod_cidrs.iter().flatten().enumerate() {
            cidr.parse::<IpNet>().map_err(|_| {
                ClusterError::invalid(
                    at,
                    format!("spec.podCIDRs[{i}]"),
                    format!("{cidr:?} is not a CIDR (expected e.g. 10.244.1.0/24)"),
                )
            })?;
        }
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut has_ipv4 = false;
    for (i, address) in addresses.iter().enumerate() {
        if address.type_ != INTERNAL_IP && address.type_ != "ExternalIP" {
            continue;
        }
        let ip: IpAddr = address.address.parse().map_err(|_| {
            ClusterError::invalid(
                at,
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", address.address),
            )
        })?;
        has_ipv4 |= address.type_ == INTERNAL_IP && ip.is_ipv4();
    }
    if !has_ipv4 {
        return Err(ClusterError::invalid(
            at,
            "status.addresses",
            "no IPv4 InternalIP; sluice reaches nodes at their IPv4 InternalIP: add \
             {type: InternalIP, address: A.B.C.D}",
        ));
    }
    Ok(())
}

/// Parses a node's `spec.podCIDR`: IPv4, network address (no host bits).
pub(crate) fn pod_cidr(text: &str) -> Result<Ipv4Net, String> {
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR (expected e.g. 10.244.1.0/24)"))?;
    let IpNet::V4(net) = net else {
        return Err(format!(
            "{text} is IPv6; sluice needs an IPv4 pod CIDR in spec.podCIDR"
        ));
    };
    if net.addr() != net.network() {
        return Err(format!(
            "{text} has host bits set; use the network address {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses an address that must be IPv4, with a message that says why IPv6 is refused.
pub(crate) fn ipv4(text: &str) -> Result<Ipv4Addr, String> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(ip),
        Ok(IpAddr::V6(_)) => Err(format!("{text} is IPv6; sluice is IPv4-only")),
        Err(_) => Err(format!("{text:?} is not an IPv4 address")),
    }
}

fn port(at: &Location, field: String, value: i32) -> Result<(), ClusterError> {
    if (1..=65535).contains(&value) {
        Ok(())
    } else {
        Err(ClusterError::invalid(
            at,
            field,
            format!("port {value} is out of range; ports are 1..=65535"),
        ))
    }
}

fn int_or_name(at: &Location, field: String, value: &IntOrString) -> Result<(), ClusterError> {
    match value {
        IntOrString::Int(n) => port(at, field, *n),
        IntOrString::String(name) if name.is_empty() => Err(ClusterError::invalid(
            at,
            field,
            "empty port name; give a number or a container port name",
        )),
        IntOrString::String(_) => Ok(()),
    }
}

pub(crate) fn pod(pod: &Pod, at: &Location) -> Result<(), ClusterError> {
    if let Some(spec) = &pod.spec {
        let lists: [(&str, &[Container]); 2] = [
            ("containers", &spec.containers),
            (
                "initContainers",
                spec.init_containers.as_deref().unwrap_or_default(),
            ),
        ];
        for (list, containers) in lists {
            for (c, container) in containers.iter().enumerate() {
                for (p, cp) in container.ports.iter().flatten().enumerate() {
                    let field = format!("spec.{list}[{c}].ports[{p}]");
                    port(at, format!("{field}.containerPort"), cp.container_port)?;
                    if let Some(host_port) = cp.host_port.filter(|&h| h != 0) {
                        port(at, format!("{field}.hostPort"), host_port)?;
                    }
                }
            }
        }
    }
    if let Some(status) = &pod.status {
        if let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) {
            ipv4(ip).map_err(|reason| ClusterError::invalid(at, "status.podIP", reason))?;
        }
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            ip.ip.parse::<IpAddr>().map_err(|_| {
                ClusterError::invalid(
                    at,
                    format!("status.podIPs[{i}].ip"),
                    format!("{:?} is not an IP address", ip.ip),
                )
            })?;
        }
    }
    Ok(())
}

pub(crate) fn service(service: &Service, at: &Location) -> Result<(), ClusterError> {
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    if let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    {
        ipv4(ip).map_err(|reason| ClusterError::invalid(at, "spec.clusterIP", reason))?;
    }
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        port(at, format!("spec.ports[{i}].port"), sp.port)?;
        if let Some(target) = &sp.target_port {
            int_or_name(at, format!("spec.ports[{i}].targetPort"), target)?;
        }
        if let Some(node_port) = sp.node_port.filter(|&n| n != 0) {
            port(at, format!("spec.ports[{i}].nodePort"), node_port)?;
        }
    }
    Ok(())
}

pub(crate) fn endpoint_slice(slice: &EndpointSlice, at: &Location) -> Result<(), ClusterError> {
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(n) = p.port {
            port(at, format!("ports[{i}].port"), n)?;
        }
    }
    if slice.address_type == "IPv4" {
        for (e, endpoint) in slice.endpoints.iter().enumerate() {
            for (a, address) in endpoint.addresses.iter().enumerate() {
                ipv4(address).map_err(|reason| {
                    ClusterError::invalid(at, format!("endpoints[{e}].addresses[{a}]"), reason)
                })?;
            }
        }
    }
    Ok(())
}

pub(crate) fn network_policy(policy: &NetworkPolicy, at: &Location) -> Result<(), ClusterError> {
    let Some(spec) = &policy.spec else {
        return Ok(());
    };
    for (r, rule) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{r}]");
        policy_ports(at, &field, rule.ports.as_deref())?;
        policy_peers(at, &format!("{field}.from"), rule.from.as_deref())?;
    }
    for (r, rule) in spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{r}]");
        policy_ports(at, &field, rule.ports.as_deref())?;
        policy_peers(at, &format!("{field}.to"), rule.to.as_deref())?;
    }
    Ok(())
}

pub(crate) fn host_policy(
    policy: &crate::policy::HostNetworkPolicy,
    at: &Location,
) -> Result<(), ClusterError> {
    let Some(spec) = &policy.spec else {
        return Ok(());
    };
    for (r, rule) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{r}]");
        policy_ports(at, &field, rule.ports.as_deref())?;
        policy_peers(at, &format!("{field}.from"), rule.from.as_deref())?;
    }
    Ok(())
}

fn policy_ports(
    at: &Location,
    rule: &str,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<(), ClusterError> {
    for (p, np) in ports.unwrap_or_default().iter().enumerate() {
        let field = format!("{rule}.ports[{p}]");
        if let Some(value) = &np.port {
            int_or_name(at, format!("{field}.port"), value)?;
        }
        if let Some(end) = np.end_port {
            port(at, format!("{field}.endPort"), end)?;
            match &np.port {
                Some(IntOrString::Int(start)) if *start <= end => {}
                _ => {
                    return Err(ClusterError::invalid(
                        at,
                        format!("{field}.endPort"),
                        "endPort needs a numeric port that is not above it",
                    ))
                }
            }
        }
    }
    Ok(())
}

fn policy_peers(
    at: &Location,
    field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
) -> Result<(), ClusterError> {
    for (i, peer) in peers.unwrap_or_default().iter().enumerate() {
        let Some(block) = &peer.ip_block else {
            continue;
        };
        let cidr_field = format!("{field}[{i}].ipBlock");
        block.cidr.parse::<IpNet>().map_err(|_| {
            ClusterError::invalid(
                at,
                format!("{cidr_field}.cidr"),
                format!("{:?} is not a CIDR", block.cidr),
            )
        })?;
        for (e, except) in block.except.iter().flatten().enumerate() {
            except.parse::<IpNet>().map_err(|_| {
                ClusterError::invalid(
                    at,
                    format!("{cidr_field}.except[{e}]"),
                    format!("{except:?} is not a CIDR"),
                )
            })?;
        }
    }
    Ok(())
}
