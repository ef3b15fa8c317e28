//! `sluice-cni`: the CNI plugin that gives a pod its veth, its address and its routes, then hands
//! the interface to the agent (CNI spec 1.0.0, also accepting configs of 0.3.0, 0.3.1 and 0.4.0).
//!
//! ```text
//!  runtime --(env CNI_*, config JSON on stdin)--> sluice-cni
//!     ADD:   ipam::Pool::allocate (CNI_ARGS IP= picks the address) -> veth lxcXXXXXXXXXXXX <-> CNI_IFNAME in CNI_NETNS
//!            -> IP/32, lo up, on-link route to gateway, default via gateway
//!            -> agent EndpointAdd (api socket) -> result JSON on stdout
//!     DEL:   agent EndpointDel (best effort) -> delete host veth -> ipam release
//!     CHECK: allocation, host veth, pod address and default route still there
//!  errors: {"cniVersion","code","msg","details"} on stdout, exit status 1
//! ```
//!
//! Invariants:
//! - A pod is only networked with the agent: ADD fails with code 11 (try again later) when the
//!   agent cannot take the endpoint, and leaves nothing behind (no veth, address released).
//! - Any failure of ADD after the address was allocated undoes the veth and the allocation.
//! - DEL succeeds for unknown containers, a missing or empty CNI_NETNS and an agent that is
//!   down (the agent reconciles its endpoints from the interfaces when it starts).
//! - Nothing here panics on bad input: every bad variable or config field is an error with the
//!   spec's code.
//!
//! The logic takes its environment through a lookup function, its config as bytes and its network
//! operations through [`netops::NetOps`], so it runs in unit tests without root; the binary
//! `sluice-cni` plugs in the process environment, stdin and [`netops::IpRoute`].
pub mod ipam;
pub mod names;
pub mod netops;

use std::{
    fmt,
    io::Read,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::api::{self, CniConf, Endpoint, Request};
use ipam::{IpamError, Pool};
use netops::{NetError, NetOps, VethSpec};

/// The spec version this plugin implements; used in VERSION and in errors raised before the
/// config's own version is known.
pub const CNI_VERSION: &str = "1.0.0";
/// Config versions the plugin accepts (results are written in the config's version).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long ADD and DEL wait for the agent.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bounds of a pod interface's MTU (the kernel's minimum for IPv4, the maximum of a veth).
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;
/// Bounds of the queue count of a veth (the kernel refuses more than 4096).
pub const QUEUES_RANGE: std::ops::RangeInclusive<u32> = 1..=4096;

/// Error codes: 1-99 are the spec's, 100 and up are sluice's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// No free address left in the node's pod CIDR.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// Creating or configuring the veth pair or the pod's addresses and routes failed.
    pub const INTERFACE_SETUP: u32 = 101;
    /// CHECK found the pod's networking not as ADD left it.
    pub const CHECK_FAILED: u32 = 102;
    /// The address requested with `CNI_ARGS` `IP=` is held by another container, or the
    /// container already holds a different one.
    pub const ADDRESS_UNAVAILABLE: u32 = 103;
}

/// A CNI error as the spec prints it: `{"cniVersion","code","msg","details"}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object, in `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let code = match e {
            IpamError::Exhausted { .. } => code::POOL_EXHAUSTED,
            IpamError::GatewayOutsideCidr { .. } => code::INVALID_CONFIG,
            // The request does not fit this network: the variable is wrong, as for code 4.
            IpamError::RequestedOutsideRange { .. } | IpamError::RequestedGateway { .. } => {
                code::INVALID_ENV
            }
            IpamError::RequestedTaken { .. } | IpamError::RequestedButHoldsAnother { .. } => {
                code::ADDRESS_UNAVAILABLE
            }
            IpamError::Io { .. } => code::IO_FAILURE,
        };
        CniError::new(code, e.to_string(), "")
    }
}

fn setup_error(what: &str, e: NetError) -> CniError {
    CniError::new(code::INTERFACE_SETUP, what, e.to_string())
}

/// CNI_COMMAND.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl FromStr for Command {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, CniError> {
        match s {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            other => Err(CniError::new(
                code::INVALID_ENV,
                format!("unsupported CNI_COMMAND {other:?}"),
                "sluice-cni implements ADD, DEL, CHECK and VERSION",
            )),
        }
    }
}

/// The plugin's environment variables, checked for the command they come with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    /// CNI_CONTAINERID (empty for VERSION).
    pub container_id: String,
    /// CNI_NETNS; required for ADD and CHECK, may be absent or empty for DEL.
    pub netns: Option<PathBuf>,
    /// CNI_IFNAME (empty for VERSION).
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` from CNI_ARGS, empty when not given.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from CNI_ARGS, empty when not given.
    pub pod_name: String,
    /// `IP` from CNI_ARGS (host-local's key): the address ADD must give the pod, `None` when not
    /// given or empty (as upstream, `IP=` requests nothing).
    pub requested_ip: Option<Ipv4Addr>,
}

impl Env {
    /// Reads the CNI_* variables through `lookup` (e.g. `|k| std::env::var(k).ok()`). CNI_PATH
    /// is not required: this plugin delegates to no other plugin.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let missing = |name: &str| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set"),
                "the container runtime must set it",
            )
        };
        let command: Command = var("CNI_COMMAND")
            .ok_or_else(|| missing("CNI_COMMAND"))?
            .parse()?;
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            requested_ip: None,
        };
        if command == Command::Version {
            return Ok(env);
        }
        env.container_id = var("CNI_CONTAINERID").ok_or_else(|| missing("CNI_CONTAINERID"))?;
        names::validate_container_id(&env.container_id).map_err(|why| {
            CniError::new(code::INVALID_ENV, format!("CNI_CONTAINERID {why}"), "")
        })?;
        env.ifname = var("CNI_IFNAME").ok_or_else(|| missing("CNI_IFNAME"))?;
        names::validate_ifname(&env.ifname)
            .map_err(|why| CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {why}"), ""))?;
        env.netns = var("CNI_NETNS").map(PathBuf::from);
        if env.netns.is_none() && command != Command::Del {
            return Err(missing("CNI_NETNS"));
        }
        if let Some(args) = var("CNI_ARGS") {
            for pair in args.split(';').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').ok_or_else(|| {
                    CniError::new(
                        code::INVALID_ENV,
                        format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                        format!("CNI_ARGS={args}"),
                    )
                })?;
                match key {
                    "K8S_POD_NAMESPACE" => env.pod_namespace = value.to_string(),
                    "K8S_POD_NAME" => env.pod_name = value.to_string(),
                    "IP" => env.requested_ip = parse_requested_ip(value, env.requested_ip, &args)?,
                    _ => {} // K8S_POD_UID, K8S_POD_INFRA_CONTAINER_ID, IgnoreUnknown, ...
                }
            }
        }
        Ok(env)
    }

    /// The netns path, or the spec's error when ADD or CHECK has none.
    fn required_netns(&self) -> Result<&Path, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set", ""))
    }
}

/// Parses the value of `IP=` in CNI_ARGS (`earlier`: the value of an earlier `IP=`, if any).
/// Empty means no request, as in host-local (Go's `net.IP` reads empty text as nil). Only
/// IPv4: sluice pods have one IPv4 address.
fn parse_requested_ip(
    value: &str,
    earlier: Option<Ipv4Addr>,
    args: &str,
) -> Result<Option<Ipv4Addr>, CniError> {
    if value.is_empty() {
        return Ok(earlier);
    }
    let ip: Ipv4Addr = value.parse().map_err(|_| {
        let why = if value.parse::<std::net::Ipv6Addr>().is_ok() {
            "is IPv6; sluice gives pods one IPv4 address"
        } else {
            "is not an IPv4 address"
        };
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_ARGS IP={value:?} {why}"),
            format!("CNI_ARGS={args}"),
        )
    })?;
    match earlier {
        Some(other) if other != ip => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_ARGS requests two addresses, IP={other} and IP={ip}"),
            format!("CNI_ARGS={args}; a pod gets one address"),
        )),
        _ => Ok(Some(ip)),
    }
}

/// The network config from stdin, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub conf: CniConf,
    pub pod_cidr: Ipv4Net,
    /// `prevResult`, if the runtime passed one (CHECK compares against it).
    pub prev_result: Option<Value>,
}

impl NetConf {
    /// Decodes and checks the config: JSON syntax (code 6), `cniVersion` (code 1), fields and
    /// their values (code 7). Unknown fields (`args`, `runtimeConfig`, ...) are ignored.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network config on stdin is not valid JSON",
                e.to_string(),
            )
        })?;
        let version = value
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "the network config has no string field cniVersion",
                    "",
                )
            })?;
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {version:?} is not supported"),
                format!("sluice-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let prev_result = value.get("prevResult").cloned();
        let conf: CniConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "the network config does not match sluice's",
                e.to_string(),
            )
        })?;
        let invalid = |msg: String| {
            CniError::new(
                code::INVALID_CONFIG,
                msg,
                "the agent writes this config; check its flags",
            )
        };
        let pod_cidr: Ipv4Net = conf
            .pod_cidr
            .parse()
            .map_err(|_| invalid(format!("podCIDR {:?} is not an IPv4 CIDR", conf.pod_cidr)))?;
        let pod_cidr = pod_cidr.trunc();
        if !pod_cidr.contains(&conf.gateway) {
            return Err(invalid(format!(
                "gateway {} is not inside podCIDR {pod_cidr}",
                conf.gateway
            )));
        }
        if !MTU_RANGE.contains(&conf.mtu) {
            return Err(invalid(format!(
                "mtu {} is outside {MTU_RANGE:?}",
                conf.mtu
            )));
        }
        if !QUEUES_RANGE.contains(&conf.queues) {
            return Err(invalid(format!(
                "queues {} is outside {QUEUES_RANGE:?}",
                conf.queues
            )));
        }
        Ok(Self {
            conf,
            pod_cidr,
            prev_result,
        })
    }

    fn pool(&self) -> Result<Pool, CniError> {
        Ok(Pool::new(
            &self.conf.data_dir,
            self.pod_cidr,
            self.conf.gateway,
        )?)
    }

    fn version(&self) -> &str {
        &self.conf.cni_version
    }
}

/// What the binary prints and its exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub exit_code: i32,
}

/// The whole plugin: reads the environment through `lookup`, the config from `stdin` (not read
/// for VERSION), runs the command with `net` and renders stdout and the exit status.
pub fn execute(
    lookup: impl Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    net: &dyn NetOps,
) -> Output {
    let failure = |e: CniError, version: &str| Output {
        stdout: format!("{}\n", e.to_json(version)),
        exit_code: 1,
    };
    let env = match Env::from_lookup(lookup) {
        Ok(env) => env,
        Err(e) => return failure(e, CNI_VERSION),
    };
    let mut input = Vec::new();
    if env.command != Command::Version {
        if let Err(e) = stdin.read_to_end(&mut input) {
            let e = CniError::new(
                code::IO_FAILURE,
                "cannot read the network config from stdin",
                e.to_string(),
            );
            return failure(e, CNI_VERSION);
        }
    }
    match run(&env, &input, net) {
        Ok(Some(result)) => Output {
            stdout: format!("{result}\n"),
            exit_code: 0,
        },
        Ok(None) => Output {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => failure(e, reply_version(&input)),
    }
}

/// Errors are written in the config's version when it is a supported one.
fn reply_version(stdin: &[u8]) -> &'static str {
    let version = serde_json::from_slice::<Value>(stdin).ok().and_then(|v| {
        v.get("cniVersion")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    SUPPORTED_VERSIONS
        .iter()
        .find(|supported| version.as_deref() == Some(**supported))
        .copied()
        .unwrap_or(CNI_VERSION)
}

/// Runs one command. Returns the JSON to print on success (ADD and VERSION) or nothing (DEL,
/// CHECK).
pub fn run(env: &Env, stdin: &[u8], net: &dyn NetOps) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(version_result()));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(env, &conf, net).map(Some),
        Command::Del => del(env, &conf, net).map(|()| None),
        Command::Check => check(env, &conf, net).map(|()| None),
        Command::Version => Ok(Some(version_result())),
    }
}

/// The VERSION answer.
pub fn version_result() -> Value {
    json!({ "cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

fn existing_netns(env: &Env, code: u32) -> Result<&Path, CniError> {
    let netns = env.required_netns()?;
    if !netns.exists() {
        return Err(CniError::new(
            code,
            format!("network namespace {} does not exist", netns.display()),
            format!("container {}", env.container_id),
        ));
    }
    Ok(netns)
}

fn add(env: &Env, conf: &NetConf, net: &dyn NetOps) -> Result<Value, CniError> {
    let netns = existing_netns(env, code::UNKNOWN_CONTAINER)?;
    let pool = conf.pool()?;
    let ip = pool.allocate(&env.container_id, &env.ifname, env.requested_ip)?;
    let host_ifname = names::host_ifname(&env.container_id);
    let result = add_interfaces(env, conf, net, netns, ip, &host_ifname);
    if result.is_err() {
        undo_add(env, net, &pool, &host_ifname);
    }
    result
}

/// ADD after the address is allocated: everything here is undone by [`undo_add`] on failure.
fn add_interfaces(
    env: &Env,
    conf: &NetConf,
    net: &dyn NetOps,
    netns: &Path,
    ip: Ipv4Addr,
    host_ifname: &str,
) -> Result<Value, CniError> {
    let c = &conf.conf;
    // The host name is derived from the container id: an interface of that name is a leftover
    // of an earlier ADD of this container, replace it.
    if net
        .link_exists(None, host_ifname)
        .map_err(|e| setup_error("cannot list interfaces", e))?
    {
        tracing::info!(host_ifname, container_id = %env.container_id, "replacing a leftover host veth");
        net.delete_link(host_ifname)
            .map_err(|e| setup_error("cannot delete the leftover host veth", e))?;
    }
    let spec = VethSpec {
        host_ifname: host_ifname.to_string(),
        pod_ifname: env.ifname.clone(),
        netns: netns.to_path_buf(),
        mtu: c.mtu,
        queues: c.queues,
    };
    net.create_veth(&spec).map_err(|e| {
        setup_error(
            &format!(
                "cannot create veth {host_ifname} <-> {} in {}",
                env.ifname,
                netns.display()
            ),
            e,
        )
    })?;
    net.configure_pod(netns, &env.ifname, ip, c.gateway)
        .map_err(|e| {
            setup_error(
                &format!(
                    "cannot configure {} in {} with {ip}/32 via {}",
                    env.ifname,
                    netns.display(),
                    c.gateway
                ),
                e,
            )
        })?;
    let pod_mac = net.mac(Some(netns), &env.ifname).map_err(|e| {
        setup_error(
            &format!(
                "cannot read the MAC of {} in {}",
                env.ifname,
                netns.display()
            ),
            e,
        )
    })?;
    let host_mac = net
        .mac(None, host_ifname)
        .map_err(|e| setup_error(&format!("cannot read the MAC of {host_ifname}"), e))?;

    let endpoint = Endpoint {
        container_id: env.container_id.clone(),
        pod_ifname: env.ifname.clone(),
        pod_namespace: env.pod_namespace.clone(),
        pod_name: env.pod_name.clone(),
        host_ifname: host_ifname.to_string(),
        ip,
        mac: pod_mac.clone(),
        netns: netns.to_string_lossy().into_owned(),
    };
    api::call(&c.agent_socket, &Request::EndpointAdd { endpoint }, AGENT_TIMEOUT).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the sluice agent at {} did not take the pod's endpoint; the pod gets no network until the agent runs",
                c.agent_socket.display()
            ),
            e.to_string(),
        )
    })?;
    Ok(add_result(
        conf.version(),
        host_ifname,
        &host_mac,
        &env.ifname,
        &pod_mac,
        netns,
        ip,
        c.gateway,
    ))
}

/// Best-effort cleanup after a failed ADD: each step is tried and its failure logged, so one
/// failing step does not keep the others from running.
fn undo_add(env: &Env, net: &dyn NetOps, pool: &Pool, host_ifname: &str) {
    match net.link_exists(None, host_ifname) {
        Ok(true) => {
            if let Err(e) = net.delete_link(host_ifname) {
                tracing::warn!(host_ifname, error = %e, "undoing ADD: cannot delete the host veth");
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(host_ifname, error = %e, "undoing ADD: cannot look for the host veth")
        }
    }
    if let Err(e) = pool.release(&env.container_id, &env.ifname) {
        tracing::warn!(container_id = %env.container_id, error = %e, "undoing ADD: cannot release the address");
    }
}

/// The success result of ADD in `version` (1.0.0 layout; 0.3.x/0.4.0 also carry
/// `"version": "4"` in each IP entry).
#[allow(clippy::too_many_arguments)]
fn add_result(
    version: &str,
    host_ifname: &str,
    host_mac: &str,
    pod_ifname: &str,
    pod_mac: &str,
    netns: &Path,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Value {
    let mut ip_entry =
        json!({ "address": format!("{ip}/32"), "gateway": gateway.to_string(), "interface": 1 });
    if version != "1.0.0" {
        ip_entry["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            { "name": host_ifname, "mac": host_mac },
            { "name": pod_ifname, "mac": pod_mac, "sandbox": netns.to_string_lossy() },
        ],
        "ips": [ip_entry],
        "routes": [{ "dst": "0.0.0.0/0", "gw": gateway.to_string() }],
        "dns": {},
    })
}

fn del(env: &Env, conf: &NetConf, net: &dyn NetOps) -> Result<(), CniError> {
    let c = &conf.conf;
    // Agent first, so it detaches its sockets before the interface goes away.
    let request = Request::EndpointDel {
        container_id: env.container_id.clone(),
    };
    if let Err(e) = api::call(&c.agent_socket, &request, AGENT_TIMEOUT) {
        tracing::warn!(
            container_id = %env.container_id,
            error = %e,
            "DEL: the agent was not told; it reconciles its endpoints when it starts"
        );
    }
    let host_ifname = names::host_ifname(&env.container_id);
    let exists = net
        .link_exists(None, &host_ifname)
        .map_err(|e| setup_error(&format!("cannot look for host veth {host_ifname}"), e))?;
    if exists {
        net.delete_link(&host_ifname)
            .map_err(|e| setup_error(&format!("cannot delete host veth {host_ifname}"), e))?;
    }
    // Released last: the address is not handed out while its interface may still exist.
    conf.pool()?.release(&env.container_id, &env.ifname)?;
    Ok(())
}

fn check(env: &Env, conf: &NetConf, net: &dyn NetOps) -> Result<(), CniError> {
    if matches!(conf.version(), "0.3.0" | "0.3.1") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CHECK is not defined for cniVersion {}", conf.version()),
            "CHECK needs cniVersion 0.4.0 or later",
        ));
    }
    let c = &conf.conf;
    let failed = |msg: String| {
        CniError::new(
            code::CHECK_FAILED,
            msg,
            format!("container {}", env.container_id),
        )
    };
    let netns = existing_netns(env, code::CHECK_FAILED)?;
    let ip = conf
        .pool()?
        .lookup(&env.container_id, &env.ifname)?
        .ok_or_else(|| {
            failed(format!(
                "no address is allocated to {} in {}",
                env.ifname,
                c.data_dir.display()
            ))
        })?;
    if let Some(requested) = env.requested_ip.filter(|r| *r != ip) {
        return Err(failed(format!(
            "CNI_ARGS requests IP={requested} but {} holds {ip} in {}",
            env.ifname,
            c.data_dir.display()
        )));
    }
    if let Some(prev) = &conf.prev_result {
        let want = format!("{ip}/32");
        let listed = prev
            .get("ips")
            .and_then(Value::as_array)
            .is_some_and(|ips| {
                ips.iter()
                    .any(|e| e.get("address").and_then(Value::as_str) == Some(&want))
            });
        if !listed {
            return Err(failed(format!(
                "prevResult does not list the allocated address {want}"
            )));
        }
    }
    let host_ifname = names::host_ifname(&env.container_id);
    let check_error = |e: NetError| {
        CniError::new(
            code::CHECK_FAILED,
            "cannot inspect the pod's interfaces",
            e.to_string(),
        )
    };
    if !net.link_exists(None, &host_ifname).map_err(check_error)? {
        return Err(failed(format!("host veth {host_ifname} does not exist")));
    }
    if !net
        .link_exists(Some(netns), &env.ifname)
        .map_err(check_error)?
    {
        return Err(failed(format!(
            "{} does not exist in {}",
            env.ifname,
            netns.display()
        )));
    }
    let link = net.pod_link(netns, &env.ifname).map_err(check_error)?;
    if !link.up {
        return Err(failed(format!(
            "{} in {} is down",
            env.ifname,
            netns.display()
        )));
    }
    if !link.addresses.contains(&(ip, 32)) {
        return Err(failed(format!(
            "{} in {} does not have {ip}/32 (it has {:?})",
            env.ifname,
            netns.display(),
            link.addresses
        )));
    }
    if link.default_gateway != Some(c.gateway) {
        return Err(failed(format!(
            "the default route of {} in {} is {:?}, expected via {}",
            env.ifname,
            netns.display(),
            link.default_gateway,
            c.gateway
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
