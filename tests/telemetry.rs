//! The relay's `tracing` events, captured by a small layer, for a delivery
//! and a dead-lettering through the reference server. A test binary of its
//! own: a callsite that another test's thread registers while this test
//! installs its subscriber can cache "never" (tracing-core computes a
//! callsite's interest once) and stay silent, so nothing runs beside it.

#![cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_outbox::{Config, HttpTransport, NewEvent, Outbox};
use edge_outbox_server::ServerConfig;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

/// One captured event: its level, target and fields (`message` among them).
#[derive(Clone, Debug)]
struct Captured {
    level: tracing::Level,
    target: String,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }
    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map_or_else(|| panic!("no field {name} in {self:?}"), String::as_str)
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
        });
    }
}

/// Everything runs on this one thread (current-thread runtime, the relay
/// driven inline), where the subscriber is installed; the cases run one
/// after the other (see the top of the file).
#[tokio::test]
async fn the_relay_traces_delivery_dead_lettering_and_backoff() {
    a_delivery_and_a_dead_lettering().await;
    a_backoff_with_its_reason().await;
}

async fn a_delivery_and_a_dead_lettering() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(Registry::default().with(capture.clone()));

    let server = edge_outbox_server::spawn(ServerConfig::in_memory().allow_anonymous(true))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path().join("app.db"), Config::new("unused")).unwrap();
    outbox
        .enqueue((0..3).map(|i| NewEvent::json("OrderCreated", &i).unwrap()))
        .unwrap();
    // The server rejects the next event it sees: the first of the batch.
    server.faults().reject_next_events(1);
    let transport = HttpTransport::builder(server.events_url())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut relay = edge_outbox::Relay::new(
        outbox.store().clone(),
        transport,
        edge_outbox::RelayConfig::default(),
    );
    let report = relay.flush().await.unwrap();
    assert_eq!((report.sent, report.dead, report.pending), (2, 1, 0));
    relay.release_lease().await.unwrap();
    server.shutdown().await.unwrap();

    let events = capture.0.lock().unwrap().clone();
    let find = |message: &str| {
        events
            .iter()
            .find(|e| e.message() == message)
            .unwrap_or_else(|| panic!("no {message:?} event in {events:#?}"))
            .clone()
    };
    let taken = find("lease taken");
    assert_eq!(taken.target, "edge_outbox::native::lease");
    assert_eq!(taken.level, tracing::Level::INFO);
    let claimed = find("claimed");
    assert_eq!(claimed.target, "edge_outbox::relay");
    assert_eq!(claimed.field("events"), "3");
    assert_eq!(claimed.field("first_seq"), "1");
    let pushed = find("pushed");
    assert_eq!(pushed.field("events"), "3");
    assert_eq!(pushed.field("answer"), "results");
    let dead = find("dead-lettered");
    assert_eq!(dead.level, tracing::Level::WARN);
    assert_eq!(dead.target, "edge_outbox::relay::push");
    assert_eq!(dead.field("seq"), "1");
    assert_eq!(
        dead.field("reason"),
        "injected: rejected by the test control"
    );
    let settled = find("batch settled");
    assert_eq!(settled.level, tracing::Level::INFO);
    assert_eq!(
        (
            settled.field("sent"),
            settled.field("dead"),
            settled.field("pending"),
            settled.field("failed"),
        ),
        ("2", "1", "0", "false")
    );
    let done = find("flush done");
    assert_eq!((done.field("sent"), done.field("dead")), ("2", "1"));
    let released = find("lease released");
    assert_eq!(released.target, "edge_outbox::native::lease");
    // Nothing was said about a backoff: the channel never failed.
    assert!(
        events
            .iter()
            .all(|e| e.message() != "channel failure: backing off")
    );
}

/// A push that fails (503 with Retry-After) is traced as a backoff decision
/// with its reason and the attempt it was.
async fn a_backoff_with_its_reason() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(Registry::default().with(capture.clone()));
    let server = edge_outbox_server::spawn(ServerConfig::in_memory().allow_anonymous(true))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path().join("app.db"), Config::new("unused")).unwrap();
    outbox
        .enqueue([NewEvent::json("OrderCreated", &1).unwrap()])
        .unwrap();
    server
        .faults()
        .fail_next(1, edge_outbox_server::Failure::status(503).retry_after(7));
    let transport = HttpTransport::builder(server.events_url()).build().unwrap();
    let mut relay = edge_outbox::Relay::new(
        outbox.store().clone(),
        transport,
        edge_outbox::RelayConfig::default(),
    );
    let report = relay.flush().await.unwrap();
    assert_eq!(report.pending, 1);
    server.shutdown().await.unwrap();

    let events = capture.0.lock().unwrap().clone();
    let backoff = events
        .iter()
        .find(|e| e.message() == "channel failure: backing off")
        .unwrap_or_else(|| panic!("no backoff event in {events:#?}"));
    assert_eq!(backoff.level, tracing::Level::WARN);
    assert_eq!(backoff.field("events"), "1");
    assert_eq!(backoff.field("attempt"), "1");
    assert_eq!(backoff.field("retry_after_secs"), "7.0");
    assert!(backoff.field("reason").contains("503"), "{backoff:?}");
    let pushed = events.iter().find(|e| e.message() == "pushed").unwrap();
    assert_eq!(pushed.field("answer"), "channel failure");
}
