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
//!   that recorded it ([`evently_core::trace::current`]), across the broker.

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
use rand::Rng;
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
         aggregate_id text NOT NULL, version bigint NOT NULL, event_id uuid NOT NULL, trace text)"
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
                "INSERT INTO \"{}\".applied (consumer, aggregate_id, version, event_id, trace) \
                 VALUES ($1, $2, $3, $4, $5)",
                self.schema
            )))
            .bind(&self.name)
            .bind(event.stream.aggregate_id.as_str())
            .bind(i64::try_from(event.version).unwrap_or(i64::MAX))
            .bind(event.event_id.0)
            .bind(evently_core::trace::current().map(|t| t.trace_id_hex()))
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
    let deadline = Instant::now() + within;
    loop {
        let now = applied_count(pool, schema, consumer).await;
        if now >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{consumer}: {now} of {count} events applied after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// What [`relay_killed_at_random_points`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillReport {
    /// Events appended.
    pub events: u64,
    /// Relay steps cut.
    pub cuts: u32,
    /// Events the consumer never applied.
    pub missing: u64,
    /// Events applied more than once.
    pub doubled: u64,
    /// Pairs of an aggregate's events applied out of version order.
    pub inversions: u64,
    /// Redeliveries the inbox dropped.
    pub duplicates: u64,
    /// Messages the consumer received (the events and the resends of cut relays).
    pub received: u64,
}

/// Four writers append to 12 aggregates while a relay is cut at a random point `cuts`
/// times (a step dropped after 2 to 60 ms, a new relay made at once, as a restarted process
/// would), then the last relay drains. The consumer must apply every event once, in each
/// aggregate's order.
///
/// # Panics
/// When a guarantee does not hold (with the figures).
pub async fn relay_killed_at_random_points<B: Broker>(
    broker: &B,
    ns: &str,
    cuts: u32,
) -> KillReport {
    relay_killed(broker, ns, cuts, true).await
}

/// [`relay_killed_at_random_points`] for a destination that keeps no order (an SQS standard
/// queue): every event applied once, in any order (the inversions are counted, not refused).
///
/// # Panics
/// When an event is missing or applied twice (with the figures).
pub async fn relay_killed_at_random_points_unordered<B: Broker>(
    broker: &B,
    ns: &str,
    cuts: u32,
) -> KillReport {
    relay_killed(broker, ns, cuts, false).await
}

async fn relay_killed<B: Broker>(broker: &B, ns: &str, cuts: u32, ordered: bool) -> KillReport {
    let store = fresh_store(&format!("{ns}_kill")).await;
    let consumer = "kill-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    // Writers append until the cuts are over, so that every relay has new events to send.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            let writing = writing.clone();
            tokio::spawn(async move {
                let mut rounds = 0u64;
                while writing.load(std::sync::atomic::Ordering::SeqCst) || rounds == 0 {
                    for a in 0..3 {
                        append(&store, &format!("w{w}-a{a}"), 5, &[]).await;
                    }
                    rounds += 1;
                    tokio::time::sleep(Duration::from_millis(60)).await;
                }
                (w, rounds * 5)
            })
        })
        .collect();
    for cut in 0..cuts {
        let mut relay = Relay::new(store.clone(), broker.sink(ns), "killed")
            .with_batch(1 + (cut as usize % 7) * 10)
            .with_lease(Duration::from_secs(5));
        // Connecting to the broker takes a few milliseconds: cut anywhere from before the first
        // send to after several pages.
        let after = Duration::from_micros(rand::rng().random_range(2_000..60_000));
        let _ = tokio::time::timeout(after, async {
            loop {
                if relay.step().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
        .await;
        // Dropped mid-flight: whatever it sent and did not checkpoint is sent again by the next.
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut expected = BTreeMap::new();
    for writer in writers {
        let (w, per_aggregate) = writer.await.unwrap_or_else(|e| panic!("{e}"));
        for a in 0..3 {
            expected.insert(format!("w{w}-a{a}"), per_aggregate);
        }
    }
    let relay = Relay::new(store.clone(), broker.sink(ns), "killed");
    let (events, metrics, (missing, doubled, inversions)) =
        drain_and_tally(relay, &store, consumer, &expected, stop, running).await;
    let report = KillReport {
        events,
        cuts,
        missing,
        doubled,
        inversions,
        duplicates: metrics.duplicates,
        received: metrics.received,
    };
    assert_eq!(
        (missing, doubled, if ordered { inversions } else { 0 }),
        (0, 0, 0),
        "the relay cut {cuts} times: {report:?}"
    );
    report
}

/// Aggregate `bad` has a poison event (version 2 of 3); 5 other aggregates have 4 events each.
/// The poison event is tried 3 times, then dead-lettered, and the later event of its aggregate
/// waits behind it (dead-lettered too, saying so): per-aggregate order holds through a dead
/// letter. Every event of the other aggregates is applied. The consumer's database records both
/// dead letters under the projection's name, the first with its error and tries.
///
/// # Panics
/// When a guarantee does not hold.
pub async fn poison_is_dead_lettered<B: Broker>(broker: &B, ns: &str) {
    let store = fresh_store(&format!("{ns}_poison")).await;
    let consumer = "poison-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let bad = append(&store, "bad", 3, &[2]).await;
    for a in 0..5 {
        append(&store, &format!("good-{a}"), 4, &[]).await;
    }
    let mut relay = Relay::new(store.clone(), broker.sink(ns), "poison");
    drain(&mut relay).await;
    let pool = store.pool().clone();
    wait_applied(
        &pool,
        store.schema(),
        consumer,
        1 + 20,
        Duration::from_secs(60),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dead = broker
            .dead_letters(ns, consumer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if dead == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{dead} dead letters, expected 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    let metrics = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(metrics.dead_lettered, 2, "{metrics:?}");
    assert_eq!(
        metrics.retries, 2,
        "two retries of the poison event: {metrics:?}"
    );
    let by_id = applied(&pool, store.schema(), consumer).await;
    assert_eq!(
        by_id.get("bad"),
        Some(&vec![1]),
        "the event after the poison one waits behind it"
    );
    let letters = evently_postgres::control::DeadLetters::new(store.clone())
        .list(Recording::NAME)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let recorded: Vec<_> = letters
        .iter()
        .map(|l| (l.event_id, l.version, l.attempts))
        .collect();
    assert_eq!(
        recorded,
        vec![(bad[1], 2, 3), (bad[2], 3, 0)],
        "the consumer's database records both: {letters:?}"
    );
    assert!(letters[0].error.contains("poison"), "{letters:?}");
    assert_eq!(letters[1].error, evently_core::projection::WAITS_BEHIND);
}

/// Writers appending `per_append` events at a time to aggregates `<prefix>0..<prefix>2`, each
/// pausing `pause` between appends, until [`Writers::stop`].
struct Writers {
    writing: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(String, u64)>>,
}

impl Writers {
    fn start(store: &PostgresEventStore, prefix: &str, per_append: u64, pause: Duration) -> Self {
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let tasks = (0..3)
            .map(|a| {
                let store = store.clone();
                let writing = writing.clone();
                let id = format!("{prefix}{a}");
                tokio::spawn(async move {
                    let mut written = 0u64;
                    while writing.load(std::sync::atomic::Ordering::SeqCst) || written == 0 {
                        append(&store, &id, per_append, &[]).await;
                        written += per_append;
                        tokio::time::sleep(pause).await;
                    }
                    (id, written)
                })
            })
            .collect();
        Self { writing, tasks }
    }

    /// Stops them; each aggregate with how many events it was given.
    async fn stop(self) -> BTreeMap<String, u64> {
        self.writing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut expected = BTreeMap::new();
        for task in self.tasks {
            let (id, written) = task.await.unwrap_or_else(|e| panic!("{e}"));
            expected.insert(id, written);
        }
        expected
    }
}

/// Drains what is left through `relay`, waits until the consumer applied all of `expected`
/// (and a moment more for redeliveries on their way, which must all be dropped), stops it, and
/// tallies what it applied: (events, its counters, (missing, applied twice, inversions)).
async fn drain_and_tally<S: Sink>(
    mut relay: Relay<S>,
    store: &PostgresEventStore,
    consumer: &str,
    expected: &BTreeMap<String, u64>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<ConsumerMetrics, TransportError>>,
) -> (u64, ConsumerMetrics, (u64, u64, u64)) {
    drain(&mut relay).await;
    let events: u64 = expected.values().sum();
    let pool = store.pool().clone();
    wait_applied(
        &pool,
        store.schema(),
        consumer,
        i64::try_from(events).unwrap_or(i64::MAX),
        Duration::from_secs(120),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    let metrics = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("the consumer failed: {e}"));
    let by_id = applied(&pool, store.schema(), consumer).await;
    (events, metrics, tally(expected, &by_id))
}

/// Per aggregate of `expected` (id -> events written), against what was applied in order:
/// (missing, applied twice, inversions).
fn tally(expected: &BTreeMap<String, u64>, by_id: &BTreeMap<String, Vec<i64>>) -> (u64, u64, u64) {
    let (mut missing, mut doubled, mut inversions) = (0, 0, 0);
    for (id, count) in expected {
        let versions = by_id.get(id).cloned().unwrap_or_default();
        let mut unique = versions.clone();
        unique.sort_unstable();
        unique.dedup();
        doubled += (versions.len() - unique.len()) as u64;
        missing += count.saturating_sub(unique.len() as u64);
        inversions += versions.windows(2).filter(|p| p[1] < p[0]).count() as u64;
    }
    (missing, doubled, inversions)
}

/// Two relays run at once under one name and one owner (a process started twice by mistake, or
/// an old one still running beside its replacement) while writers append, with a lease short
/// enough that it changes hands: the consumer applies every event once, in each aggregate's
/// order. Returns (events, steps that found the lease held by the other).
///
/// # Panics
/// When a guarantee does not hold (with the figures).
pub async fn two_relays_under_one_name<B: Broker>(broker: &B, ns: &str) -> (u64, u64) {
    let store = fresh_store(&format!("{ns}_twins")).await;
    let consumer = "twins-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let writers = Writers::start(&store, "t", 3, Duration::from_millis(15));
    let relaying = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let twins: Vec<_> = (0..2)
        .map(|_| {
            let mut relay = Relay::new(store.clone(), broker.sink(ns), "twin")
                .with_name("twins")
                .with_batch(20)
                .with_lease(Duration::from_millis(600));
            let relaying = relaying.clone();
            tokio::spawn(async move {
                let mut refused = 0u64;
                while relaying.load(std::sync::atomic::Ordering::SeqCst) {
                    match relay.step().await {
                        Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        Err(TransportError::LeaseLost(_)) => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                refused
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let expected = writers.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relaying.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut refused = 0;
    for twin in twins {
        refused += twin.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let relay = Relay::new(store.clone(), broker.sink(ns), "twin").with_name("twins");
    let (events, metrics, (missing, doubled, inversions)) =
        drain_and_tally(relay, &store, consumer, &expected, stop, running).await;
    assert_eq!(
        (missing, doubled, inversions),
        (0, 0, 0),
        "two relays under one name: {events} events, {refused} steps refused the lease, \
         consumer {metrics:?}"
    );
    (events, refused)
}

/// A consumer is cut while its handler's transaction is open (its row written, not committed,
/// nothing acknowledged); a new consumer takes over. Every event is applied exactly once.
///
/// # Panics
/// When a guarantee does not hold.
pub async fn consumer_killed_mid_handler<B: Broker>(broker: &B, ns: &str) {
    let store = fresh_store(&format!("{ns}_midkill")).await;
    let consumer = "midkill-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let ids = append(&store, "victim", 10, &[]).await;
    let reached = Arc::new(Notify::new());
    let hanging = Recorder::new(&store, consumer).hang_on(ids[4], reached.clone());
    let (_stop, running) = start_consumer(broker, ns, consumer, hanging);
    let mut relay = Relay::new(store.clone(), broker.sink(ns), "midkill");
    drain(&mut relay).await;
    tokio::time::timeout(Duration::from_secs(30), reached.notified())
        .await
        .unwrap_or_else(|_| panic!("the handler never reached the fifth event"));
    // Killed mid-handler: its transaction and its connection to the broker go with it.
    running.abort();
    let _ = running.await;
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let pool = store.pool().clone();
    wait_applied(
        &pool,
        store.schema(),
        consumer,
        10,
        Duration::from_secs(120),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    let _ = running.await;
    let by_id = applied(&pool, store.schema(), consumer).await;
    assert_eq!(
        by_id.get("victim"),
        Some(&(1..=10).collect::<Vec<i64>>()),
        "each event applied once, in order"
    );
}

/// A message that is not an envelope, on the consumer's destination: dead-lettered with why;
/// the consumer goes on with the next event.
///
/// # Panics
/// When a guarantee does not hold.
pub async fn not_ours_is_dead_lettered<B: Broker>(broker: &B, ns: &str) {
    let store = fresh_store(&format!("{ns}_foreign")).await;
    let consumer = "foreign-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    broker
        .publish_foreign(ns, consumer, b"{\"hello\": ")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    append(&store, "after", 2, &[]).await;
    let mut relay = Relay::new(store.clone(), broker.sink(ns), "foreign");
    drain(&mut relay).await;
    let pool = store.pool().clone();
    wait_applied(&pool, store.schema(), consumer, 2, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.dead_letters(ns, consumer).await.unwrap_or(0) != 1 {
        assert!(
            Instant::now() < deadline,
            "the foreign message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    let metrics = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (metrics.applied, metrics.dead_lettered),
        (2, 1),
        "{metrics:?}"
    );
}

/// Events recorded by commands in three traces (and some in none): the consumer's handler runs
/// each in its command's trace (what it sends joins that trace), across the broker.
///
/// # Panics
/// When a guarantee does not hold.
pub async fn trace_follows_each_event<B: Broker>(broker: &B, ns: &str) {
    let store = fresh_store(&format!("{ns}_trace")).await;
    let consumer = "trace-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let mut expected = BTreeMap::new();
    for n in 0..4u8 {
        let trace = (n > 0).then(|| evently_core::trace::TraceContext {
            trace_id: [n; 16],
            parent_id: [n + 1; 8],
            flags: 1,
        });
        let mut command = evently_core::CommandMetadata::new();
        if let Some(trace) = trace {
            command = command.with_trace(trace);
        }
        let stream = StreamId::new("note", format!("traced-{n}"));
        let events = (0..3)
            .map(|i| EventData {
                event_id: EventId::new(),
                event_type: "Noted".to_owned(),
                schema_version: 1,
                payload: serde_json::json!({ "n": i }),
                metadata: command.event_metadata(),
            })
            .collect();
        store
            .append(&stream, ExpectedVersion::NoStream, events)
            .await
            .unwrap_or_else(|e| panic!("append to {stream}: {e}"));
        expected.insert(
            stream.aggregate_id.as_str().to_owned(),
            trace.map(|t| t.trace_id_hex()),
        );
    }
    let mut relay = Relay::new(store.clone(), broker.sink(ns), "trace");
    drain(&mut relay).await;
    let pool = store.pool().clone();
    wait_applied(&pool, store.schema(), consumer, 12, Duration::from_secs(60)).await;
    let _ = stop.send(());
    let _ = running.await;
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT aggregate_id, trace FROM \"{}\".applied WHERE consumer = $1",
        store.schema()
    )))
    .bind(consumer)
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 12, "{rows:?}");
    for (id, trace) in rows {
        assert_eq!(
            Some(&trace),
            expected.get(&id),
            "the handler of an event of {id} ran in the wrong trace"
        );
    }
}

/// A poison event is dead-lettered and the next event of its aggregate waits behind it (also
/// in the dead-letter place); the operator lists them (the errors say why), fixes the cause and
/// retries the first: it is applied once; then retries all: the one that waited is applied
/// after it, in the aggregate's order, and the dead-letter place is empty. A retry of an id
/// that is not there is `false`.
///
/// # Panics
/// When a guarantee does not hold, or the broker offers no dead-letter queue.
pub async fn dead_letter_retried_after_a_fix<B: Broker>(broker: &B, ns: &str) {
    let store = fresh_store(&format!("{ns}_fix")).await;
    let consumer = "fix-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let queue = broker
        .dead_letter_queue(ns, consumer)
        .unwrap_or_else(|| panic!("the broker offers no dead-letter queue"));
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = Recorder::new(&store, consumer).poison_until(fixed.clone());
    let (stop, running) = start_consumer(broker, ns, consumer, handler);
    let ids = append(&store, "fixme", 3, &[2]).await;
    let mut relay = Relay::new(store.clone(), broker.sink(ns), "fix");
    drain(&mut relay).await;
    let pool = store.pool().clone();
    wait_applied(&pool, store.schema(), consumer, 1, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue.count().await.unwrap_or(0) != 2 {
        assert!(
            Instant::now() < deadline,
            "the poison event and the one behind it were not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = queue.list(10).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(letters.len(), 2, "{letters:?}");
    let (poison, behind) = (&letters[0], &letters[1]);
    assert_eq!(
        poison.event_id.as_deref(),
        Some(ids[1].to_string().as_str())
    );
    assert!(
        poison
            .error
            .as_deref()
            .is_some_and(|e| e.contains("poison")),
        "the dead letter says why: {poison}"
    );
    assert_eq!(
        behind.event_id.as_deref(),
        Some(ids[2].to_string().as_str())
    );
    assert!(
        behind
            .error
            .as_deref()
            .is_some_and(|e| e.contains("waits behind")),
        "the dead letter says why: {behind}"
    );
    assert!(
        !queue
            .retry("no-such-letter")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    // The bug is fixed; the operator retries the poison event, then all that is left.
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        queue
            .retry(&poison.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    wait_applied(&pool, store.schema(), consumer, 2, Duration::from_secs(60)).await;
    assert_eq!(queue.retry_all().await.unwrap_or_else(|e| panic!("{e}")), 1);
    wait_applied(&pool, store.schema(), consumer, 3, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queue.count().await.unwrap_or_else(|e| panic!("{e}")), 0);
    assert_eq!(queue.retry_all().await.unwrap_or_else(|e| panic!("{e}")), 0);
    let _ = stop.send(());
    let _ = running.await;
    let by_id = applied(&pool, store.schema(), consumer).await;
    assert_eq!(
        by_id.get("fixme"),
        Some(&vec![1, 2, 3]),
        "each applied once, in order"
    );
    let left = evently_postgres::control::DeadLetters::new(store.clone())
        .list(Recording::NAME)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        left.is_empty(),
        "the consumer's dead letters resolved: {left:?}"
    );
}

/// A handler for building a consumer only to declare its topology or count its dead letters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unused;

#[async_trait::async_trait]
impl MessageHandler for Unused {
    fn name(&self) -> &str {
        "unused"
    }

    async fn handle(&mut self, _: &StoredEvent) -> Result<Handled, HandleError> {
        Ok(Handled::Skipped)
    }
}

/// The broker is stopped and started again `restarts` times (by `restart`, which returns once
/// the broker is back) while writers append and a running relay ([`Relay::run`]) and consumer
/// work. Both must come back by themselves: every event applied once, in each aggregate's order.
///
/// # Panics
/// When a guarantee does not hold.
pub async fn broker_restarted_mid_stream<B, R>(broker: &B, ns: &str, restarts: u32, mut restart: R)
where
    B: Broker,
    R: FnMut(u32) -> BoxFuture<'static, ()>,
{
    let store = fresh_store(&format!("{ns}_restart")).await;
    let consumer = "restart-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop_consumer, consuming) =
        start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = Relay::new(store.clone(), broker.sink(ns), "restarted");
    let relaying = tokio::spawn(relay.run(Duration::from_millis(50), async move {
        let _ = relay_stopped.await;
    }));
    let writers = Writers::start(&store, "r", 2, Duration::from_millis(10));
    for n in 0..restarts {
        tokio::time::sleep(Duration::from_millis(700)).await;
        restart(n).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = writers.stop().await;
    let events: u64 = expected.values().sum();
    let pool = store.pool().clone();
    wait_applied(
        &pool,
        store.schema(),
        consumer,
        i64::try_from(events).unwrap_or(i64::MAX),
        Duration::from_secs(120),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_relay.send(());
    let _ = stop_consumer.send(());
    let relayed = relaying.await.unwrap_or_else(|e| panic!("{e}"));
    let relayed = relayed.unwrap_or_else(|e| panic!("the relay stopped: {e}"));
    let consumed = consuming
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("the consumer stopped: {e}"));
    let by_id = applied(&pool, store.schema(), consumer).await;
    for (id, written) in &expected {
        let versions = by_id.get(id).cloned().unwrap_or_default();
        let want: Vec<i64> = (1..=i64::try_from(*written).unwrap_or(0)).collect();
        assert_eq!(
            versions, want,
            "{id}: applied once each, in order, across {restarts} broker restarts \
             (relay {relayed:?}, consumer {consumed:?})"
        );
    }
    println!(
        "{} broker restarts: {events} events, relay {relayed:?}, consumer {consumed:?}",
        restarts
    );
}

/// A TCP proxy to a broker whose connections can all be cut at once: a network failure between
/// the framework and a live broker (both ends see the connection closed; bytes in flight are
/// lost; the broker keeps its state). Point the relay and consumers at
/// `127.0.0.1:<`[`port`](Self::port)`>` and pass [`cut`](Self::cut) as the restart of
/// [`broker_restarted_mid_stream`].
#[derive(Debug)]
pub struct CutProxy {
    port: u16,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards every connection to `target` (`host:port`).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: impl Into<String>) -> Self {
        let target = target.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind a proxy port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let held = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let piping = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(piping);
            }
        });
        Self {
            port,
            connections,
            accepting,
        }
    }

    /// The port to connect to.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every connection through the proxy now; returns how many there were. New
    /// connections are accepted at once.
    pub fn cut(&self) -> usize {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cut = connections.len();
        for connection in connections.drain(..) {
            connection.abort();
        }
        cut
    }
}

impl CutProxy {
    /// How many connections through the proxy are open now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|connection| !connection.is_finished())
            .count()
    }

    /// The "restart" of [`broker_restarted_mid_stream`]: cuts every connection once at least one
    /// is open (a client still backing off from the last cut has not reconnected yet; cutting
    /// nothing would prove nothing), and panics when none opens within 30 s: the relay and
    /// consumer are not going through the proxy, or did not come back after the last cut.
    pub fn cuts(self: Arc<Self>) -> impl FnMut(u32) -> BoxFuture<'static, ()> {
        move |n| {
            let proxy = Arc::clone(&self);
            Box::pin(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while proxy.open() == 0 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "nothing connected through the proxy within 30 s before cut {}: the \
                         relay and consumer do not use it, or did not come back after a cut",
                        n + 1
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                proxy.cut();
            })
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}
