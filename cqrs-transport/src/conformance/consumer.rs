//! The consumer: poison messages, messages that are not ours, a consumer cut mid-handler, dead
//! letters retried after a fix, and the trace of each event.

use evently_core::projection::LetterReason;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evently_core::projection::Projection;
use evently_core::{EventData, EventId, EventStore, ExpectedVersion, StoredEvent, StreamId};
use tokio::sync::Notify;

use crate::{HandleError, Handled, MessageHandler, Relay};

use super::*;

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
    assert_eq!(
        (letters[0].reason, letters[1].reason),
        (LetterReason::Failed, LetterReason::WaitsBehind),
        "{letters:?}"
    );
    assert_eq!(letters[1].error, evently_core::projection::WAITS_BEHIND);
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
/// each in its command's trace (what it sends joins that trace), across the broker. The events of
/// one stream are a tenant's (appended through a store scoped to it): its handler sees the
/// tenant, the others none.
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
        let tenant = evently_core::TenantId::new("tenant-2").unwrap_or_else(|e| panic!("{e}"));
        let writer = if n == 2 {
            store.clone().with_tenant(tenant)
        } else {
            store.clone()
        };
        let events = (0..3)
            .map(|i| EventData {
                event_id: EventId::new(),
                event_type: "Noted".to_owned(),
                schema_version: 1,
                payload: serde_json::json!({ "n": i }),
                metadata: command.event_metadata(),
            })
            .collect();
        writer
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
    let rows: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT aggregate_id, trace, tenant FROM \"{}\".applied WHERE consumer = $1",
            store.schema()
        )))
        .bind(consumer)
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 12, "{rows:?}");
    for (id, trace, tenant) in rows {
        assert_eq!(
            Some(&trace),
            expected.get(&id),
            "the handler of an event of {id} ran in the wrong trace"
        );
        let stamped = (id == "traced-2").then(|| "tenant-2".to_owned());
        assert_eq!(
            tenant, stamped,
            "the tenant of an event of {id} across the broker"
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
