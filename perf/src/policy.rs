//! Policy scenarios ([`crate::scenario::Scenario::policies`]): the same traffic run by sluice
//! without NetworkPolicies and with them, and the evidence that the "with" run really enforced
//! them.
//!
//! A run with policies that the agent silently ignored would report a ratio of about 1 and look
//! like a triumph, so each sluice mode of a policy scenario is checked from the agents' own
//! counters (`Status`, before and after the mode's traffic, summed over the nodes):
//! - `policy_flows`: flows tracked because a policy isolates one of their ends. The measured
//!   traffic's flow must be one of them with policies on, and nothing may be tracked for policy
//!   with policies off;
//! - a **denied probe**: before the traffic, the client sends [`PROBE_PACKETS`] datagrams to the
//!   server on [`PROBE_PORT`], which the scenario's policies must not allow (a test checks the
//!   cluster files). With policies on, the drop counters `policy_denied_ingress` +
//!   `policy_denied_egress` must grow by at least that many; with policies off, by none.
//!
//! A mode that fails its check gets an error in the report (and `sluice-perf run` exits
//! non-zero): its figures are not those of the configuration they claim.

use serde::{Deserialize, Serialize};

/// The port of the denied probe; a policy scenario's policies must not allow it.
pub const PROBE_PORT: u16 = 9999;
/// Datagrams of the denied probe.
pub const PROBE_PACKETS: u64 = 20;
/// The counter of flows tracked for policy (`dataplane::stats`).
pub const POLICY_FLOWS: &str = "policy_flows";
/// Drop reasons that count a packet a NetworkPolicy denied (`dataplane::drop_reason`).
pub const POLICY_DENIED: [&str; 2] = ["policy_denied_ingress", "policy_denied_egress"];

/// What the agents' counters say about one sluice mode of a policy scenario (deltas over the
/// mode, summed over nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEvidence {
    /// Whether this mode ran with the scenario's policies.
    pub policies_on: bool,
    /// Flows tracked because a policy isolates one of their ends.
    pub policy_flows: u64,
    /// Packets dropped as `policy_denied_ingress` or `policy_denied_egress`.
    pub policy_denied: u64,
    /// Probe datagrams the client sent to [`PROBE_PORT`].
    pub probe_sent: u64,
}

/// Why a mode's figures are not those of the configuration it claims.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyCheckError {
    #[error(
        "policies had no effect: the agents tracked no flow for policy (policy_flows did not \
         grow) during the run with NetworkPolicies; does this agent compile NetworkPolicies from \
         its cluster file (control::policy)? The figures of this mode are those of an open path"
    )]
    NotTracked,
    #[error(
        "policies were not enforced: the client's {sent} probe datagrams to port {PROBE_PORT}, \
         which no policy allows, caused {denied} policy drops (expected at least {sent}); \
         check that the agent read the policies file and that the probe left the client"
    )]
    ProbeNotDenied { sent: u64, denied: u64 },
    #[error(
        "the run without policies saw policy at work ({policy_flows} flows tracked for policy, \
         {denied} policy drops): the cluster file of the policies-off run must have no \
         NetworkPolicy"
    )]
    PolicyWhenOff { policy_flows: u64, denied: u64 },
}

/// A counter of an agent's `Status` JSON (`totals`: `[[name, value], ...]`).
pub fn total(status: &serde_json::Value, name: &str) -> Option<u64> {
    status.get("totals")?.as_array()?.iter().find_map(|pair| {
        let p = pair.as_array()?;
        if p.first()?.as_str()? != name {
            return None;
        }
        p.get(1)?.as_u64()
    })
}

/// A drop reason's count in an agent's `Status` JSON (`drops`: `[{reason, number, count}]`).
pub fn drops(status: &serde_json::Value, reason: &str) -> Option<u64> {
    status
        .get("drops")?
        .as_array()?
        .iter()
        .find(|d| d.get("reason").and_then(|r| r.as_str()) == Some(reason))?
        .get("count")?
        .as_u64()
}

/// The evidence of one mode from each node's `(status before, status after)`. A counter missing
/// from a status counts as 0 (an agent without policy support reports no `policy_flows`).
pub fn evidence<'a>(
    policies_on: bool,
    probe_sent: u64,
    nodes: impl IntoIterator<Item = (&'a serde_json::Value, &'a serde_json::Value)>,
) -> PolicyEvidence {
    let mut e = PolicyEvidence {
        policies_on,
        probe_sent,
        ..Default::default()
    };
    for (before, after) in nodes {
        let delta = |f: &dyn Fn(&serde_json::Value) -> Option<u64>| {
            f(after).unwrap_or(0).saturating_sub(f(before).unwrap_or(0))
        };
        e.policy_flows += delta(&|s| total(s, POLICY_FLOWS));
        for reason in POLICY_DENIED {
            e.policy_denied += delta(&|s| drops(s, reason));
        }
    }
    e
}

/// Whether the evidence fits the mode (see the module doc).
pub fn check(e: &PolicyEvidence) -> Result<(), PolicyCheckError> {
    if !e.policies_on {
        if e.policy_flows > 0 || e.policy_denied > 0 {
            return Err(PolicyCheckError::PolicyWhenOff {
                policy_flows: e.policy_flows,
                denied: e.policy_denied,
            });
        }
        return Ok(());
    }
    if e.policy_flows == 0 {
        return Err(PolicyCheckError::NotTracked);
    }
    if e.policy_denied < e.probe_sent || e.probe_sent == 0 {
        return Err(PolicyCheckError::ProbeNotDenied {
            sent: e.probe_sent,
            denied: e.policy_denied,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(flows: u64, ingress: u64, egress: u64) -> serde_json::Value {
        json!({
            "totals": [["rx_packets", 1000], [POLICY_FLOWS, flows], ["ct_hits", 5]],
            "drops": [
                {"reason": "no_route", "number": 3, "count": 7},
                {"reason": "policy_denied_ingress", "number": 44, "count": ingress},
                {"reason": "policy_denied_egress", "number": 45, "count": egress}
            ]
        })
    }

    #[test]
    fn counters_are_read_by_name_and_missing_ones_are_none() {
        let s = status(3, 4, 5);
        assert_eq!(total(&s, POLICY_FLOWS), Some(3));
        assert_eq!(total(&s, "rx_packets"), Some(1000));
        assert_eq!(total(&s, "nope"), None);
        assert_eq!(drops(&s, "policy_denied_egress"), Some(5));
        assert_eq!(drops(&s, "no_route"), Some(7));
        assert_eq!(drops(&s, "nope"), None);
        assert_eq!(total(&json!({}), POLICY_FLOWS), None);
        assert_eq!(total(&json!({"totals": [[1, 2], ["x"]]}), "x"), None);
        assert_eq!(drops(&json!({"drops": 3}), "x"), None);
    }

    #[test]
    fn evidence_sums_deltas_over_nodes() {
        let (b1, a1) = (status(10, 1, 0), status(11, 1, 20));
        let (b2, a2) = (status(0, 0, 0), status(2, 3, 0));
        let e = evidence(true, 20, [(&b1, &a1), (&b2, &a2)]);
        assert_eq!(
            e,
            PolicyEvidence {
                policies_on: true,
                policy_flows: 3,
                policy_denied: 23,
                probe_sent: 20
            }
        );
        assert_eq!(check(&e), Ok(()));
        // An agent that knows nothing of policy: no counters at all, no evidence.
        let bare = json!({"totals": [["rx_packets", 9]], "drops": []});
        let e = evidence(true, 20, [(&bare, &bare)]);
        assert_eq!((e.policy_flows, e.policy_denied), (0, 0));
        assert_eq!(check(&e), Err(PolicyCheckError::NotTracked));
    }

    #[test]
    fn ignored_or_unenforced_policies_fail_the_check() {
        let on = |flows, denied, sent| PolicyEvidence {
            policies_on: true,
            policy_flows: flows,
            policy_denied: denied,
            probe_sent: sent,
        };
        assert_eq!(check(&on(0, 20, 20)), Err(PolicyCheckError::NotTracked));
        assert_eq!(
            check(&on(1, 19, 20)),
            Err(PolicyCheckError::ProbeNotDenied {
                sent: 20,
                denied: 19
            })
        );
        // No probe sent proves nothing about enforcement.
        assert!(check(&on(1, 0, 0)).is_err());
        assert_eq!(check(&on(1, 25, 20)), Ok(()));
        let msg = PolicyCheckError::NotTracked.to_string();
        assert!(msg.contains("policy_flows"), "{msg}");
    }

    #[test]
    fn policy_at_work_without_policies_fails_the_check() {
        let off = |flows, denied| PolicyEvidence {
            policies_on: false,
            policy_flows: flows,
            policy_denied: denied,
            probe_sent: PROBE_PACKETS,
        };
        assert_eq!(check(&off(0, 0)), Ok(()));
        assert!(matches!(
            check(&off(1, 0)),
            Err(PolicyCheckError::PolicyWhenOff {
                policy_flows: 1,
                ..
            })
        ));
        assert!(check(&off(0, 3)).is_err());
    }
}
