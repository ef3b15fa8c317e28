//! The source's thread: client configuration, one watcher task per kind, the annotation task,
//! the reconnect probe, and the loop that feeds [`Stores`] and sends states and health.
//!
//! Tasks talk to the loop over one unbounded channel of [`Msg`] (bounded in practice: each
//! watcher waits for its next event only after sending the last). The loop owns the stores;
//! nothing is shared but [`ApiHealth`] behind a mutex for [`super::KubeSource::health`].

use std::collections::BTreeMap;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::watcher::{self, watcher, Event};
use ::kube::{Client, Config};
use futures::StreamExt;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use super::object::{Kind, LenientObject};
use super::store::Stores;
use super::{ApiHealth, KubeError, KubeOptions, SourceEvent};

/// Capacity of the queue to the agent. States that do not fit stay pending (and are merged
/// with later changes); health events that do not fit are dropped (`health()` stays exact).
pub(crate) const EVENT_QUEUE: usize = 16;
/// Field manager named in the Node PATCH.
const FIELD_MANAGER: &str = "sluice";

pub(crate) struct Channels {
    pub events: SyncSender<SourceEvent>,
    pub annotations: UnboundedReceiver<(String, String)>,
    pub stop: oneshot::Receiver<()>,
    pub ready: std::sync::mpsc::Sender<Result<(), KubeError>>,
    pub health: Arc<Mutex<ApiHealth>>,
}

/// Body of the source's thread: a `current_thread` runtime running [`run`] until stopped.
pub(crate) fn thread_main(opts: KubeOptions, channels: Channels) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = channels.ready.send(Err(KubeError::Thread {
                reason: format!("tokio runtime: {e}"),
            }));
            return;
        }
    };
    runtime.block_on(async move {
        let (client, endpoint) = match client(&opts).await {
            Ok(client) => client,
            Err(e) => {
                let _ = channels.ready.send(Err(e));
                return;
            }
        };
        let _ = channels.ready.send(Ok(()));
        tracing::info!(
            url = %endpoint.url,
            credentials = %endpoint.source,
            "Kubernetes API client configured"
        );
        run(client, Arc::new(endpoint), opts, channels).await;
    });
    // Watch connections and in-flight requests are dropped here; DNS lookups in blocking
    // threads are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
}

/// Where the in-cluster service account's token, `ca.crt` and namespace are mounted (kube reads
/// this fixed path, as client-go does).
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The client: kubeconfig if given, else in-cluster, else inferred; `api_server` overrides the
/// URL (falling back to a plain config for it when there is no other).
///
/// The server certificate is verified for the host of the URL actually used (an IP SAN for
/// `https://127.0.0.1:7445`, as Talos' KubePrism certificate has), or for the kubeconfig's
/// `tls-server-name` when it sets one (kept when `api_server` overrides the URL).
async fn client(opts: &KubeOptions) -> Result<(Client, Endpoint), KubeError> {
    let (mut config, source) = if let Some(path) = &opts.kubeconfig {
        let kubeconfig_error = |reason: String| KubeError::Kubeconfig {
            path: path.clone(),
            reason,
        };
        let kubeconfig = ::kube::config::Kubeconfig::read_from(path)
            .map_err(|e| kubeconfig_error(error_chain(&e)))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| kubeconfig_error(error_chain(&e)))?;
        (config, format!("kubeconfig {}", path.display()))
    } else if let Some(url) = &opts.api_server {
        match Config::incluster() {
            Ok(config) => (config, in_cluster_source()),
            Err(e) => {
                if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
                    tracing::warn!(
                        "in a pod, but the service account is unusable ({}); connecting to {url} \
                         without credentials (check automountServiceAccountToken and \
                         {SERVICE_ACCOUNT_DIR})",
                        error_chain(&e)
                    );
                }
                let source = "no kubeconfig or service account (no credentials, the system's CAs)";
                (Config::new(parse_url(url)?), source.to_owned())
            }
        }
    } else {
        let config = Config::infer().await.map_err(|e| KubeError::NoConfig {
            reason: error_chain(&e),
        })?;
        let in_cluster = config
            .auth_info
            .token_file
            .as_deref()
            .is_some_and(|f| f.starts_with(SERVICE_ACCOUNT_DIR));
        let source = if in_cluster {
            in_cluster_source()
        } else {
            "the kubeconfig of $KUBECONFIG or ~/.kube/config".to_owned()
        };
        (config, source)
    };
    if let Some(url) = &opts.api_server {
        config.cluster_url = parse_url(url)?;
    }
    // kube's own retry layer retries 429/503/504 inside one request, up to 15 times over
    // minutes: the outage would be invisible to health and the watchers' backoff. The
    // watchers and the annotation task retry themselves.
    config.default_retry = false;
    let endpoint = Endpoint {
        url: config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned(),
        source,
    };
    let client = Client::try_from(config).map_err(|e| KubeError::Client {
        url: endpoint.url.clone(),
        reason: error_chain(&e),
    })?;
    Ok((client, endpoint))
}

fn in_cluster_source() -> String {
    format!("the service account in {SERVICE_ACCOUNT_DIR}")
}

/// Where the client connects and with what, for error messages.
#[derive(Debug)]
struct Endpoint {
    /// The API server URL, e.g. `https://127.0.0.1:7445`.
    url: String,
    /// Where the credentials and the CA come from: `kubeconfig /etc/sluice/kubeconfig`, `the
    /// service account in /var/run/secrets/kubernetes.io/serviceaccount`.
    source: String,
}

impl Endpoint {
    /// `error` with its causes, the URL, and what to check when the cause is known (a TLS
    /// verification failure, refused credentials).
    fn explain(&self, error: &(dyn std::error::Error + 'static), status: Option<u16>) -> String {
        let text = error_chain(error);
        let url = &self.url;
        let source = &self.source;
        let hint = if status == Some(401) {
            format!(
                "{url} refused the credentials from {source} (401 Unauthorized): check its token \
                 or client certificate"
            )
        } else if text.contains("not valid for name") {
            format!(
                "the certificate of {url} does not name its host: connect with a name or IP \
                 address the certificate has, or set tls-server-name in the kubeconfig"
            )
        } else if text.contains("invalid peer certificate") {
            format!(
                "the certificate of {url} does not verify against the CA from {source}: check \
                 certificate-authority(-data) or ca.crt"
            )
        } else if text.contains("received fatal alert") {
            format!(
                "{url} refused the TLS handshake (a client certificate it does not trust?): \
                 check the client certificate from {source}"
            )
        } else if text.contains("HTTP request to an HTTPS server") {
            format!("{url} is an HTTPS server: use https://")
        } else {
            format!("API server {url}")
        };
        format!("{text} ({hint})")
    }
}

/// `error` followed by each cause not already in the text (kube's and hyper's messages hide the
/// cause of a failed connection, such as a certificate that does not verify).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// Parses the API server URL (into `http::Uri`, which `kube::Config` holds; `http` is not a
/// direct dependency, so the type is inferred).
fn parse_url<U>(url: &str) -> Result<U, KubeError>
where
    U: std::str::FromStr,
    U::Err: std::fmt::Display,
{
    url.parse().map_err(|e: U::Err| KubeError::BadUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

/// What the tasks tell the loop.
enum Msg {
    /// A watcher event (boxed: an event holds a whole object).
    Event(Kind, Box<Event<LenientObject>>),
    /// The API server answered 404 for the kind's list (a CRD that is not installed).
    Absent(Kind),
    /// A request failed. `answered`: the server answered (4xx), so it is reachable.
    Failed {
        what: String,
        error: String,
        answered: bool,
    },
    /// The server answered a probe or a PATCH.
    Answered,
}

/// Exponential backoff with jitter, as client-go's reflector and kube's `default_backoff`.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Retry {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Retry {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The next delay: the current one plus up to a quarter of jitter; then doubles, up to
    /// `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let quarter = u32::try_from(delay.as_millis() / 4).unwrap_or(u32::MAX);
        let jitter = Duration::from_millis(u64::from(nanos % quarter.max(1)));
        (delay + jitter).min(self.max + self.max / 4)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

fn status_code(error: &::kube::Error) -> Option<u16> {
    match error {
        ::kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The HTTP status of a watcher error, if the server answered with one.
fn watcher_status(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => status_code(e),
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => Some(200),
    }
}

/// A status below 500 means the server is there and answering.
fn answered(status: Option<u16>) -> bool {
    status.is_some_and(|code| code < 500)
}

/// One kind's watcher, forever: events to the loop, errors logged, reported and backed off.
async fn watch_kind(
    client: Client,
    endpoint: Arc<Endpoint>,
    kind: Kind,
    opts: KubeOptions,
    tx: UnboundedSender<Msg>,
) {
    let resource = kind.api_resource();
    let api: Api<LenientObject> = Api::all_with(client, &resource);
    let mut config = watcher::Config::default();
    if let Some(selector) = kind.label_selector() {
        config = config.labels(selector);
    }
    let new_stream = || watcher(api.clone(), config.clone()).boxed();
    let mut stream = new_stream();
    let mut retry = Retry::new(opts.retry_min, opts.retry_max);
    let mut failing = false;
    let mut gone_in_a_row = 0u32;
    let mut absent_warned = false;
    loop {
        let Some(item) = stream.next().await else {
            // kube's watcher never ends; if it ever does, start a new one.
            stream = new_stream();
            continue;
        };
        let error = match item {
            Ok(event) => {
                if !matches!(event, Event::Init) {
                    if failing {
                        tracing::info!(kind = kind.name(), "{kind} watch recovered");
                    }
                    failing = false;
                    gone_in_a_row = 0;
                    retry.reset();
                    absent_warned = false;
                }
                if tx.send(Msg::Event(kind, Box::new(event))).is_err() {
                    return;
                }
                continue;
            }
            Err(error) => error,
        };
        let status = watcher_status(&error);
        if kind == Kind::HostNetworkPolicy
            && status == Some(404)
            && matches!(error, watcher::Error::InitialListFailed(_))
        {
            if !absent_warned {
                tracing::warn!(
                    "the API server does not serve {}/{} (404): treating HostNetworkPolicies as \
                     none; install sluice's CRD to use them. Retrying every {:?}",
                    resource.api_version,
                    resource.plural,
                    opts.retry_max
                );
                absent_warned = true;
            }
            if tx.send(Msg::Absent(kind)).is_err() {
                return;
            }
            tokio::time::sleep(opts.retry_max).await;
            continue;
        }
        let message = format!("{kind} watcher: {}", endpoint.explain(&error, status));
        if failing {
            tracing::debug!(kind = kind.name(), "{message}");
        } else {
            tracing::warn!(
                kind = kind.name(),
                "{message}; retrying with backoff (the last state keeps forwarding)"
            );
        }
        failing = true;
        if tx
            .send(Msg::Failed {
                what: kind.name().to_owned(),
                error: message,
                answered: answered(status),
            })
            .is_err()
        {
            return;
        }
        if status == Some(410) {
            if matches!(error, watcher::Error::WatchStartFailed(_)) {
                // kube keeps retrying the expired version; start over with a list.
                stream = new_stream();
            }
            gone_in_a_row += 1;
            if gone_in_a_row == 1 {
                // Relist at once: expiry is not an overloaded server.
                continue;
            }
        }
        tokio::time::sleep(retry.next_delay()).await;
    }
}

/// Merge-PATCHes the own Node's annotations until each requested value has landed.
async fn annotate(
    client: Client,
    endpoint: Arc<Endpoint>,
    opts: KubeOptions,
    mut requests: UnboundedReceiver<(String, String)>,
    tx: UnboundedSender<Msg>,
) {
    let api: Api<LenientObject> = Api::all_with(client, &Kind::Node.api_resource());
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let mut retry = Retry::new(opts.retry_min, opts.retry_max);
    loop {
        if pending.is_empty() {
            let Some((key, value)) = requests.recv().await else {
                return;
            };
            if applied.get(&key) != Some(&value) {
                pending.insert(key, value);
            }
            continue;
        }
        while let Ok((key, value)) = requests.try_recv() {
            if applied.get(&key) == Some(&value) {
                pending.remove(&key);
            } else {
                pending.insert(key, value);
            }
        }
        if pending.is_empty() {
            continue;
        }
        let patch = serde_json::json!({ "metadata": { "annotations": &pending } });
        match api.patch(&opts.node, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(node = %opts.node, annotations = ?pending, "annotated Node");
                applied.append(&mut pending);
                retry.reset();
                if tx.send(Msg::Answered).is_err() {
                    return;
                }
            }
            Err(e) => {
                let status = status_code(&e);
                let error = format!(
                    "PATCH of Node {} (annotations {:?}): {}; retrying",
                    opts.node,
                    pending.keys().collect::<Vec<_>>(),
                    endpoint.explain(&e, status)
                );
                tracing::warn!(node = %opts.node, "{error}");
                let failed = Msg::Failed {
                    what: format!("Node {}", opts.node),
                    error,
                    answered: answered(status),
                };
                if tx.send(failed).is_err() {
                    return;
                }
                tokio::time::sleep(retry.next_delay()).await;
            }
        }
    }
}

/// Asks for the own Node once: does the API server answer?
async fn probe(client: Client, endpoint: Arc<Endpoint>, node: String, tx: UnboundedSender<Msg>) {
    let api: Api<LenientObject> = Api::all_with(client, &Kind::Node.api_resource());
    let msg = match api.get_opt(&node).await {
        Ok(_) => Msg::Answered,
        Err(e) => {
            let status = status_code(&e);
            if answered(status) {
                Msg::Answered
            } else {
                Msg::Failed {
                    what: "probe".to_owned(),
                    error: format!("probe GET Node {node}: {}", endpoint.explain(&e, status)),
                    answered: false,
                }
            }
        }
    };
    let _ = tx.send(msg);
}

/// The loop's view of health, published to the shared copy and as events.
struct Health {
    current: ApiHealth,
    shared: Arc<Mutex<ApiHealth>>,
    /// (connected, kinds synced) as last sent as an event.
    sent: Option<(bool, Vec<String>)>,
}

impl Health {
    fn set_connected(&mut self, connected: bool) {
        if self.current.connected != connected {
            self.current.connected = connected;
            self.current.since = SystemTime::now();
            if connected {
                tracing::info!("Kubernetes API server reachable");
            } else {
                tracing::warn!(
                    error = ?self.current.last_error,
                    "Kubernetes API server unreachable; forwarding on the last state"
                );
            }
        }
    }

    /// Copies the counters from the stores, publishes, and returns an event when connectivity
    /// or sync progress changed since the last one sent.
    fn publish(&mut self, stores: &Stores) -> Option<SourceEvent> {
        let kinds: Vec<String> = stores
            .kinds_synced()
            .into_iter()
            .map(|k| k.name().to_owned())
            .collect();
        self.current.all_synced = stores.all_synced();
        self.current.kinds_synced = kinds.clone();
        self.current.relists = stores.relists;
        self.current.skipped_objects = stores.skipped_objects;
        *self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = self.current.clone();
        let key = (self.current.connected, kinds);
        if self.sent.as_ref() == Some(&key) {
            return None;
        }
        self.sent = Some(key);
        Some(SourceEvent::Health(self.current.clone()))
    }
}

async fn run(client: Client, endpoint: Arc<Endpoint>, opts: KubeOptions, channels: Channels) {
    let Channels {
        events,
        annotations,
        mut stop,
        health: shared,
        ..
    } = channels;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for kind in Kind::ALL {
        tasks.spawn(watch_kind(
            client.clone(),
            Arc::clone(&endpoint),
            kind,
            opts.clone(),
            tx.clone(),
        ));
    }
    tasks.spawn(annotate(
        client.clone(),
        Arc::clone(&endpoint),
        opts.clone(),
        annotations,
        tx.clone(),
    ));

    let mut stores = Stores::new(opts.batch);
    let current = shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut health = Health {
        current,
        shared,
        sent: None,
    };
    let probe_every = opts.retry_min.max(Duration::from_millis(50));
    let mut next_probe = tokio::time::Instant::now() + probe_every;
    let mut probing: Option<tokio::task::JoinHandle<()>> = None;
    let far = Duration::from_secs(3600);
    // While the agent's queue is full, the pending state is offered again only after this.
    let mut queue_full_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let state_due = stores.due().map_or(far, |due| {
            due.max(queue_full_until.unwrap_or(due))
                .saturating_duration_since(now)
        });
        let probe_due = if health.current.connected {
            far
        } else {
            next_probe.saturating_duration_since(tokio::time::Instant::now())
        };
        tokio::select! {
            _ = &mut stop => break,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                handle(msg, &mut stores, &mut health);
                // Take whatever else is queued before deciding what to send.
                while let Ok(msg) = rx.try_recv() {
                    handle(msg, &mut stores, &mut health);
                }
            }
            () = tokio::time::sleep(state_due) => {}
            () = tokio::time::sleep(probe_due) => {
                next_probe = tokio::time::Instant::now() + probe_every;
                if probing.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    probing = Some(tokio::spawn(probe(
                        client.clone(),
                        Arc::clone(&endpoint),
                        opts.node.clone(),
                        tx.clone(),
                    )));
                }
            }
        }
        if let Some(event) = health.publish(&stores) {
            send_health(&events, event);
        }
        if queue_full_until.is_some_and(|until| Instant::now() < until) {
            continue;
        }
        queue_full_until = None;
        if let Some((state, first_change, changed)) = stores.take_due(Instant::now()) {
            match events.try_send(SourceEvent::State {
                state,
                first_change,
                changed,
            }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    tracing::debug!("agent queue full; the state stays pending");
                    stores.keep_pending(first_change, changed);
                    queue_full_until =
                        Some(Instant::now() + opts.batch.max(Duration::from_millis(10)));
                }
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
    }
    if let Some(probe) = probing {
        probe.abort();
    }
    tasks.abort_all();
}

fn send_health(events: &SyncSender<SourceEvent>, event: SourceEvent) {
    if let Err(TrySendError::Full(_)) = events.try_send(event) {
        tracing::debug!("agent queue full; health event dropped (health() is current)");
    }
}

fn handle(msg: Msg, stores: &mut Stores, health: &mut Health) {
    let now = Instant::now();
    match msg {
        Msg::Event(kind, event) => {
            if !matches!(*event, Event::Init) {
                health.set_connected(true);
            }
            stores.event(kind, *event, now);
        }
        Msg::Absent(kind) => {
            health.set_connected(true);
            stores.absent(kind, now);
        }
        Msg::Failed {
            what,
            error,
            answered,
        } => {
            tracing::debug!(%what, "{error}");
            health.current.last_error = Some(error);
            health.set_connected(answered);
        }
        Msg::Answered => health.set_connected(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_doubles_to_the_maximum_with_bounded_jitter_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(700);
        let mut retry = Retry::new(min, max);
        let delays: Vec<Duration> = (0..6).map(|_| retry.next_delay()).collect();
        let bases = [100, 200, 400, 700, 700, 700];
        for (delay, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base && *delay <= base + base / 4,
                "{delay:?} vs {base:?}"
            );
        }
        retry.reset();
        assert!(retry.next_delay() < Duration::from_millis(126));
    }

    #[test]
    fn only_answers_below_500_count_as_reachable() {
        assert!(answered(Some(404)));
        assert!(answered(Some(410)));
        assert!(!answered(Some(503)));
        assert!(!answered(None));
    }
}
