//! Scenarios as data: which pods talk, on which ports. `sluice-perf run NAME` looks a name up
//! here; adding a scenario (cross-node, via a ClusterIP, through WireGuard ...) is adding an
//! entry, as long as it is "a client pod sends to a server address".

use serde::{Deserialize, Serialize};

/// Where a scenario's server is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The server pod's own IP.
    PodIp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    /// `namespace/name` of the pod running the generator and the ping-pong client.
    pub client_pod: &'static str,
    /// `namespace/name` of the pod running the sink and the ping-pong server.
    pub server_pod: &'static str,
    pub target: Target,
    /// UDP port of the sink.
    pub sink_port: u16,
    /// UDP port of the ping-pong server.
    pub pingpong_port: u16,
}

pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "pod-to-pod",
    description: "UDP from pod-a to pod-b's IP, both pods on the same node",
    client_pod: "default/pod-a",
    server_pod: "default/pod-b",
    target: Target::PodIp,
    sink_port: 9000,
    pingpong_port: 9001,
}];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Names for error messages.
pub fn names() -> Vec<&'static str> {
    SCENARIOS.iter().map(|s| s.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_to_pod_exists_and_names_are_unique() {
        let s = find("pod-to-pod").expect("pod-to-pod is defined");
        assert_ne!(s.client_pod, s.server_pod);
        assert_ne!(s.sink_port, s.pingpong_port);
        assert!(find("nope").is_none());
        let mut n = names();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), SCENARIOS.len());
    }
}
