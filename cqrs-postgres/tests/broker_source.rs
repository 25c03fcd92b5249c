//! The delivery engine fed from a broker ([`Engine::deliver`] on an [`InboxBackend`]) against the
//! real PostgreSQL: events arrive one by one or in batches, as a broker hands them over, and the
//! engine applies them by the same rules as a window of the store. A redelivery applies nothing
//! (inbox), a poison event is retried and parked in `projection_dead_letters`, the later events
//! of its aggregate wait behind it (even when sent back too early), and once the cause is fixed
//! and the letters come back in order each applies once, in order. An outage of the handler's
//! database is an error, never a dead letter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::fresh_store;
use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::{
    Delivered, Engine, FailureMode, FailurePolicy, HandlerError, LetterReason, WAITS_BEHIND,
};
use evently_core::{EventData, EventId, RecordedEvent, StoredEvent};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::DeadLetters;
use evently_postgres::projection::InboxBackend;
use futures::TryStreamExt as _;
use sqlx::{AssertSqlSafe, PgConnection};

/// Records each deposit it applies, in order (not idempotent: a second application shows).
#[derive(Projection)]
#[projection(name = "deposits_seen", events(AccountEvent), context = PgConnection)]
struct DepositsSeen {
    schema: String,
    /// Deposits whose amount is a multiple of 13 fail while set.
    poison: Arc<AtomicBool>,
    /// Every deposit fails as if the database connection broke, while set.
    outage: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for DepositsSeen {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let AccountEvent::Deposited(deposit) = &event.event else {
            return Ok(());
        };
        if self.outage.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("connection reset by peer").into());
        }
        if self.poison.load(Ordering::SeqCst) && deposit.amount_cents % 13 == 0 {
            return Err(format!("poison deposit of {}", deposit.amount_cents).into());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".seen (account, version) VALUES ($1, $2)",
            self.schema
        )))
        .bind(event.stream.aggregate_id.as_str())
        .bind(i64::try_from(event.version)?)
        .execute(conn)
        .await?;
        Ok(())
    }
}

struct Fixture {
    store: PostgresEventStore,
    engine: Engine<DepositsSeen, InboxBackend>,
    poison: Arc<AtomicBool>,
    outage: Arc<AtomicBool>,
}

async fn fixture(name: &str, mode: FailureMode) -> Fixture {
    let store = fresh_store(name).await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".seen (seq bigserial PRIMARY KEY, account text NOT NULL, version bigint NOT NULL)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let poison = Arc::new(AtomicBool::new(true));
    let outage = Arc::new(AtomicBool::new(false));
    let projection = DepositsSeen {
        schema: store.schema().to_owned(),
        poison: poison.clone(),
        outage: outage.clone(),
    };
    let mut engine = Engine::new(projection, InboxBackend::new(store.clone()), 1);
    engine.set_policy(FailurePolicy {
        attempts: 3,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        mode,
    });
    Fixture {
        store,
        engine,
        poison,
        outage,
    }
}

/// Appends deposits of `amounts` to account `id` and returns them as stored: what a relay would
/// have published and a broker handed to the consumer.
async fn deposits(store: &PostgresEventStore, id: &str, amounts: &[u64]) -> Vec<StoredEvent> {
    let stream = StreamId::new("account", id);
    let data = amounts
        .iter()
        .map(|&amount_cents| {
            EventData::from_event(
                &AccountEvent::Deposited(Deposit {
                    amount_cents,
                    reference: String::new(),
                }),
                Metadata::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect::<Vec<_>>();
    store
        .append(&stream, ExpectedVersion::Any, data)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut events: Vec<StoredEvent> = store
        .load(&stream, 0)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let from = events.len() - amounts.len();
    events.split_off(from)
}

async fn seen(store: &PostgresEventStore, account: &str) -> Vec<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM \"{}\".seen WHERE account = $1 ORDER BY seq",
        store.schema()
    )))
    .bind(account)
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn letters(store: &PostgresEventStore) -> Vec<(EventId, u64, u32, String)> {
    DeadLetters::new(store.clone())
        .list("deposits_seen")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|l| (l.event_id, l.version, l.attempts, l.error))
        .collect()
}

async fn deliver(
    engine: &mut Engine<DepositsSeen, InboxBackend>,
    event: &StoredEvent,
) -> Delivered {
    let mut delivered = engine
        .deliver(std::slice::from_ref(event))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(delivered.len(), 1);
    delivered.remove(0)
}

/// The tries and the error of a parked event, checking that its reason goes with its error.
fn parked_after(delivered: &Delivered) -> (u32, &str) {
    match delivered {
        Delivered::Parked(failure) => {
            let expected = if failure.error == WAITS_BEHIND {
                LetterReason::WaitsBehind
            } else {
                LetterReason::Failed
            };
            assert_eq!(failure.reason, expected, "{failure:?}");
            (failure.attempts, failure.error.as_str())
        }
        other => panic!("expected a parked event, got {other:?}"),
    }
}

#[tokio::test]
async fn a_poison_event_blocks_its_aggregate_until_its_letters_come_back_in_order() {
    let Fixture {
        store,
        mut engine,
        poison,
        ..
    } = fixture("source_block", FailureMode::BlockStream).await;
    let one = deposits(&store, "acct-1", &[100, 13, 200]).await;
    let two = deposits(&store, "acct-2", &[300]).await;

    assert_eq!(deliver(&mut engine, &one[0]).await, Delivered::Applied);
    let failed = deliver(&mut engine, &one[1]).await;
    let (attempts, error) = parked_after(&failed);
    assert_eq!(attempts, 3);
    assert!(error.contains("poison deposit of 13"), "{error}");
    let waits = deliver(&mut engine, &one[2]).await;
    assert_eq!(parked_after(&waits), (0, WAITS_BEHIND));
    assert_eq!(deliver(&mut engine, &two[0]).await, Delivered::Applied);
    // A redelivery of an applied event applies nothing.
    assert_eq!(deliver(&mut engine, &one[0]).await, Delivered::Duplicate);

    // The one that waits, sent back before the poison one: it waits again, letters unchanged.
    let before = letters(&store).await;
    assert_eq!(before.len(), 2, "{before:?}");
    let again = deliver(&mut engine, &one[2]).await;
    assert_eq!(parked_after(&again), (0, WAITS_BEHIND));
    assert_eq!(letters(&store).await, before);

    // Still failing when sent back: the letter keeps the new error, the other still waits.
    let still = deliver(&mut engine, &one[1]).await;
    assert_eq!(parked_after(&still).0, 3);
    assert_eq!(letters(&store).await.len(), 2);

    // Fixed, and the letters come back in order: each applies once, in the aggregate's order.
    poison.store(false, Ordering::SeqCst);
    assert_eq!(deliver(&mut engine, &one[1]).await, Delivered::Applied);
    assert_eq!(deliver(&mut engine, &one[2]).await, Delivered::Applied);
    assert_eq!(deliver(&mut engine, &one[1]).await, Delivered::Duplicate);
    assert_eq!(seen(&store, "acct-1").await, vec![1, 2, 3]);
    assert_eq!(seen(&store, "acct-2").await, vec![1]);
    assert!(letters(&store).await.is_empty());
    let metrics = engine.metrics();
    assert_eq!((metrics.applied, metrics.parked), (4, 4), "{metrics:?}");
}

#[tokio::test]
async fn a_batch_with_a_poison_event_keeps_the_rest_and_parks_behind_it() {
    let Fixture {
        store, mut engine, ..
    } = fixture("source_batch", FailureMode::BlockStream).await;
    let mut batch = deposits(&store, "acct-1", &[100, 26, 200]).await;
    batch.extend(deposits(&store, "acct-2", &[300, 400]).await);
    let delivered = engine
        .deliver(&batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<_> = delivered
        .iter()
        .map(|d| match d {
            Delivered::Parked(f) => format!("parked/{}", f.attempts),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["Applied", "parked/3", "parked/0", "Applied", "Applied"]
    );
    assert_eq!(seen(&store, "acct-1").await, vec![1]);
    assert_eq!(seen(&store, "acct-2").await, vec![1, 2]);
    // The whole batch again (a redelivery after a lost acknowledgment): nothing twice.
    let again = engine
        .deliver(&batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again[0], Delivered::Duplicate);
    assert_eq!(again[3], Delivered::Duplicate);
    assert_eq!(seen(&store, "acct-2").await, vec![1, 2]);
    assert_eq!(letters(&store).await.len(), 2);
}

#[tokio::test]
async fn skip_mode_applies_past_a_dead_letter_and_a_fixed_letter_resolves() {
    let Fixture {
        store,
        mut engine,
        poison,
        ..
    } = fixture("source_skip", FailureMode::Skip).await;
    let one = deposits(&store, "acct-1", &[100, 39, 200]).await;
    assert_eq!(deliver(&mut engine, &one[0]).await, Delivered::Applied);
    assert_eq!(parked_after(&deliver(&mut engine, &one[1]).await).0, 3);
    assert_eq!(deliver(&mut engine, &one[2]).await, Delivered::Applied);
    poison.store(false, Ordering::SeqCst);
    assert_eq!(deliver(&mut engine, &one[1]).await, Delivered::Applied);
    assert_eq!(seen(&store, "acct-1").await, vec![1, 3, 2]);
    assert!(letters(&store).await.is_empty());
}

#[tokio::test]
async fn an_unknown_type_of_our_aggregate_is_parked_and_another_aggregate_is_skipped() {
    let Fixture {
        store, mut engine, ..
    } = fixture("source_unknown", FailureMode::BlockStream).await;
    let one = deposits(&store, "acct-1", &[100, 200]).await;
    let mut unknown = one[0].clone();
    unknown.event_id = EventId::new();
    unknown.version = 2;
    unknown.event_type = "AccountFrozen".to_owned();
    let mut foreign = one[0].clone();
    foreign.event_id = EventId::new();
    foreign.stream = StreamId::new("Parcel", "p-1");
    foreign.event_type = "ParcelShipped".to_owned();

    assert_eq!(deliver(&mut engine, &one[0]).await, Delivered::Applied);
    let parked = deliver(&mut engine, &unknown).await;
    let (attempts, error) = parked_after(&parked);
    assert_eq!(attempts, 0);
    assert!(
        error.contains("unknown event type `AccountFrozen` of aggregate type `account`"),
        "{error}"
    );
    assert_eq!(deliver(&mut engine, &foreign).await, Delivered::Skipped);
    // Version 2 of the store's own stream waits behind the parked unknown one.
    let mut next = one[1].clone();
    next.version = 3;
    assert_eq!(
        parked_after(&deliver(&mut engine, &next).await).1,
        WAITS_BEHIND
    );
    assert_eq!(seen(&store, "acct-1").await, vec![1]);
}

#[tokio::test]
async fn an_outage_of_the_handlers_database_is_an_error_and_parks_nothing() {
    let Fixture {
        store,
        mut engine,
        outage,
        ..
    } = fixture("source_outage", FailureMode::BlockStream).await;
    let one = deposits(&store, "acct-1", &[100, 200]).await;
    outage.store(true, Ordering::SeqCst);
    let error = engine
        .deliver(&one)
        .await
        .expect_err("an outage is not the event's fault");
    assert!(error.to_string().contains("connection reset"), "{error}");
    assert!(letters(&store).await.is_empty(), "nothing parked");
    assert!(seen(&store, "acct-1").await.is_empty());
    // Back: the same messages (never acknowledged) apply once.
    outage.store(false, Ordering::SeqCst);
    let delivered = engine.deliver(&one).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(delivered, vec![Delivered::Applied, Delivered::Applied]);
    assert_eq!(seen(&store, "acct-1").await, vec![1, 2]);
}

#[tokio::test]
async fn batches_of_received_events_apply_in_order() {
    let Fixture {
        store,
        mut engine,
        poison,
        ..
    } = fixture("source_many", FailureMode::BlockStream).await;
    poison.store(false, Ordering::SeqCst);
    let amounts: Vec<u64> = (1..=200).map(|i| i * 2).collect();
    let events = deposits(&store, "acct-9", &amounts).await;
    for chunk in events.chunks(50) {
        let delivered = engine
            .deliver(chunk)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            delivered.iter().all(|d| *d == Delivered::Applied),
            "{delivered:?}"
        );
    }
    let seen = seen(&store, "acct-9").await;
    assert_eq!(seen, (1..=200).collect::<Vec<i64>>());
}
