//! The two PostgreSQL adapters of the delivery engine: the log follower under a lease and the
//! consumer of a broker behind the inbox.

use std::collections::HashSet;

use evently_core::projection::engine::{Parked, Request, Savepoint};
use evently_core::projection::{DeadLetter, DeliveryBackend, DeliveryError, Projection};
use evently_core::{Checkpoint, StoreError, StreamId};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::errors::backend;
use crate::lease::Advance;
use crate::tx::Transaction;
use crate::{CheckpointLease, PostgresEventStore};

use super::letters;
use super::{Reset, ResetOnce, is_permanent};

/// Whether a projection's error is its database being out of reach (see [`crate::is_outage`]).
fn projection_outage(error: &evently_core::projection::ProjectionError) -> bool {
    match error {
        evently_core::projection::ProjectionError::Handler { source, .. } => {
            crate::is_outage(&**source)
        }
        evently_core::projection::ProjectionError::Decode(_) => false,
    }
}

/// The PostgreSQL adapter of the delivery engine: a transaction per unit of work, the checkpoint
/// in `projection_checkpoints` under a [`CheckpointLease`], dead letters in
/// `projection_dead_letters`, operator requests from [`crate::control`].
pub struct PostgresBackend {
    pub(super) store: PostgresEventStore,
    pub(super) lease: CheckpointLease,
    /// How to empty the read model, for rebuilds an operator asks for.
    pub(super) reset: Option<Reset>,
    /// The reset of the rebuild being run, if given for it (in a mutex only so that the backend
    /// stays `Sync`).
    pub(super) reset_once: std::sync::Mutex<Option<ResetOnce>>,
    /// Whether to keep the connection of a committed batch for the next one (while catching
    /// up), and the one kept: the next batch then begins without the pool's liveness ping.
    pub(super) hold: bool,
    pub(super) held: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    /// The segment this backend's lease is on, if the projection runs in segments: it serves
    /// only the redrives of its own streams.
    pub(super) segment: Option<evently_core::projection::Segment>,
    /// Whether its version is registered (see [`crate::versions`]).
    pub(super) registered: bool,
    /// How to promote its version once it has caught up, if it does so by itself.
    pub(super) auto_promote: Option<crate::versions::Promotion>,
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
    /// The lease found lost by a statement on `unit` that needed it: why, read from the row.
    async fn lease_lost(&mut self, unit: &mut Transaction, name: &'static str) -> DeliveryError {
        let epoch = self.lease.epoch();
        match self.lease.loss_on(unit).await {
            Ok(loss) => DeliveryError::LeaseLost {
                projection: name,
                epoch,
                loss,
            },
            Err(error) => error.into(),
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
    type Unit = Transaction;
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
                loss: evently_core::projection::LeaseLoss::NotHeld,
            }),
        }
    }

    async fn acquire_ownership(&mut self) -> Result<bool, DeliveryError> {
        evently_core::projection::check_tenants::<P>(&evently_core::EventStore::scope(
            &self.store,
        ))?;
        let versioned = crate::versions::is_versioned::<P>();
        if versioned {
            crate::rls::refuse_shared_registry::<P>(&self.store, "versioned")?;
        }
        if versioned && !self.registered {
            crate::versions::register::<P>(&self.store).await?;
            self.registered = true;
        }
        let acquired = self.lease.acquire().await?.is_some();
        if !acquired && versioned && crate::versions::is_retired(&self.store, P::NAME).await? {
            // Its checkpoint is gone and is never made again: the worker stops.
            return Err(crate::versions::retired::<P>().into());
        }
        Ok(acquired)
    }

    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError> {
        Ok(self.lease.checkpoint().await?)
    }

    async fn begin_unit(&mut self) -> Result<Transaction, DeliveryError> {
        if let Some(conn) = self.held.take() {
            match Transaction::begin_on(conn, "BEGIN").await {
                Ok(unit) => return Ok(unit),
                Err(error) => {
                    tracing::debug!(%error, "the connection kept between batches broke: taking another");
                }
            }
        }
        Ok(Transaction::begin(self.store.pool())
            .await
            .map_err(backend)?)
    }

    fn hold_connection(&mut self, hold: bool) {
        self.hold = hold;
        if !hold {
            self.held = None;
        }
    }

    fn unit_context<'a>(&'a mut self, unit: &'a mut Transaction) -> &'a mut PgConnection {
        unit
    }

    async fn savepoint(
        &mut self,
        unit: &mut Transaction,
        op: Savepoint,
    ) -> Result<(), DeliveryError> {
        letters::savepoint(unit, op).await
    }

    async fn blocked_streams(
        &mut self,
        unit: &mut Transaction,
    ) -> Result<HashSet<StreamId>, DeliveryError> {
        letters::blocked_streams(&self.store, unit, P::NAME).await
    }

    async fn park_event(
        &mut self,
        unit: &mut Transaction,
        parked: Parked<'_>,
    ) -> Result<(), DeliveryError> {
        letters::park(&self.store, unit, P::NAME, parked).await
    }

    async fn advance_checkpoint(
        &mut self,
        unit: &mut Transaction,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<(), DeliveryError> {
        // Read before the move, which forgets the epoch when the lease is lost.
        let epoch = self.lease.epoch();
        match self.lease.advance_on(unit, from, to).await? {
            Advance::Done => Ok(()),
            Advance::LeaseLost(loss) => Err(DeliveryError::LeaseLost {
                projection: P::NAME,
                epoch,
                loss,
            }),
            Advance::Moved { stored } => Err(DeliveryError::CheckpointMoved {
                projection: P::NAME,
                stored,
            }),
        }
    }

    async fn end_unit(&mut self, unit: Transaction, commit: bool) -> Result<(), DeliveryError> {
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
        unit: &mut Transaction,
        stream: &StreamId,
    ) -> Result<(), DeliveryError> {
        let epoch = self.lease.epoch();
        let held = sqlx::query(AssertSqlSafe(self.store.sql.hold_lease.clone()))
            .bind(self.lease.name())
            .bind(epoch)
            .fetch_optional(&mut **unit)
            .await
            .map_err(backend)?;
        if held.is_none() {
            return Err(self.lease_lost(unit, P::NAME).await);
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
        unit: &mut Transaction,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        letters::of_stream(&self.store, unit, P::NAME, stream, after, limit).await
    }

    async fn reread_letter(
        &mut self,
        unit: &mut Transaction,
        letter: &DeadLetter,
    ) -> Result<Result<evently_core::StoredEvent, String>, DeliveryError> {
        letters::reread(&self.store, unit, letter).await
    }

    async fn resolve_letter(
        &mut self,
        unit: &mut Transaction,
        id: i64,
    ) -> Result<(), DeliveryError> {
        letters::resolve(&self.store, unit, id).await
    }

    async fn fail_letter_again(
        &mut self,
        unit: &mut Transaction,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError> {
        letters::fail_again(&self.store, unit, id, error).await
    }

    async fn reset_for_rebuild(&mut self, unit: &mut Transaction) -> Result<(), DeliveryError> {
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
            .bind(self.lease.name())
            .bind(self.lease.epoch())
            .execute(&mut **unit)
            .await
            .map_err(backend)?;
        if moved.rows_affected() != 1 {
            return Err(self.lease_lost(unit, P::NAME).await);
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
        if crate::versions::is_versioned::<P>() && self.segment.is_none_or(|s| s.index() == 0) {
            crate::versions::tend::<P>(&self.store, self.auto_promote).await;
        }
        let s = &self.store.sql.quoted_schema;
        let rebuild: Option<Option<chrono::DateTime<chrono::Utc>>> =
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT rebuild_requested_at FROM {s}.projection_checkpoints WHERE projection = $1"
            )))
            .bind(self.lease.name())
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
                .map(|(t, id)| StreamId::new(t, id))
                .filter(|stream| self.segment.is_none_or(|segment| segment.contains(stream)))
                .map(Request::Retry),
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
            .bind(self.lease.name())
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
/// ([`Engine::deliver`](evently_core::projection::Engine::deliver)): a transaction per batch of received messages, each event claimed in
/// the [`Inbox`](crate::Inbox) (a redelivery applies nothing), dead letters in
/// `projection_dead_letters` under the projection's name (so later events of a stream wait
/// behind its dead letter across restarts, and operators see them with `cqrs dlq list`). There is
/// no checkpoint and no lease: the broker's acknowledgements are the checkpoint, and its
/// consumer group, queue or durable decides who consumes. Dead letters are sent back through the
/// broker's own dead-letter place (`cqrs dlq <broker> retry`); the engine's own redrive
/// ([`Engine::retry`](evently_core::projection::Engine::retry)) reads the event from this database's event store, so it works only where
/// the consumer's database also holds the log.
pub struct InboxBackend {
    pub(super) store: PostgresEventStore,
    pub(super) inbox: crate::Inbox,
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
    type Unit = Transaction;
    const TRANSACTIONAL: bool = true;
    type Store = PostgresEventStore;

    fn event_store(&self) -> &PostgresEventStore {
        &self.store
    }

    /// The start: a broker source has no checkpoint of its own (its acknowledgements are).
    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError> {
        Ok(Checkpoint::START)
    }

    async fn begin_unit(&mut self) -> Result<Transaction, DeliveryError> {
        Ok(Transaction::begin(self.store.pool())
            .await
            .map_err(backend)?)
    }

    fn unit_context<'a>(&'a mut self, unit: &'a mut Transaction) -> &'a mut PgConnection {
        unit
    }

    async fn savepoint(
        &mut self,
        unit: &mut Transaction,
        op: Savepoint,
    ) -> Result<(), DeliveryError> {
        letters::savepoint(unit, op).await
    }

    async fn blocked_streams(
        &mut self,
        unit: &mut Transaction,
    ) -> Result<HashSet<StreamId>, DeliveryError> {
        letters::blocked_streams(&self.store, unit, P::NAME).await
    }

    async fn park_event(
        &mut self,
        unit: &mut Transaction,
        parked: Parked<'_>,
    ) -> Result<(), DeliveryError> {
        letters::park(&self.store, unit, P::NAME, parked).await
    }

    /// Opens sealed personal fields with the store's key store, as its reads do.
    async fn open_payloads(
        &mut self,
        events: &mut [evently_core::StoredEvent],
    ) -> Result<(), DeliveryError> {
        Ok(self.store.open(events).await?)
    }

    /// Nothing to move: the caller acknowledges the messages once the unit committed.
    async fn advance_checkpoint(
        &mut self,
        _unit: &mut Transaction,
        _from: Checkpoint,
        _to: Checkpoint,
    ) -> Result<(), DeliveryError> {
        Ok(())
    }

    async fn end_unit(&mut self, unit: Transaction, commit: bool) -> Result<(), DeliveryError> {
        if commit {
            unit.commit().await.map_err(backend)?;
        } else {
            unit.rollback().await;
        }
        Ok(())
    }

    async fn claim<T: evently_core::Payload>(
        &mut self,
        unit: &mut Transaction,
        event: &evently_core::StoredEvent<T>,
    ) -> Result<bool, DeliveryError> {
        Ok(self.inbox.claim(unit, P::NAME, event.event_id).await?)
    }

    fn is_outage(&self, error: &evently_core::projection::ProjectionError) -> bool {
        projection_outage(error)
    }

    async fn letters_of(
        &mut self,
        unit: &mut Transaction,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        letters::of_stream(&self.store, unit, P::NAME, stream, after, limit).await
    }

    async fn reread_letter(
        &mut self,
        unit: &mut Transaction,
        letter: &DeadLetter,
    ) -> Result<Result<evently_core::StoredEvent, String>, DeliveryError> {
        letters::reread(&self.store, unit, letter).await
    }

    async fn resolve_letter(
        &mut self,
        unit: &mut Transaction,
        id: i64,
    ) -> Result<(), DeliveryError> {
        letters::resolve(&self.store, unit, id).await
    }

    async fn fail_letter_again(
        &mut self,
        unit: &mut Transaction,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError> {
        letters::fail_again(&self.store, unit, id, error).await
    }

    fn is_permanent(&self, error: &DeliveryError) -> bool {
        is_permanent(error)
    }
}
