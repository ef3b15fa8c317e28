//! Scaled-down `sluice-perf scale-api` (100 Services, 1,000 endpoints, 10 policies): the
//! measurement is consistent. No root needed: fake API server, source and translation in this
//! process.

use std::time::Duration;

use perf::scale_api::{run_scale_api, ScaleApiOptions, Summary, UpdateKind};

fn ordered(name: &str, s: &Summary, n: usize) {
    assert_eq!(s.n, n, "{name}: samples");
    assert!(s.p50_us > 0.0, "{name}: p50 {} must be > 0", s.p50_us);
    assert!(
        s.p50_us <= s.p99_us,
        "{name}: p50 {} > p99 {}",
        s.p50_us,
        s.p99_us
    );
    assert!(
        s.p99_us <= s.max_us,
        "{name}: p99 {} > max {}",
        s.p99_us,
        s.max_us
    );
}

#[test]
fn small_cluster_syncs_translates_and_measures_updates() {
    let opts = ScaleApiOptions {
        nodes: 5,
        namespaces: 4,
        services: 100,
        endpoints: 1_000,
        policies: 10,
        updates: 12,
        batch_windows_ms: vec![30, 0],
        maglev_table_size: 251,
        sync_timeout: Duration::from_secs(60),
        update_timeout: Duration::from_secs(20),
    };
    let report = run_scale_api(&opts, &mut |line| eprintln!("{line}")).expect("benchmark runs");
    eprintln!("{}", report.to_text());

    let g = report.generated;
    assert_eq!(
        (
            g.nodes,
            g.namespaces,
            g.services,
            g.endpoints,
            g.pods,
            g.network_policies
        ),
        (5, 4, 100, 1_000, 1_000, 10)
    );
    // Service 0 and 50 are big (over 100 endpoints: two slices each).
    assert_eq!(g.endpoint_slices, 102);
    assert_eq!(report.passes.len(), 2);
    for pass in &report.passes {
        let w = pass.batch_window_ms;
        let f = &pass.first_sync;
        assert_eq!(
            f.counts, g,
            "window {w}: the first state holds every served object"
        );
        assert!(f.source_us > 0.0 && f.translation.services_translate_us > 0.0);
        assert!(f.translation.service_table_rebuilt && f.translation.policy_changed);
        assert!(f.total_tables_us >= f.source_us + f.translation.policy_compile_us);
        // 100 http ports + 25 grpc ports, each with backends: one Maglev table each (plus
        // local rotations of externalTrafficPolicy: Local services with a local backend).
        assert_eq!(f.sizes.service_ports, 125);
        assert!(f.sizes.maglev_tables >= 125);
        assert_eq!(
            f.sizes.table_maglev_bytes,
            f.sizes.maglev_tables as u64 * 251 * 2
        );
        // Distinct arrays: at most one per rotation, at least one per distinct backend set.
        assert!(
            f.sizes.distinct_maglev_bytes > 0
                && f.sizes.distinct_maglev_bytes <= f.sizes.table_maglev_bytes,
            "{:?}",
            f.sizes
        );
        assert!(
            f.sizes.backends > 1_000,
            "every endpoint backs http, some grpc too: {}",
            f.sizes.backends
        );
        assert!(f.sizes.isolated_pods > 0, "some policy selects a local pod");
        assert!(f.memory_after_translation.rss_kib > 0);
        assert_eq!(
            pass.spurious_states, 0,
            "window {w}: a state without a change"
        );

        assert_eq!(pass.updates.len(), 12);
        for (u, s) in pass.updates.iter().enumerate() {
            assert!(
                0.0 < s.seen_us && s.seen_us <= s.state_us && s.state_us < s.tables_us,
                "window {w} update {u}: apply {:?} -> seen {} -> state {} -> tables {} out of order",
                s.kind,
                s.seen_us,
                s.state_us,
                s.tables_us
            );
            assert!(s.with_checkpoint_us > s.tables_us);
            match s.kind {
                UpdateKind::EndpointAdded => assert!(
                    s.translation.service_table_rebuilt && !s.translation.policy_changed,
                    "window {w} update {u}: an endpoint changes services only"
                ),
                // The table only holds rules of this node's pods: a policy selecting none of
                // them changes nothing (checked over the pass below).
                UpdateKind::PolicyChanged => assert!(
                    !s.translation.service_table_rebuilt,
                    "window {w} update {u}: a policy port changes no service"
                ),
                UpdateKind::PodLabel => assert!(!s.translation.service_table_rebuilt),
            }
        }
        assert!(
            pass.updates
                .iter()
                .any(|s| s.kind == UpdateKind::PolicyChanged && s.translation.policy_changed),
            "window {w}: no policy update changed this node's policy table"
        );
        for (name, s) in [
            ("seen", &pass.all.seen),
            ("state", &pass.all.state),
            ("translation", &pass.all.translation),
            ("tables", &pass.all.tables),
            ("checkpoint", &pass.all.checkpoint),
        ] {
            ordered(&format!("window {w} {name}"), s, 12);
        }
        assert_eq!(pass.by_kind.len(), 3);
        assert!(pass.by_kind.values().all(|k| k.state.n == 4));
    }
    // The 30 ms window delays every state by at least the window after the change was seen.
    let windowed = &report.passes[0].all.seen_to_state;
    assert!(
        windowed.p50_us >= 30_000.0,
        "30 ms window: seen -> State p50 {} µs",
        windowed.p50_us
    );
    let unbatched = &report.passes[1].all.seen_to_state;
    assert!(
        unbatched.p50_us < windowed.p50_us,
        "no window ({} µs) is not faster than 30 ms ({} µs)",
        unbatched.p50_us,
        windowed.p50_us
    );
}
