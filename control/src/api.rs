//! The agent's local API: a Unix stream socket at `<state-dir>/sluice.sock`, one JSON request
//! line in, one JSON response line out, then the connection closes. Used by the CNI plugin
//! (endpoint add/del), by `sluice status`, `sluice service list` and `sluice policy trace`.
//!
//! Also the CNI network configuration that the agent writes for the plugin (as Cilium's agent
//! writes `05-cilium.conflist`): the plugin never guesses the node's pod CIDR.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::policy::reference::TraceReport;
use crate::services::listing::ServiceListing;

/// File name of the agent's socket inside its state directory.
pub const SOCKET_NAME: &str = "sluice.sock";
/// File name of the CNI config the agent writes into the CNI config directory.
pub const CNI_CONF_NAME: &str = "05-sluice.conf";

/// A pod endpoint as the CNI plugin created it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME inside the pod (usually `eth0`).
    pub pod_ifname: String,
    /// `K8S_POD_NAMESPACE` from CNI_ARGS (empty when not given).
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from CNI_ARGS (empty when not given).
    pub pod_name: String,
    /// Host side of the pod's veth pair (in the node's namespace), e.g. `lxc1a2b3c4d5e6f`.
    pub host_ifname: String,
    /// The pod's IPv4 address (/32).
    pub ip: Ipv4Addr,
    /// MAC address of the pod's interface (destination MAC for frames sent to the pod).
    pub mac: String,
    /// CNI_NETNS: path of the pod's network namespace.
    pub netns: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Counters, workers, interfaces, drop reasons.
    Status,
    /// The workers' latency histograms (time per batch and per packet in the pipeline), merged
    /// on demand without stopping the workers. See [`Histograms`].
    Histograms,
    /// A pod interface exists: attach it and start forwarding to it. The answer comes once the
    /// interface is attached (or attaching failed).
    EndpointAdd { endpoint: Endpoint },
    /// The pod is gone: detach. Unknown container ids are not an error (DEL is idempotent).
    EndpointDel { container_id: String },
    /// The Services as translated for this node: frontends, backends with their state and
    /// Maglev shares, skipped Services. See [`ServiceListing`].
    Services,
    /// `sluice policy trace`: judge one connection with the reference evaluator on the agent's
    /// cluster state and with this node's compiled policy table. `from` / `to`: `NS/POD` or an
    /// IPv4 address; `protocol`: IP protocol number. See [`TraceReport`].
    PolicyTrace {
        from: String,
        to: String,
        protocol: u8,
        port: u16,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `Status` answers carry [`crate::status::Status`] as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// `Histograms` answers carry [`Histograms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histograms: Option<Histograms>,
    /// `Services` answers carry [`ServiceListing`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServiceListing>,
    /// `PolicyTrace` answers carry [`TraceReport`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_trace: Option<TraceReport>,
}

/// HDR histograms of the workers, each serialised as HdrHistogram V2 + deflate, then base64
/// (standard alphabet, padded): what `hdrhistogram::serialization::V2DeflateSerializer` writes
/// and every HdrHistogram implementation reads. Values are nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histograms {
    /// Time-stamp counter frequency used to turn cycles into nanoseconds.
    pub tsc_hz: u64,
    pub workers: Vec<WorkerHistograms>,
    /// All workers merged.
    pub merged: WorkerHistograms,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerHistograms {
    /// Worker id (0 for `merged`).
    pub id: usize,
    /// Nanoseconds per batch: rx ring to tx rings published, one value per batch that had work.
    pub batch_ns: String,
    /// Nanoseconds per packet in the pipeline: batch time / packets in the batch, recorded with
    /// the batch's packet count (so the histogram weighs packets, not batches).
    pub packet_ns: String,
    /// Packets per batch.
    pub batch_packets: String,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            histograms: None,
            services: None,
            policy_trace: None,
        }
    }
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            status: None,
            histograms: None,
            services: None,
            policy_trace: None,
        }
    }
}

/// The cause is part of each message, not a `source()` as well: `{:#}` printed it twice.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the sluice agent at {path}: {error} (is `sluice run` running on this node?)"
    )]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to the sluice agent at {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the sluice agent at {path} answered something that is not a response: {error}")]
    Decode {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("the sluice agent refused: {0}")]
    Refused(String),
}

/// Sends one request to the agent at `socket` and waits at most `timeout` for the answer.
/// A response with `ok: false` becomes [`ApiError::Refused`].
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let io = |error| ApiError::Io {
        path: socket.to_path_buf(),
        error,
    };
    let mut stream = UnixStream::connect(socket).map_err(|error| ApiError::Connect {
        path: socket.to_path_buf(),
        error,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    let response: Response =
        serde_json::from_str(answer.trim_end()).map_err(|error| ApiError::Decode {
            path: socket.to_path_buf(),
            error,
        })?;
    if !response.ok {
        return Err(ApiError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok(response)
}

/// The CNI network configuration for `sluice-cni`, written by the agent as
/// `<cni-conf-dir>/05-sluice.conf` and passed by the runtime on the plugin's stdin.
/// Field names follow the CNI spec's camelCase convention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// MTU of the pod interface (and of the host side of the veth pair).
    pub mtu: u32,
    /// The node's pod CIDR (Node `spec.podCIDR`), e.g. `10.244.1.0/24`.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    /// The pods' gateway address: the first address of the pod CIDR; the dataplane answers ARP
    /// for it on every pod interface.
    pub gateway: Ipv4Addr,
    /// The agent's local API socket.
    pub agent_socket: PathBuf,
    /// Where the plugin keeps its IP allocations (host-local style, one file per address).
    pub data_dir: PathBuf,
    /// rx/tx queues on each pod veth: one per dataplane worker, so every worker has its own
    /// AF_XDP socket on every interface.
    pub queues: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{listing::listing, SelectionMode, ServicePlan};

    #[test]
    fn services_request_and_response_wire_format() {
        let line = serde_json::to_string(&Request::Services).ok();
        assert_eq!(line.as_deref(), Some(r#"{"op":"services"}"#));
        let back: Result<Request, _> = serde_json::from_str(r#"{"op":"services"}"#);
        assert_eq!(back.ok(), Some(Request::Services));

        let resp = Response {
            services: Some(listing(
                &ServicePlan::default(),
                4,
                16381,
                SelectionMode::Maglev,
            )),
            ..Response::ok()
        };
        let text = serde_json::to_string(&resp).unwrap_or_default();
        assert!(text.contains(r#""services":{"generation":4,"#), "{text}");
        let back: Result<Response, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(resp));
        // Other answers carry no services field at all.
        let ok = serde_json::to_string(&Response::ok()).unwrap_or_default();
        assert_eq!(ok, r#"{"ok":true}"#);
    }

    #[test]
    fn calling_an_agent_that_is_not_running_names_the_socket() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let socket = dir.path().join(SOCKET_NAME);
        let err = call(&socket, &Request::Services, Duration::from_secs(1)).err();
        assert!(matches!(err, Some(ApiError::Connect { .. })), "{err:?}");
        // As the CLI prints it: the cause once, not again as the error's source.
        let message = err
            .map(|e| format!("{:#}", anyhow::Error::from(e)))
            .unwrap_or_default();
        assert!(
            message.contains(&socket.display().to_string()) && message.contains("sluice run"),
            "{message}"
        );
        assert_eq!(message.matches("os error").count(), 1, "{message}");
    }
}
