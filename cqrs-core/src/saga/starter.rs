//! Event-started sagas (process managers): a recorded event starts an instance, exactly once per
//! event however often it is delivered.

use std::marker::PhantomData;
use std::time::Duration;

use futures::future::BoxFuture;

use super::{Saga, SagaId, SagaState, SagaStore};
use crate::envelope::{RecordedEvent, StoredEvent};
use crate::event::DomainEvent;
use crate::projection::{Projection, ProjectionError, Subscription};

/// A saga that events of `E` start.
pub trait StartedBy<E: DomainEvent>: Saga {
    /// The data of the instance `event` starts (taking what correlates it, e.g. the order id,
    /// from the event), or `None` when this event starts none.
    fn start(event: &RecordedEvent<E>) -> Option<Self::Data>;
}

/// Starts saga `S` from the events of `E`: a [`Projection`] to run with any projection runner.
///
/// Each instance is keyed by the saga's name and the id of the event that started it (its id is
/// derived from both, and `started_by` holds the event id), so an event delivered twice (a
/// redelivery, a rebuild, a second runner) finds its instance and starts nothing, while any
/// number of sagas can start from one event, each exactly once. The
/// instance is only stored, not run: an [`Orchestrator`](super::Orchestrator) of `S` on the same
/// store runs it ([`run_due`](super::Orchestrator::run_due)), so a slow saga never holds the
/// event stream back.
pub struct SagaStarter<S, E, St> {
    store: St,
    owner: String,
    started: u64,
    _saga: PhantomData<fn() -> (S, E)>,
}

impl<S, E, St> std::fmt::Debug for SagaStarter<S, E, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaStarter")
            .field("owner", &self.owner)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl<S, E, St> SagaStarter<S, E, St> {
    /// Starts instances in `store`, named `owner` in their first lease.
    pub fn new(store: St, owner: impl Into<String>) -> Self {
        Self {
            store,
            owner: owner.into(),
            started: 0,
            _saga: PhantomData,
        }
    }

    /// How many instances this starter stored (events delivered again start none).
    #[must_use]
    pub fn started(&self) -> u64 {
        self.started
    }
}

/// The id of the instance of saga `saga` that `event` starts: a name-based UUID (v5) of the saga's
/// name in the namespace of the event's id, the same on every delivery and different per saga.
#[must_use]
pub fn started_id(saga: &str, event: &StoredEvent) -> SagaId {
    SagaId(uuid::Uuid::new_v5(&event.event_id.0, saga.as_bytes()))
}

impl<S, E, St> Projection for SagaStarter<S, E, St>
where
    S: StartedBy<E>,
    E: DomainEvent + Send + 'static,
    St: SagaStore,
{
    const NAME: &'static str = S::NAME;
    type Context = ();
    const SUBSCRIPTIONS: &'static [Subscription] = &[Subscription::to::<E>()];

    fn apply<'a>(
        &'a mut self,
        event: &'a StoredEvent,
        (): &'a mut (),
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        Box::pin(async move {
            if !Self::subscribes_to(event) {
                return Ok(false);
            }
            let recorded = event.to_recorded::<E>()?;
            let Some(data) = S::start(&recorded) else {
                return Ok(true);
            };
            let handler =
                |source: Box<dyn std::error::Error + Send + Sync>| ProjectionError::Handler {
                    projection: S::NAME,
                    stream: event.stream.clone(),
                    version: event.version,
                    source,
                };
            let mut state = SagaState::start::<S>(started_id(S::NAME, event), &data)
                .map_err(|e| handler(Box::new(e)))?;
            state.started_by = Some(event.event_id.0);
            if state.trace.is_none() {
                state.trace =
                    crate::trace::TraceContext::of(&event.metadata).map(|t| t.to_string());
            }
            if self
                .store
                .create(&state, &self.owner, Duration::ZERO)
                .await
                .map_err(|e| handler(Box::new(e)))?
            {
                self.started += 1;
            }
            Ok(true)
        })
    }
}
