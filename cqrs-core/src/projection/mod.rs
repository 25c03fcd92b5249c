//! Projections: read models kept up to date from the store's global order.
//!
//! A projection is a type with `#[derive(Projection)]` and
//! `#[projection(name = "order_summary", events(OrderEvent, PaymentEvent))]`, and one
//! [`Handles<E, Context>`] implementation per listed event enum. The derive generates its
//! [`Subscription`]s (so a store is asked only for those event types) and [`Projection::apply`],
//! which decodes a stored event and routes it to the handler of its enum.
//!
//! The context is what handlers write the read model with: `()` (the default) for a projection that
//! keeps its state in itself, `#[projection(context = sqlx::PgConnection)]` for one that writes
//! PostgreSQL tables in the transaction that also moves its checkpoint.

use futures::future::BoxFuture;

pub mod engine;
mod failure;
mod fixture;
mod freshness;
mod lease;
mod memory;
mod runner;
pub mod segment;

pub use engine::{Delivered, DeliveryBackend, DeliveryError, Engine, unknown_event_type};
pub use failure::{
    DeadLetter, Failure, FailureMode, FailurePolicy, LetterReason, Redrive, Retries,
    UnknownLetterReason, WAITS_BEHIND,
};
pub use fixture::{CaughtUp, FixtureError, ProjectionFixture, assert_no_dead_letters};
pub use freshness::{NotCaughtUp, Progress, wait_until_caught_up};
pub use lease::LeaseLoss;
pub use memory::{CheckpointStore, InMemoryCheckpoints, InMemoryDeadLetters};
pub use runner::{Batch, InMemoryBackend, ProjectionMetrics, ProjectionRunner, event_span};
pub use segment::{Segment, SegmentError, SegmentState};

use crate::envelope::{Checkpoint, RawStoredEvent, RecordedEvent, StoredEvent};
use crate::event::DomainEvent;
use crate::store::{EventStore, StoreError};
pub use crate::store::{Lag, Subscription};

/// The error a projection handler returns.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Handles the events of enum `E` for a projection, writing through `Context`.
#[diagnostic::on_unimplemented(
    message = "projection `{Self}` has no handler for `{E}`",
    label = "no `Handles<{E}, {Context}>` for `{Self}`",
    note = "implement `evently_core::projection::Handles<{E}, {Context}>` for `{Self}` (with `#[async_trait::async_trait]`)"
)]
#[async_trait::async_trait]
pub trait Handles<E: DomainEvent, Context: Send + ?Sized = ()>: Send {
    /// Applies one event to the read model.
    ///
    /// # Errors
    /// Whatever kept the handler from applying the event; the runner retries and eventually parks
    /// the event as a dead letter.
    async fn handle(
        &mut self,
        event: &RecordedEvent<E>,
        context: &mut Context,
    ) -> Result<(), HandlerError>;
}

/// Why a projection did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The stored event does not decode into the enum its type belongs to.
    #[error(transparent)]
    Decode(#[from] StoreError),
    /// The handler failed.
    #[error("projection `{projection}` failed on event {version} of {stream}: {source}")]
    Handler {
        /// The projection.
        projection: &'static str,
        /// The event's stream.
        stream: crate::envelope::StreamId,
        /// The event's version.
        version: u64,
        /// What the handler said.
        #[source]
        source: HandlerError,
    },
}

/// A read model fed by events: derive it with `#[derive(Projection)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a projection",
    note = "add `#[derive(evently_core::Projection)]` with `#[projection(name = \"...\", events(...))]` to `{Self}`"
)]
pub trait Projection: Send {
    /// The projection's stable name: its checkpoint and dead letters are kept under it.
    const NAME: &'static str;

    /// What the handlers write with (`()` when the projection holds its state itself).
    type Context: Send + ?Sized;

    /// The event types it listens to, one entry per event enum.
    const SUBSCRIPTIONS: &'static [Subscription];

    /// The version of the read model (`#[projection(version = N)]`, 1 when not written). A new
    /// version is a new projection beside the old one: its [`NAME`](Self::NAME) is the base name
    /// followed by `@vN` (from version 2 on), so it has its own checkpoint, lease and dead letters
    /// and catches up while the old one keeps serving; the PostgreSQL store promotes it when it
    /// has caught up (blue/green, see `evently_postgres::versions`).
    const VERSION: u32 = 1;

    /// The read model's tables, by the names readers use (`#[projection(tables("balances"))]`,
    /// none when not written). Each version writes its own copies ([`table`](Self::table)), and
    /// readers read the live version's through a view of the plain name, switched over when a
    /// version is promoted.
    const TABLES: &'static [&'static str] = &[];

    /// Whose events the projection reads: one tenant's per worker (the default) or every
    /// tenant's (`#[projection(tenants = "all")]`); see [`TenantScope`](crate::tenant::TenantScope).
    const TENANTS: crate::tenant::TenantScope = crate::tenant::TenantScope::Each;

    /// The name without the version: what operators and the version registry call the read
    /// model (`balances` for `balances@v2`).
    #[must_use]
    fn base_name() -> &'static str {
        Self::NAME
            .split_once('@')
            .map_or(Self::NAME, |(base, _)| base)
    }

    /// The table this version writes for the table readers call `logical`: `balances_v2` for
    /// `balances` in version 2 (`rm.balances_v2` for `rm.balances`).
    #[must_use]
    fn table(logical: &str) -> String {
        format!("{logical}_v{}", Self::VERSION)
    }

    /// Whether `event` is one this projection listens to.
    fn subscribes_to<T>(event: &StoredEvent<T>) -> bool {
        Self::SUBSCRIPTIONS.iter().any(|s| s.matches(event))
    }

    /// Decodes `event` and routes it to the handler of its enum; returns `false` for an event the
    /// projection does not listen to.
    ///
    /// # Errors
    /// [`ProjectionError::Decode`] for an undecodable event, [`ProjectionError::Handler`] when
    /// the handler fails.
    fn apply<'a>(
        &'a mut self,
        event: &'a StoredEvent,
        context: &'a mut Self::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>>;

    /// [`Projection::apply`] for an event whose payload is still the stored JSON text: what the
    /// runners read from a store. The derive decodes the text straight into the event enum (no
    /// [`serde_json::Value`] on the way, most of what catching up costs); this default parses the
    /// payload and calls [`Projection::apply`], so a projection written by hand needs only that.
    ///
    /// # Errors
    /// As [`Projection::apply`].
    fn apply_raw<'a>(
        &'a mut self,
        event: &'a RawStoredEvent,
        context: &'a mut Self::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        Box::pin(async move {
            let parsed = event.parse()?;
            self.apply(&parsed, context).await
        })
    }
}

/// Feeds `projection` every event it subscribes to after `after` in the store's global order, in
/// pages of `batch`, until it is caught up; returns the checkpoint of the last event read.
///
/// The one-shot building block of the runners: a runner persists the returned checkpoint (with the
/// read-model change, for PostgreSQL projections) and calls this again when woken.
///
/// # Errors
/// A store failure, or the first event the projection fails on (the checkpoint of the events
/// before it is in [`CatchUpError::checkpoint`]).
pub async fn catch_up<P: Projection, S: EventStore + ?Sized>(
    store: &S,
    projection: &mut P,
    context: &mut P::Context,
    after: Checkpoint,
    batch: usize,
) -> Result<Checkpoint, CatchUpError> {
    let mut checkpoint = after;
    loop {
        let page = store
            .read_all(checkpoint, batch.max(1))
            .await
            .map_err(|error| CatchUpError {
                checkpoint,
                error: ProjectionError::Decode(error),
            })?;
        let Some(last) = page.last().map(|e| e.checkpoint) else {
            return Ok(checkpoint);
        };
        for event in &page {
            if P::subscribes_to(event) {
                projection
                    .apply(event, context)
                    .await
                    .map_err(|error| CatchUpError { checkpoint, error })?;
            }
            checkpoint = event.checkpoint;
        }
        debug_assert_eq!(checkpoint, last);
    }
}

/// A failed catch-up: the error and how far the projection got.
#[derive(Debug, thiserror::Error)]
#[error("projection stopped after {checkpoint}: {error}")]
pub struct CatchUpError {
    /// The checkpoint of the last event applied (or skipped) before the failure.
    pub checkpoint: Checkpoint,
    /// What failed.
    #[source]
    pub error: ProjectionError,
}

/// Refuses to run projection `P` on a store handle that would not give it the tenants it
/// declares (`#[projection(tenants = ...)]`): a per-tenant projection on the all-tenants view (it
/// would mix tenants in a read model that does not tell them apart), an all-tenants one on one
/// tenant's view of a shared log (it would see that tenant only). Every runner calls it before its
/// first batch.
///
/// # Errors
/// [`StoreError::InvalidInput`] saying what to run instead.
pub fn check_tenants<P: Projection>(scope: &crate::store::StoreScope) -> Result<(), StoreError> {
    use crate::store::StoreScope;
    use crate::tenant::TenantScope;
    match (P::TENANTS, scope) {
        (TenantScope::Each, StoreScope::AllTenants) => Err(StoreError::InvalidInput(format!(
            "projection `{}` reads one tenant's events (tenants = \"each\", the default) but runs \
             on the all-tenants view: run it per tenant on `for_tenant`, or declare \
             #[projection(tenants = \"all\")] and key its read model by tenant",
            P::NAME
        ))),
        (TenantScope::All, StoreScope::TenantView(tenant)) => {
            Err(StoreError::InvalidInput(format!(
                "projection `{}` reads every tenant's events (tenants = \"all\") but runs on the view \
             of tenant `{tenant}`, which shows it that tenant only: run it on `all_tenants()`",
                P::NAME
            )))
        }
        _ => Ok(()),
    }
}
