//! The transport conformance suite: the guarantees every broker crate must keep, written once and
//! run against each real broker (feature `conformance`, for tests).
//!
//! A broker crate implements [`Broker`] (a sink and a consumer for a namespace of its own) and
//! calls each check from a `#[tokio::test]`. Every check runs against the real PostgreSQL
//! (`DATABASE_URL`) with a schema of its own, and a handler ([`Recorder`]): a projection run by
//! the core's delivery engine ([`Transactional`]) that writes each event it applies in the same
//! transaction as its inbox row, so a second effect would show.
//!
//! - [`relay_killed_at_random_points`]: writers append while the relay is cut at random points
//!   (a step dropped mid-flight, including after messages were sent and before their confirms or
//!   the checkpoint move) and started again at once, hundreds of times: the consumer sees every
//!   event, once, each aggregate's events in order.
//! - [`poison_is_dead_lettered`]: an event the handler always fails on is retried, then lands in
//!   the broker's dead-letter place; the later events of its aggregate wait behind it (dead
//!   letters too), later events of other aggregates keep flowing.
//! - [`dead_letter_retried_after_a_fix`]: the operator retries the dead letters after a fix;
//!   each is applied once, in the aggregate's order.
//! - [`consumer_killed_mid_handler`]: a consumer cut while its handler's transaction is open
//!   (nothing acknowledged) is replaced; the event's effect happens exactly once.
//! - [`not_ours_is_dead_lettered`]: a message on the consumed destination that is not an
//!   envelope is dead-lettered, naming why, and does not stop the consumer.
//! - [`trace_follows_each_event`]: the handler of each event runs in the trace of the command
//!   that recorded it ([`evently_core::trace::current`]), across the broker, and sees the tenant
//!   its store stamped on it (`Metadata::tenant`).

mod consumer;
mod outage;
mod relay;

pub use consumer::*;
pub use outage::*;
pub use relay::*;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evently_core::projection::{HandlerError, Projection, ProjectionError, Subscription};
use evently_core::{
    EventData, EventId, EventStore, ExpectedVersion, Metadata, StoredEvent, StreamId,
};
use evently_postgres::PostgresEventStore;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

use crate::{
    ConsumerMetrics, HandleError, Handled, MessageHandler, Relay, Sink, Transactional,
    TransportError,
};

/// A boxed future, as the harness returns them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// What a broker crate supplies to the suite.
pub trait Broker: Send + Sync + 'static {
    /// Its sink.
    type Sink: Sink;

    /// A sink publishing into namespace `ns` (an exchange, a stream, a topic prefix of its own).
    fn sink(&self, ns: &str) -> Self::Sink;

    /// Declares consumer `name`'s topology in `ns`, so that what is published afterwards reaches
    /// it.
    fn declare<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Runs consumer `name` of `ns` into `handler` until `shutdown`; at most 3 tries per message.
    fn consume(
        &self,
        ns: &str,
        name: &str,
        handler: Recorder,
        shutdown: BoxFuture<'static, ()>,
    ) -> BoxFuture<'static, Result<ConsumerMetrics, TransportError>>;

    /// How many dead letters consumer `name` of `ns` has in the broker's dead-letter place.
    fn dead_letters<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>>;

    /// Consumer `name`'s dead letters, where the broker crate offers them to operators.
    fn dead_letter_queue(&self, _ns: &str, _name: &str) -> Option<Box<dyn crate::DeadLetterQueue>> {
        None
    }

    /// Publishes `value` (with no headers) where consumer `name` of `ns` reads, as a stranger
    /// would.
    fn publish_foreign<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
        value: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>>;
}
/// A store in a fresh schema `t_<name>` of `DATABASE_URL`'s database, with a table `applied`
/// the [`Recorder`] writes.
///
/// # Panics
/// When the database cannot be reached: the suite needs it.
pub async fn fresh_store(name: &str) -> PostgresEventStore {
    let url = evently_postgres::database_url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("the conformance suite needs PostgreSQL at {url}: {e}"));
    let schema = format!("t_{name}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("drop schema {schema}: {e}"));
    let store = PostgresEventStore::new(pool.clone(), &schema).unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".applied (seq bigserial PRIMARY KEY, consumer text NOT NULL, \
         aggregate_id text NOT NULL, version bigint NOT NULL, event_id uuid NOT NULL, trace text, \
         tenant text)"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    store
}
/// The suite's handler: the projection [`Recording`] run by the delivery engine through
/// [`Transactional`], exactly as an application's projection fed from a broker, so every check
/// exercises the engine's inbox, retries, parking and per-aggregate blocking.
pub struct Recorder(Transactional<Recording>);
impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Recorder").field(&self.0).finish()
    }
}
/// Records each event it applies (consumer name, aggregate id, version, event id) in table
/// `applied`, in the engine's transaction (with the inbox row). Events whose payload has
/// `"poison": true` always fail. With [`Recorder::hang_on`], the first attempt at that event
/// writes its row, signals, and then never commits.
pub struct Recording {
    schema: String,
    name: String,
    hang: Option<(EventId, Arc<Notify>, Arc<std::sync::atomic::AtomicBool>)>,
    fixed: Option<Arc<std::sync::atomic::AtomicBool>>,
}
/// The suite's events: `Noted` of aggregate type `note`.
const NOTES: &[Subscription] = &[Subscription {
    aggregate_type: Some("note"),
    event_types: &["Noted"],
}];
impl Projection for Recording {
    const NAME: &'static str = "conformance_recorder";
    type Context = PgConnection;
    const SUBSCRIPTIONS: &'static [Subscription] = NOTES;

    fn apply<'a>(
        &'a mut self,
        event: &'a StoredEvent,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        Box::pin(async move {
            let failed = |source: HandlerError| ProjectionError::Handler {
                projection: Self::NAME,
                stream: event.stream.clone(),
                version: event.version,
                source,
            };
            let fixed = self
                .fixed
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
            if !fixed && event.payload.get("poison") == Some(&serde_json::Value::Bool(true)) {
                return Err(failed(
                    format!("poison event {} of {}", event.version, event.stream).into(),
                ));
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO \"{}\".applied (consumer, aggregate_id, version, event_id, trace, tenant) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                self.schema
            )))
            .bind(&self.name)
            .bind(event.stream.aggregate_id.as_str())
            .bind(i64::try_from(event.version).unwrap_or(i64::MAX))
            .bind(event.event_id.0)
            .bind(evently_core::trace::current().map(|t| t.trace_id_hex()))
            .bind(event.metadata.tenant.as_ref().map(evently_core::TenantId::as_str))
            .execute(&mut *conn)
            .await
            .map_err(|e| failed(e.into()))?;
            if let Some((id, reached, done)) = &self.hang
                && *id == event.event_id
                && !done.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                reached.notify_one();
                std::future::pending::<()>().await;
            }
            Ok(true)
        })
    }
}

impl Recorder {
    /// A recorder whose `applied` rows say `name`.
    pub fn new(store: &PostgresEventStore, name: &str) -> Self {
        Self(Transactional::new(
            store.clone(),
            Recording {
                schema: store.schema().to_owned(),
                name: name.to_owned(),
                hang: None,
                fixed: None,
            },
        ))
    }

    fn recording(self, change: impl FnOnce(&mut Recording)) -> Self {
        let Self(handler) = self;
        let (mut recording, store) = handler.into_parts();
        change(&mut recording);
        Self(Transactional::new(store, recording))
    }

    /// The first attempt at `event` writes its row, notifies `reached`, then hangs with its
    /// transaction open.
    #[must_use]
    pub fn hang_on(self, event: EventId, reached: Arc<Notify>) -> Self {
        self.recording(|r| r.hang = Some((event, reached, Arc::default())))
    }

    /// Poison events fail only until `fixed` is set (a bug fixed, a dependency back).
    #[must_use]
    pub fn poison_until(self, fixed: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.recording(|r| r.fixed = Some(fixed))
    }
}

#[async_trait::async_trait]
impl MessageHandler for Recorder {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn set_retries(&mut self, attempts: u32, backoff: Duration) {
        self.0.set_retries(attempts, backoff);
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        self.0.handle(event).await
    }
}
/// Appends `count` events to aggregate `id` of type `note` (payload `{"n": i}`, `"poison"` for
/// the versions in `poison`). Returns the event ids.
///
/// # Panics
/// When the append fails.
pub async fn append(
    store: &PostgresEventStore,
    id: &str,
    count: u64,
    poison: &[u64],
) -> Vec<EventId> {
    let stream = StreamId::new("note", id);
    let mut ids = Vec::new();
    for i in 0..count {
        let version_hint = i + 1;
        let data = EventData {
            event_id: EventId::new(),
            event_type: "Noted".to_owned(),
            schema_version: 1,
            payload: serde_json::json!({ "n": i, "poison": poison.contains(&version_hint) }),
            metadata: Metadata::default(),
        };
        ids.push(data.event_id);
        store
            .append(&stream, ExpectedVersion::Any, vec![data])
            .await
            .unwrap_or_else(|e| panic!("append to {stream}: {e}"));
    }
    ids
}
/// The rows `consumer` applied: per aggregate id, the versions in the order applied.
async fn applied(pool: &PgPool, schema: &str, consumer: &str) -> BTreeMap<String, Vec<i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT aggregate_id, version FROM \"{schema}\".applied WHERE consumer = $1 ORDER BY seq"
    )))
    .bind(consumer)
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut by_id: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, version) in rows {
        by_id.entry(id).or_default().push(version);
    }
    by_id
}
/// How many events `consumer` applied.
async fn applied_count(pool: &PgPool, schema: &str, consumer: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".applied WHERE consumer = $1"
    )))
    .bind(consumer)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}
/// Runs consumer `name` on a task until the returned sender is dropped or sent to.
fn start_consumer<B: Broker>(
    broker: &B,
    ns: &str,
    name: &str,
    handler: Recorder,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<ConsumerMetrics, TransportError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown: BoxFuture<'static, ()> = Box::pin(async move {
        let _ = stopped.await;
    });
    let run = broker.consume(ns, name, handler, shutdown);
    (stop, tokio::spawn(run))
}
/// Waits until `consumer` applied `count` events (at most `within`).
async fn wait_applied(pool: &PgPool, schema: &str, consumer: &str, count: i64, within: Duration) {
    if let Err(why) = try_wait_applied(pool, schema, consumer, count, within).await {
        panic!("{why}");
    }
}

/// As [`wait_applied`], saying what went wrong instead of panicking (for a caller that adds what
/// it knows before it fails).
async fn try_wait_applied(
    pool: &PgPool,
    schema: &str,
    consumer: &str,
    count: i64,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let now = applied_count(pool, schema, consumer).await;
        if now >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = not_applied(pool, schema, consumer).await;
            return Err(format!(
                "{consumer}: {now} of {count} events applied after {within:?}; {why}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the events `consumer` did not apply got to, for a failed wait: each one (up to 10) with
/// whether its inbox row or a dead letter exists, and every checkpoint of the schema (the relay's
/// among them: an event at or before it was confirmed by the broker).
async fn not_applied(pool: &PgPool, schema: &str, consumer: &str) -> String {
    let missing: Vec<(String, i64, uuid::Uuid, String, bool, bool)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT e.aggregate_id, e.version, e.event_id, \
                    e.transaction_id::text || ':' || e.global_position, \
                    EXISTS (SELECT 1 FROM \"{schema}\".inbox i \
                            WHERE i.consumer = $1 AND i.event_id = e.event_id), \
                    EXISTS (SELECT 1 FROM \"{schema}\".projection_dead_letters d \
                            WHERE d.projection = $1 AND d.event_id = e.event_id) \
             FROM \"{schema}\".events e \
             WHERE NOT EXISTS (SELECT 1 FROM \"{schema}\".applied a \
                               WHERE a.consumer = $1 AND a.event_id = e.event_id) \
             ORDER BY e.transaction_id, e.global_position LIMIT 10"
        )))
        .bind(consumer)
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let checkpoints: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT projection, transaction_id::text || ':' || global_position \
         FROM \"{schema}\".projection_checkpoints ORDER BY projection"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let missing: Vec<String> = missing
        .iter()
        .map(|(id, version, event, at, claimed, parked)| {
            format!(
                "{id} v{version} (event {event} at {at}; inbox row: {claimed}, dead letter: {parked})"
            )
        })
        .collect();
    format!(
        "not applied: [{}]; checkpoints: {checkpoints:?}",
        missing.join(", ")
    )
}
/// Publishes everything in `store` through a fresh relay until its lag is 0.
async fn drain<S: Sink>(relay: &mut Relay<S>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match relay.step().await {
            Ok(step) if step.sent == 0 && step.delivered == 0 => {
                if relay.lag().await.unwrap_or(1) == 0 {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "the relay does not drain: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(Instant::now() < deadline, "the relay does not drain");
    }
}
