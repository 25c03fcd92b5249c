//! This framework: the derived bank account through `CommandGateway` on `PostgresEventStore`.

use cqrs_examples::bank::{Account, AccountCommand, AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::{CommandError, EventData, EventStoreExt, Snapshot, SnapshotStore};
use evently_postgres::PostgresEventStore;

use crate::framework::{Failure, Framework, REFERENCE, amount};

/// The gateway over a store in its own schema.
pub struct Ours {
    store: PostgresEventStore,
    gateway: CommandGateway<Account, PostgresEventStore>,
}

impl Ours {
    /// Over `store` (an empty schema).
    pub fn new(store: PostgresEventStore) -> Self {
        Self {
            gateway: CommandGateway::new(store.clone()),
            store,
        }
    }
}

impl Ours {
    /// Saves a snapshot of account `id` at version `at` (as `snapshot(every = N)` leaves one at
    /// most N - 1 events behind the head).
    pub async fn snapshot(&self, id: u64, at: u64) -> Result<(), Failure> {
        let stream = StreamId::new("account", id_of(id));
        let events = self.store.load_all(&stream).await.map_err(Failure::other)?;
        let mut state = Account::default();
        for e in events.iter().take(at as usize) {
            state.apply(&e.decode::<AccountEvent>().map_err(Failure::other)?);
        }
        let state = serde_json::to_value(&state).map_err(Failure::other)?;
        self.store
            .save_snapshot(Snapshot {
                stream,
                version: at,
                schema_version: 1,
                state,
            })
            .await
            .map_err(Failure::other)
    }

    /// [`Framework::balance`] through the latest snapshot and the events after it.
    pub async fn balance_from_snapshot(&self, id: u64) -> Result<u64, Failure> {
        let gateway = CommandGateway::<Account, _>::new(self.store.clone())
            .with_cache_capacity(0)
            .with_snapshots(self.store.clone());
        let (account, _) = gateway.load(id_of(id)).await.map_err(Failure::other)?;
        Ok(account.balance_cents)
    }
}

fn id_of(id: u64) -> String {
    format!("acc-{id}")
}

fn failure<E: std::fmt::Display>(error: CommandError<E>) -> Failure {
    match error {
        CommandError::TooManyConflicts { .. } => Failure::Conflict,
        other => Failure::other(other),
    }
}

/// A deposit event, as the gateway records it.
pub fn deposit_event(n: u64) -> EventData {
    let event = AccountEvent::Deposited(Deposit {
        amount_cents: amount(n),
        reference: REFERENCE.into(),
    });
    EventData::from_event(&event, Metadata::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[async_trait::async_trait]
impl Framework for Ours {
    fn name(&self) -> &'static str {
        "this framework"
    }

    async fn open(&self, id: u64) -> Result<(), Failure> {
        let open = AccountCommand::Open {
            owner: "ada".into(),
        };
        self.gateway
            .execute(id_of(id), open, CommandMetadata::new())
            .await
            .map(|_| ())
            .map_err(failure)
    }

    async fn deposit(&self, id: u64, n: u64) -> Result<(), Failure> {
        let deposit = AccountCommand::Deposit(Deposit {
            amount_cents: amount(n),
            reference: REFERENCE.into(),
        });
        self.gateway
            .execute(id_of(id), deposit, CommandMetadata::new())
            .await
            .map(|_| ())
            .map_err(failure)
    }

    async fn balance(&self, id: u64) -> Result<u64, Failure> {
        // A gateway without a cache: the state comes from the store.
        let gateway = CommandGateway::<Account, _>::new(self.store.clone()).with_cache_capacity(0);
        let (account, _) = gateway.load(id_of(id)).await.map_err(Failure::other)?;
        Ok(account.balance_cents)
    }

    async fn events(&self, id: u64) -> Result<u64, Failure> {
        self.store
            .stream_version(&StreamId::new("account", id_of(id)))
            .await
            .map_err(Failure::other)
    }

    async fn bulk(&self, id: u64, count: u64) -> Result<(), Failure> {
        let stream = StreamId::new("account", id_of(id));
        // Each batch built as it is appended (as the raw COPY builds its rows), not cloned.
        for start in (0..count).step_by(10_000) {
            let expected = if start == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(start)
            };
            let chunk: Vec<EventData> = (start..count.min(start + 10_000))
                .map(deposit_event)
                .collect();
            self.store
                .append(&stream, expected, chunk)
                .await
                .map_err(Failure::other)?;
        }
        Ok(())
    }
}
