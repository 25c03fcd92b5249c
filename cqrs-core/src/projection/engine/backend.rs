//! The port a delivery backend implements: a unit of work, ownership, the checkpoint, dead letters
//! and operator requests, and what the engine hands it.

use crate::envelope::{Checkpoint, EventId, Payload, StoredEvent, StreamId};
use crate::projection::failure::{DeadLetter, Failure};
use crate::projection::{Projection, ProjectionError};
use crate::store::{EventStore, StoreError};
use futures::future::BoxFuture;
use std::collections::HashSet;
use std::convert::Infallible;

use super::*;

/// A savepoint operation inside a unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Savepoint {
    /// Set a savepoint before one event.
    Set,
    /// The event applied: release it.
    Release,
    /// The event failed: roll back to it.
    Rollback,
}
/// An event (or a row that cannot be read as one) to park as a dead letter.
#[derive(Debug, Clone, Copy)]
pub struct Parked<'a> {
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream: &'a StreamId,
    /// Its version.
    pub version: u64,
    /// Why it is parked.
    pub failure: &'a Failure,
}
/// An operator's request to a running projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Rebuild from the first event.
    Rebuild,
    /// Retry the dead letters of a stream.
    Retry(StreamId),
}
/// Where a projection's checkpoint, dead letters and unit of work live: what the engine needs
/// from a backend. Implemented by [`InMemoryBackend`](crate::projection::InMemoryBackend) and by
/// `evently_postgres::projection::PostgresBackend`.
#[async_trait::async_trait]
pub trait DeliveryBackend<P: Projection>: Send {
    /// One unit of work: a database transaction, or nothing for state in the process.
    type Unit: Send;

    /// Whether a unit rolls back everything done in it. Then a batch is first applied without
    /// savepoints (one round trip less per event) and, if a handler fails, again event by event
    /// with a savepoint each; without it, each event is applied once, with its retries.
    const TRANSACTIONAL: bool;

    /// The store events are read from (cloned into the task that reads ahead).
    type Store: EventStore + Clone + 'static;

    /// The store.
    fn event_store(&self) -> &Self::Store;

    /// `Ok` while this backend may write the projection (holds its lease), else
    /// [`DeliveryError::LeaseLost`].
    ///
    /// # Errors
    /// As said.
    fn check_ownership(&self) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Takes or renews the ownership of the projection; `false` while another owner holds it.
    ///
    /// # Errors
    /// A failing backend.
    async fn acquire_ownership(&mut self) -> Result<bool, DeliveryError> {
        Ok(true)
    }

    /// The stored checkpoint.
    ///
    /// # Errors
    /// A failing backend.
    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError>;

    /// Opens a unit of work.
    ///
    /// # Errors
    /// A failing backend.
    async fn begin_unit(&mut self) -> Result<Self::Unit, DeliveryError>;

    /// What handlers write through, in `unit`.
    fn unit_context<'a>(&'a mut self, unit: &'a mut Self::Unit) -> &'a mut P::Context;

    /// A savepoint operation (only called on transactional backends).
    ///
    /// # Errors
    /// A failing backend.
    async fn savepoint(
        &mut self,
        unit: &mut Self::Unit,
        op: Savepoint,
    ) -> Result<(), DeliveryError>;

    /// The streams with dead letters.
    ///
    /// # Errors
    /// A failing backend.
    async fn blocked_streams(
        &mut self,
        unit: &mut Self::Unit,
    ) -> Result<HashSet<StreamId>, DeliveryError>;

    /// Parks an event as a dead letter.
    ///
    /// # Errors
    /// A failing backend.
    async fn park_event(
        &mut self,
        unit: &mut Self::Unit,
        parked: Parked<'_>,
    ) -> Result<(), DeliveryError>;

    /// Opens the sealed personal fields of events received from a broker (published as stored,
    /// see [`crate::personal`]) before [`Engine::deliver`](super::Engine::deliver) applies them.
    /// The default leaves them sealed: a backend with a key store opens them.
    ///
    /// # Errors
    /// The key store's.
    async fn open_payloads(
        &mut self,
        events: &mut [crate::StoredEvent],
    ) -> Result<(), DeliveryError> {
        let _ = events;
        Ok(())
    }

    /// Moves the checkpoint from exactly `from` to `to` (compare-and-set), renewing the ownership.
    /// A [`TRANSACTIONAL`](Self::TRANSACTIONAL) backend is asked first in the unit, before any
    /// event is applied (the unit holds its ownership from there to its end, and a fenced owner
    /// writes nothing); any other backend last, after the unit's effects.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], [`DeliveryError::CheckpointMoved`], a failing backend.
    async fn advance_checkpoint(
        &mut self,
        unit: &mut Self::Unit,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<(), DeliveryError>;

    /// Claims `event` for this projection in `unit` (the inbox of a broker source): `false` when
    /// it was applied before (a redelivery), and then nothing is applied. Backends that read the
    /// store need none (their checkpoint says what was applied): the default claims everything.
    /// Called inside the event's savepoint, so a failed try releases its claim.
    ///
    /// # Errors
    /// A failing backend.
    async fn claim<T: Payload>(
        &mut self,
        _unit: &mut Self::Unit,
        _event: &StoredEvent<T>,
    ) -> Result<bool, DeliveryError> {
        Ok(true)
    }

    /// Whether a handler's error says that what the handler needs is down (its database
    /// unreachable, its connection terminated) rather than that the event cannot be applied.
    /// The engine then neither retries nor parks the event: the unit ends with the error and the
    /// caller tries again after the outage, so an outage never parks events. Default: never.
    fn is_outage(&self, _error: &ProjectionError) -> bool {
        false
    }

    /// Whether to keep a connection (or whatever a unit runs on) from one unit to the next: `true`
    /// while [`Engine::catch_up`] runs batch after batch, `false` after it. Default: nothing to
    /// keep.
    fn hold_connection(&mut self, _hold: bool) {}

    /// Ends `unit`: commits it, or rolls it back.
    ///
    /// # Errors
    /// A failing commit.
    async fn end_unit(&mut self, unit: Self::Unit, commit: bool) -> Result<(), DeliveryError>;

    /// Renews the ownership while a long batch runs; never completes (the default waits).
    fn ownership_heartbeat(&self) -> BoxFuture<'static, Infallible> {
        Box::pin(futures::future::pending())
    }

    /// Prepares `unit` for a redrive of `stream` (holds the lease, answers requests on it).
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], a failing backend.
    async fn begin_redrive(
        &mut self,
        _unit: &mut Self::Unit,
        _stream: &StreamId,
    ) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Up to `limit` dead letters of `stream` after version `after`, in version order.
    ///
    /// # Errors
    /// A failing backend.
    async fn letters_of(
        &mut self,
        unit: &mut Self::Unit,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError>;

    /// The event of a dead letter, read again (`Err(reason)` when it cannot be read: it stays
    /// parked with the reason).
    ///
    /// # Errors
    /// A failing backend.
    async fn reread_letter(
        &mut self,
        unit: &mut Self::Unit,
        letter: &DeadLetter,
    ) -> Result<Result<StoredEvent, String>, DeliveryError>;

    /// A dead letter applied: remove it.
    ///
    /// # Errors
    /// A failing backend.
    async fn resolve_letter(&mut self, unit: &mut Self::Unit, id: i64)
    -> Result<(), DeliveryError>;

    /// A dead letter failed again: record the new error.
    ///
    /// # Errors
    /// A failing backend.
    async fn fail_letter_again(
        &mut self,
        unit: &mut Self::Unit,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError>;

    /// Resets the read model, the checkpoint and the dead letters for a rebuild an operator asked
    /// for, in `unit`.
    ///
    /// # Errors
    /// [`DeliveryError::Store`] with `InvalidInput` when the backend has no reset.
    async fn reset_for_rebuild(&mut self, _unit: &mut Self::Unit) -> Result<(), DeliveryError> {
        Err(StoreError::InvalidInput(format!(
            "projection `{}` has no reset: rebuilds on request are not available",
            P::NAME
        ))
        .into())
    }

    /// The operators' pending requests.
    ///
    /// # Errors
    /// A failing backend.
    async fn pending_requests(&mut self) -> Result<Vec<Request>, DeliveryError> {
        Ok(Vec::new())
    }

    /// Records the outcome of a served request.
    ///
    /// # Errors
    /// A failing backend.
    async fn request_answered(
        &mut self,
        _request: &Request,
        _outcome: Result<(), String>,
    ) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Whether waiting cannot heal `error` (a missing schema, refused privileges): then `run`
    /// returns it.
    fn is_permanent(&self, _error: &DeliveryError) -> bool {
        false
    }
}
