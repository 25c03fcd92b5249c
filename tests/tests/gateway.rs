//! The command gateway on the in-memory store: dispatch, metadata, expectations, rejections,
//! conflicts and retries, the aggregate cache, bad stored data.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cqrs_examples::bank::{Account, AccountCommand, AccountError, AccountEvent, Deposit};
use cqrs_examples::order::{Order, OrderCommand, OrderError, OrderItem, OrderStatus};
use evently_core::prelude::*;
use evently_core::store::AppendResult;
use evently_core::{
    Checkpoint, CorrelationId, EventData, EventId, EventStoreExt, KeyRecord, StoreError,
    StoredEvent,
};
use futures::stream::BoxStream;

fn items() -> Vec<OrderItem> {
    vec![OrderItem {
        sku: "sku-1".into(),
        quantity: 3,
        unit_price_cents: 500,
    }]
}

fn create() -> OrderCommand {
    OrderCommand::CreateOrder {
        customer_id: "c-1".into(),
        items: items(),
    }
}

#[tokio::test]
async fn commands_dispatch_to_handlers_and_events_apply() {
    let gateway = CommandGateway::<Order, _>::new(InMemoryEventStore::new());
    let created = gateway
        .execute("o-1", create(), CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!(created.version, 1);
    assert_eq!(created.events.len(), 1);
    assert_eq!(created.events[0].version, 1);
    let confirmed = gateway
        .execute("o-1", OrderCommand::ConfirmOrder, CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!(confirmed.version, 2);
    let (order, version) = gateway.load("o-1").await.unwrap();
    assert_eq!(version, 2);
    assert_eq!(order.status, OrderStatus::Confirmed);
    assert_eq!(order.total_cents, 1500);
}

#[tokio::test]
async fn correlation_and_causation_flow_into_every_event() {
    let store = InMemoryEventStore::new();
    let gateway = CommandGateway::<Order, _>::new(store.clone());
    let correlation = CorrelationId::new();
    let meta = CommandMetadata::new()
        .correlated(correlation)
        .by_user("bob")
        .with_header("tenant", "t1");
    let command_id = meta.command_id;
    let done = gateway.execute("o-2", create(), meta).await.unwrap();
    let stored = store.load_all(&done.stream).await.unwrap();
    for metadata in stored
        .iter()
        .map(|e| &e.metadata)
        .chain(done.events.iter().map(|e| &e.metadata))
    {
        assert_eq!(metadata.correlation_id, Some(correlation));
        assert_eq!(metadata.causation_id, Some(command_id.into()));
        assert_eq!(metadata.user_id.as_deref(), Some("bob"));
        assert_eq!(
            metadata.headers.get("tenant").map(String::as_str),
            Some("t1")
        );
    }
    // Without a correlation id the command id starts the correlation.
    let meta = CommandMetadata::new();
    let command_id = meta.command_id;
    let done = gateway
        .execute("o-2", OrderCommand::ConfirmOrder, meta)
        .await
        .unwrap();
    assert_eq!(
        done.events[0].metadata.correlation_id,
        Some(CorrelationId(command_id.0))
    );
}

#[tokio::test]
async fn aggregate_errors_reach_the_caller_unchanged() {
    let gateway = CommandGateway::<Order, _>::new(InMemoryEventStore::new());
    let empty = OrderCommand::CreateOrder {
        customer_id: "c".into(),
        items: Vec::new(),
    };
    let error = gateway
        .execute("o-3", empty, CommandMetadata::new())
        .await
        .unwrap_err();
    assert_eq!(error.into_rejection(), Some(OrderError::NoItems));
    gateway
        .execute("o-3", create(), CommandMetadata::new())
        .await
        .unwrap();
    gateway
        .execute("o-3", OrderCommand::ConfirmOrder, CommandMetadata::new())
        .await
        .unwrap();
    let error = gateway
        .execute("o-3", OrderCommand::ConfirmOrder, CommandMetadata::new())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        CommandError::Rejected(OrderError::NotPending(OrderStatus::Confirmed))
    ));
    assert_eq!(
        gateway.store().len(),
        2,
        "a rejected command records nothing"
    );
}

#[tokio::test]
async fn missing_and_existing_aggregates_are_typed_errors() {
    let gateway = CommandGateway::<Order, _>::new(InMemoryEventStore::new());
    let error = gateway
        .execute("nope", OrderCommand::ConfirmOrder, CommandMetadata::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CommandError::NotFound { stream } if stream.aggregate_id.as_str() == "nope"),
        "{error}"
    );
    gateway
        .execute("o-4", create(), CommandMetadata::new())
        .await
        .unwrap();
    let error = gateway
        .execute("o-4", create(), CommandMetadata::new())
        .await
        .unwrap_err();
    assert!(
        matches!(error, CommandError::AlreadyExists { version: 1, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn events_written_by_others_are_seen_despite_the_cache() {
    let store = InMemoryEventStore::new();
    let a = CommandGateway::<Account, _>::new(store.clone());
    let b = CommandGateway::<Account, _>::new(store.clone());
    a.execute(
        "acc",
        AccountCommand::Open { owner: "x".into() },
        CommandMetadata::new(),
    )
    .await
    .unwrap();
    let deposit = |cents| {
        AccountCommand::Deposit(Deposit {
            amount_cents: cents,
            reference: String::new(),
        })
    };
    a.execute("acc", deposit(100), CommandMetadata::new())
        .await
        .unwrap();
    b.execute("acc", deposit(50), CommandMetadata::new())
        .await
        .unwrap();
    // `a` cached the account at version 2; the withdrawal must see b's deposit (balance 150).
    let done = a
        .execute(
            "acc",
            AccountCommand::Withdraw { amount_cents: 150 },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    assert_eq!(done.version, 4);
    let error = a
        .execute(
            "acc",
            AccountCommand::Withdraw { amount_cents: 1 },
            CommandMetadata::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error.into_rejection(),
        Some(AccountError::InsufficientFunds {
            balance_cents: 0,
            asked_cents: 1
        })
    );
}

#[tokio::test]
async fn concurrent_commands_on_one_aggregate_all_land_through_retries() {
    let store = InMemoryEventStore::new();
    let gateway = Arc::new(CommandGateway::<Account, _>::new(store.clone()).with_max_retries(1000));
    gateway
        .execute(
            "hot",
            AccountCommand::Open { owner: "x".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let gateway = Arc::clone(&gateway);
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let deposit = AccountCommand::Deposit(Deposit {
                    amount_cents: 1,
                    reference: String::new(),
                });
                gateway
                    .execute("hot", deposit, CommandMetadata::new())
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (account, version) = gateway.load("hot").await.unwrap();
    assert_eq!(version, 401);
    assert_eq!(account.balance_cents, 400);
}

/// A store that lets another writer append just before the gateway's first `conflicts` appends.
#[derive(Clone)]
struct Interfering {
    inner: InMemoryEventStore,
    conflicts: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl EventStore for Interfering {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        if self
            .conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            let deposit = AccountEvent::Deposited(Deposit {
                amount_cents: 7,
                reference: "other".into(),
            });
            let other = EventData::from_event(&deposit, Metadata::default()).unwrap();
            self.inner
                .append(stream, ExpectedVersion::Any, vec![other])
                .await?;
        }
        self.inner.append(stream, expected, events).await
    }
    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after: u64,
    ) -> BoxStream<'a, Result<StoredEvent, StoreError>> {
        self.inner.load(stream, after)
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }
    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_all(after, limit).await
    }
    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        self.inner
            .append_with_key(stream, expected, events, key)
            .await
    }
    async fn find_key(&self, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_key(key).await
    }
    async fn head(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.inner.head().await
    }
}

#[tokio::test]
async fn a_conflict_reloads_and_decides_again_up_to_the_limit() {
    let inner = InMemoryEventStore::new();
    let conflicts = Arc::new(AtomicUsize::new(0));
    let store = Interfering {
        inner: inner.clone(),
        conflicts: Arc::clone(&conflicts),
    };
    let gateway = CommandGateway::<Account, _>::new(store).with_max_retries(2);
    gateway
        .execute(
            "a",
            AccountCommand::Open { owner: "x".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();

    // Two conflicts, then success: each attempt reloads the interfering deposit and decides again.
    conflicts.store(2, Ordering::SeqCst);
    let deposit = || {
        AccountCommand::Deposit(Deposit {
            amount_cents: 1,
            reference: String::new(),
        })
    };
    let done = gateway
        .execute("a", deposit(), CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!(done.version, 4);
    assert_eq!(gateway.load("a").await.unwrap().0.balance_cents, 15);

    // Three conflicts with two retries: the command gives up and records nothing.
    conflicts.store(3, Ordering::SeqCst);
    let error = gateway
        .execute("a", deposit(), CommandMetadata::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            CommandError::TooManyConflicts {
                attempts: 3,
                actual: 7,
                ..
            }
        ),
        "{error}"
    );
    let (account, version) = gateway.load("a").await.unwrap();
    assert_eq!(
        (account.balance_cents, version),
        (36, 7),
        "only the interfering deposits landed"
    );
    assert_eq!(inner.len(), 7);
}

#[tokio::test]
async fn an_undecodable_stored_event_is_a_typed_error_naming_it() {
    let store = InMemoryEventStore::new();
    let gateway = CommandGateway::<Account, _>::new(store.clone()).with_cache_capacity(0);
    gateway
        .execute(
            "bad",
            AccountCommand::Open { owner: "x".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    gateway
        .execute(
            "good",
            AccountCommand::Open { owner: "y".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    let corrupt = EventData {
        event_id: EventId::new(),
        event_type: "MoneyDeposited".into(),
        schema_version: 2,
        payload: serde_json::json!({ "amount_cents": "lots" }),
        metadata: Metadata::default(),
    };
    store
        .append(
            &StreamId::new("account", "bad"),
            ExpectedVersion::Exact(1),
            vec![corrupt],
        )
        .await
        .unwrap();
    let error = gateway
        .execute(
            "bad",
            AccountCommand::Withdraw { amount_cents: 1 },
            CommandMetadata::new(),
        )
        .await
        .unwrap_err();
    match error {
        CommandError::Store(StoreError::Decode {
            stream,
            version,
            event_type,
            ..
        }) => {
            assert_eq!(stream, StreamId::new("account", "bad"));
            assert_eq!(version, 2);
            assert_eq!(event_type, "MoneyDeposited");
        }
        other => panic!("expected a decode error, got {other}"),
    }
    let unknown = EventData {
        event_type: "Exploded".into(),
        event_id: EventId::new(),
        ..EventData::from_event(
            &AccountEvent::Withdrawn { amount_cents: 1 },
            Metadata::default(),
        )
        .unwrap()
    };
    store
        .append(
            &StreamId::new("account", "bad"),
            ExpectedVersion::Any,
            vec![unknown],
        )
        .await
        .unwrap();
    assert!(matches!(
        gateway.load("bad").await,
        Err(StoreError::Decode { version: 2, .. })
    ));
    // Other aggregates are unaffected.
    let deposit = AccountCommand::Deposit(Deposit {
        amount_cents: 5,
        reference: String::new(),
    });
    assert_eq!(
        gateway
            .execute("good", deposit, CommandMetadata::new())
            .await
            .unwrap()
            .version,
        2
    );
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(aggregate = Switch)]
enum SwitchEvent {
    TurnedOn,
}

#[derive(Debug, Clone, Command)]
#[command(aggregate = Switch)]
enum SwitchCommand {
    #[command(create_or_update)]
    TurnOn,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "switch", command = SwitchCommand, event = SwitchEvent, error = Never)]
struct Switch {
    on: bool,
}

impl Switch {
    fn turn_on(&self) -> Result<Vec<SwitchEvent>, Never> {
        Ok(if self.on {
            Vec::new()
        } else {
            vec![SwitchEvent::TurnedOn]
        })
    }

    fn apply_turned_on(&mut self) {
        self.on = true;
    }
}

#[tokio::test]
async fn a_command_that_decides_nothing_records_nothing() {
    let gateway = CommandGateway::<Switch, _>::new(InMemoryEventStore::new());
    let first = gateway
        .execute("s", SwitchCommand::TurnOn, CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!((first.version, first.events.len()), (1, 1));
    let second = gateway
        .execute("s", SwitchCommand::TurnOn, CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!((second.version, second.events.len()), (1, 0));
    assert_eq!(gateway.store().len(), 1);
}

fn deposit(cents: u64) -> AccountCommand {
    AccountCommand::Deposit(Deposit {
        amount_cents: cents,
        reference: String::new(),
    })
}

#[tokio::test]
async fn an_idempotency_key_executes_once_and_returns_the_first_outcome() {
    let store = InMemoryEventStore::new();
    let gateway = CommandGateway::<Account, _>::new(store.clone());
    gateway
        .execute(
            "k",
            AccountCommand::Open { owner: "x".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    let first = gateway
        .execute_idempotent("pay-1", "k", deposit(10), CommandMetadata::new())
        .await
        .unwrap();
    let again = gateway
        .execute_idempotent("pay-1", "k", deposit(10), CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!(
        first, again,
        "the repeat returns the first outcome, event ids included"
    );
    assert_eq!(gateway.load("k").await.unwrap().0.balance_cents, 10);

    // Used for another aggregate: a clear error, nothing executed.
    gateway
        .execute(
            "other",
            AccountCommand::Open { owner: "y".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    let error = gateway
        .execute_idempotent("pay-1", "other", deposit(10), CommandMetadata::new())
        .await
        .unwrap_err();
    assert!(matches!(error, CommandError::KeyReused { .. }), "{error}");

    // A rejection records no key: the retry decides again.
    let error = gateway
        .execute_idempotent("pay-2", "k", deposit(0), CommandMetadata::new())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        CommandError::Rejected(AccountError::ZeroAmount)
    ));
    let done = gateway
        .execute_idempotent("pay-2", "k", deposit(5), CommandMetadata::new())
        .await
        .unwrap();
    assert_eq!(done.version, 3);
}

#[tokio::test]
async fn racing_callers_with_one_key_get_one_execution() {
    let store = InMemoryEventStore::new();
    let open = CommandGateway::<Account, _>::new(store.clone());
    open.execute(
        "r",
        AccountCommand::Open { owner: "x".into() },
        CommandMetadata::new(),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // Separate gateways, as separate processes would have.
        let gateway = CommandGateway::<Account, _>::new(store.clone());
        tasks.push(tokio::spawn(async move {
            gateway
                .execute_idempotent("once", "r", deposit(1), CommandMetadata::new())
                .await
                .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert!(
        outcomes.windows(2).all(|w| w[0] == w[1]),
        "every caller sees the same outcome"
    );
    assert_eq!(open.load("r").await.unwrap().0.balance_cents, 1);
}

#[tokio::test]
async fn snapshots_are_taken_every_n_events_and_used_to_load() {
    use evently_core::{Snapshot, SnapshotStore};

    let store = InMemoryEventStore::new();
    let gateway = CommandGateway::<Account, _>::new(store.clone())
        .with_cache_capacity(0)
        .with_snapshots(store.clone());
    gateway
        .execute(
            "s",
            AccountCommand::Open { owner: "x".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    for _ in 0..250 {
        gateway
            .execute("s", deposit(1), CommandMetadata::new())
            .await
            .unwrap();
    }
    let stream = StreamId::new("account", "s");
    let snapshot = store
        .load_snapshot(&stream)
        .await
        .unwrap()
        .expect("a snapshot at version 200");
    assert_eq!((snapshot.version, snapshot.schema_version), (200, 1));
    assert_eq!(snapshot.state["balance_cents"], 199);

    // The snapshot is what loading starts from: a (deliberately wrong) snapshot shows through.
    let planted = Snapshot {
        version: 250,
        state: serde_json::json!({ "owner": "x", "balance_cents": 1000, "movements": 0 }),
        ..snapshot.clone()
    };
    store.save_snapshot(planted).await.unwrap();
    let (account, version) = gateway.load("s").await.unwrap();
    assert_eq!((account.balance_cents, version), (1001, 251));

    // A snapshot of another schema version, or one that does not deserialize, is ignored.
    for bad in [
        Snapshot {
            version: 251,
            schema_version: 7,
            ..snapshot.clone()
        },
        Snapshot {
            version: 251,
            state: serde_json::json!("garbage"),
            ..snapshot.clone()
        },
    ] {
        let fresh = InMemoryEventStore::new();
        let replayed =
            CommandGateway::<Account, _>::new(store.clone()).with_snapshots(fresh.clone());
        fresh.save_snapshot(bad).await.unwrap();
        assert_eq!(
            replayed.load("s").await.unwrap().0.balance_cents,
            250,
            "replayed from the events"
        );
    }
}
