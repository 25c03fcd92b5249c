//! The store handle: what it holds and its settings. Its methods live with what they do: `connect`,
//! `migrate`, `append`, `read` (and wake-ups), `snapshot`, `server`; the [`EventStore`] trait in
//! `event_store`.
//!
//! [`EventStore`]: evently_core::EventStore

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use evently_core::telemetry;
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use crate::sql::Sql;
use crate::{GroupCommit, GroupCommitStats, group, inline, notify};

/// The event store on PostgreSQL.
///
/// - Appends are one `INSERT .. SELECT FROM UNNEST(..)` statement: all events or none. The
///   expectation is checked in the same statement, and `UNIQUE(aggregate_type, aggregate_id,
///   version)` decides races; a violation becomes [`StoreError::Conflict`](evently_core::StoreError::Conflict), never a generic
///   database error. No `SERIALIZABLE` isolation is needed.
/// - `UNIQUE(event_id)` makes appends idempotent: retrying the same events returns
///   [`StoreError::AlreadyAppended`](evently_core::StoreError::AlreadyAppended) with the first outcome.
/// - [`EventStore::read_all`](evently_core::EventStore::read_all) never skips an event: each row carries its transaction id
///   (`pg_current_xact_id()`), and only rows of transactions below the oldest running one
///   (`pg_snapshot_xmin(pg_current_snapshot())`) are read, ordered by `(transaction id, position)`.
///   A long transaction pauses readers; it never makes them skip.
/// - [`PostgresEventStore::listen`] wakes subscribers after commits (`LISTEN/NOTIFY`, sent by the
///   store after the commit and coalesced to at most one per 2 ms: a `NOTIFY` inside the appending
///   transaction would serialize all writers' commits); it is a hint, and polling stays correct
///   without it (events written around the store wake no one: readers find them at their poll).
///
/// Every table lives in one PostgreSQL schema, configurable so tenants and tests are isolated.
#[derive(Clone)]
pub struct PostgresEventStore {
    pub(crate) pool: PgPool,
    pub(crate) schema: Arc<str>,
    pub(crate) sql: Arc<Sql>,
    pub(crate) inline: Arc<[Arc<dyn inline::InlineProjection>]>,
    pub(crate) notifier: Arc<notify::Notifier>,
    pub(crate) listener: Arc<notify::Listener>,
    pub(crate) channel: Arc<str>,
    pub(crate) moves: Arc<notify::Moves>,
    pub(crate) server: Arc<ServerGuard>,
    pub(crate) appends: Arc<telemetry::AppendMetrics>,
    pub(crate) group: Option<Arc<group::Grouper>>,
    pub(crate) personal: Arc<Personal>,
    /// Whose data this handle holds: no tenant's, one tenant's schema (`with_tenant`), one
    /// tenant's row-level view or the all-tenants view (the `rls` module).
    pub(crate) scope: evently_core::store::StoreScope,
    /// The pools of the tenant views of this store, shared by its clones and views.
    pub(crate) tenant_pools: Arc<TenantPools>,
}

/// A store's personal-data settings (see `crate::personal`): which fields of which event types
/// are sealed, and where the keys are (the schema's `personal_keys` unless another key store is
/// given).
#[derive(Default, Clone)]
pub(crate) struct Personal {
    pub(crate) sealing: evently_core::personal::Sealing,
    pub(crate) keys: Option<Arc<dyn evently_core::personal::KeyStore>>,
    /// The schema's key store, made at its first use.
    pub(crate) schema_keys: std::sync::OnceLock<Arc<dyn evently_core::personal::KeyStore>>,
}
impl std::fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("schema", &self.schema)
            .field("inline_projections", &self.inline.len())
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PostgresEventStore {
    /// The store of `tenant`'s data: every event appended carries `tenant` in its metadata, and
    /// one that names another tenant is refused. Use it on the tenant's own schema (as
    /// [`SchemaPerTenant`](crate::tenants::SchemaPerTenant) does): the schema is what keeps the
    /// tenants' streams, keys, snapshots, checkpoints and dead letters apart.
    #[must_use]
    pub fn with_tenant(mut self, tenant: evently_core::TenantId) -> Self {
        self.scope = evently_core::store::StoreScope::TenantStore(tenant);
        self
    }

    /// The tenant this store's data belongs to, if any.
    #[must_use]
    pub fn tenant(&self) -> Option<&evently_core::TenantId> {
        self.scope.tenant()
    }

    /// Runs `projection` inside every append's transaction (read-your-writes): when an append
    /// returns, the projection's tables reflect its events, and a failing projection fails the
    /// append, which then stores nothing. Each append applies a clone of `projection`, so keep its
    /// state in the database. Appends with inline projections do not use `COPY`.
    #[must_use]
    pub fn with_inline<P>(mut self, projection: P) -> Self
    where
        P: evently_core::projection::Projection<Context = PgConnection> + Clone + Sync + 'static,
    {
        let mut all: Vec<Arc<dyn inline::InlineProjection>> = self.inline.iter().cloned().collect();
        all.push(Arc::new(inline::Inline(projection)));
        self.inline = all.into();
        self
    }

    /// Groups concurrent appends (see [`GroupCommit`]): an append that finds others of this store
    /// in flight is written with them by one statement, one transaction and one commit flush,
    /// each on its own expected version (a conflict fails only its own append). Applies to
    /// appends without an idempotency key, inline projections or `COPY`. Off by default.
    #[must_use]
    pub fn with_group_commit(mut self, config: GroupCommit) -> Self {
        self.group = Some(Arc::new(group::Grouper::new(config)));
        self
    }

    /// What group commit did so far (`None` when it is off).
    #[must_use]
    pub fn group_commit_stats(&self) -> Option<GroupCommitStats> {
        self.group.as_ref().map(|group| group.stats())
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the tables.
    #[must_use]
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The `NOTIFY` channel signalled when events of this schema commit.
    #[must_use]
    pub fn channel(&self) -> &str {
        &self.sql.channel
    }

    /// Signals waiters for a projection checkpoint of this schema that one moved.
    pub(crate) fn checkpoint_moved(&self) {
        self.moves.moved(&self.pool);
    }
}

/// Appends 1,000 `Happened` events to stream `thing/t<n>` (the unit tests that need a table of
/// thousands of rows; at the `COPY` threshold, so they go through `COPY`).
#[cfg(test)]
pub(crate) async fn append_thousand(store: &PostgresEventStore, n: u32) {
    use evently_core::EventStore as _;
    let events = (0..1_000)
        .map(|i| evently_core::EventData {
            event_id: evently_core::EventId::new(),
            event_type: "Happened".to_owned(),
            schema_version: 1,
            payload: serde_json::json!({ "n": n * 1_000 + i }),
            metadata: evently_core::Metadata::default(),
        })
        .collect();
    store
        .append(
            &evently_core::StreamId::new("thing", format!("t{n}")),
            evently_core::ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap();
}

/// A store on `schema`, dropped first, not migrated (the unit tests).
#[cfg(test)]
pub(crate) async fn empty_schema(schema: &str) -> PostgresEventStore {
    let store = PostgresEventStore::connect(&crate::database_url(), schema)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        store.sql.quoted_schema
    )))
    .execute(store.pool())
    .await
    .unwrap();
    store
}

/// Whether the server was checked since the pool last connected.
#[derive(Debug)]
pub(crate) struct ServerGuard {
    /// Bumped by every connection a pool the store opened makes.
    pub(crate) connections: AtomicU64,
    /// The value of `connections` when a check last passed (0: never).
    pub(crate) checked: AtomicU64,
}

impl Default for ServerGuard {
    fn default() -> Self {
        Self {
            connections: AtomicU64::new(1),
            checked: AtomicU64::new(0),
        }
    }
}

impl ServerGuard {
    /// A new connection was made: check again before the next global read or append (it may be
    /// to another server, e.g. after a switchover).
    pub(crate) fn connected(&self) {
        self.connections.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn is_checked(&self) -> bool {
        self.checked.load(Ordering::Acquire) == self.connections.load(Ordering::Acquire)
    }
}

/// The per-tenant pools of one store (shared by its views).
pub(crate) struct TenantPools {
    pub(crate) pools: std::sync::Mutex<std::collections::HashMap<String, PgPool>>,
    /// Whether the policies bind this store's role (checked once).
    pub(crate) checked: tokio::sync::OnceCell<()>,
    /// The most connections of one tenant's pool (`None`: as many as the store's).
    pub(crate) max_connections: Option<u32>,
    /// How long an idle connection of a tenant's pool is kept.
    pub(crate) idle_timeout: std::time::Duration,
}

impl Default for TenantPools {
    fn default() -> Self {
        Self {
            pools: std::sync::Mutex::default(),
            checked: tokio::sync::OnceCell::new(),
            max_connections: None,
            idle_timeout: std::time::Duration::from_secs(30),
        }
    }
}
