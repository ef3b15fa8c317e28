//! Cluster state from Kubernetes objects (being written).
