//! Encrypted scenarios ([`perf::scenario::Encryption::Wireguard`]): before the traffic, the
//! tunnels between the nodes must be up, or the first seconds would measure handshakes (the
//! kernel baseline: wireguard-go handshakes on the first packet) or clear text / strict drops
//! (sluice); after it, the tunnels' counters show that the traffic really went through them.
//!
//! - sluice: the agents run with `--wg-strict` ([`SLUICE_AGENT_ARGS`]), so a packet without a
//!   session is dropped and counted, never sent in clear; [`wait_ready`] pings the server pod
//!   from the client pod until it answers, then waits until every agent has a session with every
//!   peer (`sluice status`, the WireGuard section).
//! - kernel: the same pings, then every node's wireguard-go must report a handshake with every
//!   peer (`wg show IFNAME latest-handshakes`).
//!
//! [`Counters`] are read before and after the traffic: the packets (sluice) or bytes
//! (wireguard-go) each node sealed to its peers. The run fails if the client's node sealed
//! nothing during the traffic, since the figures would then not be of an encrypted path. They
//! are written to `encryption.json` in the mode's directory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use testbed::Testbed;

/// Appended to the sluice agents' command line in an encrypted scenario.
pub const SLUICE_AGENT_ARGS: &[&str] = &["--wg-strict"];
/// Pings (one second each at most) before the path counts as dead.
const WARMUP_PINGS: u32 = 15;
/// How long the sessions may take once a ping got through.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// What one node's tunnel has sealed and opened, summed over its peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sealed {
    /// sluice only (wireguard-go's `wg show` counts bytes).
    pub tx_packets: Option<u64>,
    pub tx_bytes: u64,
    pub rx_packets: Option<u64>,
    pub rx_bytes: u64,
}

impl Sealed {
    fn delta(after: Self, before: Self) -> Self {
        let sub = |a: Option<u64>, b: Option<u64>| a.map(|a| a.saturating_sub(b.unwrap_or(0)));
        Self {
            tx_packets: sub(after.tx_packets, before.tx_packets),
            tx_bytes: after.tx_bytes.saturating_sub(before.tx_bytes),
            rx_packets: sub(after.rx_packets, before.rx_packets),
            rx_bytes: after.rx_bytes.saturating_sub(before.rx_bytes),
        }
    }
}

/// Per node name.
pub type Counters = BTreeMap<String, Sealed>;

/// One peer as either tunnel reports it.
struct PeerState {
    has_session: bool,
    sealed: Sealed,
}

/// The WireGuard section of an agent's status.
fn agent_peers(tb: &Testbed, node: &str) -> Result<Vec<PeerState>> {
    let resp = crate::run::agent_call(tb, node, &control::api::Request::Status)?;
    let status = resp
        .status
        .with_context(|| format!("the agent on {node} answered Status without a status"))?;
    let wg: Option<control::status::WgStatus> = serde_json::from_value(status["wireguard"].clone())
        .with_context(|| format!("the WireGuard section of {node}'s status"))?;
    let Some(wg) = wg else {
        bail!("the agent on {node} runs without WireGuard (no `wireguard` in its status)");
    };
    Ok(wg
        .peers
        .iter()
        .map(|p| PeerState {
            has_session: p.has_session,
            sealed: Sealed {
                tx_packets: Some(p.tx_packets),
                tx_bytes: p.tx_bytes,
                rx_packets: Some(p.rx_packets),
                rx_bytes: p.rx_bytes,
            },
        })
        .collect())
}

/// `wg show IFNAME dump` in `node`: one line per peer after the interface's line; fields
/// `public-key preshared-key endpoint allowed-ips latest-handshake rx-bytes tx-bytes keepalive`.
fn tunnel_peers(tb: &Testbed, node: &str, ifname: &str) -> Result<Vec<PeerState>> {
    let out = tb
        .exec_in_node(node, &["wg", "show", ifname, "dump"])
        .with_context(|| format!("`wg show {ifname} dump` in {node}"))?;
    if !out.status.success() {
        bail!(
            "`wg show {ifname} dump` in {node} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_dump(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("`wg show {ifname} dump` in {node}"))
}

fn parse_dump(text: &str) -> Result<Vec<PeerState>> {
    let mut peers = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 8 {
            bail!("peer line {line:?} has {} fields, not 8", f.len());
        }
        let num = |i: usize, what: &str| -> Result<u64> {
            f[i].parse()
                .with_context(|| format!("{what} {:?} in {line:?}", f[i]))
        };
        peers.push(PeerState {
            has_session: num(4, "latest-handshake")? > 0,
            sealed: Sealed {
                tx_packets: None,
                tx_bytes: num(6, "tx-bytes")?,
                rx_packets: None,
                rx_bytes: num(5, "rx-bytes")?,
            },
        });
    }
    Ok(peers)
}

/// Every node's peers: the agent's for a node running one, wireguard-go's for a
/// kernel-wireguard node; nodes with neither are left out.
fn all_peers(tb: &Testbed) -> Result<BTreeMap<String, Vec<PeerState>>> {
    let mut out = BTreeMap::new();
    for n in tb.nodes() {
        let peers = if n.agent_pid.is_some() {
            agent_peers(tb, &n.name)?
        } else if let Some(t) = &n.wireguard {
            tunnel_peers(tb, &n.name, &t.ifname)?
        } else {
            continue;
        };
        out.insert(n.name.clone(), peers);
    }
    if out.is_empty() {
        bail!("no node of this testbed runs WireGuard (no agent, no wireguard-go)");
    }
    Ok(out)
}

/// Sums per node.
pub fn counters(tb: &Testbed) -> Result<Counters> {
    Ok(all_peers(tb)?
        .into_iter()
        .map(|(node, peers)| {
            let mut s = Sealed::default();
            for p in &peers {
                let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
                };
                s.tx_packets = add(s.tx_packets, p.sealed.tx_packets);
                s.rx_packets = add(s.rx_packets, p.sealed.rx_packets);
                s.tx_bytes += p.sealed.tx_bytes;
                s.rx_bytes += p.sealed.rx_bytes;
            }
            (node, s)
        })
        .collect())
}

/// Pings `server_ip` from `client_pod` until it answers, then waits until every node has a
/// session with each of its peers. Bounded: [`WARMUP_PINGS`] one-second pings, then
/// [`SESSION_TIMEOUT`].
pub fn wait_ready(tb: &Testbed, client_pod: &str, server_ip: Ipv4Addr) -> Result<()> {
    let ip = server_ip.to_string();
    let mut answered = false;
    let mut last = String::new();
    for _ in 0..WARMUP_PINGS {
        let out = tb
            .exec_in_pod(client_pod, &["ping", "-n", "-q", "-c", "1", "-W", "1", &ip])
            .with_context(|| format!("pinging {ip} from {client_pod}"))?;
        if out.status.success() {
            answered = true;
            break;
        }
        last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // A ping that failed fast (no route yet) must not spin.
        std::thread::sleep(POLL);
    }
    if !answered {
        bail!(
            "{client_pod} got no answer from {ip} in {WARMUP_PINGS} pings, so the tunnels are \
             not up (last ping: {last}); see the agents' or wireguard-go's logs in the testbed's \
             state directory"
        );
    }
    let start = Instant::now();
    loop {
        let peers = all_peers(tb)?;
        let missing: Vec<&str> = peers
            .iter()
            .filter(|(_, p)| p.is_empty() || p.iter().any(|p| !p.has_session))
            .map(|(n, _)| n.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= SESSION_TIMEOUT {
            bail!(
                "nodes {} still lack a WireGuard session with a peer {SESSION_TIMEOUT:?} after \
                 the first ping got through",
                missing.join(", ")
            );
        }
        std::thread::sleep(POLL);
    }
}

#[derive(Serialize)]
struct Record<'a> {
    before: &'a Counters,
    after: &'a Counters,
    during: &'a Counters,
}

/// Writes `encryption.json` (before, after, during) into `dir` and fails when `client_node`
/// sealed nothing during the traffic. Returns the counts during the traffic.
pub fn check_and_record(
    dir: &Path,
    client_node: &str,
    before: &Counters,
    after: &Counters,
) -> Result<Counters> {
    let during: Counters = after
        .iter()
        .map(|(n, a)| {
            (
                n.clone(),
                Sealed::delta(*a, before.get(n).copied().unwrap_or_default()),
            )
        })
        .collect();
    let path = dir.join("encryption.json");
    let text = serde_json::to_string_pretty(&Record {
        before,
        after,
        during: &during,
    })
    .context("serialising the WireGuard counters")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    match during.get(client_node) {
        Some(s) if s.tx_bytes > 0 => Ok(during),
        Some(_) => bail!(
            "{client_node}'s WireGuard sealed nothing during the traffic, so these figures are \
             not of an encrypted path (counters in {})",
            path.display()
        ),
        None => bail!("{client_node} runs no WireGuard, so this run is not encrypted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines_give_sessions_and_bytes() {
        let text = "PRIV\tPUB\t51871\t0xca6c\n\
                    peerA=\t(none)\t172.18.0.12:51871\t172.18.0.12/32\t1767225600\t1000\t2000\toff\n\
                    peerB=\t(none)\t(none)\t172.18.0.13/32\t0\t0\t0\toff\n";
        let peers = parse_dump(text).expect("parses");
        assert_eq!(peers.len(), 2);
        assert!(peers[0].has_session);
        assert_eq!(peers[0].sealed.tx_bytes, 2000);
        assert_eq!(peers[0].sealed.rx_bytes, 1000);
        assert_eq!(peers[0].sealed.tx_packets, None);
        assert!(!peers[1].has_session);
        assert!(parse_dump("iface\npeer\tonly\n").is_err());
        assert!(parse_dump("iface\np\t-\te\ta\tnot-a-number\t0\t0\toff\n").is_err());
        assert_eq!(parse_dump("iface only\n").expect("no peers").len(), 0);
    }

    #[test]
    fn no_sealed_bytes_on_the_client_node_fails_the_run() {
        let dir = std::env::temp_dir().join(format!("sluice-perf-wg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let s = |tx_bytes, tx_packets| Sealed {
            tx_packets,
            tx_bytes,
            rx_packets: None,
            rx_bytes: 0,
        };
        let before: Counters = [("node1".to_string(), s(100, Some(2)))].into();
        let moved: Counters = [("node1".to_string(), s(1100, Some(12)))].into();
        let during = check_and_record(&dir, "node1", &before, &moved).expect("sealed 1000 bytes");
        assert_eq!(during["node1"].tx_bytes, 1000);
        assert_eq!(during["node1"].tx_packets, Some(10));
        assert!(dir.join("encryption.json").is_file());
        let err = check_and_record(&dir, "node1", &before, &before).expect_err("nothing sealed");
        assert!(err.to_string().contains("sealed nothing"), "{err}");
        assert!(check_and_record(&dir, "node2", &before, &moved).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
