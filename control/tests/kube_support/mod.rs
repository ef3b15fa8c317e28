//! Helpers shared by the `KubeSource` test binaries (`kube_source`, `kube_tls`).

use std::time::{Duration, Instant};

use control::kube::{ApiHealth, KubeSource};

/// Polls [`KubeSource::health`] until `done` holds; fails the test after `limit`.
pub fn health_where(
    source: &KubeSource,
    limit: Duration,
    done: impl Fn(&ApiHealth) -> bool,
) -> ApiHealth {
    let deadline = Instant::now() + limit;
    loop {
        let health = source.health();
        if done(&health) {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "health not reached within {limit:?}: {health:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
