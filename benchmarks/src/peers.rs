//! The peers: the same bank account written for `cqrs-es` (+ `postgres-es`) and for `esrs`, as
//! their documentation shows, each on its own schema of the same database.

use serde::{Deserialize, Serialize};

use crate::framework::{REFERENCE, amount};

/// The account's events (serde's external tagging, as both peers store them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BankEvent {
    /// Opened.
    Opened {
        /// Its holder.
        owner: String,
    },
    /// Money came in.
    Deposited {
        /// Cents.
        amount_cents: u64,
        /// Why.
        reference: String,
    },
    /// Money went out.
    Withdrawn {
        /// Cents.
        amount_cents: u64,
    },
}

/// The account's commands; `DepositMany` decides many events at once (W5).
#[derive(Debug, Clone)]
pub enum BankCommand {
    /// Open it.
    Open,
    /// Deposit `amount(n)`.
    Deposit(u64),
    /// Deposit `amount(0..count)`.
    DepositMany(u64),
}

/// Why a command is refused.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// Opened twice.
    #[error("the account is open already")]
    AlreadyOpen,
    /// Not opened.
    #[error("no such account")]
    NotOpen,
}

/// The account's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BankState {
    open: bool,
    balance_cents: u64,
}

fn decide(state: &BankState, command: BankCommand) -> Result<Vec<BankEvent>, BankError> {
    let deposit = |n| BankEvent::Deposited {
        amount_cents: amount(n),
        reference: REFERENCE.into(),
    };
    match command {
        BankCommand::Open if state.open => Err(BankError::AlreadyOpen),
        BankCommand::Open => Ok(vec![BankEvent::Opened {
            owner: "ada".into(),
        }]),
        BankCommand::Deposit(n) => Ok(vec![deposit(n)]),
        BankCommand::DepositMany(count) => Ok((0..count).map(deposit).collect()),
    }
}

fn evolve(mut state: BankState, event: &BankEvent) -> BankState {
    match event {
        BankEvent::Opened { .. } => state.open = true,
        BankEvent::Deposited { amount_cents, .. } => state.balance_cents += amount_cents,
        BankEvent::Withdrawn { amount_cents } => {
            state.balance_cents = state.balance_cents.saturating_sub(*amount_cents);
        }
    }
    state
}

/// A pool of sqlx 0.8 (the peers' version) whose connections use `schema`, recreated empty.
async fn pool(url: &str, schema: &str, connections: u32) -> sqlx08::PgPool {
    use std::str::FromStr;
    let admin = sqlx08::PgPool::connect(url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    for sql in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
    ] {
        sqlx08::query(&sql)
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    admin.close().await;
    let options = sqlx08::postgres::PgConnectOptions::from_str(url)
        .unwrap_or_else(|e| panic!("{e}"))
        .options([("search_path", schema)]);
    sqlx08::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub mod cqrs_es_impl {
    //! `cqrs-es` 0.5 with `postgres-es` 0.5.

    use cqrs_es::persist::PersistedEventStore;
    use cqrs_es::{Aggregate, AggregateError, CqrsFramework, EventStore};
    use postgres_es::PostgresEventRepository;

    use super::{BankCommand, BankError, BankEvent, BankState, decide, evolve};
    use crate::framework::{Failure, Framework};

    /// The aggregate, as `cqrs_es::Aggregate` wants it.
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    pub struct BankAccount(BankState);

    impl cqrs_es::DomainEvent for BankEvent {
        fn event_type(&self) -> String {
            match self {
                Self::Opened { .. } => "Opened",
                Self::Deposited { .. } => "Deposited",
                Self::Withdrawn { .. } => "Withdrawn",
            }
            .to_owned()
        }

        fn event_version(&self) -> String {
            "1.0".to_owned()
        }
    }

    impl Aggregate for BankAccount {
        const TYPE: &'static str = "account";
        type Command = BankCommand;
        type Event = BankEvent;
        type Error = BankError;
        type Services = ();

        async fn handle(
            &mut self,
            command: BankCommand,
            (): &(),
            sink: &cqrs_es::event_sink::EventSink<Self>,
        ) -> Result<(), BankError> {
            if !self.0.open && !matches!(command, BankCommand::Open | BankCommand::DepositMany(_)) {
                return Err(BankError::NotOpen);
            }
            for event in decide(&self.0, command)? {
                sink.write(event, self).await;
            }
            Ok(())
        }

        fn apply(&mut self, event: BankEvent) {
            self.0 = evolve(std::mem::take(&mut self.0), &event);
        }
    }

    type Store = PersistedEventStore<PostgresEventRepository, BankAccount>;

    /// The framework over the `events` and `snapshots` tables of its schema.
    pub struct CqrsEs {
        pool: sqlx08::PgPool,
        cqrs: CqrsFramework<BankAccount, Store>,
    }

    fn store(pool: &sqlx08::PgPool) -> Store {
        PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()))
    }

    impl CqrsEs {
        /// On an empty schema `schema` (the tables of postgres-es's `db/init.sql`).
        pub async fn new(url: &str, schema: &str, connections: u32) -> Self {
            let pool = super::pool(url, schema, connections).await;
            for sql in [
                "CREATE TABLE events (aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
                 sequence bigint CHECK (sequence >= 0) NOT NULL, event_type text NOT NULL, \
                 event_version text NOT NULL, payload json NOT NULL, metadata json NOT NULL, \
                 PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
                "CREATE TABLE snapshots (aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
                 last_sequence bigint CHECK (last_sequence >= 0) NOT NULL, \
                 current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL, \
                 payload json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
            ] {
                sqlx08::query(sql)
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Self {
                cqrs: CqrsFramework::new(store(&pool), Vec::new(), ()),
                pool,
            }
        }

        async fn execute(&self, id: u64, command: BankCommand) -> Result<(), Failure> {
            match self.cqrs.execute(&format!("acc-{id}"), command).await {
                Ok(()) => Ok(()),
                Err(AggregateError::AggregateConflict) => Err(Failure::Conflict),
                Err(other) => Err(Failure::other(other)),
            }
        }
    }

    #[async_trait::async_trait]
    impl Framework for CqrsEs {
        fn name(&self) -> &'static str {
            "cqrs-es + postgres-es"
        }

        async fn open(&self, id: u64) -> Result<(), Failure> {
            self.execute(id, BankCommand::Open).await
        }

        async fn deposit(&self, id: u64, n: u64) -> Result<(), Failure> {
            self.execute(id, BankCommand::Deposit(n)).await
        }

        async fn balance(&self, id: u64) -> Result<u64, Failure> {
            let mut context = store(&self.pool)
                .load_aggregate(&format!("acc-{id}"))
                .await
                .map_err(Failure::other)?;
            Ok(cqrs_es::AggregateContext::aggregate(&mut context)
                .0
                .balance_cents)
        }

        async fn events(&self, id: u64) -> Result<u64, Failure> {
            let events = store(&self.pool)
                .load_events(&format!("acc-{id}"))
                .await
                .map_err(Failure::other)?;
            Ok(events.len() as u64)
        }

        async fn bulk(&self, id: u64, count: u64) -> Result<(), Failure> {
            self.execute(id, BankCommand::DepositMany(count)).await
        }
    }
}

pub mod esrs_impl {
    //! `esrs` 0.18 (feature `postgres`).

    use esrs::AggregateState;
    use esrs::manager::AggregateManager;
    use esrs::store::EventStore;
    use esrs::store::postgres::{PgStore, PgStoreBuilder, PgStoreError};
    use uuid::Uuid;

    use super::{BankCommand, BankError, BankEvent, BankState, decide, evolve};
    use crate::framework::{Failure, Framework};

    /// The aggregate, as `esrs::Aggregate` wants it.
    pub struct BankAccount;

    impl esrs::Aggregate for BankAccount {
        const NAME: &'static str = "account";
        type State = BankState;
        type Command = BankCommand;
        type Event = BankEvent;
        type Error = BankError;

        fn handle_command(
            state: &BankState,
            command: BankCommand,
        ) -> Result<Vec<BankEvent>, BankError> {
            decide(state, command)
        }

        fn apply_event(state: BankState, event: BankEvent) -> BankState {
            evolve(state, &event)
        }
    }

    /// The manager over the `account_events` table its migrations create.
    pub struct Esrs {
        store: PgStore<BankAccount>,
        manager: AggregateManager<PgStore<BankAccount>>,
    }

    fn uuid(id: u64) -> Uuid {
        Uuid::from_u128(0xb4_2c00_0000_0000_0000_0000_0000_0000 + u128::from(id))
    }

    fn failure(error: PgStoreError) -> Failure {
        match &error {
            PgStoreError::Sqlx(sqlx08::Error::Database(e))
                if e.code().as_deref() == Some("23505") =>
            {
                Failure::Conflict
            }
            _ => Failure::other(error),
        }
    }

    impl Esrs {
        /// On an empty schema `schema`.
        pub async fn new(url: &str, schema: &str, connections: u32) -> Self {
            let pool = super::pool(url, schema, connections).await;
            let store = PgStoreBuilder::new(pool)
                .try_build()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            Self {
                manager: AggregateManager::new(store.clone()),
                store,
            }
        }

        async fn state(&self, id: u64) -> Result<AggregateState<BankState>, Failure> {
            self.manager
                .load(uuid(id))
                .await
                .map_err(failure)?
                .ok_or_else(|| Failure::other(BankError::NotOpen))
        }

        async fn handle(
            &self,
            state: AggregateState<BankState>,
            command: BankCommand,
        ) -> Result<(), Failure> {
            match self.manager.handle_command(state, command).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(rejected)) => Err(Failure::other(rejected)),
                Err(error) => Err(failure(error)),
            }
        }
    }

    #[async_trait::async_trait]
    impl Framework for Esrs {
        fn name(&self) -> &'static str {
            "esrs"
        }

        async fn open(&self, id: u64) -> Result<(), Failure> {
            self.handle(AggregateState::with_id(uuid(id)), BankCommand::Open)
                .await
        }

        async fn deposit(&self, id: u64, n: u64) -> Result<(), Failure> {
            let state = self.state(id).await?;
            self.handle(state, BankCommand::Deposit(n)).await
        }

        async fn balance(&self, id: u64) -> Result<u64, Failure> {
            Ok(self.state(id).await?.inner().balance_cents)
        }

        async fn events(&self, id: u64) -> Result<u64, Failure> {
            let events = self
                .store
                .by_aggregate_id(uuid(id))
                .await
                .map_err(failure)?;
            Ok(events.len() as u64)
        }

        async fn bulk(&self, id: u64, count: u64) -> Result<(), Failure> {
            self.handle(
                AggregateState::with_id(uuid(id)),
                BankCommand::DepositMany(count),
            )
            .await
        }
    }
}
