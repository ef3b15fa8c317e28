//! Names of everything a testbed instance creates.
//!
//! Every name carries the instance name, so two instances (two tests, a demo and a test) never
//! touch each other's namespaces. Namespace names are `sl-{inst}-fab`, `sl-{inst}-ext`,
//! `sl-{inst}-{node}` and `sl-{inst}-{node}-{namespace}-{pod}`, reduced to `[a-z0-9-]`.
//! Interface names must fit in 15 bytes (`IFNAMSIZ` - 1), so fabric-side interfaces use a 6-hex
//! digit tag derived from the instance name instead of the name itself: `s{tag}n{index}`.
//!
//! Hashes are FNV-1a 64 (written out here): the derived instance name must be the same for every
//! build and Rust version, so that `down FILE` finds what `up FILE` made.
use std::path::Path;

/// Longest instance name accepted (it appears in every namespace name).
pub const MAX_INSTANCE_LEN: usize = 32;
/// Longest network namespace name (`/run/netns/NAME` is a file name).
pub const MAX_NETNS_LEN: usize = 255;
/// Longest interface name in bytes (`IFNAMSIZ` is 16 including the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error(
        "instance name {name:?} is not usable: use 1 to {MAX_INSTANCE_LEN} characters of \
         [a-z0-9-], starting and ending with a letter or digit"
    )]
    BadInstance { name: String },
    #[error(
        "network namespace name {name:?} is longer than {MAX_NETNS_LEN} bytes: use shorter \
         node, namespace or pod names (or a shorter --instance)"
    )]
    NetnsTooLong { name: String },
}

/// FNV-1a, 64 bit: stable across builds, unlike `std`'s `DefaultHasher`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Lower-cases `s` and replaces everything outside `[a-z0-9-]` with `-`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Checks a user-given instance name (`--instance`).
pub fn validate_instance(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_INSTANCE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadInstance {
            name: name.to_string(),
        })
    }
}

/// The instance name for a cluster file: `{stem}-{hash}`, where `stem` is the sanitized file
/// stem (at most 12 characters) and `hash` 8 hex digits of the FNV-1a hash of the canonical path.
/// The caller canonicalizes `canonical_path`.
pub fn instance_for_path(canonical_path: &Path) -> String {
    let hash = fnv1a64(canonical_path.as_os_str().as_encoded_bytes());
    let stem = canonical_path
        .file_stem()
        .map(|s| sanitize(&s.to_string_lossy()))
        .unwrap_or_default();
    let stem: String = stem.trim_matches('-').chars().take(12).collect();
    let stem = stem.trim_end_matches('-');
    let hash = format!("{:08x}", hash & 0xffff_ffff);
    if stem.is_empty() {
        format!("c{hash}")
    } else {
        format!("{stem}-{hash}")
    }
}

/// Names for one instance.
#[derive(Clone, Debug)]
pub struct Names {
    instance: String,
    /// 6 hex digits derived from the instance name, for interface names.
    tag: String,
}

impl Names {
    pub fn new(instance: &str) -> Self {
        let tag = format!("{:06x}", fnv1a64(instance.as_bytes()) & 0xff_ffff);
        Self {
            instance: instance.to_string(),
            tag,
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn fabric_netns(&self) -> String {
        format!("sl-{}-fab", self.instance)
    }

    pub fn external_netns(&self) -> String {
        format!("sl-{}-ext", self.instance)
    }

    pub fn node_netns(&self, node: &str) -> Result<String, NameError> {
        checked(format!("sl-{}-{}", self.instance, sanitize(node)))
    }

    pub fn pod_netns(&self, node: &str, namespace: &str, pod: &str) -> Result<String, NameError> {
        checked(format!(
            "sl-{}-{}-{}-{}",
            self.instance,
            sanitize(node),
            sanitize(namespace),
            sanitize(pod)
        ))
    }

    /// The bridge in the fabric namespace.
    pub fn bridge(&self) -> String {
        format!("s{}br", self.tag)
    }

    /// Fabric side of node `index`'s uplink veth (the node side is `eth0`).
    pub fn fabric_veth(&self, index: usize) -> String {
        format!("s{}n{index}", self.tag)
    }

    /// A kernel-wireguard node's tunnel (node `index`), unique per instance: wireguard-go's
    /// control socket is named after it in a directory all namespaces share.
    pub fn wg_interface(&self, index: usize) -> String {
        format!("s{}w{index}", self.tag)
    }

    /// Fabric side of the external client's veth.
    pub fn external_veth(&self) -> String {
        format!("s{}x", self.tag)
    }

    /// A container id for a pod, 32 hex digits like a (short) runtime id, unique per instance.
    pub fn container_id(&self, namespace: &str, pod: &str) -> String {
        let key = format!("{}/{namespace}/{pod}", self.instance);
        let low = fnv1a64(key.as_bytes());
        let high = fnv1a64(format!("sluice-testbed:{key}").as_bytes());
        format!("{high:016x}{low:016x}")
    }
}

fn checked(name: String) -> Result<String, NameError> {
    if name.len() > MAX_NETNS_LEN {
        Err(NameError::NetnsTooLong { name })
    } else {
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn sanitize_keeps_only_lowercase_digits_and_dashes() {
        assert_eq!(sanitize("Node_1.Example"), "node-1-example");
        assert_eq!(sanitize("pod-a"), "pod-a");
    }

    #[test]
    fn instance_names_are_validated() {
        assert!(validate_instance("tb-123-4").is_ok());
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            &"x".repeat(MAX_INSTANCE_LEN + 1),
        ] {
            assert!(validate_instance(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn derived_instance_is_stable_valid_and_path_dependent() {
        let a = instance_for_path(Path::new("/work/clusters/Demo Cluster.yaml"));
        let b = instance_for_path(Path::new("/other/clusters/Demo Cluster.yaml"));
        assert_eq!(
            a,
            instance_for_path(Path::new("/work/clusters/Demo Cluster.yaml"))
        );
        assert_ne!(a, b);
        assert!(a.starts_with("demo-cluster-"), "{a}");
        validate_instance(&a).expect("derived names are valid");
        validate_instance(&instance_for_path(Path::new("/.yaml"))).expect("valid without stem");
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let names = Names::new(&"x".repeat(MAX_INSTANCE_LEN));
        for name in [
            names.bridge(),
            names.fabric_veth(999_999),
            names.external_veth(),
            names.wg_interface(999_999),
        ] {
            assert!(name.len() <= MAX_IFNAME_LEN, "{name} too long");
        }
        assert_ne!(Names::new("a").bridge(), Names::new("b").bridge());
        assert_ne!(
            Names::new("a").wg_interface(0),
            Names::new("b").wg_interface(0)
        );
    }

    #[test]
    fn netns_names_carry_instance_and_are_bounded() {
        let names = Names::new("t1");
        assert_eq!(names.fabric_netns(), "sl-t1-fab");
        assert_eq!(names.node_netns("Node1").expect("short"), "sl-t1-node1");
        assert_eq!(
            names.pod_netns("node1", "default", "pod.a").expect("short"),
            "sl-t1-node1-default-pod-a"
        );
        assert!(names.pod_netns("n", "ns", &"p".repeat(300)).is_err());
    }

    #[test]
    fn container_ids_are_unique_per_instance_and_pod() {
        let a = Names::new("a");
        assert_eq!(a.container_id("default", "p").len(), 32);
        assert_ne!(
            a.container_id("default", "p"),
            a.container_id("default", "q")
        );
        assert_ne!(
            a.container_id("default", "p"),
            Names::new("b").container_id("default", "p")
        );
    }
}
