//! sluice's control side: the agent (`sluice run`), its local API, the CNI plugin (`sluice-cni`)
//! and the compiler from Kubernetes objects to the dataplane's immutable `Snapshot`.
//!
//! ```text
//!  cluster file / API server --> cluster::ClusterState --> agent --(Snapshot, arc-swap)--> workers
//!  sluice-cni --(api: EndpointAdd/Del)--> agent            sluice status --(api: Status)--> agent
//!  policy: NetworkPolicy/HostNetworkPolicy --compile--> PolicyTable (in the Snapshot);
//!          sluice policy trace --(api: PolicyTrace)--> agent --> policy::reference explanation
//! ```
pub mod agent;
pub mod api;
pub mod cluster;
pub mod cni;
pub mod handover;
pub mod hostfw;
pub mod kube;
pub mod metrics;
pub mod overlay;
pub mod policy;
pub mod services;
pub mod status;
pub mod wg;
pub mod wg_runtime;

/// `HashMap` with a fast, seeded hasher (foldhash), for the caches' pointer and address keys;
/// the control plane's per-state passes over 100,000 objects hash each one or more times.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set of [`FastMap`].
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
