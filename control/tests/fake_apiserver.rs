//! The in-process API server (`control::kube::fake`) against the real kube-rs client: paging,
//! watches (ADDED/MODIFIED/DELETED, bookmarks, timeouts, 410), `kube::runtime::watcher` relisting
//! after a compaction and resuming after dropped streams, a slow server, a server that is down,
//! objects that fail typed decoding, node PATCHes, discovery, and the `/fake/` control endpoints.
//! No root needed; every await is under a timeout.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use control::kube::fake::{cluster_objects, FakeApi, Kind, Verb};
use control::policy::HostNetworkPolicy;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use serde_json::{json, Value};

/// Longest any single test step may take.
const STEP: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `fut` on a fresh runtime, failing the test if it takes longer than `limit`.
fn run<F: Future<Output = ()>>(limit: Duration, fut: F) {
    runtime().block_on(async {
        tokio::time::timeout(limit, fut)
            .await
            .expect("test step timed out");
    });
}

fn start() -> FakeApi {
    FakeApi::start("127.0.0.1:0").expect("fake API server starts")
}

fn client(api: &FakeApi) -> kube::Client {
    let url = api.url().parse().expect("fake API url parses");
    kube::Client::try_from(kube::Config::new(url)).expect("kube client")
}

fn pod(name: &str, node: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.1.1.5"},
    })
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.1.1.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
    })
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect()
}

fn api_status(err: &kube::Error) -> Option<(u16, String)> {
    match err {
        kube::Error::Api(s) => Some((s.code, s.reason.clone())),
        _ => None,
    }
}

/// Next watch event, or panic after `STEP`.
async fn next_event<S>(stream: &mut S) -> WatchEvent<Pod>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin,
{
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("a watch event within the step time")
        .expect("the watch stream is still open")
        .expect("the watch event decodes")
}

#[test]
fn list_pages_through_a_consistent_snapshot() {
    let fake = start();
    for i in 0..25 {
        fake.apply(pod(&format!("p{i:02}"), "n1", "web"))
            .expect("pod applies");
    }
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let first = pods
            .list(&ListParams::default().limit(10))
            .await
            .expect("first page");
        assert_eq!(first.items.len(), 10);
        let token = first.metadata.continue_.clone().expect("a continue token");
        let rv = first.metadata.resource_version.clone();
        // Changes between pages do not show in the paged list (one snapshot, as etcd serves).
        fake.delete(Kind::Pod, Some("default"), "p24")
            .expect("p24 exists");
        fake.apply(pod("p99", "n1", "web")).expect("pod applies");
        let mut all = names(&first.items);
        let mut token = Some(token);
        while let Some(t) = token {
            let page = pods
                .list(&ListParams::default().limit(10).continue_token(&t))
                .await
                .expect("next page");
            assert_eq!(
                page.metadata.resource_version, rv,
                "pages share one version"
            );
            all.extend(names(&page.items));
            token = page.metadata.continue_.filter(|c| !c.is_empty());
        }
        let expected: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
        assert_eq!(all, expected);
        assert_eq!(fake.request_count(Kind::Pod, Verb::List), 3);
        // A fresh list sees the changes.
        let now = pods.list(&ListParams::default()).await.expect("list");
        assert_eq!(now.items.len(), 25);
        assert!(names(&now.items).contains(&"p99".to_owned()));
        assert!(!names(&now.items).contains(&"p24".to_owned()));
    });
}

#[test]
fn selectors_filter_lists() {
    let fake = start();
    fake.apply(pod("a", "n1", "web")).expect("applies");
    fake.apply(pod("b", "n2", "web")).expect("applies");
    fake.apply(pod("c", "n1", "db")).expect("applies");
    let mut other_ns = pod("d", "n1", "web");
    other_ns["metadata"]["namespace"] = json!("kube-system");
    fake.apply(other_ns).expect("applies");
    run(STEP, async {
        let client = client(&fake);
        let all: Api<Pod> = Api::all(client.clone());
        let default: Api<Pod> = Api::namespaced(client, "default");
        let list = |api: Api<Pod>, lp: ListParams| async move {
            names(&api.list(&lp).await.expect("list").items)
        };
        assert_eq!(
            list(all.clone(), ListParams::default().labels("app=web")).await,
            ["a", "b", "d"]
        );
        assert_eq!(
            list(all.clone(), ListParams::default().labels("app!=web")).await,
            ["c"]
        );
        assert_eq!(
            list(
                all.clone(),
                ListParams::default().fields("spec.nodeName=n1")
            )
            .await,
            ["a", "c", "d"]
        );
        assert_eq!(
            list(
                default.clone(),
                ListParams::default()
                    .fields("spec.nodeName=n1")
                    .labels("app")
            )
            .await,
            ["a", "c"]
        );
        assert_eq!(
            list(default.clone(), ListParams::default().labels("!app")).await,
            Vec::<String>::new()
        );
        let bad = default
            .list(&ListParams::default().fields("spec.hostname=x"))
            .await
            .expect_err("unsupported field selector refused");
        assert_eq!(api_status(&bad).map(|s| s.0), Some(400));
    });
}

#[test]
fn continue_token_after_compaction_is_410_expired() {
    let fake = start();
    for i in 0..5 {
        fake.apply(pod(&format!("p{i}"), "n1", "web"))
            .expect("applies");
    }
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let first = pods
            .list(&ListParams::default().limit(2))
            .await
            .expect("first page");
        let token = first.metadata.continue_.expect("a continue token");
        fake.compact();
        let err = pods
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .expect_err("token from before the compaction expired");
        assert_eq!(api_status(&err), Some((410, "Expired".to_owned())));
    });
}

#[test]
fn watch_streams_added_modified_deleted_and_bookmarks() {
    let fake = start();
    fake.set_bookmark_interval(Duration::from_millis(200));
    fake.apply(pod("old", "n1", "web")).expect("applies");
    let start_rv = fake.resource_version();
    run(STEP, async {
        let pods: Api<Pod> = Api::namespaced(client(&fake), "default");
        let mut stream = pods
            .watch(&WatchParams::default().timeout(30), &start_rv.to_string())
            .await
            .expect("watch starts")
            .boxed();
        let rv_added = fake.apply(pod("web", "n1", "web")).expect("applies");
        match next_event(&mut stream).await {
            WatchEvent::Added(p) => {
                assert_eq!(p.metadata.name.as_deref(), Some("web"));
                assert_eq!(p.metadata.resource_version, Some(rv_added.to_string()));
                assert!(p.metadata.uid.is_some() && p.metadata.creation_timestamp.is_some());
            }
            other => panic!("expected ADDED, got {other:?}"),
        }
        fake.apply(pod("web", "n2", "web")).expect("applies");
        match next_event(&mut stream).await {
            WatchEvent::Modified(p) => {
                assert_eq!(p.spec.and_then(|s| s.node_name).as_deref(), Some("n2"))
            }
            other => panic!("expected MODIFIED, got {other:?}"),
        }
        // An update that changes nothing emits nothing: the next event is the deletion.
        fake.apply(pod("web", "n2", "web")).expect("applies");
        let rv_deleted = fake
            .delete(Kind::Pod, Some("default"), "web")
            .expect("deletes");
        loop {
            match next_event(&mut stream).await {
                WatchEvent::Deleted(p) => {
                    assert_eq!(p.metadata.resource_version, Some(rv_deleted.to_string()));
                    break;
                }
                WatchEvent::Bookmark(_) => {}
                other => panic!("expected DELETED, got {other:?}"),
            }
        }
        // Bookmarks carry the latest version.
        loop {
            if let WatchEvent::Bookmark(b) = next_event(&mut stream).await {
                assert_eq!(b.metadata.resource_version, rv_deleted.to_string());
                break;
            }
        }
    });
    assert_eq!(fake.request_count(Kind::Pod, Verb::Watch), 1);
}

#[test]
fn watch_with_selector_sees_objects_enter_and_leave() {
    let fake = start();
    fake.apply(pod("web", "n1", "web")).expect("applies");
    let rv = fake.resource_version();
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let wp = WatchParams::default()
            .labels("app=web")
            .timeout(30)
            .disable_bookmarks();
        let mut stream = pods
            .watch(&wp, &rv.to_string())
            .await
            .expect("watch")
            .boxed();
        fake.apply(pod("web", "n1", "db")).expect("applies");
        assert!(matches!(
            next_event(&mut stream).await,
            WatchEvent::Deleted(_)
        ));
        fake.apply(pod("other", "n1", "db")).expect("applies");
        fake.apply(pod("web", "n1", "web")).expect("applies");
        match next_event(&mut stream).await {
            WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("web")),
            other => panic!("expected ADDED of web, got {other:?}"),
        }
    });
}

#[test]
fn watch_from_compacted_version_gets_410_error_event_and_timeout_ends_stream() {
    let fake = start();
    fake.apply(pod("a", "n1", "web")).expect("applies");
    let old = fake.resource_version();
    fake.apply(pod("b", "n1", "web")).expect("applies");
    fake.compact();
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let mut stream = pods
            .watch(&WatchParams::default().timeout(30), &old.to_string())
            .await
            .expect("watch starts (the 410 comes as an event)")
            .boxed();
        match next_event(&mut stream).await {
            WatchEvent::Error(e) => assert_eq!(e.code, 410),
            other => panic!("expected ERROR 410, got {other:?}"),
        }
        // From the current version it works, and ends after timeoutSeconds.
        let started = Instant::now();
        let mut stream = pods
            .watch(
                &WatchParams::default().timeout(1).disable_bookmarks(),
                &fake.resource_version().to_string(),
            )
            .await
            .expect("watch starts")
            .boxed();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream ends within its timeout");
        assert!(end.is_none(), "no events, just the end: {end:?}");
        assert!(started.elapsed() >= Duration::from_millis(900));
    });
}

/// What a watcher consumer keeps: names of live pods, and whether the first sync is done.
#[derive(Default)]
struct Mirror {
    names: BTreeSet<String>,
    buffer: BTreeSet<String>,
    synced: bool,
}

impl Mirror {
    fn apply(&mut self, event: watcher::Event<Pod>) {
        let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => self.buffer.clear(),
            watcher::Event::InitApply(p) => {
                self.buffer.insert(name(&p));
            }
            watcher::Event::InitDone => {
                self.names = std::mem::take(&mut self.buffer);
                self.synced = true;
            }
            watcher::Event::Apply(p) => {
                self.names.insert(name(&p));
            }
            watcher::Event::Delete(p) => {
                self.names.remove(&name(&p));
            }
        }
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Feeds `stream` into `mirror` until `done(mirror)`; errors are tolerated (the watcher retries).
async fn until<S>(stream: &mut S, mirror: &mut Mirror, done: impl Fn(&Mirror) -> bool)
where
    S: futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + STEP;
    while !done(mirror) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) => mirror.apply(event),
            Ok(Some(Err(_))) => {}
            Ok(None) => panic!("watcher stream ended"),
            Err(_) => panic!(
                "watcher did not reach the expected state in time; has {:?}",
                mirror.names
            ),
        }
    }
}

/// Polls `stream` (applying events to `mirror`) until `cond()` holds.
async fn pump_until<S>(stream: &mut S, mirror: &mut Mirror, cond: impl Fn() -> bool)
where
    S: futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    let deadline = Instant::now() + STEP;
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        if let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_millis(20), stream.next()).await
        {
            mirror.apply(event);
        }
    }
}

#[test]
fn watcher_relists_after_compaction_and_ends_with_the_right_objects() {
    let fake = start();
    for name in ["a", "b", "c"] {
        fake.apply(pod(name, "n1", "web")).expect("applies");
    }
    run(STEP * 2, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let mut stream = watcher(pods, watcher::Config::default().timeout(30))
            .default_backoff()
            .boxed();
        let mut mirror = Mirror::default();
        until(&mut stream, &mut mirror, |m| m.synced).await;
        assert_eq!(mirror.names, set(&["a", "b", "c"]));
        let lists_before = fake.request_count(Kind::Pod, Verb::List);
        // An outage during which objects change and the history is compacted: the resumed
        // watch is too old (410) and the watcher must relist.
        fake.set_down(true);
        fake.delete(Kind::Pod, Some("default"), "a")
            .expect("deletes");
        fake.apply(pod("d", "n1", "web")).expect("applies");
        fake.compact();
        fake.set_down(false);
        until(&mut stream, &mut mirror, |m| {
            m.names == set(&["b", "c", "d"])
        })
        .await;
        assert!(
            fake.request_count(Kind::Pod, Verb::List) > lists_before,
            "a relist happened"
        );
        // And it keeps following changes after the relist.
        fake.apply(pod("e", "n1", "web")).expect("applies");
        until(&mut stream, &mut mirror, |m| m.names.contains("e")).await;
    });
}

#[test]
fn watcher_resumes_dropped_watch_streams_without_relisting() {
    let fake = start();
    fake.apply(pod("a", "n1", "web")).expect("applies");
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let mut stream = watcher(pods, watcher::Config::default().timeout(30))
            .default_backoff()
            .boxed();
        let mut mirror = Mirror::default();
        until(&mut stream, &mut mirror, |m| m.synced).await;
        let lists = fake.request_count(Kind::Pod, Verb::List);
        let watches = fake.request_count(Kind::Pod, Verb::Watch);
        for round in 0..3 {
            // Drive the watcher until its watch request is open, then cut it.
            pump_until(&mut stream, &mut mirror, || fake.open_watches() == 1).await;
            fake.drop_watches();
            let name = format!("after-drop-{round}");
            fake.apply(pod(&name, "n1", "web")).expect("applies");
            until(&mut stream, &mut mirror, |m| m.names.contains(&name)).await;
        }
        assert_eq!(mirror.names.len(), 4);
        assert_eq!(
            fake.request_count(Kind::Pod, Verb::List),
            lists,
            "resumed from the last version, no relist"
        );
        assert!(fake.request_count(Kind::Pod, Verb::Watch) >= watches + 3);
    });
}

#[test]
fn slow_server_still_syncs() {
    let fake = start();
    fake.set_delay(Duration::from_millis(400));
    for name in ["a", "b"] {
        fake.apply(pod(name, "n1", "web")).expect("applies");
    }
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let started = Instant::now();
        pods.list(&ListParams::default()).await.expect("list");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "the delay applies"
        );
        let mut stream = watcher(pods, watcher::Config::default().timeout(30))
            .default_backoff()
            .boxed();
        let mut mirror = Mirror::default();
        until(&mut stream, &mut mirror, |m| m.synced).await;
        assert_eq!(mirror.names, set(&["a", "b"]));
        fake.apply(pod("c", "n1", "web")).expect("applies");
        until(&mut stream, &mut mirror, |m| m.names.contains("c")).await;
    });
}

#[test]
fn down_server_fails_requests_and_recovers() {
    let fake = start();
    fake.apply(pod("a", "n1", "web")).expect("applies");
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let mut stream = pods
            .watch(&WatchParams::default().timeout(30).disable_bookmarks(), "1")
            .await
            .expect("watch starts")
            .boxed();
        fake.set_down(true);
        // The open watch ends (error or end of stream), it does not hang.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        assert!(ended.is_ok(), "the watch ended when the server went down");
        let err = pods
            .list(&ListParams::default())
            .await
            .expect_err("down server answers nothing");
        assert!(
            api_status(&err).is_none(),
            "a transport error, not a Status: {err}"
        );
        fake.set_down(false);
        let list = pods.list(&ListParams::default()).await.expect("back up");
        assert_eq!(names(&list.items), ["a"]);
    });
}

#[test]
fn bad_objects_reach_the_client_as_json_that_fails_typed_decoding() {
    let fake = start();
    fake.apply(pod("good", "n1", "web")).expect("applies");
    // Wrong type, a missing required field, an unknown enum value.
    let mut wrong_type = pod("wrong-type", "n1", "web");
    wrong_type["spec"]["containers"] = json!("not a list");
    let mut missing_field = pod("missing-field", "n1", "web");
    missing_field["spec"]["containers"] = json!([{"image": "busybox"}]);
    let mut wrong_port = pod("wrong-port-type", "n1", "web");
    wrong_port["spec"]["containers"][0]["ports"] = json!([{"containerPort": "eighty"}]);
    let mut unknown_enum = pod("unknown-enum", "n1", "web");
    unknown_enum["spec"]["restartPolicy"] = json!("Sometimes");
    let start_rv = fake.resource_version();
    fake.insert_raw(Kind::Pod, wrong_type);
    fake.insert_raw(Kind::Pod, missing_field);
    fake.insert_raw(Kind::Pod, unknown_enum);
    fake.insert_raw(Kind::Pod, wrong_port);
    run(STEP, async {
        let client = client(&fake);
        // A typed list cannot decode the page: the caller must list untyped and skip.
        let typed: Api<Pod> = Api::all(client.clone());
        let err = typed
            .list(&ListParams::default())
            .await
            .expect_err("typed decoding of the page fails");
        assert!(matches!(err, kube::Error::SerdeError(_)), "{err}");
        let untyped: Api<DynamicObject> =
            Api::all_with(client.clone(), &ApiResource::erase::<Pod>(&()));
        let list = untyped
            .list(&ListParams::default())
            .await
            .expect("untyped list");
        assert_eq!(list.items.len(), 5);
        let mut decoded = Vec::new();
        let mut refused = Vec::new();
        for item in list.items {
            let name = item.metadata.name.clone().unwrap_or_default();
            let value = serde_json::to_value(&item).expect("re-encodes");
            match serde_json::from_value::<Pod>(value) {
                Ok(_) => decoded.push(name),
                Err(_) => refused.push(name),
            }
        }
        // k8s-openapi keeps enum-like fields as strings and defaults missing required fields:
        // those decode, and must be caught by the caller's own checks.
        assert_eq!(decoded, ["good", "missing-field", "unknown-enum"]);
        assert_eq!(refused, ["wrong-port-type", "wrong-type"]);
        // Watches deliver the raw objects too.
        let mut stream = untyped
            .watch(
                &WatchParams::default().timeout(30).disable_bookmarks(),
                &start_rv.to_string(),
            )
            .await
            .expect("watch")
            .boxed();
        let event = tokio::time::timeout(STEP, stream.try_next())
            .await
            .expect("an event in time")
            .expect("decodes as a dynamic object")
            .expect("an event");
        match event {
            WatchEvent::Added(o) => {
                assert_eq!(o.metadata.name.as_deref(), Some("wrong-type"));
                assert_eq!(o.data["spec"]["containers"], json!("not a list"));
            }
            other => panic!("expected ADDED, got {other:?}"),
        }
    });
}

#[test]
fn node_patches_merge_and_are_recorded() {
    let fake = start();
    fake.apply(node("n1")).expect("applies");
    run(STEP, async {
        let nodes: Api<Node> = Api::all(client(&fake));
        let before = nodes.get("n1").await.expect("get");
        let patch =
            json!({"metadata": {"annotations": {"sluice.io/wireguard-public-key": "KEY1"}}});
        let patched = nodes
            .patch("n1", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("merge patch");
        let annotations = patched.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations["sluice.io/wireguard-public-key"], "KEY1");
        assert_eq!(
            patched.metadata.labels, before.metadata.labels,
            "labels kept"
        );
        assert_eq!(patched.metadata.uid, before.metadata.uid, "identity kept");
        assert_ne!(
            patched.metadata.resource_version,
            before.metadata.resource_version
        );
        let strategic = json!({"metadata": {"annotations": {"x": "y"}}});
        nodes
            .patch("n1", &PatchParams::default(), &Patch::Strategic(&strategic))
            .await
            .expect("strategic patch treated as merge");
        let apply = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "annotations": {"sluice.io/wireguard-public-key": "KEY2"}}});
        nodes
            .patch("n1", &PatchParams::apply("sluice"), &Patch::Apply(&apply))
            .await
            .expect("apply patch treated as merge");
        let err = nodes
            .patch("missing", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect_err("no such node");
        assert_eq!(api_status(&err).map(|s| s.0), Some(404));
        let err = nodes.get("missing").await.expect_err("no such node");
        assert_eq!(api_status(&err), Some((404, "NotFound".to_owned())));
    });
    let stored = fake.get(Kind::Node, None, "n1").expect("stored");
    assert_eq!(
        stored["metadata"]["annotations"],
        json!({"sluice.io/wireguard-public-key": "KEY2", "x": "y"})
    );
    let patches = fake.patches();
    assert_eq!(patches.len(), 4);
    assert_eq!(patches[0].content_type, "application/merge-patch+json");
    assert_eq!(patches[0].name, "n1");
    assert_eq!(patches[0].status, 200);
    assert_eq!(patches[3].status, 404);
    assert_eq!(fake.request_count(Kind::Node, Verb::Patch), 4);
}

#[test]
fn cluster_state_objects_are_served_with_discovery() {
    let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDR: 10.1.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: ssh-only}
spec: {ingress: []}
"#;
    let state = control::cluster::parse_str(yaml, "test.yaml").expect("cluster parses");
    let fake = start();
    fake.sync(cluster_objects(&state).expect("objects"))
        .expect("syncs");
    let rv = fake.resource_version();
    // Syncing the same objects again changes nothing.
    fake.sync(cluster_objects(&state).expect("objects"))
        .expect("syncs");
    assert_eq!(fake.resource_version(), rv);
    run(STEP, async {
        let client = client(&fake);
        let hnp: Api<HostNetworkPolicy> = Api::all(client.clone());
        let list = hnp.list(&ListParams::default()).await.expect("list");
        assert_eq!(list.items.len(), 1);
        assert_eq!(list.items[0].metadata.name.as_deref(), Some("ssh-only"));
        let nodes: Api<Node> = Api::all(client.clone());
        assert_eq!(
            nodes
                .list(&ListParams::default())
                .await
                .expect("list")
                .items
                .len(),
            1
        );
        let version = client.apiserver_version().await.expect("version");
        assert_eq!(
            (version.major.as_str(), version.minor.as_str()),
            ("1", "33")
        );
        let groups = client.list_api_groups().await.expect("groups");
        let group_names: BTreeSet<String> = groups.groups.iter().map(|g| g.name.clone()).collect();
        assert_eq!(
            group_names,
            set(&["discovery.k8s.io", "networking.k8s.io", "policy.sluice.io"])
        );
        let core = client.list_core_api_resources("v1").await.expect("core");
        assert!(core
            .resources
            .iter()
            .any(|r| r.name == "pods" && r.namespaced));
        let hnp_res = client
            .list_api_group_resources("policy.sluice.io/v1alpha1")
            .await
            .expect("group resources");
        assert_eq!(hnp_res.resources[0].name, "hostnetworkpolicies");
        assert!(!hnp_res.resources[0].namespaced);
    });
    // Syncing a state without the policy deletes it.
    let mut smaller = state.clone();
    smaller.host_policies.clear();
    fake.sync(cluster_objects(&smaller).expect("objects"))
        .expect("syncs");
    assert!(fake.objects(Kind::HostNetworkPolicy).is_empty());
    assert_eq!(fake.objects(Kind::Node).len(), 1);
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body as JSON).
fn http(fake: &FakeApi, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, raw) = http_raw(fake, method, path, body);
    (status, serde_json::from_str(&raw).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, raw body).
fn http_raw(fake: &FakeApi, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(fake.addr()).expect("connects");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("writes");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("reads");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

#[test]
fn control_endpoints_drive_the_server() {
    let fake = start();
    let list = json!({"kind": "List", "items": [pod("a", "n1", "web"), node("n1")]});
    assert_eq!(http(&fake, "POST", "/fake/apply", &list.to_string()).0, 200);
    assert!(fake.get(Kind::Pod, Some("default"), "a").is_some());
    assert!(fake.get(Kind::Node, None, "n1").is_some());
    let (code, body) = http(
        &fake,
        "POST",
        "/fake/apply",
        r#"{"kind":"Deployment","apiVersion":"apps/v1","metadata":{"name":"x"}}"#,
    );
    assert_eq!(code, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("not served"),
        "{body}"
    );
    assert_eq!(
        http(
            &fake,
            "POST",
            "/fake/insert-raw?kind=Pod",
            r#"{"metadata":{"name":"raw"},"spec":7}"#
        )
        .0,
        200
    );
    assert_eq!(
        fake.get(Kind::Pod, None, "raw"),
        None,
        "raw pod has no namespace"
    );
    assert_eq!(fake.objects(Kind::Pod).len(), 2);
    assert_eq!(
        http(
            &fake,
            "POST",
            "/fake/delete?kind=Pod&namespace=default&name=a",
            ""
        )
        .0,
        200
    );
    assert_eq!(
        http(
            &fake,
            "POST",
            "/fake/delete?kind=Pod&namespace=default&name=a",
            ""
        )
        .0,
        404
    );
    // Down: Kubernetes paths get a closed connection, control paths still answer.
    assert_eq!(http(&fake, "POST", "/fake/down?on=true", "").0, 200);
    assert_eq!(
        http(&fake, "GET", "/api/v1/pods", "").0,
        0,
        "no response while down"
    );
    assert_eq!(http(&fake, "POST", "/fake/down?on=false", "").0, 200);
    let (code, body) = http(&fake, "GET", "/api/v1/pods", "");
    assert_eq!(code, 200);
    assert_eq!(body["kind"], "PodList");
    assert_eq!(body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(http(&fake, "POST", "/fake/delay?ms=300", "").0, 200);
    let started = Instant::now();
    assert_eq!(http(&fake, "GET", "/api/v1/nodes/n1", "").0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(http(&fake, "POST", "/fake/delay?ms=0", "").0, 200);
    assert_eq!(http(&fake, "POST", "/fake/compact", "").0, 200);
    // A watch from before the compaction: a 200 chunked stream with one ERROR 410 event.
    let (code, body) = http_raw(
        &fake,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=1",
        "",
    );
    assert_eq!(code, 200);
    assert!(
        body.contains(r#""type":"ERROR""#) && body.contains(r#""code":410"#),
        "{body}"
    );
    assert!(
        body.ends_with("0\r\n\r\n"),
        "the stream ends cleanly: {body:?}"
    );
    assert_eq!(http(&fake, "POST", "/fake/drop-watches", "").0, 200);
    let (code, body) = http(&fake, "GET", "/fake/counters", "");
    assert_eq!(code, 200);
    let counters = body["counters"].as_array().cloned().unwrap_or_default();
    assert!(counters
        .iter()
        .any(|c| c["kind"] == "Pod" && c["verb"] == "list" && c["count"] == 1));
    assert_eq!(
        http(&fake, "GET", "/fake/patches", "").1,
        json!({"patches": []})
    );
    assert_eq!(http(&fake, "GET", "/fake/nope", "").0, 404);
    assert_eq!(http(&fake, "DELETE", "/api/v1/nodes/n1", "").0, 405);
}

#[test]
fn drop_stops_the_server_and_its_open_watches() {
    let fake = start();
    let addr = fake.addr();
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    s.write_all(b"GET /api/v1/pods?watch=true HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("writes");
    let deadline = Instant::now() + STEP;
    while fake.open_watches() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fake.open_watches(), 1);
    let started = Instant::now();
    drop(fake);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drop is bounded"
    );
    // The open watch is closed by the drop: the read ends (EOF or reset) instead of timing out.
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    if let Err(e) = s.read_to_end(&mut rest) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the watch connection stayed open after the drop"
        );
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "nothing listens any more"
    );
}

#[test]
fn silent_watch_notices_a_client_that_went_away() {
    let fake = start();
    fake.set_bookmark_interval(Duration::from_millis(50));
    let wait_for = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while fake.open_watches() != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        fake.open_watches()
    };
    let mut s = TcpStream::connect(fake.addr()).expect("connects");
    // No bookmarks and no events: the server never writes to this stream.
    s.write_all(b"GET /api/v1/pods?watch=true&resourceVersion=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("writes");
    assert_eq!(wait_for(1), 1, "the watch is open");
    drop(s);
    assert_eq!(wait_for(0), 0, "the server noticed the client left");
}

#[test]
fn injected_errors_and_unserved_kinds() {
    let fake = start();
    fake.apply(pod("a", "n1", "web")).expect("applies");
    run(STEP, async {
        let client = client(&fake);
        let pods: Api<Pod> = Api::all(client.clone());
        // 500 is not retried by kube's client: the Status reaches the caller.
        fake.set_error_status(Some(500));
        let err = pods
            .list(&ListParams::default())
            .await
            .expect_err("500 injected");
        assert_eq!(api_status(&err), Some((500, "InternalError".to_owned())));
        // 503 is retried by kube's client itself (its default retry layer): the list succeeds
        // once the server recovers, after more than one request.
        let lists = fake.request_count(Kind::Pod, Verb::List);
        fake.set_error_status(Some(503));
        let recover = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            fake.set_error_status(None);
        };
        let lp = ListParams::default();
        let (list, ()) = tokio::join!(pods.list(&lp), recover);
        assert_eq!(list.expect("retried until served").items.len(), 1);
        assert!(fake.request_count(Kind::Pod, Verb::List) >= lists + 2);
        let hnp: Api<HostNetworkPolicy> = Api::all(client.clone());
        fake.set_served(Kind::HostNetworkPolicy, false);
        let err = hnp
            .list(&ListParams::default())
            .await
            .expect_err("CRD not installed");
        assert_eq!(api_status(&err).map(|s| s.0), Some(404));
        let groups = client.list_api_groups().await.expect("groups");
        assert!(!groups.groups.iter().any(|g| g.name == "policy.sluice.io"));
        fake.set_served(Kind::HostNetworkPolicy, true);
        assert!(hnp
            .list(&ListParams::default())
            .await
            .expect("served")
            .items
            .is_empty());
    });
}

#[test]
fn watcher_with_streaming_lists_syncs_from_initial_events() {
    let fake = start();
    for name in ["a", "b"] {
        fake.apply(pod(name, "n1", "web")).expect("applies");
    }
    run(STEP, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let config = watcher::Config::default().timeout(30).streaming_lists();
        let mut stream = watcher(pods, config).default_backoff().boxed();
        let mut mirror = Mirror::default();
        // InitDone only comes with the bookmark annotated k8s.io/initial-events-end.
        until(&mut stream, &mut mirror, |m| m.synced).await;
        assert_eq!(mirror.names, set(&["a", "b"]));
        assert_eq!(
            fake.request_count(Kind::Pod, Verb::List),
            0,
            "no list at all"
        );
        fake.apply(pod("c", "n1", "web")).expect("applies");
        until(&mut stream, &mut mirror, |m| m.names.contains("c")).await;
    });
}

#[test]
fn watcher_pages_through_thousands_of_objects() {
    let fake = start();
    let objects: Vec<Value> = (0..5000)
        .map(|i| pod(&format!("p{i:05}"), "n1", "web"))
        .collect();
    fake.sync(objects).expect("syncs");
    run(STEP * 2, async {
        let pods: Api<Pod> = Api::all(client(&fake));
        let config = watcher::Config::default().timeout(30).page_size(500);
        let mut stream = watcher(pods, config).default_backoff().boxed();
        let mut mirror = Mirror::default();
        until(&mut stream, &mut mirror, |m| m.synced).await;
        assert_eq!(mirror.names.len(), 5000);
        assert_eq!(
            fake.request_count(Kind::Pod, Verb::List),
            10,
            "10 pages of 500"
        );
    });
}
