//! The store handle: what it holds, how it is built, and the [`EventStore`] it implements.

use std::sync::Arc;

use evently_core::store::{AppendResult, KeyRecord, ReplayEvent};
use evently_core::{
    AggregateId, Checkpoint, EventData, EventStore, ExpectedVersion, RawStoredEvent, StoreError,
    StoredEvent, StreamId, telemetry,
};
use futures::stream::BoxStream;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tracing::Instrument as _;

use crate::connect::tls_provider;
use crate::read::read_span;
use crate::rows::{backend, replay_event, stored_event, to_u64};
use crate::sql::Sql;
use crate::{GroupCommit, GroupCommitStats, group, inline, notify, rows, server};
/// The event store on PostgreSQL.
///
/// - Appends are one `INSERT .. SELECT FROM UNNEST(..)` statement: all events or none. The
///   expectation is checked in the same statement, and `UNIQUE(aggregate_type, aggregate_id,
///   version)` decides races; a violation becomes [`StoreError::Conflict`], never a generic
///   database error. No `SERIALIZABLE` isolation is needed.
/// - `UNIQUE(event_id)` makes appends idempotent: retrying the same events returns
///   [`StoreError::AlreadyAppended`] with the first outcome.
/// - [`EventStore::read_all`] never skips an event: each row carries its transaction id
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
    pub(crate) server: Arc<server::ServerGuard>,
    pub(crate) appends: Arc<telemetry::AppendMetrics>,
    pub(crate) group: Option<Arc<group::Grouper>>,
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
    /// A store on `pool` using the tables in `schema`.
    ///
    /// The schema name is validated as a PostgreSQL identifier (1 to 63 bytes, no NUL) and always
    /// quoted, so any such name is safe, quotes and semicolons included.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for an invalid schema name.
    pub fn new(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        tls_provider();
        let sql = Sql::new(schema)?;
        Ok(Self {
            pool,
            schema: schema.into(),
            channel: sql.channel.as_str().into(),
            moves: Arc::new(notify::Moves::new(&sql.checkpoint_channel)),
            sql: Arc::new(sql),
            inline: Arc::new([]),
            notifier: Arc::default(),
            listener: Arc::default(),
            server: Arc::default(),
            appends: Arc::default(),
            group: None,
        })
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

#[async_trait::async_trait]
impl EventStore for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let count = events.len();
        telemetry::observe_append(
            "postgres",
            &self.appends,
            stream,
            count,
            self.append_unobserved(stream, expected, events),
        )
        .await
    }

    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<StoredEvent, StoreError>> {
        self.stream_rows(&self.sql.load, stream, after_version, stored_event)
    }

    fn replay<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<ReplayEvent, StoreError>> {
        // Only what rehydration needs, and the payload as text: the derive deserializes it
        // straight into the event, without a `serde_json::Value` in between.
        self.stream_rows(&self.sql.replay, stream, after_version, replay_event)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.version_of(stream).await
    }

    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        let count = events.len();
        telemetry::observe_append(
            "postgres",
            &self.appends,
            stream,
            count,
            self.append_with_key_unobserved(stream, expected, events, key),
        )
        .await
    }

    async fn read_filtered(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[evently_core::projection::Subscription],
    ) -> Result<(Vec<StoredEvent>, Checkpoint), StoreError> {
        self.read_filtered_with(after, scan, filter, stored_event)
            .instrument(read_span(after, scan))
            .await
    }

    async fn read_filtered_raw(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[evently_core::projection::Subscription],
    ) -> Result<(Vec<RawStoredEvent>, Checkpoint), StoreError> {
        self.read_filtered_with(after, scan, filter, rows::raw_stored_event)
            .instrument(read_span(after, scan))
            .await
    }

    async fn find_key(&self, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.find_key.clone()))
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| {
            let aggregate_type: String = row.try_get("aggregate_type").map_err(backend)?;
            let aggregate_id: String = row.try_get("aggregate_id").map_err(backend)?;
            Ok(KeyRecord {
                key: key.to_owned(),
                stream: StreamId::new(aggregate_type, AggregateId::new(aggregate_id)),
                first_version: to_u64(row.try_get("first_version").map_err(backend)?)?,
                last_version: to_u64(row.try_get("last_version").map_err(backend)?)?,
            })
        })
        .transpose()
    }

    async fn lag(
        &self,
        after: Checkpoint,
    ) -> Result<Option<evently_core::projection::Lag>, StoreError> {
        self.lag_after(after).await.map(Some)
    }

    async fn head(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.same_server().await?;
        let row = sqlx::query(AssertSqlSafe(self.sql.head.clone()))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| rows::checkpoint(&row)).transpose()
    }

    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let query = self.read_all_query(after, limit)?;
        self.collect_in_global_order(query, after, limit, stored_event)
            .instrument(read_span(after, limit))
            .await
    }

    /// Each payload left as the stored JSON text: what a publisher that forwards events (the
    /// relays) and the projection engine read, as parsing a payload into a `Value` is most of the
    /// cost of reading it. Same order, same gap safety.
    async fn read_all_raw(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RawStoredEvent>, StoreError> {
        let query = self.read_all_query(after, limit)?;
        self.collect_in_global_order(query, after, limit, rows::raw_stored_event)
            .instrument(read_span(after, limit))
            .await
    }

    /// Changes after commits of this schema's events, in this process and others (`LISTEN`
    /// on one connection per store, outside its pool); `None` outside a tokio runtime.
    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.listener
            .subscribe(&self.pool, &self.channel)
            .map(|(signal, _)| signal)
    }
}

/// A store on `schema`, dropped first, not migrated (the unit tests).
#[cfg(test)]
pub(crate) async fn empty_schema(schema: &str) -> PostgresEventStore {
    let store = PostgresEventStore::connect(&crate::database_url(), schema)
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        store.sql.quoted_schema
    )))
    .execute(store.pool())
    .await
    .unwrap();
    store
}
