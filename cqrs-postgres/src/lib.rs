#![doc = include_str!("../README.md")]

pub mod control;
mod copy;
pub mod freshness;
mod group;
pub mod lease;
mod notify;
pub mod projection;
mod rows;
pub mod saga;
mod server;
mod sql;
mod tx;

pub use freshness::{CaughtUpIn, PostgresFixture};
pub use group::{GroupCommit, GroupCommitStats};
pub use lease::{Advance, CheckpointLease, Inbox};
pub use rows::is_outage;
pub use server::Rebased;
pub use tx::Tx as Transaction;

use std::sync::Arc;
use std::time::Duration;

use evently_core::store::{
    AppendResult, AppendedEvent, KeyRecord, ReplayEvent, Snapshot, SnapshotStore,
    classify_stored_ids, validate_append,
};
use evently_core::{
    AggregateId, Checkpoint, EventData, EventId, EventStore, ExpectedVersion, RawStoredEvent,
    StoreError, StoredEvent, StreamId,
};
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use std::ops::ControlFlow;

pub use sqlx;

use crate::copy::{COPY_THRESHOLD, copy_at};
use crate::rows::{backend, fetch_events, replay_event, stored_event, to_i64, to_u64, xid};
use crate::sql::Sql;
use crate::tx::Tx;
use evently_core::telemetry;
use tracing::Instrument as _;

/// The embedded migrations: the events, snapshots and command-key tables.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL schema used when none is given.
pub const DEFAULT_SCHEMA: &str = "cqrs";

/// `DATABASE_URL`, or the local default `postgres://postgres@127.0.0.1:5432/test`.
#[must_use]
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// How many times an append with [`ExpectedVersion::Any`] or [`ExpectedVersion::StreamExists`]
/// retries after losing a race for a version number (it has no expectation to fail).
const ANY_VERSION_ATTEMPTS: usize = 64;

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
    pool: PgPool,
    schema: Arc<str>,
    pub(crate) sql: Arc<Sql>,
    inline: Arc<[Arc<dyn projection::InlineProjection>]>,
    notifier: Arc<notify::Notifier>,
    listener: Arc<notify::Listener>,
    channel: Arc<str>,
    moves: Arc<notify::Moves>,
    server: Arc<server::ServerGuard>,
    appends: Arc<telemetry::AppendMetrics>,
    group: Option<Arc<group::Grouper>>,
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
    /// Connects to `url` (a pool of up to 16 connections, see [`PoolOptions`]) and uses the tables
    /// in `schema`.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for an invalid schema name, [`StoreError::Backend`] when the
    /// server cannot be reached.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, schema, PoolOptions::default()).await
    }

    /// As [`PostgresEventStore::connect`], giving up on a connection after `timeout` (a command
    /// line wants to fail fast; a service may wait for its database to come up).
    ///
    /// # Errors
    /// As [`PostgresEventStore::connect`].
    pub async fn connect_within(
        url: &str,
        schema: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_with(
            url,
            schema,
            PoolOptions {
                acquire_timeout: timeout,
                ..PoolOptions::default()
            },
        )
        .await
    }

    /// As [`PostgresEventStore::connect`], with the pool sized by `options`.
    ///
    /// # Errors
    /// As [`PostgresEventStore::connect`]; [`StoreError::InvalidInput`] for a pool of 0.
    pub async fn connect_with(
        url: &str,
        schema: &str,
        options: PoolOptions,
    ) -> Result<Self, StoreError> {
        tls_provider();
        if options.max_connections == 0 {
            return Err(StoreError::InvalidInput(
                "a pool of 0 connections can run nothing: max_connections must be at least 1"
                    .into(),
            ));
        }
        // Every new connection may be to another server (a switchover): check it again.
        let server = Arc::new(server::ServerGuard::default());
        let connected = Arc::clone(&server);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout.min(evently_core::backoff::MAX_WAIT))
            .after_connect(move |_, _| {
                connected.connected();
                Box::pin(async { Ok(()) })
            })
            .connect(url)
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(sqlx::Error::PoolTimedOut) => {
                // The pool retried until its timeout and says only that: one more try on its
                // own gives the cause (refused, unknown host, authentication, no database).
                let cause = tokio::time::timeout(
                    Duration::from_secs(5),
                    <PgConnection as sqlx::Connection>::connect(url),
                )
                .await;
                let error = match cause {
                    Ok(Err(cause)) => cause,
                    _ => sqlx::Error::PoolTimedOut,
                };
                return Err(connect_error(url, error));
            }
            Err(error) => return Err(connect_error(url, error)),
        };
        let mut store = Self::new(pool, schema)?;
        store.server = server;
        Ok(store)
    }

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
        let mut all: Vec<Arc<dyn projection::InlineProjection>> =
            self.inline.iter().cloned().collect();
        all.push(Arc::new(projection::Inline(projection)));
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

    /// Creates the schema if needed and applies the embedded migrations; safe to call from several
    /// processes at once.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let result = migrate_on(&mut conn, &self.sql, None).await;
        if result.is_err() {
            // Do not hand a connection with our search_path back to a pool the user may share.
            conn.detach();
        }
        result
    }

    /// The migrations applied to this schema, oldest first: version and description (none when
    /// the schema was never migrated).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn applied_migrations(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let table = format!("{}._sqlx_migrations", self.sql.quoted_schema);
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&table)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, description FROM {table} WHERE success ORDER BY version"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)
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

    /// How far a reader at `checkpoint` is behind: the committed events after it (counted, so
    /// it costs a walk of the global-order index over them) and the age of the oldest.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn lag_after(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<evently_core::projection::Lag, StoreError> {
        self.same_server().await?;
        let row = sqlx::query(AssertSqlSafe(self.sql.lag.clone()))
            .bind(checkpoint.transaction.to_string())
            .bind(to_i64(checkpoint.position)?)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        let events: i64 = row.try_get("events").map_err(backend)?;
        Ok(evently_core::projection::Lag {
            events: to_u64(events)?,
            seconds: row.try_get::<f64, _>("seconds").map_err(backend)?.max(0.0),
        })
    }

    /// The checkpoint of the `n`-th readable event after `after` (`None` when fewer are readable),
    /// without reading the events: readers split a long read at it and read both parts at once
    /// (every event up to it is settled, so a read up to it returns exactly `n` events).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn checkpoint_after(
        &self,
        after: Checkpoint,
        n: usize,
    ) -> Result<Option<Checkpoint>, StoreError> {
        if n == 0 {
            return Ok(Some(after));
        }
        let query = sqlx::query(AssertSqlSafe(self.sql.nth_after.clone()))
            .bind(after.transaction.to_string())
            .bind(to_i64(after.position)?)
            .bind(i64::try_from(n).unwrap_or(i64::MAX));
        let mut nth = None;
        self.in_global_order(query, after, n, rows::checkpoint, |checkpoint| {
            nth = Some(checkpoint);
            ControlFlow::Continue(())
        })
        .await?;
        Ok(nth)
    }

    /// The checkpoint after which the last `n` readable events of the global order come
    /// ([`Checkpoint::START`] when there are `n` or fewer), found by reading the order's index
    /// backwards: `n` rows, whatever the log's length (`cqrs events tail`).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn checkpoint_before_last(&self, n: usize) -> Result<Checkpoint, StoreError> {
        self.same_server().await?;
        let row = sqlx::query(AssertSqlSafe(self.sql.nth_from_end.clone()))
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map_or(Ok(Checkpoint::START), |row| rows::checkpoint(&row))
    }

    /// [`EventStore::read_all_raw`] handing each event to `each` as its row arrives, so
    /// the caller's work on it overlaps the database sending the rest of the page. `each` stops
    /// the page with [`ControlFlow::Break`] (the rows left are read and dropped).
    ///
    /// # Errors
    /// As [`EventStore::read_all`]; events handed over before the error stay handed over.
    pub async fn read_all_raw_each(
        &self,
        after: Checkpoint,
        limit: usize,
        each: impl FnMut(RawStoredEvent) -> ControlFlow<()> + Send,
    ) -> Result<(), StoreError> {
        let query = self.read_all_query(after, limit)?;
        self.in_global_order(query, after, limit, rows::raw_stored_event, each)
            .await
    }

    /// The query of the readable events after `after`, at most `limit`.
    fn read_all_query(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>, StoreError>
    {
        Ok(sqlx::query(AssertSqlSafe(self.sql.read_all.clone()))
            .bind(after.transaction.to_string())
            .bind(to_i64(after.position)?)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX)))
    }

    /// [`in_global_order`](Self::in_global_order) into a vector.
    async fn collect_in_global_order<'q, E: Send>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        after: Checkpoint,
        rows: usize,
        read: fn(&sqlx::postgres::PgRow) -> Result<E, StoreError>,
    ) -> Result<Vec<E>, StoreError> {
        let mut events = Vec::with_capacity(rows.min(10_000));
        self.in_global_order(query, after, rows, read, |e| {
            events.push(e);
            ControlFlow::Continue(())
        })
        .await?;
        Ok(events)
    }

    /// Runs `query`, which walks up to `rows` events of the global order after `after`, handing
    /// each row read by `read` to `each`. On a store moved to another server it refuses (see
    /// [`PostgresEventStore::rebase`]); when nothing is read, it checks that `after` is not past
    /// every transaction of the server (a position from before a move). Above [`SORT_SAFE_PAGE`] rows it runs with sorts disabled, so the
    /// planner walks the global-order index whatever its statistics say: on an events table not
    /// analyzed yet (after a bulk load, before autovacuum's first ANALYZE) it guesses that a
    /// ninth of the rows match and, for a few thousand rows, reads and sorts the whole table for
    /// every page (measured: 30-95 ms per page of 5,000 at 100,000 events instead of 2 ms). JIT
    /// compilation is off for it too: disabling sorts adds a huge cost to any plan that still
    /// needs one (the projection window's final ORDER BY over its scanned rows), which crossed
    /// `jit_above_cost` and had each window of 2,000 compiled (200-340 ms instead of 2.4 ms).
    /// The transaction holds nothing but this one statement, so it reads the same snapshot as
    /// the statement alone would.
    async fn in_global_order<'q, E>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        after: Checkpoint,
        rows: usize,
        read: fn(&sqlx::postgres::PgRow) -> Result<E, StoreError>,
        mut each: impl FnMut(E) -> ControlFlow<()> + Send,
    ) -> Result<(), StoreError> {
        if rows == 0 {
            return Ok(());
        }
        self.same_server().await?;
        let mut found = false;
        let each = |event| {
            found = true;
            each(event)
        };
        if rows <= SORT_SAFE_PAGE {
            rows::each_event(query, &self.pool, read, each).await?;
        } else {
            let mut tx = Tx::begin_with(&self.pool, sql::BEGIN_ORDERED_READ)
                .await
                .map_err(backend)?;
            let read = rows::each_event(query, &mut *tx, read, each).await;
            tx.end(read, backend).await?;
        }
        if !found {
            self.nothing_after(after).await?;
        }
        Ok(())
    }

    /// Subscribes to commit notifications of this schema's events: the store's
    /// [`EventStore::commit_signal`] as a waitable handle. Every subscriber of a store (and of its
    /// clones) shares one listening connection, opened outside the pool.
    ///
    /// # Errors
    /// [`StoreError::Backend`] outside a tokio runtime.
    pub async fn listen(&self) -> Result<Wakeups, StoreError> {
        let (signal, mut listening) = self
            .listener
            .subscribe(&self.pool, &self.channel)
            .ok_or_else(|| StoreError::backend("listening needs a tokio runtime"))?;
        // Commits from here on wake it, once the shared connection listens (a server that cannot
        // be reached now leaves it to reconnect by itself; readers poll meanwhile).
        let _ = tokio::time::timeout(LISTEN_WAIT, listening.wait_for(|l| *l)).await;
        Ok(Wakeups { signal })
    }

    /// The rows of `stream` after `after_version` by `sql` (which binds type, id and version),
    /// streamed from the server and read with `read`.
    fn stream_rows<'a, T: Send + 'a>(
        &'a self,
        sql: &str,
        stream: &'a StreamId,
        after_version: u64,
        read: fn(&sqlx::postgres::PgRow) -> Result<T, StoreError>,
    ) -> BoxStream<'a, Result<T, StoreError>> {
        let after = match to_i64(after_version) {
            Ok(after) => after,
            Err(error) => return futures::stream::once(async { Err(error) }).boxed(),
        };
        let rows = sqlx::query(AssertSqlSafe(sql.to_owned()))
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .bind(after)
            .fetch(&self.pool)
            .map(move |row| row.map_err(backend).and_then(|row| read(&row)));
        let span = tracing::debug_span!("cqrs.load", stream = %stream, after_version);
        telemetry::InSpan::new(rows, span).boxed()
    }

    async fn version_of(&self, stream: &StreamId) -> Result<u64, StoreError> {
        stream_version_on(&self.pool, &self.sql, stream).await
    }

    /// Appends, deciding the base version from the expectation; retries lost version races for the
    /// expectations that allow it.
    async fn append_on(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult, StoreError> {
        for _ in 0..ANY_VERSION_ATTEMPTS {
            let base = match expected {
                ExpectedVersion::Exact(n) => n,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Any | ExpectedVersion::StreamExists => {
                    let actual = self.version_of(stream).await?;
                    if expected == ExpectedVersion::StreamExists && actual == 0 {
                        return Err(StoreError::Conflict {
                            stream: stream.clone(),
                            expected,
                            actual,
                        });
                    }
                    actual
                }
            };
            // On the pool, not a held connection: the follow-up queries below must not wait for a
            // second connection while holding one (64 writers on a pool of 32 would deadlock).
            let inserted = if !self.inline.is_empty() {
                self.insert_with_inline(stream, base, events).await
            } else if events.len() >= COPY_THRESHOLD {
                copy_at(&self.pool, &self.sql, stream, base, events).await
            } else if let Some(group) = &self.group {
                group
                    .insert(&self.pool, &self.sql, stream, base, events)
                    .await
            } else {
                insert_at(&self.pool, &self.sql, stream, base, events).await
            };
            match inserted {
                Ok(result) => return Ok(result),
                Err(Insert::Failed(error)) => return Err(error),
                Err(Insert::Lost) => {
                    if let Some(error) = self.classify_ids(stream, events).await? {
                        return Err(error);
                    }
                    if matches!(
                        expected,
                        ExpectedVersion::Exact(_) | ExpectedVersion::NoStream
                    ) {
                        return Err(StoreError::Conflict {
                            stream: stream.clone(),
                            expected,
                            actual: self.version_of(stream).await?,
                        });
                    }
                }
            }
        }
        Err(StoreError::backend(format!(
            "{stream}: lost the race for a version {ANY_VERSION_ATTEMPTS} times in a row"
        )))
    }

    /// One try of a keyed append in `conn`'s transaction: the key first (a racing caller with the
    /// same key waits on it until this transaction ends, then sees the key and these events, or
    /// takes it), then the expected version, the events, the inline projections and the key's
    /// versions.
    async fn append_keyed_in(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
        key: &str,
    ) -> Result<Keyed, StoreError> {
        let claimed = sqlx::query(AssertSqlSafe(self.sql.claim_key.clone()))
            .bind(key)
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        if claimed.rows_affected() == 0 {
            return Ok(Keyed::KeyTaken);
        }
        let actual = stream_version_on(&mut *conn, &self.sql, stream).await?;
        if !expected.is_met_by(actual) {
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let result = if events.is_empty() {
            AppendResult {
                stream: stream.clone(),
                version: actual,
                events: Vec::new(),
            }
        } else {
            match insert_at(&mut *conn, &self.sql, stream, actual, events).await {
                Ok(result) => result,
                Err(Insert::Failed(error)) => return Err(error),
                Err(Insert::Lost) => return Ok(Keyed::Lost),
            }
        };
        self.run_inline(conn, &result, events).await?;
        let first = result
            .events
            .first()
            .map_or(result.version + 1, |e| e.version);
        sqlx::query(AssertSqlSafe(self.sql.set_key_versions.clone()))
            .bind(key)
            .bind(to_i64(first)?)
            .bind(to_i64(result.version)?)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        Ok(Keyed::Appended(result))
    }

    /// Inserts and runs the inline projections in one transaction.
    async fn insert_with_inline(
        &self,
        stream: &StreamId,
        base: u64,
        events: &[EventData],
    ) -> Result<AppendResult, Insert> {
        let mut tx = Tx::begin(&self.pool)
            .await
            .map_err(|e| Insert::Failed(backend(e)))?;
        let outcome = async {
            let result = insert_at(&mut *tx, &self.sql, stream, base, events).await?;
            self.run_inline(&mut tx, &result, events)
                .await
                .map_err(Insert::Failed)?;
            Ok(result)
        }
        .await;
        tx.end(outcome, |e| {
            if is_unique_violation(&e) {
                Insert::Lost
            } else {
                Insert::Failed(backend(e))
            }
        })
        .await
    }

    /// Applies the just-appended events to the inline projections, in the append's transaction.
    async fn run_inline(
        &self,
        conn: &mut PgConnection,
        result: &AppendResult,
        events: &[EventData],
    ) -> Result<(), StoreError> {
        if self.inline.is_empty() {
            return Ok(());
        }
        let stored: Vec<StoredEvent> = result
            .events
            .iter()
            .zip(events)
            .map(|(at, data)| StoredEvent {
                event_id: at.event_id,
                stream: result.stream.clone(),
                version: at.version,
                checkpoint: at.checkpoint,
                recorded_at: at.recorded_at,
                event_type: data.event_type.clone(),
                schema_version: data.schema_version,
                payload: data.payload.clone(),
                metadata: data.metadata.clone(),
            })
            .collect();
        for projection in self.inline.iter() {
            projection.apply_all(&stored, conn).await?;
        }
        Ok(())
    }

    /// After a unique violation: are these ids stored already (an idempotent replay, or a reuse)?
    async fn classify_ids(
        &self,
        stream: &StreamId,
        events: &[EventData],
    ) -> Result<Option<StoreError>, StoreError> {
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id.0).collect();
        let stored = fetch_events(
            sqlx::query(AssertSqlSafe(self.sql.events_by_id.clone())).bind(&ids),
            &self.pool,
            ids.len(),
        )
        .await?;
        let by_id: std::collections::HashMap<EventId, &StoredEvent> =
            stored.iter().map(|e| (e.event_id, e)).collect();
        Ok(classify_stored_ids(stream, events, |id| {
            by_id.get(id).copied()
        }))
    }
}

/// The columns of an event that the store computes: its schema version as PostgreSQL's `integer`
/// and its payload and metadata as JSON text (the `json` columns keep the text as written).
pub(crate) struct Columns {
    schema_version: i32,
    payload: String,
    metadata: String,
}

impl Columns {
    fn of(event: &EventData) -> Result<Self, StoreError> {
        Ok(Self {
            schema_version: Self::schema_version(event)?,
            payload: serde_json::to_string(&event.payload)
                .map_err(|e| Self::unwritable(event, "payload", e))?,
            metadata: serde_json::to_string(&event.metadata)
                .map_err(|e| Self::unwritable(event, "metadata", e))?,
        })
    }

    /// The event's schema version as PostgreSQL's `integer`.
    pub(crate) fn schema_version(event: &EventData) -> Result<i32, StoreError> {
        i32::try_from(event.schema_version).map_err(|_| {
            StoreError::InvalidInput(format!(
                "schema version {} of `{}` does not fit PostgreSQL's integer",
                event.schema_version, event.event_type
            ))
        })
    }

    /// The error for a payload or metadata (`what`) that serde_json cannot write.
    pub(crate) fn unwritable(
        event: &EventData,
        what: &str,
        error: serde_json::Error,
    ) -> StoreError {
        StoreError::InvalidInput(format!(
            "the {what} of `{}` cannot be written as JSON: {error}",
            event.event_type
        ))
    }
}

/// The columns of a batch, one array per column, as the array statements bind them.
pub(crate) struct ColumnArrays<'e> {
    ids: Vec<uuid::Uuid>,
    types: Vec<&'e str>,
    versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl<'e> ColumnArrays<'e> {
    fn of(events: &'e [EventData]) -> Result<Self, StoreError> {
        let mut arrays = Self {
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
        };
        for event in events {
            let columns = Columns::of(event)?;
            arrays.ids.push(event.event_id.0);
            arrays.types.push(event.event_type.as_str());
            arrays.versions.push(columns.schema_version);
            arrays.payloads.push(columns.payload);
            arrays.metadata.push(columns.metadata);
        }
        Ok(arrays)
    }
}

/// The outcome of an append from the one-row summary both append statements return.
fn appended_from(
    row: &sqlx::postgres::PgRow,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
) -> Result<AppendResult, Insert> {
    let failed = |e: sqlx::Error| Insert::Failed(backend(e));
    let positions: Vec<i64> = row.try_get("positions").map_err(failed)?;
    if positions.len() != events.len() {
        // The stream was not at `base` (the statement's condition): nothing went in.
        return Err(Insert::Lost);
    }
    let transaction: &str = row.try_get("transaction_text").map_err(failed)?;
    appended(
        stream,
        base,
        events.iter().map(|e| e.event_id),
        &positions,
        xid(transaction).map_err(Insert::Failed)?,
        row.try_get("recorded_at").map_err(failed)?,
    )
    .map_err(Insert::Failed)
}

/// The outcome of an append whose events (`event_ids`, in version order) went in at versions
/// `base + 1..` and global `positions` in `transaction`: what every append path returns.
pub(crate) fn appended(
    stream: &StreamId,
    base: u64,
    event_ids: impl Iterator<Item = EventId>,
    positions: &[i64],
    transaction: u64,
    recorded_at: chrono::DateTime<chrono::Utc>,
) -> Result<AppendResult, StoreError> {
    let mut events = Vec::with_capacity(positions.len());
    for ((event_id, &position), version) in event_ids.zip(positions).zip(base + 1..) {
        events.push(AppendedEvent {
            event_id,
            version,
            checkpoint: Checkpoint::new(transaction, to_u64(position)?),
            recorded_at,
        });
    }
    Ok(AppendResult {
        stream: stream.clone(),
        version: base + events.len() as u64,
        events,
    })
}

/// How one try of a keyed append in a transaction ended.
enum Keyed {
    /// Appended (and the key recorded): commit.
    Appended(AppendResult),
    /// Another caller recorded the key first.
    KeyTaken,
    /// Another writer took a version first.
    Lost,
}

/// Why an `INSERT` attempt did not append.
pub(crate) enum Insert {
    /// A unique violation, or the expected base version was not the stream's: the caller decides
    /// between replay, reuse, conflict and another attempt.
    Lost,
    /// Anything else.
    Failed(StoreError),
}

/// Inserts `events` at versions `base + 1..` if the stream is exactly at `base`, in one statement.
pub(crate) async fn insert_at<'c, E: sqlx::PgExecutor<'c>>(
    executor: E,
    sql: &Sql,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
) -> Result<AppendResult, Insert> {
    let ColumnArrays {
        ids,
        types,
        versions,
        payloads,
        metadata,
    } = ColumnArrays::of(events).map_err(Insert::Failed)?;
    let base_i64 = to_i64(base).map_err(Insert::Failed)?;
    let query = sqlx::query(AssertSqlSafe(if events.len() == 1 {
        sql.insert_one.clone()
    } else {
        sql.insert.clone()
    }))
    .bind(&stream.aggregate_type)
    .bind(stream.aggregate_id.as_str())
    .bind(base_i64);
    // One event (most commands) binds scalars: no arrays to encode, unnest and aggregate.
    let query = match (
        &ids[..],
        &types[..],
        &versions[..],
        &payloads[..],
        &metadata[..],
    ) {
        ([id], [event_type], [version], [payload], [meta]) => query
            .bind(id)
            .bind(event_type)
            .bind(version)
            .bind(payload)
            .bind(meta),
        _ => query
            .bind(&ids)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&metadata),
    };
    let row = match query.fetch_optional(executor).await {
        Ok(Some(row)) => row,
        // The single-event statement returns no row when the stream is not at `base`.
        Ok(None) => return Err(Insert::Lost),
        Err(error) if is_unique_violation(&error) => return Err(Insert::Lost),
        Err(error) => return Err(Insert::Failed(backend(error))),
    };
    appended_from(&row, stream, base, events)
}

/// A keyed append at `base` in one statement (`Sql::insert_keyed`): `None` when the key was
/// taken, the stream was not at `base`, or a unique index refused a row (the statement then
/// wrote nothing): the transaction path sorts out which.
async fn insert_keyed(
    pool: &PgPool,
    sql: &Sql,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
    key: &str,
) -> Result<Option<AppendResult>, StoreError> {
    let columns = ColumnArrays::of(events)?;
    let row = sqlx::query(AssertSqlSafe(sql.insert_keyed.clone()))
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .bind(to_i64(base)?)
        .bind(&columns.ids)
        .bind(&columns.types)
        .bind(&columns.versions)
        .bind(&columns.payloads)
        .bind(&columns.metadata)
        .bind(key)
        .fetch_one(pool)
        .await;
    let row = match row {
        Ok(row) => row,
        Err(error) if is_unique_violation(&error) => return Ok(None),
        Err(error) => return Err(backend(error)),
    };
    match appended_from(&row, stream, base, events) {
        Ok(result) => Ok(Some(result)),
        Err(Insert::Lost) => Ok(None),
        Err(Insert::Failed(error)) => Err(error),
    }
}

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation())
}

async fn stream_version_on<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    sql: &Sql,
    stream: &StreamId,
) -> Result<u64, StoreError> {
    let version: i64 = sqlx::query_scalar(AssertSqlSafe(sql.stream_version.clone()))
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .fetch_one(executor)
        .await
        .map_err(backend)?;
    to_u64(version)
}

/// Applies the migrations to the schema of `sql`: all of them, or those up to version `up_to`
/// (the upgrade tests start from an older schema).
async fn migrate_on(
    conn: &mut PgConnection,
    sql: &Sql,
    up_to: Option<i64>,
) -> Result<(), StoreError> {
    // Serializes concurrent first migrations of a schema (CREATE SCHEMA IF NOT EXISTS can race).
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(&sql.quoted_schema)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let result = async {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            sql.quoted_schema
        )))
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
        sqlx::query(AssertSqlSafe(format!(
            "SET search_path TO {}",
            sql.quoted_schema
        )))
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
        let migrated = match up_to {
            None => MIGRATOR.run(&mut *conn).await,
            Some(version) => MIGRATOR.run_to(version, &mut *conn).await,
        }
        .map_err(StoreError::backend);
        sqlx::query("RESET search_path")
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        migrated
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(&sql.quoted_schema)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    result
}

impl PostgresEventStore {
    /// [`EventStore::append`] without its span and metrics.
    async fn append_unobserved(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        if events.is_empty() {
            let actual = self.version_of(stream).await?;
            return if expected.is_met_by(actual) {
                Ok(AppendResult {
                    stream: stream.clone(),
                    version: actual,
                    events: Vec::new(),
                })
            } else {
                Err(StoreError::Conflict {
                    stream: stream.clone(),
                    expected,
                    actual,
                })
            };
        }
        self.same_server().await?;
        let appended = self.append_on(stream, expected, &events).await?;
        self.notifier.committed(&self.pool, &self.channel);
        Ok(appended)
    }

    /// [`EventStore::append_with_key`] without its span and metrics.
    async fn append_with_key_unobserved(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        self.same_server().await?;
        // The common case in one statement (no transaction block, one round trip).
        let base = match expected {
            ExpectedVersion::Exact(n) => Some(n),
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Any | ExpectedVersion::StreamExists => None,
        };
        if let Some(base) = base
            && self.inline.is_empty()
            && !events.is_empty()
            && events.len() < COPY_THRESHOLD
            && let Some(result) =
                insert_keyed(&self.pool, &self.sql, stream, base, &events, key).await?
        {
            self.notifier.committed(&self.pool, &self.channel);
            return Ok(result);
        }
        for _ in 0..ANY_VERSION_ATTEMPTS {
            let mut tx = Tx::begin(&self.pool).await.map_err(backend)?;
            match self
                .append_keyed_in(&mut tx, stream, expected, &events, key)
                .await
            {
                Ok(Keyed::Appended(result)) => {
                    tx.commit().await.map_err(backend)?;
                    self.notifier.committed(&self.pool, &self.channel);
                    return Ok(result);
                }
                Ok(Keyed::KeyTaken) => {
                    tx.rollback().await;
                    let record = self.find_key(key).await?;
                    return Err(record.map_or_else(
                        || StoreError::backend(format!("idempotency key `{key}` vanished")),
                        |r| StoreError::KeyUsed(Box::new(r)),
                    ));
                }
                Ok(Keyed::Lost) => {
                    tx.rollback().await;
                    if let Some(error) = self.classify_ids(stream, &events).await? {
                        return Err(error);
                    }
                    if !matches!(
                        expected,
                        ExpectedVersion::Any | ExpectedVersion::StreamExists
                    ) {
                        return Err(StoreError::Conflict {
                            stream: stream.clone(),
                            expected,
                            actual: self.version_of(stream).await?,
                        });
                    }
                }
                Err(error) => {
                    tx.rollback().await;
                    return Err(error);
                }
            }
        }
        Err(StoreError::backend(format!(
            "{stream}: lost the race for a version {ANY_VERSION_ATTEMPTS} times in a row"
        )))
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

/// The span of a read in the global order.
fn read_span(after: Checkpoint, limit: usize) -> tracing::Span {
    tracing::debug_span!(
        "cqrs.read",
        after.transaction = after.transaction,
        after.position = after.position,
        limit
    )
}

impl PostgresEventStore {
    /// [`EventStore::read_filtered`] reading each row with `read`.
    async fn read_filtered_with<P: Send>(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[evently_core::projection::Subscription],
        read: fn(&sqlx::postgres::PgRow) -> Result<StoredEvent<P>, StoreError>,
    ) -> Result<(Vec<StoredEvent<P>>, Checkpoint), StoreError> {
        if scan == 0 {
            return Ok((Vec::new(), after));
        }
        // Any aggregate type when one subscription is not tied to one; else the subscribed ones.
        let aggregate_types: Vec<&str> = if filter.iter().all(|s| s.aggregate_type.is_some()) {
            filter.iter().filter_map(|s| s.aggregate_type).collect()
        } else {
            Vec::new()
        };
        let event_types: Vec<&str> = filter
            .iter()
            .flat_map(|s| s.event_types.iter().copied())
            .collect();
        let query = sqlx::query(AssertSqlSafe(self.sql.read_window_filtered.clone()))
            .bind(after.transaction.to_string())
            .bind(to_i64(after.position)?)
            .bind(i64::try_from(scan).unwrap_or(i64::MAX))
            .bind(&aggregate_types)
            .bind(&event_types);
        let rows = self
            .collect_in_global_order(query, after, scan, read)
            .await?;
        // The last row is the window's end, subscribed or not; the query matched each event type
        // with each aggregate type: keep the exact pairs.
        let scanned_to = rows.last().map_or(after, |e| e.checkpoint);
        let events = rows
            .into_iter()
            .filter(|e| filter.iter().any(|s| s.matches(e)))
            .collect();
        Ok((events, scanned_to))
    }
}

/// The largest page read without disabling sorts (see `in_global_order`): below it the planner
/// prefers the ordered index scan even without statistics, at 100,000 events (measured: it
/// switches to scanning and sorting the table between 2,000 and 5,000).
const SORT_SAFE_PAGE: usize = 1_000;

#[async_trait::async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.load_snapshot.clone()))
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| {
            let schema_version: i32 = row.try_get("schema_version").map_err(backend)?;
            Ok(Snapshot {
                stream: stream.clone(),
                version: to_u64(row.try_get("version").map_err(backend)?)?,
                schema_version: u32::try_from(schema_version).map_err(|_| {
                    StoreError::backend(format!("snapshot schema version {schema_version}"))
                })?,
                state: row.try_get("state").map_err(backend)?,
            })
        })
        .transpose()
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let schema_version = i32::try_from(snapshot.schema_version).map_err(|_| {
            StoreError::InvalidInput(format!(
                "snapshot schema version {}",
                snapshot.schema_version
            ))
        })?;
        sqlx::query(AssertSqlSafe(self.sql.save_snapshot.clone()))
            .bind(&snapshot.stream.aggregate_type)
            .bind(snapshot.stream.aggregate_id.as_str())
            .bind(to_i64(snapshot.version)?)
            .bind(schema_version)
            .bind(&snapshot.state)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// How the store's connection pool is sized ([`PostgresEventStore::connect_with`]).
///
/// What takes a connection, and for how long: each append or load one, for its statement (or its
/// transaction); a running `ProjectionWorker` one for each batch's transaction and one for the
/// next window it reads meanwhile; an `OutboxRelay` one or two for its reads and one for its
/// checkpoint; a saga orchestrator one per store call. Commit wake-ups take none: a store has one
/// listening connection of its own, outside the pool, whatever listens on it. So size the pool as
/// the concurrent appends you want to run at once, plus two per worker and three per relay of the
/// process, and keep the sum over all processes below the server's `max_connections`. Appends
/// that find the pool busy wait up to `acquire_timeout`, then fail with a backend error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// The most connections the pool opens (at least 1). Default 16.
    pub max_connections: u32,
    /// How long a caller waits for a free connection (or for the server to come up) before an
    /// error. Default 60 s; clamped to a day.
    pub acquire_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(60),
        }
    }
}

/// How long [`PostgresEventStore::listen`] waits for the shared listening connection.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// Commit notifications of one schema's events, from [`PostgresEventStore::listen`].
#[derive(Debug)]
pub struct Wakeups {
    signal: tokio::sync::watch::Receiver<u64>,
}

impl Wakeups {
    /// Waits for the next commit of events. A hint only: notifications sent while the listening
    /// connection was down are lost (everyone is woken once it is back), so readers keep polling
    /// too.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store's listener has stopped (its store is gone).
    pub async fn next(&mut self) -> Result<(), StoreError> {
        self.signal
            .changed()
            .await
            .map_err(|_| StoreError::backend("the store's commit listener has stopped"))
    }

    /// Waits for the next commit or `timeout`, whichever comes first; `true` if woken by a commit.
    ///
    /// # Errors
    /// As [`Wakeups::next`].
    pub async fn next_within(&mut self, timeout: Duration) -> Result<bool, StoreError> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(result) => result.map(|()| true),
            Err(_) => Ok(false),
        }
    }
}

/// A connection failure, naming the server (without its password).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {0}: {1}{hint}", hint = tls_hint(.1))]
struct ConnectError(String, #[source] sqlx::Error);

/// A failure to connect to `url`, named without its password.
fn connect_error(url: &str, error: sqlx::Error) -> StoreError {
    StoreError::backend(ConnectError(url_without_password(url), error))
}

/// Makes sure rustls has a process-wide crypto provider before a TLS connection needs one.
/// rustls picks one by its crate features, and finds none when a build enables two (ring here,
/// aws-lc-rs through an AWS SDK, say): sqlx's TLS handshake then panics. ring is installed
/// unless the application installed one first.
fn tls_provider() {
    #[cfg(feature = "tls")]
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: there is a provider either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// What to do about a TLS failure that is this build's, not the server's.
fn tls_hint(error: &sqlx::Error) -> &'static str {
    if cfg!(feature = "tls") || !matches!(error, sqlx::Error::Tls(_)) {
        ""
    } else {
        " (cqrs-postgres was built without TLS: enable its `tls` feature)"
    }
}

/// `url` with every password replaced, for error messages: the one in the user info
/// (`postgres://app:secret@host`), a `password=` parameter of a URL's query
/// (`?password=secret`) and a `password=` pair of a key/value connection string
/// (`host=db password=secret`, quoted or not).
fn url_without_password(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    let mut out = String::with_capacity(url.len());
    let mut rest = url.as_str();
    while let Some(at) = rest.to_ascii_lowercase().find("password=") {
        let value = at + "password=".len();
        out.push_str(&rest[..value]);
        out.push_str("***");
        let tail = &rest[value..];
        let end = if let Some(quoted) = tail.strip_prefix('\'') {
            // A quoted value runs to the next unescaped quote.
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(tail.len(), |(i, _)| i + 2)
        } else {
            tail.find(['&', ' ', '\t', '\n']).unwrap_or(tail.len())
        };
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::url_without_password;
    use super::*;
    use evently_core::conformance::read_settled;

    /// A store on `schema`, dropped first, not migrated.
    async fn empty_schema(schema: &str) -> PostgresEventStore {
        let store = PostgresEventStore::connect(&database_url(), schema)
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

    /// The plans of the ordered reads with the settings `in_global_order` applies, on an events
    /// table that was never analyzed: the global-order index, no JIT compilation.
    #[tokio::test]
    async fn ordered_reads_walk_the_index_without_jit_on_an_unanalyzed_table() {
        let store = empty_schema("unit_ordered_plans").await;
        store.migrate().await.unwrap();
        for n in 0..3u32 {
            let events = (0..1_000)
                .map(|i| EventData {
                    event_id: EventId::new(),
                    event_type: "Happened".to_owned(),
                    schema_version: 1,
                    payload: serde_json::json!({ "n": n * 1_000 + i }),
                    metadata: evently_core::Metadata::default(),
                })
                .collect();
            store
                .append(
                    &StreamId::new("thing", format!("t{n}")),
                    ExpectedVersion::Any,
                    events,
                )
                .await
                .unwrap();
        }
        let types = vec!["Happened"];
        let no_types: Vec<&str> = Vec::new();
        for (name, statement, binds_filter) in [
            ("read_all", store.sql.read_all.clone(), false),
            (
                "read_window_filtered",
                store.sql.read_window_filtered.clone(),
                true,
            ),
        ] {
            let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {statement}");
            let mut query = sqlx::query(AssertSqlSafe(explain))
                .bind("0")
                .bind(0i64)
                .bind(2_000i64);
            if binds_filter {
                query = query.bind(&no_types).bind(&types);
            }
            let mut tx = Tx::begin_with(store.pool(), sql::BEGIN_ORDERED_READ)
                .await
                .unwrap();
            let plan: serde_json::Value = query.fetch_one(&mut *tx).await.unwrap().get(0);
            tx.rollback().await;
            let plan = plan.to_string();
            assert!(!plan.contains("\"JIT\""), "{name} was JIT-compiled: {plan}");
            assert!(
                plan.contains("events_global_order"),
                "{name} did not use the index: {plan}"
            );
        }
    }

    /// The JSON corpus of the upgrade test: escapes, non-ASCII, numbers at the edges of what
    /// `serde_json` and `numeric` hold, nesting, empty containers, keys `jsonb` reorders.
    fn tricky_payloads() -> Vec<serde_json::Value> {
        vec![
            serde_json::json!({ "text": "tab\t newline\n back\\slash \"quoted\" \u{1} é 🎉 \u{2028}" }),
            serde_json::json!({ "max": u64::MAX, "min": i64::MIN, "tenth": 0.1, "huge": 1e300, "tiny": 5e-324 }),
            serde_json::json!({ "zzz": 1, "a": 2, "mm": [null, true, false, [], {}, [[{ "deep": [1, 2.5, "x"] }]]] }),
            serde_json::json!({}),
            serde_json::json!([1, "two", { "three": 3 }]),
            serde_json::json!("a bare string"),
            serde_json::json!(42),
        ]
    }

    fn tricky_events() -> Vec<EventData> {
        tricky_payloads()
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                let mut metadata = evently_core::Metadata::default()
                    .with_correlation_id(evently_core::CorrelationId::new());
                metadata.causation_id = Some(evently_core::CausationId::new());
                metadata.user_id = Some(format!("ü-{i}\t\"x\""));
                metadata
                    .headers
                    .insert("tenant".to_owned(), format!("t\\{i}\n"));
                EventData {
                    event_id: EventId::new(),
                    event_type: format!("Tricky{i}"),
                    schema_version: 1,
                    payload,
                    metadata,
                }
            })
            .collect()
    }

    async fn json_column_types(store: &PostgresEventStore) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'events' \
               AND column_name IN ('metadata', 'payload') ORDER BY column_name",
        )
        .bind(store.schema())
        .fetch_all(store.pool())
        .await
        .unwrap()
    }

    /// A schema written before migration 0009 (payload and metadata as `jsonb`) reads the same
    /// after it through every read path, and what is appended afterwards is stored as written.
    #[tokio::test]
    async fn events_written_as_jsonb_read_the_same_after_the_json_migration() {
        let store = empty_schema("unit_json_upgrade").await;
        let mut conn = store.pool().acquire().await.unwrap();
        migrate_on(&mut conn, &store.sql, Some(20261130000008))
            .await
            .unwrap();
        drop(conn);
        assert_eq!(json_column_types(&store).await, ["jsonb", "jsonb"]);
        let one = StreamId::new("thing", "one-by-one");
        for event in tricky_events() {
            store
                .append(&one, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        let batch = StreamId::new("thing", "batch");
        store
            .append(&batch, ExpectedVersion::Any, tricky_events())
            .await
            .unwrap();
        let appended = 2 * tricky_payloads().len();
        let before = read_settled(&store, Checkpoint::START, appended).await;
        assert_eq!(before.len(), appended);

        // The upgrade as it happens in production: the new version's process migrates before it
        // reads (the old process's connections hold prepared reads whose result type changed,
        // which PostgreSQL refuses: "cached plan must not change result type").
        drop(store);
        let store = PostgresEventStore::connect(&database_url(), "unit_json_upgrade")
            .await
            .unwrap();
        store.migrate().await.unwrap();
        assert_eq!(json_column_types(&store).await, ["json", "json"]);
        let after = store
            .read_all(Checkpoint::START, before.len())
            .await
            .unwrap();
        assert_eq!(after, before);
        let raw = store
            .read_all_raw(Checkpoint::START, before.len())
            .await
            .unwrap();
        assert_eq!(raw.len(), after.len());
        for (raw, parsed) in raw.iter().zip(&after) {
            let reparsed: serde_json::Value = serde_json::from_str(raw.payload.get()).unwrap();
            assert_eq!(reparsed, parsed.payload, "{}", raw.event_type);
            assert_eq!(raw.metadata, parsed.metadata);
        }
        for stream in [&one, &batch] {
            let loaded: Vec<StoredEvent> =
                store.load(stream, 0).map(Result::unwrap).collect().await;
            let expected: Vec<&StoredEvent> =
                after.iter().filter(|e| &e.stream == stream).collect();
            assert_eq!(loaded.iter().collect::<Vec<_>>(), expected);
            let replayed: Vec<ReplayEvent> =
                store.replay(stream, 0).map(Result::unwrap).collect().await;
            for (replayed, stored) in replayed.iter().zip(&expected) {
                let evently_core::store::Payload::Text(text) = &replayed.payload else {
                    panic!("replay returned a parsed payload");
                };
                let reparsed: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(reparsed, stored.payload);
            }
        }

        // Appended after the migration, one by one and as a batch: the stored text is the
        // text written, byte for byte.
        let written = tricky_events();
        let later = StreamId::new("thing", "later");
        store
            .append(&later, ExpectedVersion::Any, written[..1].to_vec())
            .await
            .unwrap();
        store
            .append(&later, ExpectedVersion::Exact(1), written[1..].to_vec())
            .await
            .unwrap();
        let last = after.last().unwrap().checkpoint;
        read_settled(&store, last, written.len()).await;
        let raw = store.read_all_raw(last, 100).await.unwrap();
        assert_eq!(raw.len(), written.len());
        for (raw, event) in raw.iter().zip(&written) {
            assert_eq!(
                raw.payload.get(),
                serde_json::to_string(&event.payload).unwrap()
            );
            assert_eq!(raw.metadata, event.metadata);
            assert_eq!(raw.event_id, event.event_id);
        }
    }

    #[test]
    fn passwords_never_reach_error_messages() {
        assert_eq!(
            url_without_password("postgres://app:s3cr3t@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            url_without_password("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(url_without_password("not a url"), "not a url");
        assert_eq!(
            url_without_password("postgres://db/x?user=app&password=s3cr3t&sslmode=require"),
            "postgres://db/x?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            url_without_password("host=db user=app PASSWORD=s3cr3t dbname=x"),
            "host=db user=app PASSWORD=*** dbname=x"
        );
        assert_eq!(
            url_without_password("host=db password='s3 cr\\'3t' dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(
            url_without_password("postgres://a:b@db/x?password=c"),
            "postgres://a:***@db/x?password=***"
        );
    }
}
