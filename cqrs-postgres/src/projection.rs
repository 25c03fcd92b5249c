//! PostgreSQL projections: the core's delivery engine ([`evently_core::projection::Engine`]) on a
//! PostgreSQL backend. The read-model change and the checkpoint move commit in one transaction,
//! the checkpoint moves by compare-and-set from the window's start under the epoch of the lease
//! that makes one worker the owner at a time, and dead letters and operator requests live in the
//! schema's tables.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use evently_core::projection::engine::{Parked, Request, Savepoint};
pub use evently_core::projection::{
    Batch, DeadLetter, FailureMode, FailurePolicy, ProjectionMetrics, Redrive,
};
use evently_core::projection::{DeliveryBackend, DeliveryError, Engine, Projection};
use evently_core::{Checkpoint, StoreError, StreamId};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::lease::Advance;
use crate::rows::{backend, to_i64, to_u64};
use crate::tx::Tx;
use crate::{CheckpointLease, PostgresEventStore};

/// Why a projection worker stopped: the engine's [`DeliveryError`].
pub type WorkerError = DeliveryError;

/// Whether waiting cannot heal `error`: the schema or its tables do not exist (run the
/// migrations), the database refuses this user, or the projection failed outside its retries.
/// Connection failures, a server restarting, a lost lease and timeouts heal, and
/// [`ProjectionWorker::run`] rides them out.
#[must_use]
pub fn is_permanent(error: &WorkerError) -> bool {
    match error {
        DeliveryError::LeaseLost { .. } | DeliveryError::CheckpointMoved { .. } => false,
        DeliveryError::Projection(_) => true,
        DeliveryError::Store(StoreError::Backend(source)) => {
            source.downcast_ref::<sqlx::Error>().is_some_and(|e| {
                matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|code| {
                    // undefined_table, undefined_column, invalid_schema_name,
                    // insufficient_privilege, undefined_function
                    matches!(&*code, "42P01" | "42703" | "3F000" | "42501" | "42883")
                }))
            })
        }
        DeliveryError::Store(_) => false,
    }
}

/// Lists and purges a projection's dead letters; retrying them needs the projection, so it is
/// [`ProjectionWorker::retry`] and [`ProjectionWorker::retry_all`].
#[derive(Debug, Clone)]
pub struct DeadLetters {
    store: PostgresEventStore,
}

impl DeadLetters {
    /// The dead letters of the projections in `store`'s schema.
    #[must_use]
    pub fn new(store: PostgresEventStore) -> Self {
        Self { store }
    }

    /// The dead letters of `projection`, by stream and version.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, WorkerError> {
        let rows = sqlx::query(AssertSqlSafe(self.store.sql.list_dead_letters.clone()))
            .bind(projection)
            .fetch_all(self.store.pool())
            .await
            .map_err(backend)?;
        rows.iter().map(dead_letter).collect()
    }

    /// Removes the dead letters of `projection` that last failed before `older_than` (all of them
    /// with `None`), without applying them; returns how many.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn purge(
        &self,
        projection: &str,
        older_than: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<u64, WorkerError> {
        let done = sqlx::query(AssertSqlSafe(self.store.sql.purge_dead_letters.clone()))
            .bind(projection)
            .bind(older_than)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }
}

fn dead_letter(row: &sqlx::postgres::PgRow) -> Result<DeadLetter, WorkerError> {
    let aggregate_type: String = row.try_get("aggregate_type").map_err(backend)?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(backend)?;
    let attempts: i32 = row.try_get("attempts").map_err(backend)?;
    Ok(DeadLetter {
        id: row.try_get("id").map_err(backend)?,
        event_id: evently_core::EventId(row.try_get("event_id").map_err(backend)?),
        stream: StreamId::new(aggregate_type, aggregate_id),
        version: to_u64(row.try_get("version").map_err(backend)?)?,
        error: row.try_get("error").map_err(backend)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        first_failed_at: row.try_get("first_failed_at").map_err(backend)?,
        last_failed_at: row.try_get("last_failed_at").map_err(backend)?,
    })
}

/// The dead-letter statements both PostgreSQL backends run (on `projection_dead_letters`, under
/// `projection`), in the unit's transaction.
mod letters {
    use super::{
        AssertSqlSafe, DeadLetter, DeliveryError, HashSet, Parked, PgConnection, Row, Savepoint,
        StoreError, StreamId, backend, dead_letter, to_i64,
    };
    use crate::PostgresEventStore;

    pub(super) async fn savepoint(
        conn: &mut PgConnection,
        op: Savepoint,
    ) -> Result<(), DeliveryError> {
        let statement = match op {
            Savepoint::Set => "SAVEPOINT cqrs_event",
            Savepoint::Release => "RELEASE SAVEPOINT cqrs_event",
            Savepoint::Rollback => "ROLLBACK TO SAVEPOINT cqrs_event",
        };
        sqlx::query(statement)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub(super) async fn blocked_streams(
        store: &PostgresEventStore,
        conn: &mut PgConnection,
        projection: &str,
    ) -> Result<HashSet<StreamId>, DeliveryError> {
        let rows = sqlx::query(AssertSqlSafe(store.sql.blocked_streams.clone()))
            .bind(projection)
            .fetch_all(conn)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| {
                let aggregate_type: String = row.try_get(0).map_err(backend)?;
                let aggregate_id: String = row.try_get(1).map_err(backend)?;
                Ok(StreamId::new(aggregate_type, aggregate_id))
            })
            .collect()
    }

    pub(super) async fn park(
        store: &PostgresEventStore,
        conn: &mut PgConnection,
        projection: &str,
        parked: Parked<'_>,
    ) -> Result<(), DeliveryError> {
        sqlx::query(AssertSqlSafe(store.sql.park.clone()))
            .bind(projection)
            .bind(parked.event_id.0)
            .bind(&parked.stream.aggregate_type)
            .bind(parked.stream.aggregate_id.as_str())
            .bind(to_i64(parked.version)?)
            .bind(&parked.failure.error)
            .bind(i32::try_from(parked.failure.attempts).unwrap_or(i32::MAX))
            .bind(parked.failure.first_failed_at)
            .bind(chrono::Utc::now())
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub(super) async fn of_stream(
        store: &PostgresEventStore,
        conn: &mut PgConnection,
        projection: &str,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        let after = match after {
            Some(version) => to_i64(version)?,
            None => i64::MIN,
        };
        let rows = sqlx::query(AssertSqlSafe(store.sql.stream_dead_letters.clone()))
            .bind(projection)
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(conn)
            .await
            .map_err(backend)?;
        rows.iter().map(dead_letter).collect()
    }

    pub(super) async fn reread(
        store: &PostgresEventStore,
        conn: &mut PgConnection,
        letter: &DeadLetter,
    ) -> Result<Result<evently_core::StoredEvent, String>, DeliveryError> {
        let row = sqlx::query(AssertSqlSafe(store.sql.event_by_id.clone()))
            .bind(letter.event_id.0)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        let Some(row) = row else {
            return Ok(Err(format!(
                "event {} (version {} of {}) is not in this database's event store",
                letter.event_id, letter.version, letter.stream
            )));
        };
        match crate::rows::stored_event(&row) {
            Ok(event) => Ok(Ok(event)),
            // Still unreadable: it stays parked, with the reason.
            Err(corrupt @ StoreError::Corrupt(_)) => Ok(Err(corrupt.to_string())),
            Err(error) => Err(error.into()),
        }
    }

    pub(super) async fn resolve(
        store: &PostgresEventStore,
        conn: &mut PgConnection,
        id: i64,
    ) -> Result<(), DeliveryError> {
        sqlx::query(AssertSqlSafe(store.sql.resolve_dead_letter.clone()))
            .bind(id)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub(super) async fn fail_again(
        store: &PostgresEventStore,
        conn: &mut PgConnection,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError> {
        sqlx::query(AssertSqlSafe(store.sql.fail_dead_letter.clone()))
            .bind(id)
            .bind(error)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Whether a projection's error is its database being out of reach (see [`crate::is_outage`]).
fn projection_outage(error: &evently_core::projection::ProjectionError) -> bool {
    match error {
        evently_core::projection::ProjectionError::Handler { source, .. } => {
            crate::is_outage(&**source)
        }
        evently_core::projection::ProjectionError::Decode(_) => false,
    }
}

/// Empties a read model inside the rebuild's transaction.
type Reset = Arc<
    dyn for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> + Send + Sync,
>;

/// A one-shot reset given to [`ProjectionWorker::rebuild`].
type ResetOnce =
    Box<dyn for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> + Send>;

/// The PostgreSQL adapter of the delivery engine: a transaction per unit of work, the checkpoint
/// in `projection_checkpoints` under a [`CheckpointLease`], dead letters in
/// `projection_dead_letters`, operator requests from [`crate::control`].
pub struct PostgresBackend {
    store: PostgresEventStore,
    lease: CheckpointLease,
    /// How to empty the read model, for rebuilds an operator asks for.
    reset: Option<Reset>,
    /// The reset of the rebuild being run, if given for it (in a mutex only so that the backend
    /// stays `Sync`).
    reset_once: std::sync::Mutex<Option<ResetOnce>>,
    /// Whether to keep the connection of a committed batch for the next one (while catching
    /// up), and the one kept: the next batch then begins without the pool's liveness ping.
    hold: bool,
    held: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("owner", &self.lease.owner())
            .field("epoch", &self.lease.epoch())
            .field("lease", &self.lease.duration())
            .finish_non_exhaustive()
    }
}

impl PostgresBackend {
    fn lease_lost(&mut self, name: &'static str) -> DeliveryError {
        let epoch = self.lease.epoch();
        self.lease.forget();
        DeliveryError::LeaseLost {
            projection: name,
            epoch,
        }
    }
}

/// Runs `sql`, which binds a projection and a stream, on `conn`.
async fn exec_on_stream(
    conn: &mut PgConnection,
    sql: &str,
    projection: &str,
    stream: &StreamId,
) -> Result<(), DeliveryError> {
    sqlx::query(AssertSqlSafe(sql.to_owned()))
        .bind(projection)
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

#[async_trait::async_trait]
impl<P: Projection<Context = PgConnection>> DeliveryBackend<P> for PostgresBackend {
    type Unit = Tx;
    const TRANSACTIONAL: bool = true;
    type Store = PostgresEventStore;

    fn event_store(&self) -> &PostgresEventStore {
        &self.store
    }

    fn check_ownership(&self) -> Result<(), DeliveryError> {
        match self.lease.epoch() {
            Some(_) => Ok(()),
            None => Err(DeliveryError::LeaseLost {
                projection: P::NAME,
                epoch: None,
            }),
        }
    }

    async fn acquire_ownership(&mut self) -> Result<bool, DeliveryError> {
        Ok(self.lease.acquire().await?.is_some())
    }

    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError> {
        Ok(self.lease.checkpoint().await?)
    }

    async fn begin_unit(&mut self) -> Result<Tx, DeliveryError> {
        if let Some(conn) = self.held.take() {
            match Tx::begin_on(conn, "BEGIN").await {
                Ok(unit) => return Ok(unit),
                Err(error) => {
                    tracing::debug!(%error, "the connection kept between batches broke: taking another");
                }
            }
        }
        Ok(Tx::begin(self.store.pool()).await.map_err(backend)?)
    }

    fn hold_connection(&mut self, hold: bool) {
        self.hold = hold;
        if !hold {
            self.held = None;
        }
    }

    fn unit_context<'a>(&'a mut self, unit: &'a mut Tx) -> &'a mut PgConnection {
        unit
    }

    async fn savepoint(&mut self, unit: &mut Tx, op: Savepoint) -> Result<(), DeliveryError> {
        letters::savepoint(unit, op).await
    }

    async fn blocked_streams(&mut self, unit: &mut Tx) -> Result<HashSet<StreamId>, DeliveryError> {
        letters::blocked_streams(&self.store, unit, P::NAME).await
    }

    async fn park_event(&mut self, unit: &mut Tx, parked: Parked<'_>) -> Result<(), DeliveryError> {
        letters::park(&self.store, unit, P::NAME, parked).await
    }

    async fn advance_checkpoint(
        &mut self,
        unit: &mut Tx,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<(), DeliveryError> {
        match self.lease.advance_on(unit, from, to).await? {
            Advance::Done => Ok(()),
            Advance::LeaseLost => Err(self.lease_lost(P::NAME)),
            Advance::Moved { stored } => Err(DeliveryError::CheckpointMoved {
                projection: P::NAME,
                stored,
            }),
        }
    }

    async fn end_unit(&mut self, unit: Tx, commit: bool) -> Result<(), DeliveryError> {
        if commit && self.hold {
            self.held = Some(unit.commit_keeping().await.map_err(backend)?);
        } else if commit {
            unit.commit().await.map_err(backend)?;
        } else {
            unit.rollback().await;
            return Ok(());
        }
        // Waiters for the checkpoint read it again now rather than at their next poll.
        self.store.checkpoint_moved();
        Ok(())
    }

    fn ownership_heartbeat(&self) -> BoxFuture<'static, std::convert::Infallible> {
        Box::pin(self.lease.heartbeat())
    }

    async fn begin_redrive(
        &mut self,
        unit: &mut Tx,
        stream: &StreamId,
    ) -> Result<(), DeliveryError> {
        let epoch = self.lease.epoch();
        let held = sqlx::query(AssertSqlSafe(self.store.sql.hold_lease.clone()))
            .bind(P::NAME)
            .bind(epoch)
            .fetch_optional(&mut **unit)
            .await
            .map_err(backend)?;
        if held.is_none() {
            return Err(self.lease_lost(P::NAME));
        }
        // This redrive answers any request on the stream, whatever its outcome.
        let sql = format!(
            "UPDATE {}.projection_dead_letters SET retry_requested_at = NULL \
             WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
            self.store.sql.quoted_schema
        );
        exec_on_stream(unit, &sql, P::NAME, stream).await
    }

    async fn letters_of(
        &mut self,
        unit: &mut Tx,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        letters::of_stream(&self.store, unit, P::NAME, stream, after, limit).await
    }

    async fn reread_letter(
        &mut self,
        unit: &mut Tx,
        letter: &DeadLetter,
    ) -> Result<Result<evently_core::StoredEvent, String>, DeliveryError> {
        letters::reread(&self.store, unit, letter).await
    }

    async fn resolve_letter(&mut self, unit: &mut Tx, id: i64) -> Result<(), DeliveryError> {
        letters::resolve(&self.store, unit, id).await
    }

    async fn fail_letter_again(
        &mut self,
        unit: &mut Tx,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError> {
        letters::fail_again(&self.store, unit, id, error).await
    }

    async fn reset_for_rebuild(&mut self, unit: &mut Tx) -> Result<(), DeliveryError> {
        let reset_once = self
            .reset_once
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if reset_once.is_none() && self.reset.is_none() {
            return Err(StoreError::InvalidInput(format!(
                "the worker of `{}` ({}) has no reset: build it with ProjectionWorker::with_reset to allow rebuilds",
                P::NAME,
                self.lease.owner()
            ))
            .into());
        }
        let moved = sqlx::query(AssertSqlSafe(self.store.sql.reset_checkpoint.clone()))
            .bind(P::NAME)
            .bind(self.lease.epoch())
            .execute(&mut **unit)
            .await
            .map_err(backend)?;
        if moved.rows_affected() != 1 {
            return Err(self.lease_lost(P::NAME));
        }
        match (reset_once, &self.reset) {
            (Some(reset), _) => reset(unit).await.map_err(backend)?,
            (None, Some(reset)) => reset(unit).await.map_err(backend)?,
            (None, None) => {}
        }
        sqlx::query(AssertSqlSafe(self.store.sql.reset_dead_letters.clone()))
            .bind(P::NAME)
            .execute(&mut **unit)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn pending_requests(&mut self) -> Result<Vec<Request>, DeliveryError> {
        let s = &self.store.sql.quoted_schema;
        let rebuild: Option<Option<chrono::DateTime<chrono::Utc>>> =
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT rebuild_requested_at FROM {s}.projection_checkpoints WHERE projection = $1"
            )))
            .bind(P::NAME)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        let mut requests = Vec::new();
        if rebuild.flatten().is_some() {
            requests.push(Request::Rebuild);
        }
        let streams: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT DISTINCT aggregate_type, aggregate_id FROM {s}.projection_dead_letters \
             WHERE projection = $1 AND retry_requested_at IS NOT NULL"
        )))
        .bind(P::NAME)
        .fetch_all(self.store.pool())
        .await
        .map_err(backend)?;
        requests.extend(
            streams
                .into_iter()
                .map(|(t, id)| Request::Retry(StreamId::new(t, id))),
        );
        Ok(requests)
    }

    async fn request_answered(
        &mut self,
        request: &Request,
        outcome: Result<(), String>,
    ) -> Result<(), DeliveryError> {
        if let (Request::Rebuild, Err(error)) = (request, outcome) {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {}.projection_checkpoints SET rebuild_requested_at = NULL, request_error = $2 \
                 WHERE projection = $1",
                self.store.sql.quoted_schema
            )))
            .bind(P::NAME)
            .bind(error)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        }
        Ok(())
    }

    fn is_permanent(&self, error: &DeliveryError) -> bool {
        is_permanent(error)
    }

    fn is_outage(&self, error: &evently_core::projection::ProjectionError) -> bool {
        projection_outage(error)
    }
}

/// The PostgreSQL adapter of the delivery engine for a projection fed from a broker
/// ([`Engine::deliver`]): a transaction per batch of received messages, each event claimed in
/// the [`Inbox`](crate::Inbox) (a redelivery applies nothing), dead letters in
/// `projection_dead_letters` under the projection's name (so later events of a stream wait
/// behind its dead letter across restarts, and operators see them with `cqrs dlq list`). There is
/// no checkpoint and no lease: the broker's acknowledgements are the checkpoint, and its
/// consumer group, queue or durable decides who consumes. Dead letters are sent back through the
/// broker's own dead-letter place (`cqrs dlq <broker> retry`); the engine's own redrive
/// ([`Engine::retry`]) reads the event from this database's event store, so it works only where
/// the consumer's database also holds the log.
pub struct InboxBackend {
    store: PostgresEventStore,
    inbox: crate::Inbox,
}

impl std::fmt::Debug for InboxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxBackend")
            .field("schema", &self.store.schema())
            .finish_non_exhaustive()
    }
}

impl InboxBackend {
    /// The backend in `store`'s schema (which holds the inbox and the dead letters).
    #[must_use]
    pub fn new(store: PostgresEventStore) -> Self {
        Self {
            inbox: crate::Inbox::new(&store),
            store,
        }
    }

    /// The store whose database the projection writes.
    #[must_use]
    pub fn store(&self) -> &PostgresEventStore {
        &self.store
    }

    /// The store, giving up the backend.
    #[must_use]
    pub fn into_store(self) -> PostgresEventStore {
        self.store
    }
}

#[async_trait::async_trait]
impl<P: Projection<Context = PgConnection>> DeliveryBackend<P> for InboxBackend {
    type Unit = Tx;
    const TRANSACTIONAL: bool = true;
    type Store = PostgresEventStore;

    fn event_store(&self) -> &PostgresEventStore {
        &self.store
    }

    /// The start: a broker source has no checkpoint of its own (its acknowledgements are).
    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError> {
        Ok(Checkpoint::START)
    }

    async fn begin_unit(&mut self) -> Result<Tx, DeliveryError> {
        Ok(Tx::begin(self.store.pool()).await.map_err(backend)?)
    }

    fn unit_context<'a>(&'a mut self, unit: &'a mut Tx) -> &'a mut PgConnection {
        unit
    }

    async fn savepoint(&mut self, unit: &mut Tx, op: Savepoint) -> Result<(), DeliveryError> {
        letters::savepoint(unit, op).await
    }

    async fn blocked_streams(&mut self, unit: &mut Tx) -> Result<HashSet<StreamId>, DeliveryError> {
        letters::blocked_streams(&self.store, unit, P::NAME).await
    }

    async fn park_event(&mut self, unit: &mut Tx, parked: Parked<'_>) -> Result<(), DeliveryError> {
        letters::park(&self.store, unit, P::NAME, parked).await
    }

    /// Nothing to move: the caller acknowledges the messages once the unit committed.
    async fn advance_checkpoint(
        &mut self,
        _unit: &mut Tx,
        _from: Checkpoint,
        _to: Checkpoint,
    ) -> Result<(), DeliveryError> {
        Ok(())
    }

    async fn end_unit(&mut self, unit: Tx, commit: bool) -> Result<(), DeliveryError> {
        if commit {
            unit.commit().await.map_err(backend)?;
        } else {
            unit.rollback().await;
        }
        Ok(())
    }

    async fn claim<T: evently_core::Payload>(
        &mut self,
        unit: &mut Tx,
        event: &evently_core::StoredEvent<T>,
    ) -> Result<bool, DeliveryError> {
        Ok(self.inbox.claim(unit, P::NAME, event.event_id).await?)
    }

    fn is_outage(&self, error: &evently_core::projection::ProjectionError) -> bool {
        projection_outage(error)
    }

    async fn letters_of(
        &mut self,
        unit: &mut Tx,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        letters::of_stream(&self.store, unit, P::NAME, stream, after, limit).await
    }

    async fn reread_letter(
        &mut self,
        unit: &mut Tx,
        letter: &DeadLetter,
    ) -> Result<Result<evently_core::StoredEvent, String>, DeliveryError> {
        letters::reread(&self.store, unit, letter).await
    }

    async fn resolve_letter(&mut self, unit: &mut Tx, id: i64) -> Result<(), DeliveryError> {
        letters::resolve(&self.store, unit, id).await
    }

    async fn fail_letter_again(
        &mut self,
        unit: &mut Tx,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError> {
        letters::fail_again(&self.store, unit, id, error).await
    }

    fn is_permanent(&self, error: &DeliveryError) -> bool {
        is_permanent(error)
    }
}

/// Runs one projection whose handlers write through the transaction (`Context = PgConnection`):
/// the core's delivery [`Engine`] on a [`PostgresBackend`].
///
/// Each [`step`](ProjectionWorker::step) reads a batch after the checkpoint, applies it in one
/// transaction and moves the checkpoint in that same transaction by compare-and-set from the
/// window's start, naming this worker's lease epoch: a crash anywhere before the commit leaves
/// the read model and the checkpoint as they were, a worker that lost its lease (paused past it
/// while another took over) can never commit, and a step cut after `COMMIT` was sent and retried
/// at once applies nothing twice.
pub struct ProjectionWorker<P: Projection> {
    engine: Engine<P, PostgresBackend>,
}

impl<P: Projection> std::fmt::Debug for ProjectionWorker<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionWorker")
            .field("projection", &P::NAME)
            .field("backend", self.engine.backend())
            .field("batch", &self.engine.batch())
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> ProjectionWorker<P> {
    /// A worker named `owner` (unique per process) for `projection`, with a 30 s lease, batches of
    /// 2,000 events and the default [`FailurePolicy`].
    pub fn new(store: PostgresEventStore, projection: P, owner: impl Into<String>) -> Self {
        let backend = PostgresBackend {
            lease: CheckpointLease::new(store.clone(), P::NAME, owner, Duration::from_secs(30)),
            store,
            reset: None,
            reset_once: std::sync::Mutex::new(None),
            hold: false,
            held: None,
        };
        Self {
            engine: Engine::new(projection, backend, 2_000),
        }
    }

    /// How to empty the read model (e.g. `TRUNCATE` its tables): lets an operator rebuild the
    /// projection with `cqrs projections rebuild` while this worker runs (see
    /// [`crate::control`]). Without it such a request is answered with an error saying so.
    #[must_use]
    pub fn with_reset<F>(mut self, reset: F) -> Self
    where
        F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + Sync
            + 'static,
    {
        self.engine.backend_mut().reset = Some(Arc::new(reset));
        self
    }

    /// What to do with events the projection keeps failing on.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.engine.set_policy(policy);
        self
    }

    /// How long the lease lasts without a renewal (each checkpoint move renews it, and a
    /// heartbeat every third of it while a batch runs); clamped to between
    /// [`MIN_LEASE`](crate::lease::MIN_LEASE) and a day.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        let backend = self.engine.backend_mut();
        backend.lease = backend.lease.clone().with_lease(lease);
        self
    }

    /// How many events one step reads at most.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.engine.set_batch(batch);
        self
    }

    /// The worker's counters.
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.engine.metrics()
    }

    /// The counters, readable while the worker runs: take it before calling `run`.
    #[must_use]
    pub fn metrics_handle(&self) -> evently_core::telemetry::MetricsHandle<ProjectionMetrics> {
        self.engine.metrics_handle()
    }

    /// How many committed events the projection has still to read (an exact count; see
    /// [`lag_detail`](Self::lag_detail) for their age too).
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn lag(&self) -> Result<u64, WorkerError> {
        Ok(self.lag_detail().await?.events)
    }

    /// How far the projection is behind: the committed events after its checkpoint and how long
    /// ago the oldest of them was recorded.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn lag_detail(&self) -> Result<evently_core::projection::Lag, WorkerError> {
        let checkpoint = self.checkpoint().await?;
        Ok(self.engine.backend().store.lag_after(checkpoint).await?)
    }

    /// The projection (e.g. to read in-process state in tests).
    pub fn projection(&self) -> &P {
        self.engine.projection()
    }

    /// Takes (or renews) the lease; `false` while another worker's lease is live.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn acquire(&mut self) -> Result<bool, WorkerError> {
        DeliveryBackend::<P>::acquire_ownership(self.engine.backend_mut()).await
    }

    /// The stored checkpoint of the projection.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, WorkerError> {
        Ok(self.engine.backend().lease.checkpoint().await?)
    }

    /// Applies the next batch after the checkpoint in one transaction, with the checkpoint move.
    /// A stored row no reader can decode is parked as a dead letter naming its position, and
    /// passed.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection (nothing is
    /// committed), [`WorkerError::CheckpointMoved`] after an in-doubt commit of this worker went
    /// through (nothing of this batch is kept; step again), [`WorkerError::Store`].
    pub async fn step(&mut self) -> Result<Batch, WorkerError> {
        self.engine.step().await
    }

    /// Steps until every event committed before the call is applied (or parked); returns how
    /// many events were applied. See [`Engine::catch_up`].
    ///
    /// # Errors
    /// As [`ProjectionWorker::step`].
    pub async fn catch_up(&mut self) -> Result<usize, WorkerError> {
        self.engine.catch_up().await
    }

    /// Keeps the projection up to date until `shutdown` completes: catches up from the checkpoint,
    /// serves the operators' requests, then waits for a commit wake-up
    /// ([`EventStore::commit_signal`](evently_core::EventStore::commit_signal): one listening
    /// connection per store, outside the pool, whatever runs on it) or `poll` (a lost notification
    /// costs at most one poll interval), and again. A shutdown rolls back the batch in flight (or
    /// finds it committed), never half of it. The lease is renewed on every wake-up; a worker that
    /// loses it keeps trying to take it back and otherwise stays idle.
    ///
    /// Failures that heal are ridden out: a broken connection, a server restarting or terminating
    /// connections, a timeout are logged (`warn`) and the work is tried again after a backoff
    /// (50 ms doubling to 5 s, with jitter); each try starts from the stored checkpoint, so nothing
    /// is applied twice or skipped. Returns the projection on shutdown.
    ///
    /// # Errors
    /// Only what waiting cannot heal ([`is_permanent`]): the schema or its tables do not exist
    /// (run the migrations), the database refuses this user.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<P, WorkerError> {
        self.engine.run(poll, shutdown).await?;
        Ok(self.engine.into_parts().0)
    }

    /// Answers the operators' requests on this projection (see [`crate::control`]): a rebuild
    /// (with the reset given to [`with_reset`](Self::with_reset); without one the request is
    /// answered with an error saying so), then the dead letters asked to be retried, stream by
    /// stream. [`run`](Self::run) calls it after every catch-up; call it yourself when driving
    /// [`step`](Self::step). Returns whether there was anything to do.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection, store failures.
    /// A failed rebuild is recorded for the operator and returned.
    pub async fn serve_requests(&mut self) -> Result<bool, WorkerError> {
        self.engine.serve_requests().await
    }

    /// Applies the dead letters of `stream` again, in version order, in one transaction under this
    /// worker's lease (a page of letters at a time): each one that applies is removed; the first
    /// that fails again stays (with the new error) and so do the ones after it.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection, store failures.
    pub async fn retry(&mut self, stream: &StreamId) -> Result<Redrive, WorkerError> {
        self.engine.retry(stream).await
    }

    /// [`ProjectionWorker::retry`] for every stream with dead letters.
    ///
    /// # Errors
    /// As [`ProjectionWorker::retry`].
    pub async fn retry_all(&mut self) -> Result<Redrive, WorkerError> {
        self.engine.retry_all().await
    }

    /// Rebuilds the read model from the first event: in one transaction under this worker's lease,
    /// runs `reset` (which empties the read model, e.g. `TRUNCATE`), moves the checkpoint back to
    /// the start and drops the dead letters; then catches up. Writers may keep writing meanwhile: the
    /// catch-up reads the global order to its end, so the result equals a clean replay.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection (nothing is reset),
    /// a failing `reset` ([`WorkerError::Store`]), and the errors of [`ProjectionWorker::catch_up`].
    pub async fn rebuild<F>(&mut self, reset: F) -> Result<usize, WorkerError>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + 'static,
    {
        *self
            .engine
            .backend_mut()
            .reset_once
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(reset));
        let rebuilt = self.engine.rebuild().await;
        self.engine
            .backend_mut()
            .reset_once
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        rebuilt
    }
}

/// Where a projection of the schema is, for operators (`cqrs projections list`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// The checkpoint it has applied up to.
    pub checkpoint: Checkpoint,
    /// Committed events after the checkpoint (an exact count).
    pub lag: u64,
    /// How long ago the oldest of them was recorded (0 when caught up).
    pub lag_seconds: f64,
    /// The worker holding (or last holding) the lease.
    pub owner: Option<String>,
    /// The lease's epoch: bumped by every takeover.
    pub epoch: i64,
    /// Whether the lease is live now.
    pub leased: bool,
    /// How many dead letters it has.
    pub dead_letters: u64,
    /// When its checkpoint last moved.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Every projection with a checkpoint in `store`'s schema, by name.
///
/// # Errors
/// [`WorkerError::Store`] when the database fails.
pub async fn projections(store: &PostgresEventStore) -> Result<Vec<ProjectionStatus>, WorkerError> {
    let s = &store.sql.quoted_schema;
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT c.projection, c.transaction_id::text AS transaction_text, c.global_position, c.owner, c.epoch, \
                COALESCE(c.lease_until > now(), false) AS leased, c.updated_at, \
                (SELECT count(*) FROM {s}.projection_dead_letters d WHERE d.projection = c.projection) AS dead_letters, \
                l.lag, l.lag_seconds \
         FROM {s}.projection_checkpoints c, LATERAL ( \
           SELECT count(*) AS lag, \
                  COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(e.recorded_at))::float8, 0) AS lag_seconds \
           FROM {s}.events e WHERE (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)) l \
         ORDER BY c.projection"
    )))
    .fetch_all(store.pool())
    .await
    .map_err(backend)?;
    rows.iter()
        .map(|row| {
            let checkpoint = crate::rows::checkpoint(row)?;
            let lag: i64 = row.try_get("lag").map_err(backend)?;
            let dead_letters: i64 = row.try_get("dead_letters").map_err(backend)?;
            Ok(ProjectionStatus {
                name: row.try_get("projection").map_err(backend)?,
                lag: to_u64(lag)?,
                lag_seconds: row
                    .try_get::<f64, _>("lag_seconds")
                    .map_err(backend)?
                    .max(0.0),
                checkpoint,
                owner: row.try_get("owner").map_err(backend)?,
                epoch: row.try_get("epoch").map_err(backend)?,
                leased: row.try_get("leased").map_err(backend)?,
                dead_letters: to_u64(dead_letters)?,
                updated_at: row.try_get("updated_at").map_err(backend)?,
            })
        })
        .collect()
}

/// The stored checkpoint of projection `name` ([`Checkpoint::START`] before its first step).
///
/// # Errors
/// [`WorkerError::Store`] when the database fails.
pub async fn read_checkpoint(
    store: &PostgresEventStore,
    name: &str,
) -> Result<Checkpoint, WorkerError> {
    Ok(crate::lease::read(store, name).await?)
}

/// A projection run inside the append transaction; see [`PostgresEventStore::with_inline`].
pub(crate) trait InlineProjection: Send + Sync {
    /// Applies the subscribed ones of `events` through `conn`.
    fn apply_all<'a>(
        &'a self,
        events: &'a [evently_core::StoredEvent],
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The inline form of a projection: a clone applies each append's events.
pub(crate) struct Inline<P>(pub(crate) P);

impl<P> InlineProjection for Inline<P>
where
    P: Projection<Context = PgConnection> + Clone + Sync,
{
    fn apply_all<'a>(
        &'a self,
        events: &'a [evently_core::StoredEvent],
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut projection = self.0.clone();
            for event in events.iter().filter(|e| P::subscribes_to(e)) {
                projection.apply(event, conn).await.map_err(|error| {
                    StoreError::InlineProjection {
                        projection: P::NAME,
                        source: Box::new(error),
                    }
                })?;
            }
            Ok(())
        })
    }
}
