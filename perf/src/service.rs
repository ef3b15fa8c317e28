//! Service targets: where a [`Target::ClusterIp`](crate::scenario::Target::ClusterIp) scenario
//! sends its traffic, and the kernel baseline for it.
//!
//! [`resolve`] is pure: it reads the same [`control::services::translate`] output the agents
//! (and the kube-proxy-shaped nftables rules of `testbed::nft`) use, and checks that the
//! scenario's server pod is the Service's backend on the scenario's port, so a scenario can never
//! measure a path it did not mean (a ClusterIP that DNATs somewhere else, or a server listening on
//! the wrong port). [`prepare`] does it for a running testbed: it loads the nftables rules into
//! the kernel nodes (none in sluice mode: the agents serve Services) and resolves against the
//! cluster as built (pod addresses from the CNI, not the file).

use std::net::{Ipv4Addr, SocketAddrV4};

use control::cluster::ClusterState;
use control::services::{translate, Protocol, ServiceOptions};
use testbed::Testbed;

use crate::scenario::Traffic;

#[derive(Debug, thiserror::Error)]
pub enum ServiceTargetError {
    #[error(
        "the cluster has no Service {service} with port {port}/{protocol} for node {node} \
         (service ports: {known}); fix the scenario's target or the cluster file"
    )]
    NoSuchPort {
        service: String,
        port: u16,
        protocol: Protocol,
        node: String,
        known: String,
    },
    #[error(
        "Service {service} port {port}/{protocol} does not send new flows to the server pod \
         {server} ({server_ip}:{port}); its rotation is [{rotation}]: make the server pod the \
         Service's only ready backend, with targetPort {port}"
    )]
    NotTheServer {
        service: String,
        port: u16,
        protocol: Protocol,
        server: String,
        server_ip: Ipv4Addr,
        rotation: String,
    },
    #[error("testbed: {0}")]
    Testbed(#[from] testbed::TestbedError),
    #[error("kernel baseline: {0}")]
    Kernel(#[from] testbed::KernelError),
}

/// The protocol a kind of traffic uses.
pub fn protocol(traffic: Traffic) -> Protocol {
    match traffic {
        Traffic::UdpStream | Traffic::UdpRequestResponse => Protocol::Udp,
        Traffic::TcpStream => Protocol::Tcp,
    }
}

/// The ClusterIP address of `service` (`namespace/name`) port `port`/`protocol`, as node
/// `client_node` translates it, after checking that every backend new flows may use is
/// `server_ip:port`.
pub fn resolve(
    cluster: &ClusterState,
    client_node: &str,
    service: &str,
    port: u16,
    protocol: Protocol,
    server: &str,
    server_ip: Ipv4Addr,
) -> Result<SocketAddrV4, ServiceTargetError> {
    let plan = translate(cluster, client_node, &ServiceOptions::default());
    let entry = plan
        .services
        .iter()
        .find(|e| e.service_key() == service && e.port == port && e.protocol == protocol)
        .ok_or_else(|| ServiceTargetError::NoSuchPort {
            service: service.to_string(),
            port,
            protocol,
            node: client_node.to_string(),
            known: plan
                .services
                .iter()
                .filter(|e| e.service_key() == service)
                .map(|e| format!("{}/{}", e.port, e.protocol))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let rotation: Vec<_> = entry
        .cluster
        .backends
        .iter()
        .filter_map(|&i| entry.backends.get(i as usize))
        .collect();
    let only_server = !rotation.is_empty()
        && rotation
            .iter()
            .all(|b| b.address == server_ip && b.port == port);
    if !only_server {
        return Err(ServiceTargetError::NotTheServer {
            service: service.to_string(),
            port,
            protocol,
            server: server.to_string(),
            server_ip,
            rotation: rotation
                .iter()
                .map(|b| b.key())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(SocketAddrV4::new(entry.cluster_ip, port))
}

/// For a running testbed: loads the kube-proxy-shaped nftables rules into its kernel nodes
/// (`testbed::kernel::install_services`; nothing on sluice nodes) and [`resolve`]s the target
/// against the cluster as built. Returns the address to send to and the kernel nodes that got
/// rules.
pub fn prepare(
    tb: &Testbed,
    service: &str,
    port: u16,
    traffic: Traffic,
    client_pod: &str,
    server_pod: &str,
) -> Result<(SocketAddrV4, Vec<String>), ServiceTargetError> {
    let loaded = testbed::kernel::install_services(tb)?;
    let cluster = testbed::kernel::cluster_as_built(tb)?;
    let client_node = tb.pod(client_pod)?.node.clone();
    let server_ip = tb.pod(server_pod)?.ip;
    let dst = resolve(
        &cluster,
        &client_node,
        service,
        port,
        protocol(traffic),
        server_pod,
        server_ip,
    )?;
    Ok((dst, loaded.into_iter().map(|n| n.node).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn services_yaml() -> ClusterState {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/clusters/services.yaml");
        control::cluster::load_file(&path).expect("services.yaml parses")
    }

    const ECHO_1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

    #[test]
    fn clusterip_scenarios_resolve_to_the_echo_service() {
        let cluster = services_yaml();
        for s in crate::scenario::SCENARIOS {
            let crate::scenario::Target::ClusterIp { service } = s.target else {
                continue;
            };
            let dst = resolve(
                &cluster,
                "node1",
                service,
                s.port,
                protocol(s.traffic),
                s.server_pod,
                ECHO_1,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(dst, SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 15), s.port));
        }
    }

    #[test]
    fn wrong_port_protocol_or_server_is_refused() {
        let cluster = services_yaml();
        let err = resolve(
            &cluster,
            "node1",
            "default/echo",
            9000,
            Protocol::Tcp,
            "default/echo-1",
            ECHO_1,
        )
        .expect_err("9000 is UDP only");
        assert!(
            matches!(err, ServiceTargetError::NoSuchPort { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("9000/UDP"), "{err}");
        // Two backends: the server is not the only one.
        let err = resolve(
            &cluster,
            "node1",
            "default/web",
            80,
            Protocol::Tcp,
            "default/web-1",
            Ipv4Addr::new(10, 244, 1, 4),
        )
        .expect_err("web has two backends on another port");
        assert!(
            matches!(err, ServiceTargetError::NotTheServer { .. }),
            "{err}"
        );
        // A server pod that is not the backend.
        let err = resolve(
            &cluster,
            "node1",
            "default/echo",
            9000,
            Protocol::Udp,
            "default/client",
            Ipv4Addr::new(10, 244, 1, 2),
        )
        .expect_err("client is not echo's backend");
        assert!(err.to_string().contains("10.244.1.3:9000"), "{err}");
        // No endpoints at all.
        let err = resolve(
            &cluster,
            "node1",
            "default/nothing",
            80,
            Protocol::Tcp,
            "default/web-1",
            Ipv4Addr::new(10, 244, 1, 4),
        )
        .expect_err("no endpoints");
        assert!(err.to_string().contains("rotation is []"), "{err}");
    }
}
