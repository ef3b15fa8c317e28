//! The kernel kube-proxy baseline: nftables rules shaped like kube-proxy's nftables mode
//! (`pkg/proxy/nftables/proxier.go`, v1.31+), generated from the same
//! [`control::services::ServicePlan`] sluice's workers use, so Terminating/NotServing backends,
//! traffic policies and affinity mean the same thing on both sides of a comparison.
//!
//! ```text
//!  nat-prerouting (dstnat) ─┐
//!  nat-output     (dstnat) ─┴─> services: ip daddr . meta l4proto . th dport vmap @service-ips
//!                                         ip daddr @nodeport-ips meta l4proto . th dport
//!                                            vmap @service-nodeports
//!   @service-ips:  ClusterIP . tcp . 80 : goto service-HASH-ns/svc/tcp/http
//!                  LB/externalIP . tcp . 80 : goto external-HASH-ns/svc/tcp/http
//!   service-… / local-…: [masquerade non-pod sources] [affinity hits]
//!                        numgen random mod N vmap { 0 : goto endpoint-…, … }
//!   endpoint-…: ip saddr EP jump mark-for-masquerade (hairpin); [update @affinity-…];
//!               meta l4proto tcp dnat to EP:PORT
//!  nat-postrouting (srcnat) -> masquerading: marked packets are masqueraded (fully-random)
//!  filter-forward/input/output (-110): new flows to @no-endpoint-services /
//!    @no-endpoint-nodeports: goto reject-chain (reject) or drop
//! ```
//!
//! What follows kube-proxy: the table, chain, map and set names and types; the rule shapes above
//! (`ruleset` writes kube-proxy's `add …` transaction syntax, so its output reads like
//! kube-proxy's own test dumps); NodePorts on the node's addresses through the `nodeport-ips` set
//! (kube-proxy's default `--nodeport-addresses primary`); `externalTrafficPolicy: Local` through
//! an `external-` chain that short-circuits pod and node-local sources to the cluster rotation,
//! as kube-proxy does; an empty rotation rejects (no endpoints at all) or drops (endpoints exist
//! but none is local), as kube-proxy's no-endpoint maps do.
//!
//! What differs, and why:
//! - Which backends are in a rotation comes from the plan ([`control::services::Rotation`]),
//!   not from kube-proxy's own categorisation; they agree by construction (the translation
//!   follows `topology.go`).
//! - Chain names carry an 8-character base32 hash of the name like kube-proxy's, but of FNV-1a
//!   (64-bit) instead of SHA-256: the hash only keeps names distinct and readable, nothing
//!   compares it with a real kube-proxy.
//! - The "drop traffic to unallocated ClusterIPs" rule needs the service CIDR, which a cluster
//!   file does not carry: left out. `loadBalancerSourceRanges` is not in the plan: the
//!   `firewall-ips` map exists but stays empty.
//! - The whole table is replaced atomically on every load (`add table; delete table; add …` in
//!   one `nft -f` transaction) instead of kube-proxy's incremental syncs.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
    time::Duration,
};

use control::services::{FrontendKind, Protocol, Rotation, Scope, ServiceEntry, ServicePlan};
use ipnet::Ipv4Net;

use crate::cmd::{self, CmdError};

/// kube-proxy's table (family `ip`).
pub const TABLE: &str = "kube-proxy";
/// kube-proxy's masquerade mark bit (`--masquerade-bit` 14).
pub const MASQUERADE_MARK: &str = "0x4000";
/// How long one `nft` invocation may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "loading the kube-proxy nftables rules into namespace {netns}: {source} (is the \
         `nftables` package installed? scripts/install-deps.sh installs it)"
    )]
    Load {
        netns: String,
        #[source]
        source: CmdError,
    },
    #[error("listing the nftables ruleset of namespace {netns}: {source}")]
    List {
        netns: String,
        #[source]
        source: CmdError,
    },
}

/// What the rules need beyond the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesetOptions {
    /// The cluster's pod CIDRs (kube-proxy's `--cluster-cidr`): traffic to a ClusterIP from any
    /// other source is masqueraded, and pod sources short-circuit `externalTrafficPolicy:
    /// Local`. Empty: no such rules (kube-proxy without `--cluster-cidr`).
    pub pod_cidrs: Vec<Ipv4Net>,
}

/// One service port's chain names (kube-proxy's `servicePortChainNameBase` shape:
/// `HASH-namespace/name/protocol/portname`).
struct Names {
    base: String,
}

impl Names {
    fn new(entry: &ServiceEntry) -> Self {
        let name = format!(
            "{}/{}/{}/{}",
            entry.namespace,
            entry.name,
            proto(entry.protocol),
            entry.port_name
        );
        Self {
            base: hash_and_truncate(&name),
        }
    }
    fn service(&self) -> String {
        format!("service-{}", self.base)
    }
    fn local(&self) -> String {
        format!("local-{}", self.base)
    }
    fn external(&self) -> String {
        format!("external-{}", self.base)
    }
    fn rotation(&self, scope: Scope) -> String {
        match scope {
            Scope::Cluster => self.service(),
            Scope::Local => self.local(),
        }
    }
}

/// `HASH-namespace/name/protocol/portname__ip/port`.
fn endpoint_base(entry: &ServiceEntry, address: Ipv4Addr, port: u16) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        entry.namespace,
        entry.name,
        proto(entry.protocol),
        entry.port_name,
        address,
        port
    ))
}

/// nftables names are at most 256 bytes; kube-proxy keeps 16 for prefixes.
const NAME_BASE_MAX: usize = 256 - 16;

/// kube-proxy's `hashAndTruncate`, with FNV-1a instead of SHA-256 (module doc).
fn hash_and_truncate(name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = String::with_capacity(name.len() + 9);
    for i in 0..8 {
        let index = ((hash >> (59 - 5 * i)) & 31) as usize;
        out.push(char::from(ALPHABET[index]));
    }
    out.push('-');
    out.push_str(name);
    if out.len() > NAME_BASE_MAX {
        let mut cut = NAME_BASE_MAX - 3;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `{ a, b }` of the pod CIDRs.
fn cidr_set(cidrs: &[Ipv4Net]) -> String {
    let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

/// The whole `ip kube-proxy` table for one node's plan, as one `nft -f` transaction that
/// replaces any previous version of the table. Pure: no I/O.
pub fn ruleset(plan: &ServicePlan, opts: &RulesetOptions) -> String {
    let mut out = String::new();
    let t = format!("ip {TABLE}");
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    let _ = writeln!(out, "add table {t}");
    let _ = writeln!(out, "delete table {t}");
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    base_chains(&mut out, &t);

    let mut nodeport_ips = BTreeSet::new();
    let mut cluster_ips = BTreeSet::new();
    // Every element is collected first so each map is written sorted.
    let mut service_ips = Vec::new();
    let mut service_nodeports = BTreeMap::new();
    let mut no_endpoint_services = Vec::new();
    let mut no_endpoint_nodeports = BTreeMap::new();

    // Service chains and sets are written to `services`, then every `add chain`/`add set` is
    // moved before the first rule, since a rule may only name chains and sets that exist.
    let mut services = String::new();
    for (index, entry) in plan.services.iter().enumerate() {
        let out = &mut services;
        let names = Names::new(entry);
        cluster_ips.insert(entry.cluster_ip);
        let frontends: Vec<_> = plan
            .frontends
            .iter()
            .filter(|f| f.service == index)
            .collect();
        let _ = writeln!(
            out,
            "\n# {}/{} port {} ({}/{})",
            entry.namespace,
            entry.name,
            if entry.port_name.is_empty() {
                "-"
            } else {
                &entry.port_name
            },
            entry.port,
            entry.protocol
        );
        // Rotation chains: the cluster one always (kube-proxy has it whenever endpoints exist),
        // the local one when a policy is Local.
        let mut endpoints = BTreeSet::new();
        let mut scopes = vec![Scope::Cluster];
        if entry.local.is_some() {
            scopes.push(Scope::Local);
        }
        for &scope in &scopes {
            endpoints.extend(entry.rotation(scope).backends.iter().copied());
        }
        // Affinity sets first: the rotation chains refer to them.
        if let Some(affinity) = entry.affinity {
            for b in endpoints
                .iter()
                .filter_map(|&i| entry.backends.get(i as usize))
            {
                let _ = writeln!(
                    out,
                    "add set {t} affinity-{} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {}s ; }}",
                    endpoint_base(entry, b.address, b.port),
                    affinity.timeout_seconds
                );
            }
        }
        for &scope in &scopes {
            let rotation = entry.rotation(scope);
            if !rotation.backends.is_empty() {
                rotation_chain(out, &t, entry, &names, scope, rotation, opts);
            }
        }
        for &backend in &endpoints {
            endpoint_chain(out, &t, entry, backend);
        }
        let has_external = frontends.iter().any(|f| f.kind.is_external());
        if has_external && !entry.cluster.backends.is_empty() {
            external_chain(out, &t, entry, &names, opts);
        }
        let comment = format!(
            "{}/{}:{}",
            entry.namespace,
            entry.name,
            if entry.port_name.is_empty() {
                entry.port.to_string()
            } else {
                entry.port_name.clone()
            }
        );
        for f in frontends {
            let p = proto(f.protocol);
            // Where a new flow goes; `None`: the scope's rotation is empty.
            let target = if f.kind.is_external() {
                if entry.rotation(f.scope).backends.is_empty() {
                    None
                } else {
                    Some(names.external())
                }
            } else if entry.rotation(f.scope).backends.is_empty() {
                None
            } else {
                Some(names.rotation(f.scope))
            };
            // No endpoint anywhere: reject; endpoints elsewhere but none local: drop.
            let empty_verdict = if entry.cluster.backends.is_empty() {
                "goto reject-chain"
            } else {
                "drop"
            };
            match (f.kind, target) {
                (FrontendKind::NodePort, target) => {
                    nodeport_ips.insert(f.address);
                    let key = format!("{p} . {}", f.port);
                    match target {
                        Some(chain) => {
                            service_nodeports
                                .insert(key, format!("comment \"{comment}\" : goto {chain}"));
                        }
                        None => {
                            no_endpoint_nodeports
                                .insert(key, format!("comment \"{comment}\" : {empty_verdict}"));
                        }
                    }
                }
                (_, Some(chain)) => service_ips.push(format!(
                    "{} . {p} . {} comment \"{comment}\" : goto {chain}",
                    f.address, f.port
                )),
                (_, None) => no_endpoint_services.push(format!(
                    "{} . {p} . {} comment \"{comment}\" : {empty_verdict}",
                    f.address, f.port
                )),
            }
        }
    }

    let (declarations, rules): (Vec<&str>, Vec<&str>) = services
        .lines()
        .partition(|l| l.starts_with("add chain ") || l.starts_with("add set "));
    let _ = writeln!(out, "\n# service chains and affinity sets");
    for line in declarations.iter().chain(&rules) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
    for ip in &cluster_ips {
        let _ = writeln!(out, "add element {t} cluster-ips {{ {ip} }}");
    }
    for ip in &nodeport_ips {
        let _ = writeln!(out, "add element {t} nodeport-ips {{ {ip} }}");
    }
    for e in &service_ips {
        let _ = writeln!(out, "add element {t} service-ips {{ {e} }}");
    }
    for (k, v) in &service_nodeports {
        let _ = writeln!(out, "add element {t} service-nodeports {{ {k} {v} }}");
    }
    for e in &no_endpoint_services {
        let _ = writeln!(out, "add element {t} no-endpoint-services {{ {e} }}");
    }
    for (k, v) in &no_endpoint_nodeports {
        let _ = writeln!(out, "add element {t} no-endpoint-nodeports {{ {k} {v} }}");
    }
    out
}

/// The chains, maps and sets every kube-proxy table has (proxier.go `setupNFTables`).
fn base_chains(out: &mut String, t: &str) {
    let lines = [
        "add chain T mark-for-masquerade",
        "add rule T mark-for-masquerade mark set mark or M",
        "add chain T masquerading",
        "add rule T masquerading mark and M == 0 return",
        "add rule T masquerading mark set mark xor M",
        "add rule T masquerading masquerade fully-random",
        "add chain T services",
        "add chain T service-endpoints-check",
        "add chain T nodeport-endpoints-check",
        "add chain T firewall-check",
        "add chain T cluster-ips-check",
        "add chain T reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "add rule T reject-chain reject",
        "add set T cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
        "add set T nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "add map T firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }",
        "add map T no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
        "add map T no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }",
        "add map T service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add map T service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
        "add rule T service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add rule T nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add rule T firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        "add rule T cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "add chain T filter-prerouting { type filter hook prerouting priority -110 ; }",
        "add rule T filter-prerouting ct state new jump firewall-check",
        "add chain T filter-forward { type filter hook forward priority -110 ; }",
        "add rule T filter-forward ct state new jump service-endpoints-check",
        "add rule T filter-forward ct state new jump cluster-ips-check",
        "add chain T filter-input { type filter hook input priority -110 ; }",
        "add rule T filter-input ct state new jump nodeport-endpoints-check",
        "add rule T filter-input ct state new jump service-endpoints-check",
        "add chain T filter-output { type filter hook output priority -110 ; }",
        "add rule T filter-output ct state new jump service-endpoints-check",
        "add rule T filter-output ct state new jump firewall-check",
        "add chain T filter-output-post-dnat { type filter hook output priority -90 ; }",
        "add rule T filter-output-post-dnat ct state new jump cluster-ips-check",
        "add chain T nat-prerouting { type nat hook prerouting priority dstnat ; }",
        "add rule T nat-prerouting jump services",
        // -100 is dstnat; nft 1.0.6 (Debian 12) accepts the name only for prerouting.
        "add chain T nat-output { type nat hook output priority -100 ; }",
        "add rule T nat-output jump services",
        "add chain T nat-postrouting { type nat hook postrouting priority srcnat ; }",
        "add rule T nat-postrouting jump masquerading",
        "add rule T services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule T services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
    ];
    for line in lines {
        let _ = writeln!(
            out,
            "{}",
            line.replace("T ", &format!("{t} "))
                .replace(" M", &format!(" {MASQUERADE_MARK}"))
        );
    }
}

/// `service-…` (cluster) or `local-…` chain: masquerade rule, affinity, random choice.
fn rotation_chain(
    out: &mut String,
    t: &str,
    entry: &ServiceEntry,
    names: &Names,
    scope: Scope,
    rotation: &Rotation,
    opts: &RulesetOptions,
) {
    let chain = names.rotation(scope);
    let _ = writeln!(out, "add chain {t} {chain}");
    if scope == Scope::Cluster && !opts.pod_cidrs.is_empty() {
        let _ = writeln!(
            out,
            "add rule {t} {chain} ip daddr {} {} dport {} ip saddr != {} jump mark-for-masquerade",
            entry.cluster_ip,
            proto(entry.protocol),
            entry.port,
            cidr_set(&opts.pod_cidrs)
        );
    }
    let in_rotation: Vec<(Ipv4Addr, u16)> = rotation
        .backends
        .iter()
        .filter_map(|&i| entry.backends.get(i as usize))
        .map(|b| (b.address, b.port))
        .collect();
    if entry.affinity.is_some() {
        for &(address, port) in &in_rotation {
            let base = endpoint_base(entry, address, port);
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr @affinity-{base} goto endpoint-{base}"
            );
        }
    }
    let arms: Vec<String> = in_rotation
        .iter()
        .enumerate()
        .map(|(i, &(address, port))| {
            format!(
                "{i} : goto endpoint-{}",
                endpoint_base(entry, address, port)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
        arms.len(),
        arms.join(" , ")
    );
}

/// `endpoint-…` chain (and its affinity set): hairpin masquerade, affinity record, DNAT.
fn endpoint_chain(out: &mut String, t: &str, entry: &ServiceEntry, backend: u32) {
    let Some(b) = entry.backends.get(backend as usize) else {
        return;
    };
    let base = endpoint_base(entry, b.address, b.port);
    let chain = format!("endpoint-{base}");
    let _ = writeln!(out, "add chain {t} {chain}");
    let _ = writeln!(
        out,
        "add rule {t} {chain} ip saddr {} jump mark-for-masquerade",
        b.address
    );
    if entry.affinity.is_some() {
        let _ = writeln!(
            out,
            "add rule {t} {chain} update @affinity-{base} {{ ip saddr }}"
        );
    }
    let _ = writeln!(
        out,
        "add rule {t} {chain} meta l4proto {} dnat to {}:{}",
        proto(entry.protocol),
        b.address,
        b.port
    );
}

/// `external-…` chain: where NodePort, LoadBalancer and externalIP traffic goes.
fn external_chain(
    out: &mut String,
    t: &str,
    entry: &ServiceEntry,
    names: &Names,
    opts: &RulesetOptions,
) {
    let chain = names.external();
    let service = names.service();
    let _ = writeln!(out, "add chain {t} {chain}");
    if entry.external_traffic_local {
        // kube-proxy: pods and the node itself may use any endpoint; outside clients keep
        // their address and only reach local endpoints.
        if !opts.pod_cidrs.is_empty() {
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr {} goto {service} comment \"short-circuit pod traffic\"",
                cidr_set(&opts.pod_cidrs)
            );
        }
        let _ = writeln!(
            out,
            "add rule {t} {chain} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
        );
        let _ = writeln!(
            out,
            "add rule {t} {chain} fib saddr type local goto {service} comment \"short-circuit local traffic\""
        );
        if entry.rotation(Scope::Local).backends.is_empty() {
            let _ = writeln!(
                out,
                "add rule {t} {chain} drop comment \"no local endpoints\""
            );
        } else {
            let _ = writeln!(out, "add rule {t} {chain} goto {}", names.local());
        }
    } else {
        let _ = writeln!(out, "add rule {t} {chain} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {t} {chain} goto {service}");
    }
}

/// Loads `rules` (a [`ruleset`]) into the network namespace `netns` with `nft -f -`.
pub fn load(netns: &str, rules: &str) -> Result<(), NftError> {
    let mut command = cmd::in_netns(netns, &["nft", "-f", "-"]);
    cmd::run_with_timeout(&mut command, rules.as_bytes(), NFT_TIMEOUT)
        .and_then(|output| cmd::check(&command, output))
        .map(drop)
        .map_err(|source| NftError::Load {
            netns: netns.to_string(),
            source,
        })
}

/// `nft list table ip kube-proxy` in `netns`.
pub fn list(netns: &str) -> Result<String, NftError> {
    let mut command: Command = cmd::in_netns(netns, &["nft", "list", "table", "ip", TABLE]);
    cmd::run_with_timeout(&mut command, &[], NFT_TIMEOUT)
        .and_then(|output| cmd::check(&command, output))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .map_err(|source| NftError::List {
            netns: netns.to_string(),
            source,
        })
}

/// Removes the table from `netns`; a missing table is not an error.
pub fn remove(netns: &str) -> Result<(), NftError> {
    load(
        netns,
        &format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::services::{translate, ServiceOptions};
    use std::path::Path;

    fn fixture() -> control::cluster::ClusterState {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("clusters/services.yaml");
        control::cluster::load_file(&path).expect("services.yaml parses")
    }

    fn opts() -> RulesetOptions {
        RulesetOptions {
            pod_cidrs: vec![
                "10.244.1.0/24".parse().expect("cidr"),
                "10.244.2.0/24".parse().expect("cidr"),
            ],
        }
    }

    /// The lines of `rules` that mention `needle`.
    fn lines_with<'a>(rules: &'a str, needle: &str) -> Vec<&'a str> {
        rules.lines().filter(|l| l.contains(needle)).collect()
    }

    #[test]
    fn services_fixture_loads_and_translates_for_both_nodes() {
        let cluster = fixture();
        assert_eq!(cluster.nodes.len(), 2);
        assert_eq!(cluster.services.len(), 8);
        for node in ["node1", "node2"] {
            let plan = translate(&cluster, node, &ServiceOptions::default());
            assert!(plan.skipped.is_empty(), "{node}: {:?}", plan.skipped);
            let entry = |name: &str, port: &str| {
                plan.services
                    .iter()
                    .find(|e| e.name == name && e.port_name == port)
                    .unwrap_or_else(|| panic!("{node}: no {name}:{port}"))
            };
            // Named targetPorts resolve per backend: http -> 8080/TCP, dns -> 5353/UDP.
            let http = entry("web", "http");
            assert_eq!(http.backends.len(), 2, "{node}: backends on both nodes");
            assert!(http.backends.iter().all(|b| b.port == 8080));
            assert_eq!(http.backends.iter().filter(|b| b.local).count(), 1);
            let dns = entry("web", "dns");
            assert_eq!(dns.protocol, Protocol::Udp);
            assert!(dns.backends.iter().all(|b| b.port == 5353));
            assert!(entry("nothing", "http").cluster.backends.is_empty());
            assert_eq!(
                entry("web-sticky", "http")
                    .affinity
                    .map(|a| a.timeout_seconds),
                Some(60)
            );
            let lb = entry("web-lb", "http");
            assert!(lb.external_traffic_local);
            assert_eq!(lb.health_check_node_port, Some(32081));
            assert_eq!(lb.rotation(Scope::Local).backends.len(), 1);
            let kinds: BTreeSet<_> = plan.frontends.iter().map(|f| f.kind).collect();
            assert!(kinds.contains(&FrontendKind::NodePort));
            assert!(kinds.contains(&FrontendKind::LoadBalancer));
            let lb_ip = Ipv4Addr::new(192, 168, 100, 10);
            assert!(plan.frontend(lb_ip, 80, Protocol::Tcp).is_some());
        }
        let node2 = translate(&cluster, "node2", &ServiceOptions::default());
        let echo = node2
            .services
            .iter()
            .find(|e| e.name == "echo" && e.port_name == "stream")
            .expect("echo:stream");
        assert_eq!(echo.backends.len(), 1);
        assert!(!echo.backends[0].local, "echo-1 is on node1");
    }

    #[test]
    fn ruleset_has_kube_proxy_shape() {
        let plan = translate(&fixture(), "node1", &ServiceOptions::default());
        let rules = ruleset(&plan, &opts());
        let t = "ip kube-proxy";
        // Replaces the table atomically.
        assert!(rules.starts_with(&format!("add table {t}\ndelete table {t}\nadd table {t}")));
        for needle in [
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }",
            "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy nat-output jump services",
            "add rule ip kube-proxy nat-postrouting jump masquerading",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            "add element ip kube-proxy nodeport-ips { 172.18.0.11 }",
        ] {
            assert!(rules.contains(needle), "missing {needle:?} in\n{rules}");
        }
        // web:http: service chain with two endpoints, chosen at random; each endpoint chain
        // masquerades hairpin traffic and DNATs.
        let web = lines_with(&rules, "ns/web/");
        assert!(web.is_empty(), "names are namespace/name/..., not ns/");
        let service_chain = lines_with(&rules, "-default/web/tcp/http numgen random mod 2 vmap");
        assert_eq!(service_chain.len(), 1, "{rules}");
        assert_eq!(service_chain[0].matches("goto endpoint-").count(), 2);
        for ep in ["10.244.1.4", "10.244.2.2"] {
            let chain = lines_with(&rules, &format!("default/web/tcp/http__{ep}/8080"));
            assert!(
                chain
                    .iter()
                    .any(|l| l.ends_with(&format!("ip saddr {ep} jump mark-for-masquerade"))),
                "{chain:?}"
            );
            assert!(
                chain
                    .iter()
                    .any(|l| l.ends_with(&format!("meta l4proto tcp dnat to {ep}:8080"))),
                "{chain:?}"
            );
        }
        let dns = lines_with(&rules, "default/web/udp/dns__10.244.2.2/5353");
        assert!(dns
            .iter()
            .any(|l| l.ends_with("meta l4proto udp dnat to 10.244.2.2:5353")));
        // Non-pod sources to a ClusterIP are masqueraded.
        assert!(rules.contains(
            "ip daddr 10.96.1.10 tcp dport 80 ip saddr != { 10.244.1.0/24, 10.244.2.0/24 } jump mark-for-masquerade"
        ));
        // Frontends in the maps.
        let element = lines_with(
            &rules,
            "add element ip kube-proxy service-ips { 10.96.1.10 . tcp . 80 ",
        );
        assert_eq!(element.len(), 1);
        assert!(element[0].contains("goto service-"), "{element:?}");
        let nodeport = lines_with(&rules, "service-nodeports { tcp . 30080 ");
        assert_eq!(nodeport.len(), 1);
        assert!(nodeport[0].contains("goto external-"), "{nodeport:?}");
        let lb = lines_with(&rules, "service-ips { 192.168.100.10 . tcp . 80 ");
        assert_eq!(lb.len(), 1);
        assert!(lb[0].contains("goto external-"), "{lb:?}");
        // No endpoints: reject through the filter chains, never a service-ips element.
        let nothing = lines_with(&rules, "10.96.1.14 . tcp . 80");
        assert_eq!(nothing.len(), 1, "{nothing:?}");
        assert!(
            nothing[0].contains("no-endpoint-services")
                && nothing[0].ends_with(": goto reject-chain }")
        );
        // Affinity: a dynamic set per endpoint, consulted before the random choice.
        assert_eq!(
            lines_with(&rules, "add set ip kube-proxy affinity-").len(),
            2,
            "{rules}"
        );
        assert!(rules.contains("flags dynamic,timeout ; timeout 60s ;"));
        let sticky = lines_with(&rules, "default/web-sticky/tcp/http ip saddr @affinity-");
        assert_eq!(sticky.len(), 2);
        assert_eq!(lines_with(&rules, "update @affinity-").len(), 2);
    }

    #[test]
    fn external_traffic_local_uses_local_endpoints_and_drops_without_them() {
        let cluster = fixture();
        let external_rules = |node: &str| {
            let plan = translate(&cluster, node, &ServiceOptions::default());
            let rules = ruleset(&plan, &opts());
            lines_with(&rules, "external-")
                .into_iter()
                .filter(|l| l.contains("web-lb"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        for node in ["node1", "node2"] {
            let lines = external_rules(node);
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("short-circuit pod traffic")),
                "{node}: {lines:?}"
            );
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("fib saddr type local goto service-")),
                "{node}: {lines:?}"
            );
            assert!(
                lines.iter().any(|l| l.contains(" goto local-")),
                "{node}: one local web pod on each node: {lines:?}"
            );
            assert!(
                !lines
                    .iter()
                    .any(|l| l.ends_with("jump mark-for-masquerade")),
                "{node}: eTP=Local keeps the client address: {lines:?}"
            );
        }
        // A local rotation with one endpoint: the one on this node.
        let plan = translate(&cluster, "node2", &ServiceOptions::default());
        let rules = ruleset(&plan, &opts());
        let local = lines_with(&rules, "add rule ip kube-proxy local-");
        let local: Vec<_> = local.iter().filter(|l| l.contains("web-lb")).collect();
        assert_eq!(local.len(), 1, "{local:?}");
        assert!(local[0].contains("mod 1 vmap") && local[0].contains("__10.244.2.2/8080"));
    }

    #[test]
    fn cluster_traffic_policy_masquerades_external_traffic() {
        let plan = translate(&fixture(), "node1", &ServiceOptions::default());
        let rules = ruleset(&plan, &opts());
        let chain: Vec<_> = lines_with(&rules, "add rule ip kube-proxy external-")
            .into_iter()
            .filter(|l| l.contains("web-nodeport"))
            .collect();
        assert_eq!(chain.len(), 2, "{chain:?}");
        assert!(chain[0].ends_with("jump mark-for-masquerade"));
        assert!(chain[1].contains("goto service-"));
    }

    #[test]
    fn terminating_and_not_serving_backends_follow_the_plan() {
        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: p, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s-1
  namespace: default
  labels: {kubernetes.io/service-name: s}
addressType: IPv4
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.20]
    conditions: {ready: false, serving: true, terminating: true}
  - addresses: [10.244.1.21]
    conditions: {ready: false, serving: false, terminating: true}
"#;
        let cluster = control::cluster::parse_str(yaml, "inline").expect("parses");
        let plan = translate(&cluster, "node1", &ServiceOptions::default());
        let rules = ruleset(&plan, &opts());
        // Only the serving-terminating backend is in rotation (no ready one exists); the
        // not-serving one gets no chain at all.
        assert!(rules.contains("numgen random mod 1 vmap"), "{rules}");
        assert!(rules.contains("dnat to 10.244.1.20:8080"));
        assert!(!rules.contains("10.244.1.21"), "{rules}");
    }

    #[test]
    fn chain_names_are_hashed_distinct_and_bounded() {
        let a = hash_and_truncate("default/web/tcp/http");
        let b = hash_and_truncate("default/web/tcp/https");
        assert_eq!(a.len(), 9 + "default/web/tcp/http".len());
        assert!(a.ends_with("-default/web/tcp/http"));
        assert_ne!(a[..8], b[..8]);
        assert!(a[..8]
            .bytes()
            .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c)));
        let long = hash_and_truncate(&"x".repeat(400));
        assert_eq!(long.len(), NAME_BASE_MAX);
        assert!(long.ends_with("..."));
        assert_eq!(hash_and_truncate("same"), hash_and_truncate("same"));
    }

    #[test]
    fn empty_plan_still_gives_the_base_table() {
        let rules = ruleset(&ServicePlan::default(), &RulesetOptions::default());
        assert!(rules.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        assert!(!rules.contains("add element"));
        assert!(
            !rules.contains("saddr !="),
            "no pod CIDRs, no masquerade-by-source rule"
        );
    }

    /// A scratch namespace removed on drop (even on panic).
    struct ScratchNetns(String);

    impl ScratchNetns {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "sl-nft-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            cmd::netns_add(&name).expect("creating a scratch namespace");
            Self(name)
        }
    }

    impl Drop for ScratchNetns {
        fn drop(&mut self) {
            let _ = cmd::netns_del(&self.0);
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn ruleset_loads_into_a_namespace_and_lists_back() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let netns = ScratchNetns::new("load");
        let plan = translate(&fixture(), "node1", &ServiceOptions::default());
        let rules = ruleset(&plan, &opts());
        load(&netns.0, &rules).expect("nft accepts the ruleset");
        // Loading again replaces the table (idempotent).
        load(&netns.0, &rules).expect("nft accepts it a second time");
        let listed = list(&netns.0).expect("lists");
        for needle in [
            "table ip kube-proxy",
            "map service-ips",
            "type ipv4_addr . inet_proto . inet_service : verdict",
            "type nat hook prerouting priority dstnat",
            "numgen random mod 2 vmap",
            "10.96.1.10 . tcp . 80",
            "192.168.100.10 . tcp . 80",
            "set nodeport-ips",
            "172.18.0.11",
            "dnat to 10.244.2.2:8080",
            "fib saddr type local",
            "masquerade fully-random",
            "update @affinity-",
        ] {
            assert!(listed.contains(needle), "missing {needle:?} in\n{listed}");
        }
        assert_eq!(
            listed.matches("chain endpoint-").count(),
            rules.matches("add chain ip kube-proxy endpoint-").count()
        );
        remove(&netns.0).expect("removes");
        assert!(list(&netns.0).is_err(), "table gone");
        remove(&netns.0).expect("removing a missing table is fine");
    }
}
