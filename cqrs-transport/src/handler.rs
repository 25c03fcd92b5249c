//! The consumer side's handlers: what applies an event received from any broker.
//!
//! [`Transactional`] runs a projection that writes PostgreSQL (`derive(Projection)` with
//! `context = PgConnection`, the same type a
//! [`ProjectionWorker`](cqrs_postgres::projection::ProjectionWorker) runs from the store): each
//! event's effect commits with an inbox row, so a redelivered message has no second effect.
//! [`InProcess`] runs a projection with `Context = ()`, e.g. a
//! [`SagaStarter`](cqrs_core::saga::SagaStarter), which is idempotent by itself (an instance is
//! keyed by its starting event's id).

use cqrs_core::StoredEvent;
use cqrs_core::projection::{Projection, ProjectionError};
use cqrs_postgres::{Inbox, PostgresEventStore, Transaction};
use sqlx::PgConnection;

/// What a handler did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The effect happened.
    Applied,
    /// The event was handled before (the inbox has it): no effect.
    Duplicate,
    /// The handler does not listen to this event type.
    Skipped,
}

/// Why a handler did not handle an event.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event cannot be handled however often it is tried (an unknown type, a payload that
    /// does not decode): dead-lettered at once.
    #[error("{0}")]
    Malformed(String),
    /// The handler failed (retried with a backoff, then dead-lettered).
    #[error("{0}")]
    Failed(String),
    /// What the handler needs is down (the database unreachable, its connections terminated, the
    /// pool exhausted): not the message's fault, so it is not dead-lettered however long it
    /// lasts. The consumer waits (backoff up to 10 s) and tries the same message again, and
    /// nothing after it is handled meanwhile, so an outage never reorders an aggregate's events.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl From<ProjectionError> for HandleError {
    fn from(error: ProjectionError) -> Self {
        match error {
            ProjectionError::Decode(e) => Self::Malformed(e.to_string()),
            ProjectionError::Handler { ref source, .. } if is_outage(&**source) => {
                Self::Unavailable(error.to_string())
            }
            e @ ProjectionError::Handler { .. } => Self::Failed(e.to_string()),
        }
    }
}

impl HandleError {
    /// A database error as a handler error: [`HandleError::Unavailable`] when the database is
    /// unreachable or dropped the connection, else [`HandleError::Failed`].
    #[must_use]
    pub fn from_database(error: &sqlx::Error) -> Self {
        if is_outage(error) {
            Self::Unavailable(error.to_string())
        } else {
            Self::Failed(error.to_string())
        }
    }
}

/// Whether `error` (or an error it wraps) says the database is out of reach rather than that
/// this event cannot be applied: a broken or refused connection, an exhausted or closed pool, a
/// server shutting down or terminating connections, too many connections.
#[must_use]
pub fn is_outage(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
            return match sqlx {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // connection_exception (08xxx), admin/crash shutdown, cannot connect now,
                // too many connections.
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
                }),
                _ => false,
            };
        }
        if error.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        next = error.source();
    }
    false
}

/// Applies events received from a broker.
#[async_trait::async_trait]
pub trait MessageHandler: Send {
    /// The consumer's name (its inbox rows are kept under it).
    fn name(&self) -> &str;

    /// Handles one event.
    ///
    /// # Errors
    /// [`HandleError`]: whether trying again can help.
    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError>;
}

/// A projection writing PostgreSQL, fed from a broker: each event's effect and its inbox row commit
/// in one transaction, so a redelivery finds the row and does nothing.
pub struct Transactional<P> {
    store: PostgresEventStore,
    inbox: Inbox,
    projection: P,
}

impl<P> std::fmt::Debug for Transactional<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactional").finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> Transactional<P> {
    /// `projection`, writing in `store`'s database (whose schema holds the inbox).
    pub fn new(store: PostgresEventStore, projection: P) -> Self {
        Self {
            inbox: Inbox::new(&store),
            store,
            projection,
        }
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    async fn handle_in(
        &mut self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<Handled, HandleError> {
        if !self
            .inbox
            .claim(tx, P::NAME, event.event_id)
            .await
            .map_err(|e| match e {
                cqrs_core::StoreError::Backend(source) if is_outage(&*source) => {
                    HandleError::Unavailable(source.to_string())
                }
                other => HandleError::Failed(other.to_string()),
            })?
        {
            return Ok(Handled::Duplicate);
        }
        self.projection.apply(event, tx).await?;
        Ok(Handled::Applied)
    }
}

#[async_trait::async_trait]
impl<P> MessageHandler for Transactional<P>
where
    P: Projection<Context = PgConnection> + Sync,
{
    fn name(&self) -> &str {
        P::NAME
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        if !P::subscribes_to(event) {
            return unknown_type::<P>(event);
        }
        let failed = |e: sqlx::Error| HandleError::from_database(&e);
        let mut tx = Transaction::begin(self.store.pool())
            .await
            .map_err(failed)?;
        let outcome = self.handle_in(&mut tx, event).await;
        tx.end(outcome, failed).await
    }
}

/// A projection with `Context = ()` fed from a broker, e.g. a
/// [`SagaStarter`](cqrs_core::saga::SagaStarter). It has no inbox: it must be idempotent by
/// itself (a saga starter is: an instance is stored under its starting event's id).
#[derive(Debug)]
pub struct InProcess<P>(pub P);

#[async_trait::async_trait]
impl<P> MessageHandler for InProcess<P>
where
    P: Projection<Context = ()> + Sync,
{
    fn name(&self) -> &str {
        P::NAME
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        if !P::subscribes_to(event) {
            return unknown_type::<P>(event);
        }
        self.0.apply(event, &mut ()).await?;
        Ok(Handled::Applied)
    }
}

/// What an event `P` does not subscribe to is: skipped when its aggregate type is not one of
/// `P`'s, malformed when it is (the aggregate's event enum does not know this type: a producer
/// newer than this consumer, or a bad message).
fn unknown_type<P: Projection>(event: &StoredEvent) -> Result<Handled, HandleError> {
    let ours = P::SUBSCRIPTIONS
        .iter()
        .find(|s| s.aggregate_type == Some(event.stream.aggregate_type.as_str()));
    match ours {
        None => Ok(Handled::Skipped),
        Some(subscription) => Err(HandleError::Malformed(format!(
            "unknown event type `{}` of aggregate type `{}` (known: {})",
            event.event_type,
            event.stream.aggregate_type,
            subscription.event_types.join(", ")
        ))),
    }
}
