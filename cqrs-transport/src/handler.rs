//! The consumer side's handlers: what applies an event received from any broker.
//!
//! [`Transactional`] runs a projection that writes PostgreSQL (`derive(Projection)` with
//! `context = PgConnection`, the same type a
//! [`ProjectionWorker`](evently_postgres::projection::ProjectionWorker) runs from the store): each
//! event's effect commits with an inbox row, so a redelivered message has no second effect.
//! [`InProcess`] runs a projection with `Context = ()`, e.g. a
//! [`SagaStarter`](evently_core::saga::SagaStarter), which is idempotent by itself (an instance is
//! keyed by its starting event's id).

use std::time::Duration;

use evently_core::StoredEvent;
use evently_core::projection::{
    Delivered, Engine, FailureMode, FailurePolicy, Projection, ProjectionError, ProjectionMetrics,
    unknown_event_type,
};
use evently_postgres::PostgresEventStore;
pub use evently_postgres::is_outage;
use evently_postgres::projection::InboxBackend;
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

/// The error behind a [`HandleError`]: the handler's own error, kept whole (its `source()` chain
/// included), or a message (`"text".into()`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a handler did not handle an event. Each variant carries the error that decided it as its
/// source, so a report walks down to the database's or the decoder's own error.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event cannot be handled however often it is tried (an unknown type, a payload that
    /// does not decode): dead-lettered at once.
    #[error(transparent)]
    Malformed(BoxError),
    /// The handler failed (retried with a backoff, then dead-lettered).
    #[error(transparent)]
    Failed(BoxError),
    /// What the handler needs is down (the database unreachable, its connections terminated, the
    /// pool exhausted): not the message's fault, so it is not dead-lettered however long it
    /// lasts. The consumer waits (backoff up to 10 s) and tries the same message again, and
    /// nothing after it is handled meanwhile, so an outage never reorders an aggregate's events.
    #[error("unavailable")]
    Unavailable(#[source] BoxError),
    /// The handler gave up on the event and parked it where it keeps its dead letters (after
    /// its own retries, or behind an earlier dead letter of its aggregate): the consumer sends
    /// it to the broker's dead-letter place at once, without trying it again.
    #[error("{reason}")]
    Parked {
        /// Why (the last error, or that it waits behind an earlier dead letter).
        reason: String,
        /// How many times it was tried (0 for one that waits or cannot be applied).
        attempts: u32,
    },
}

impl From<ProjectionError> for HandleError {
    fn from(error: ProjectionError) -> Self {
        match error {
            ProjectionError::Decode(e) => Self::Malformed(Box::new(e)),
            ProjectionError::Handler { ref source, .. } if is_outage(&**source) => {
                Self::Unavailable(Box::new(error))
            }
            e @ ProjectionError::Handler { .. } => Self::Failed(Box::new(e)),
        }
    }
}

impl HandleError {
    /// A database error as a handler error: [`HandleError::Unavailable`] when the database is
    /// unreachable or dropped the connection, else [`HandleError::Failed`]; the error is kept as
    /// the source.
    #[must_use]
    pub fn from_database(error: sqlx::Error) -> Self {
        if is_outage(&error) {
            Self::Unavailable(Box::new(error))
        } else {
            Self::Failed(Box::new(error))
        }
    }

    /// The whole chain as one line, `error: cause: cause`: what logs and dead letters record.
    #[must_use]
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

/// Applies events received from a broker.
#[async_trait::async_trait]
pub trait MessageHandler: Send {
    /// The consumer's name (its inbox rows are kept under it).
    fn name(&self) -> &str;

    /// How often a failing event is tried and the first backoff, for a handler that retries
    /// by itself (the consumer's [`set_retries`](crate::Consumer::set_retries) passes them on;
    /// the default ignores them: the consumer retries).
    fn set_retries(&mut self, _attempts: u32, _backoff: Duration) {}

    /// Handles one event.
    ///
    /// # Errors
    /// [`HandleError`]: whether trying again can help.
    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError>;
}

/// A projection writing PostgreSQL, fed from a broker: the core's delivery
/// [`Engine`] on an [`InboxBackend`], so a message is handled by the same rules as an event read
/// from the store by a [`ProjectionWorker`](evently_postgres::projection::ProjectionWorker). Each
/// event's effect commits with its inbox row (a redelivery finds the row and does nothing); a
/// failing handler is retried with the backoff and then parked in `projection_dead_letters`
/// under the projection's name; by default ([`FailureMode::BlockStream`]) later events of its
/// aggregate are parked behind it until it is sent back from the broker's dead-letter place and
/// applies, so per-aggregate order holds through a dead letter. Parked events go to the broker's
/// dead-letter place too ([`HandleError::Parked`]).
pub struct Transactional<P: Projection> {
    engine: Engine<P, InboxBackend>,
}

impl<P: Projection> std::fmt::Debug for Transactional<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactional")
            .field("projection", &P::NAME)
            .field("policy", &self.engine.policy())
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> Transactional<P> {
    /// `projection`, writing in `store`'s database (whose schema holds the inbox and the dead
    /// letters), with the default [`FailurePolicy`] (later events of an aggregate wait behind
    /// its dead letter; the consumer's [`set_retries`](MessageHandler::set_retries) sets the
    /// tries).
    pub fn new(store: PostgresEventStore, projection: P) -> Self {
        Self {
            engine: Engine::new(projection, InboxBackend::new(store), 1),
        }
    }

    /// Where events after a dead letter go: [`FailureMode::BlockStream`] (the default) parks
    /// later events of its aggregate behind it; [`FailureMode::Skip`] applies them (for
    /// projections that do not depend on order within an aggregate).
    #[must_use]
    pub fn with_failure_mode(mut self, mode: FailureMode) -> Self {
        let policy = FailurePolicy {
            mode,
            ..self.engine.policy()
        };
        self.engine.set_policy(policy);
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        self.engine.projection()
    }

    /// The projection and the store, to build another handler from them.
    pub fn into_parts(self) -> (P, PostgresEventStore) {
        let (projection, backend) = self.engine.into_parts();
        (projection, backend.into_store())
    }

    /// The engine's counters (events applied and parked).
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.engine.metrics()
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

    fn set_retries(&mut self, attempts: u32, backoff: Duration) {
        let policy = FailurePolicy {
            attempts: attempts.max(1),
            backoff,
            max_backoff: Duration::from_secs(10),
            ..self.engine.policy()
        };
        self.engine.set_policy(policy);
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        let delivered = self
            .engine
            .deliver(std::slice::from_ref(event))
            .await
            .map_err(|error| HandleError::Unavailable(Box::new(error)))?;
        match delivered.into_iter().next() {
            Some(Delivered::Applied) => Ok(Handled::Applied),
            Some(Delivered::Duplicate) => Ok(Handled::Duplicate),
            Some(Delivered::Skipped) | None => Ok(Handled::Skipped),
            Some(Delivered::Parked(failure)) => Err(HandleError::Parked {
                reason: failure.error,
                attempts: failure.attempts,
            }),
        }
    }
}

/// A projection with `Context = ()` fed from a broker, e.g. a
/// [`SagaStarter`](evently_core::saga::SagaStarter). It has no inbox: it must be idempotent by
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

/// A handler whose events have their sealed personal fields opened first (see
/// `evently_core::personal`): brokers carry the envelopes the store wrote, and a handler without
/// an inbox of its own (an [`InProcess`] saga starter, your own `MessageHandler`) gets the data,
/// or the placeholders once their subject is forgotten. Projections fed through
/// `evently_postgres::projection::InboxBackend` open what they receive already.
pub struct Opening<H> {
    handler: H,
    keys: std::sync::Arc<dyn evently_core::personal::KeyStore>,
}

impl<H: std::fmt::Debug> std::fmt::Debug for Opening<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opening")
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

impl<H> Opening<H> {
    /// `handler`, its events opened with the data keys in `keys` (the store's `key_store()`).
    pub fn new(handler: H, keys: std::sync::Arc<dyn evently_core::personal::KeyStore>) -> Self {
        Self { handler, keys }
    }

    /// The wrapped handler.
    pub fn inner(&self) -> &H {
        &self.handler
    }
}

#[async_trait::async_trait]
impl<H: MessageHandler> MessageHandler for Opening<H> {
    fn name(&self) -> &str {
        self.handler.name()
    }

    fn set_retries(&mut self, attempts: u32, backoff: Duration) {
        self.handler.set_retries(attempts, backoff);
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        if evently_core::personal::subjects(&event.payload).is_empty() {
            return self.handler.handle(event).await;
        }
        let mut opened = event.clone();
        // A key store that fails is down, not the message's fault: tried again, never parked.
        evently_core::personal::open_all([&mut opened.payload], &*self.keys)
            .await
            .map_err(|e| HandleError::Unavailable(Box::new(e)))?;
        self.handler.handle(&opened).await
    }
}

/// What an event `P` does not subscribe to is: skipped when its aggregate type is not one of
/// `P`'s, malformed when it is (see [`unknown_event_type`]).
fn unknown_type<P: Projection>(event: &StoredEvent) -> Result<Handled, HandleError> {
    match unknown_event_type::<P, _>(event) {
        None => Ok(Handled::Skipped),
        Some(reason) => Err(HandleError::Malformed(reason.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// Keeps the payloads it is handed.
    #[derive(Debug, Default)]
    struct Seen(Vec<serde_json::Value>);

    #[async_trait::async_trait]
    impl MessageHandler for Seen {
        fn name(&self) -> &str {
            "seen"
        }

        async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
            self.0.push(event.payload.clone());
            Ok(Handled::Applied)
        }
    }

    /// A sealed field reaches the handler opened, then as its placeholder once forgotten; a
    /// payload without one is handed over as it is.
    #[tokio::test]
    async fn opening_hands_over_the_data_then_the_placeholder() {
        use evently_core::personal::{InMemoryKeyStore, KeyStore as _, PersonalField, seal};
        let keys = std::sync::Arc::new(InMemoryKeyStore::new());
        let fields = [PersonalField {
            event_type: "Joined",
            field: "email",
            subject: "member_id",
            forgotten: || serde_json::Value::String(String::new()),
        }];
        let mut payload = serde_json::json!({ "member_id": "m-1", "email": "ada@example.com" });
        seal(&mut payload, "Joined", &fields, &*keys, b"seed")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!payload.to_string().contains("ada@"));
        let event = |payload: serde_json::Value| StoredEvent {
            event_id: evently_core::EventId::new(),
            stream: evently_core::StreamId::new("member", "m-1"),
            version: 1,
            checkpoint: evently_core::Checkpoint::START,
            recorded_at: chrono::Utc::now(),
            event_type: "Joined".into(),
            schema_version: 1,
            payload,
            metadata: evently_core::Metadata::default(),
        };
        let mut opening = Opening::new(Seen::default(), keys.clone());
        for payload in [payload.clone(), serde_json::json!({ "plain": 1 })] {
            opening
                .handle(&event(payload))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        keys.forget("m-1").await.unwrap_or_else(|e| panic!("{e}"));
        opening
            .handle(&event(payload))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let emails: Vec<_> = opening
            .inner()
            .0
            .iter()
            .map(|p| p.get("email").cloned())
            .collect();
        assert_eq!(
            emails,
            [
                Some(serde_json::json!("ada@example.com")),
                None,
                Some(serde_json::json!(""))
            ]
        );
    }

    /// The database's own error stays reachable behind a handler error, and the one-line report
    /// names each cause once.
    #[test]
    fn handle_errors_keep_their_source() {
        let down = HandleError::from_database(sqlx::Error::PoolTimedOut);
        assert!(matches!(down, HandleError::Unavailable(_)));
        let source = down.source().expect("a source");
        assert!(matches!(
            source.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut)
        ));
        assert_eq!(down.report(), format!("unavailable: {source}"));

        let refused = HandleError::from_database(sqlx::Error::RowNotFound);
        assert!(matches!(refused, HandleError::Failed(_)));
        assert_eq!(refused.to_string(), sqlx::Error::RowNotFound.to_string());

        let failed = HandleError::from(ProjectionError::Handler {
            projection: "summaries",
            stream: evently_core::StreamId::new("order", "o-1"),
            version: 3,
            source: "the row is locked".into(),
        });
        assert!(matches!(failed, HandleError::Failed(_)));
        // The handler's message is part of the projection error's text: not repeated.
        assert_eq!(
            failed.report(),
            "projection `summaries` failed on event 3 of order/o-1: the row is locked"
        );
        let malformed = HandleError::Malformed("unknown event type `Nope`".into());
        assert_eq!(malformed.report(), "unknown event type `Nope`");
    }
}
