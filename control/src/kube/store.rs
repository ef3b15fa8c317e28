//! The per-kind stores and the batching rule, without I/O: watcher events in, complete
//! [`ClusterState`]s out.
//!
//! Each kind has a store of decoded objects. A (re)list (`Init`, `InitApply`..., `InitDone`)
//! fills a separate buffer that replaces the store at `InitDone`, so a relist after an outage or
//! a 410 prunes exactly what is gone, at once, and a half-finished relist is never visible.
//! Watch events (`Apply`, `Delete`) change the store directly.
//!
//! A state is due `batch` after the first change that is not yet sent, and only once every kind
//! has finished its first list. Changes that leave a store equal (a relist that finds the same
//! objects, an update to the same content) do not count as changes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ::kube::runtime::watcher::Event;

use super::object::{decode, label, Key, Kind, LenientObject, Object};
use crate::cluster::ClusterState;

#[derive(Debug, Default)]
struct KindStore {
    objects: BTreeMap<Key, Object>,
    /// Objects of a list in progress (between `Init` and `InitDone`).
    listing: Option<BTreeMap<Key, Object>>,
    /// A list has completed at least once (or the kind is absent from the API).
    synced: bool,
}

/// All stores, the pending-change clock and the counters.
#[derive(Debug)]
pub(crate) struct Stores {
    kinds: [KindStore; 7],
    batch: Duration,
    /// When the first change not yet sent was seen.
    dirty_since: Option<Instant>,
    /// The kinds changed since the last state taken.
    dirty_kinds: crate::cluster::ChangedKinds,
    /// Objects skipped because they did not decode or failed the checks.
    pub skipped_objects: u64,
    /// Lists completed by a kind that had completed one before (410 Gone, outages).
    pub relists: u64,
}

impl Stores {
    pub(crate) fn new(batch: Duration) -> Self {
        Stores {
            kinds: Default::default(),
            batch,
            dirty_since: None,
            dirty_kinds: crate::cluster::ChangedKinds::NONE,
            skipped_objects: 0,
            relists: 0,
        }
    }

    fn changed(&mut self, kind: Kind, now: Instant) {
        self.dirty_since.get_or_insert(now);
        self.dirty_kinds = self.dirty_kinds.union(kind.changed());
    }

    /// Applies one watcher event of `kind` seen at `now`.
    pub(crate) fn event(&mut self, kind: Kind, event: Event<LenientObject>, now: Instant) {
        match event {
            Event::Init => {
                self.kinds[kind.index()].listing = Some(BTreeMap::new());
            }
            Event::InitApply(raw) => {
                if self.kinds[kind.index()].listing.is_none() {
                    // Not expected from kube's watcher; treat as a plain update.
                    return self.event(kind, Event::Apply(raw), now);
                }
                if let Some(object) = self.decode(kind, &raw) {
                    if let Some(listing) = self.kinds[kind.index()].listing.as_mut() {
                        listing.insert(raw.key(), object);
                    }
                }
            }
            Event::InitDone => {
                let store = &mut self.kinds[kind.index()];
                let listed = store.listing.take().unwrap_or_default();
                let relist = store.synced;
                store.synced = true;
                let differs = store.objects != listed;
                store.objects = listed;
                if relist {
                    self.relists += 1;
                    tracing::info!(
                        kind = kind.name(),
                        changed = differs,
                        "relisted {kind}: {} objects",
                        self.kinds[kind.index()].objects.len()
                    );
                }
                if differs || !relist {
                    self.changed(kind, now);
                }
            }
            Event::Apply(raw) => {
                let key = raw.key();
                let decoded = self.decode(kind, &raw);
                let objects = &mut self.kinds[kind.index()].objects;
                let differs = match decoded {
                    // A bad update counts as the object being gone: the state only holds
                    // objects as they are in the API.
                    None => objects.remove(&key).is_some(),
                    Some(object) => objects.insert(key, object.clone()).as_ref() != Some(&object),
                };
                if differs {
                    self.changed(kind, now);
                }
            }
            Event::Delete(raw) => {
                if self.kinds[kind.index()]
                    .objects
                    .remove(&raw.key())
                    .is_some()
                {
                    self.changed(kind, now);
                }
            }
        }
    }

    /// The API does not serve `kind` (a CRD that is not installed): it counts as synced and
    /// empty until a list succeeds.
    pub(crate) fn absent(&mut self, kind: Kind, now: Instant) {
        let store = &mut self.kinds[kind.index()];
        store.listing = None;
        let had_objects = !store.objects.is_empty();
        store.objects.clear();
        if had_objects || !store.synced {
            store.synced = true;
            self.changed(kind, now);
        }
    }

    fn decode(&mut self, kind: Kind, raw: &LenientObject) -> Option<Object> {
        match decode(kind, raw) {
            Ok(object) => Some(object),
            Err(skip) => {
                self.skipped_objects += 1;
                let key = raw.key();
                tracing::warn!(
                    kind = kind.name(),
                    namespace = %key.namespace,
                    name = %key.name,
                    "skipping {} from the API server: {skip}; fix or delete the object \
                     (the rest of the {kind}s are applied)",
                    label(kind, &key)
                );
                None
            }
        }
    }

    /// Kinds that have completed a list, in [`Kind::ALL`] order.
    pub(crate) fn kinds_synced(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| self.kinds[k.index()].synced)
            .collect()
    }

    /// Every kind has completed a list.
    pub(crate) fn all_synced(&self) -> bool {
        self.kinds.iter().all(|k| k.synced)
    }

    /// When the pending changes are due to be sent (`None`: nothing to send yet).
    pub(crate) fn due(&self) -> Option<Instant> {
        let since = self.dirty_since?;
        self.all_synced().then(|| since + self.batch)
    }

    /// The state, the time of its first change and the kinds changed since the last state
    /// taken, when due at `now`. After `None` is returned for a due state (the caller could not
    /// send it) call [`Self::keep_pending`].
    pub(crate) fn take_due(
        &mut self,
        now: Instant,
    ) -> Option<(ClusterState, Instant, crate::cluster::ChangedKinds)> {
        if self.due()? > now {
            return None;
        }
        let since = self.dirty_since.take()?;
        let kinds = std::mem::take(&mut self.dirty_kinds);
        Some((self.state(), since, kinds))
    }

    /// Puts back a taken state's first-change time and kinds (the state could not be sent).
    pub(crate) fn keep_pending(&mut self, since: Instant, kinds: crate::cluster::ChangedKinds) {
        self.dirty_since = Some(self.dirty_since.map_or(since, |d| d.min(since)));
        self.dirty_kinds = self.dirty_kinds.union(kinds);
    }

    /// The current state of every store.
    pub(crate) fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for store in &self.kinds {
            for object in store.objects.values() {
                match object.clone() {
                    Object::Node(o) => state.nodes.push(o),
                    Object::Namespace(o) => state.namespaces.push(o),
                    Object::Pod(o) => state.pods.push(o),
                    Object::Service(o) => state.services.push(o),
                    Object::EndpointSlice(o) => state.endpoint_slices.push(o),
                    Object::NetworkPolicy(o) => state.network_policies.push(o),
                    Object::HostNetworkPolicy(o) => state.host_policies.push(o),
                }
            }
        }
        // Each store is a map by (namespace or "", name): its values are already in the
        // state's order (`cluster::name_order`); no sort (at 100,000 Pods that is ~10 ms of
        // string comparisons per state).
        debug_assert!(state
            .pods
            .is_sorted_by(|a, b| { crate::cluster::name_order(&a.metadata, &b.metadata).is_le() }));
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ChangedKinds;
    use serde_json::json;

    const BATCH: Duration = Duration::from_millis(30);

    fn ns(name: &str, label: &str) -> LenientObject {
        LenientObject::new(json!({
            "metadata": {"name": name, "resourceVersion": "1", "labels": {"l": label}}
        }))
    }

    fn list(stores: &mut Stores, kind: Kind, objects: Vec<LenientObject>, now: Instant) {
        stores.event(kind, Event::Init, now);
        for o in objects {
            stores.event(kind, Event::InitApply(o), now);
        }
        stores.event(kind, Event::InitDone, now);
    }

    fn names(state: &ClusterState) -> Vec<String> {
        state
            .namespaces
            .iter()
            .map(|n| n.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn nothing_is_due_before_every_kind_listed_then_the_batch_window_applies() {
        let t0 = Instant::now();
        let mut stores = Stores::new(BATCH);
        list(&mut stores, Kind::Namespace, vec![ns("a", "1")], t0);
        for kind in Kind::ALL {
            if kind != Kind::Namespace && kind != Kind::Pod {
                list(&mut stores, kind, vec![], t0);
            }
        }
        assert!(!stores.all_synced());
        assert_eq!(stores.due(), None);
        assert!(stores.take_due(t0 + Duration::from_secs(5)).is_none());
        list(
            &mut stores,
            Kind::Pod,
            vec![],
            t0 + Duration::from_millis(100),
        );
        assert!(stores.all_synced());
        // First change was at t0: due at t0 + batch, which has passed.
        let (state, first, kinds) = stores
            .take_due(t0 + Duration::from_millis(100))
            .expect("due");
        assert_eq!(first, t0);
        assert_eq!(names(&state), ["a"]);
        assert_eq!(
            kinds,
            ChangedKinds::ALL,
            "the first state: every kind is new"
        );
        assert!(stores.take_due(t0 + Duration::from_secs(1)).is_none());

        // Two changes within the window: one state, first-change time of the first.
        let t1 = t0 + Duration::from_secs(2);
        stores.event(Kind::Namespace, Event::Apply(ns("b", "1")), t1);
        stores.event(Kind::Namespace, Event::Apply(ns("c", "1")), t1 + BATCH / 2);
        assert_eq!(stores.due(), Some(t1 + BATCH));
        assert!(stores.take_due(t1 + BATCH / 2).is_none());
        let (state, first, kinds) = stores.take_due(t1 + BATCH).expect("due");
        assert_eq!(first, t1);
        assert_eq!(names(&state), ["a", "b", "c"]);
        assert_eq!(kinds, ChangedKinds::NAMESPACES, "only what changed since");
        assert!(!kinds.services() && kinds.policy());
        // A kind whose update changes nothing is not reported.
        stores.event(Kind::Namespace, Event::Apply(ns("c", "1")), t1 + BATCH * 2);
        stores.event(
            Kind::EndpointSlice,
            Event::Delete(ns("gone", "1")),
            t1 + BATCH * 2,
        );
        assert!(stores.take_due(t1 + BATCH * 4).is_none());
    }

    fn synced_with(objects: Vec<LenientObject>) -> Stores {
        let t0 = Instant::now();
        let mut stores = Stores::new(BATCH);
        for kind in Kind::ALL {
            let o = if kind == Kind::Namespace {
                objects.clone()
            } else {
                vec![]
            };
            list(&mut stores, kind, o, t0);
        }
        assert!(stores.take_due(t0 + BATCH).is_some());
        stores
    }

    #[test]
    fn a_relist_replaces_the_store_only_at_init_done_and_counts() {
        let mut stores = synced_with(vec![ns("a", "1"), ns("b", "1")]);
        let t = Instant::now();
        stores.event(Kind::Namespace, Event::Init, t);
        stores.event(Kind::Namespace, Event::InitApply(ns("b", "1")), t);
        assert_eq!(
            names(&stores.state()),
            ["a", "b"],
            "half a list is not visible"
        );
        assert_eq!(stores.due(), None);
        stores.event(Kind::Namespace, Event::InitDone, t);
        assert_eq!(stores.relists, 1);
        let (state, _, _) = stores.take_due(t + BATCH).expect("a pruned");
        assert_eq!(names(&state), ["b"]);

        // The same objects again: a relist, but no change to send.
        list(&mut stores, Kind::Namespace, vec![ns("b", "1")], t);
        assert_eq!(stores.relists, 2);
        assert_eq!(stores.due(), None);
    }

    #[test]
    fn deletes_prune_and_equal_updates_are_not_changes() {
        let mut stores = synced_with(vec![ns("a", "1"), ns("b", "1")]);
        let t = Instant::now();
        stores.event(Kind::Namespace, Event::Apply(ns("a", "1")), t);
        assert_eq!(stores.due(), None);
        stores.event(Kind::Namespace, Event::Delete(ns("a", "1")), t);
        let (state, _, _) = stores.take_due(t + BATCH).expect("delete is a change");
        assert_eq!(names(&state), ["b"]);
        stores.event(Kind::Namespace, Event::Delete(ns("zz", "1")), t);
        assert_eq!(
            stores.due(),
            None,
            "deleting an unknown object changes nothing"
        );
    }

    #[test]
    fn a_bad_object_is_skipped_and_counted_and_a_bad_update_removes_the_old_version() {
        let bad = LenientObject::new(json!({"metadata": {"name": "bad", "labels": 5}}));
        let mut stores = synced_with(vec![ns("a", "1"), bad.clone(), ns("c", "1")]);
        assert_eq!(stores.skipped_objects, 1);
        assert_eq!(names(&stores.state()), ["a", "c"]);
        let t = Instant::now();
        let bad_a = LenientObject::new(json!({"metadata": {"name": "a", "labels": 5}}));
        stores.event(Kind::Namespace, Event::Apply(bad_a), t);
        assert_eq!(stores.skipped_objects, 2);
        let (state, _, _) = stores.take_due(t + BATCH).expect("a is gone");
        assert_eq!(names(&state), ["c"]);
    }

    #[test]
    fn an_absent_kind_is_synced_and_empty() {
        let t0 = Instant::now();
        let mut stores = Stores::new(BATCH);
        for kind in Kind::ALL {
            if kind != Kind::HostNetworkPolicy {
                list(&mut stores, kind, vec![], t0);
            }
        }
        assert_eq!(stores.due(), None);
        stores.absent(Kind::HostNetworkPolicy, t0);
        assert!(stores.all_synced());
        assert!(stores.take_due(t0 + BATCH).is_some());
        stores.absent(Kind::HostNetworkPolicy, t0);
        assert_eq!(stores.due(), None, "still absent: no change");
    }

    #[test]
    fn a_state_that_could_not_be_sent_stays_pending() {
        let mut stores = synced_with(vec![]);
        let t = Instant::now();
        stores.event(Kind::Namespace, Event::Apply(ns("a", "1")), t);
        let (_, first, kinds) = stores.take_due(t + BATCH).expect("due");
        stores.keep_pending(first, kinds);
        let (state, again, kinds) = stores.take_due(t + BATCH).expect("still due");
        assert_eq!(again, t);
        assert_eq!(names(&state), ["a"]);
        assert_eq!(
            kinds,
            ChangedKinds::NAMESPACES,
            "the kinds stay pending too"
        );
    }
}
