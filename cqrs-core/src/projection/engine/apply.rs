//! Applying a window: each event with its retries, parked or blocking its stream when it keeps
//! failing, in one unit of work with the checkpoint move.

use crate::envelope::{Checkpoint, Payload, RawStoredEvent, StoredEvent};
use crate::projection::failure::{Failure, FailureMode, LetterReason, WAITS_BEHIND};
use crate::projection::runner::{Batch, event_span};
use crate::projection::{Projection, ProjectionError};
use chrono::Utc;
use futures::future::BoxFuture;
use std::collections::HashSet;
use tracing::Instrument as _;

use super::*;

/// One try at an event, with its retries.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Attempt {
    Applied,
    Duplicate,
    Failed(Failure),
}
/// An event the engine applies: parsed (what a broker consumer hands to
/// [`Engine::deliver`]) or with its payload still the stored text (what a window of the store
/// holds, applied through [`Projection::apply_raw`]).
pub(super) trait Deliverable: Payload {
    fn apply_to<'a, P: Projection>(
        event: &'a StoredEvent<Self>,
        projection: &'a mut P,
        context: &'a mut P::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>>;
}
/// `apply`, with a panic of the handler turned into its failure on `event` (retried, then parked
/// by the policy like any other): one bad event never kills the worker.
fn guarded<'a, P: Projection, T: Sync>(
    event: &'a StoredEvent<T>,
    apply: BoxFuture<'a, Result<bool, ProjectionError>>,
) -> BoxFuture<'a, Result<bool, ProjectionError>> {
    use futures::FutureExt as _;
    Box::pin(async move {
        match std::panic::AssertUnwindSafe(apply).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => Err(ProjectionError::Handler {
                projection: P::NAME,
                stream: event.stream.clone(),
                version: event.version,
                source: format!("panicked: {}", crate::panic_message(&*panic)).into(),
            }),
        }
    })
}
impl Deliverable for serde_json::Value {
    fn apply_to<'a, P: Projection>(
        event: &'a StoredEvent<Self>,
        projection: &'a mut P,
        context: &'a mut P::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        guarded::<P, _>(event, projection.apply(event, context))
    }
}
impl Deliverable for Box<serde_json::value::RawValue> {
    fn apply_to<'a, P: Projection>(
        event: &'a StoredEvent<Self>,
        projection: &'a mut P,
        context: &'a mut P::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        guarded::<P, _>(event, projection.apply_raw(event, context))
    }
}

impl<P, B> Engine<P, B>
where
    P: Projection,
    B: DeliveryBackend<P>,
{
    /// Applies a window read after `from` and moves the checkpoint to its end.
    pub(super) async fn apply_window(
        &mut self,
        from: Checkpoint,
        window: Window,
    ) -> Result<Batch, DeliveryError> {
        self.dense = window.dense;
        let (mut page, last) = (window.events, window.last);
        if let Some(segment) = &self.segment {
            // Other segments' streams are passed with the checkpoint, as unsubscribed events are.
            page.retain(|event| segment.admits(event));
        }
        if last == from {
            // Nothing new: exactly caught up.
            self.caught_up();
            return Ok(Batch {
                read: 0,
                applied: 0,
                parked: 0,
                checkpoint: from,
            });
        }
        let span = tracing::debug_span!(
            "cqrs.projection.batch",
            projection = P::NAME,
            events = page.len()
        );
        let started = std::time::Instant::now();
        let outcome = async {
            if B::TRANSACTIONAL {
                match self.apply_batch(&page, from, last, false).await {
                    Err(DeliveryError::Projection(error)) => {
                        tracing::debug!(projection = P::NAME, %error, "a handler failed: running the batch event by event");
                        self.apply_batch(&page, from, last, true).await
                    }
                    done => done,
                }
            } else {
                self.apply_batch(&page, from, last, true).await
            }
        }
        .instrument(span)
        .await;
        let mut step = match outcome {
            Ok(step) => step,
            Err(error) => {
                self.count_failure();
                self.no_dead_letters = false;
                return Err(error);
            }
        };
        // Events scanned but filtered out by the store count as read: the checkpoint moved.
        step.read = step.read.max(1);
        self.count(&step, started.elapsed());
        self.sample_lag(step.checkpoint, page.last().map(|e| e.recorded_at));
        Ok(step)
    }

    /// One attempt at a batch in a unit of its own, with the backend's heartbeat beside it.
    /// `careful`: each event with a savepoint (transactional backends), retries and parking;
    /// otherwise any failure ends the attempt (and the unit rolls back whole).
    async fn apply_batch(
        &mut self,
        page: &[RawStoredEvent],
        from: Checkpoint,
        last: Checkpoint,
        careful: bool,
    ) -> Result<Batch, DeliveryError> {
        let mut unit = self.backend.begin_unit().await?;
        let heartbeat = self.backend.ownership_heartbeat();
        let outcome = tokio::select! {
            outcome = self.apply_batch_in(&mut unit, page, from, last, careful) => outcome,
            never = heartbeat => match never {},
        };
        self.end(unit, outcome).await
    }

    /// Ends `unit` by `outcome`: commits an `Ok`, rolls back an `Err` and returns it.
    pub(super) async fn end<T>(
        &mut self,
        unit: B::Unit,
        outcome: Result<T, DeliveryError>,
    ) -> Result<T, DeliveryError> {
        match outcome {
            Ok(value) => self.backend.end_unit(unit, true).await.map(|()| value),
            Err(error) => {
                // The first error is the one to report.
                let _ = self.backend.end_unit(unit, false).await;
                Err(error)
            }
        }
    }

    async fn apply_batch_in(
        &mut self,
        unit: &mut B::Unit,
        page: &[RawStoredEvent],
        from: Checkpoint,
        last: Checkpoint,
        careful: bool,
    ) -> Result<Batch, DeliveryError> {
        // Fence first: a transactional unit moves its checkpoint (compare-and-set, which takes the
        // ownership row) before it writes anything, so a fenced owner stops before touching the
        // read model, and an operator's change that locks the ownership rows (a rescale, a
        // rebuild resetting the read model) waits for the units in flight without them ever
        // waiting for it: the two cannot deadlock. The unit commits or rolls back whole, so the
        // order inside it is not visible. A non-transactional backend moves it last, after the
        // effects it stands for.
        if B::TRANSACTIONAL {
            self.backend.advance_checkpoint(unit, from, last).await?;
        }
        let mut blocked = match self.policy.mode {
            FailureMode::BlockStream if self.no_dead_letters => HashSet::new(),
            FailureMode::BlockStream => {
                let blocked = self.backend.blocked_streams(unit).await?;
                self.no_dead_letters = blocked.is_empty();
                blocked
            }
            FailureMode::Skip => HashSet::new(),
        };
        let (mut applied, mut parked) = (0, 0);
        for event in page.iter().filter(|e| P::subscribes_to(e)) {
            if blocked.contains(&event.stream) {
                let waits = Failure {
                    reason: LetterReason::WaitsBehind,
                    error: WAITS_BEHIND.to_owned(),
                    attempts: 0,
                    first_failed_at: Utc::now(),
                };
                self.park(unit, event, &waits).await?;
                parked += 1;
                continue;
            }
            if !careful {
                // Any failure rolls this unit back; the caller runs the batch carefully.
                let context = self.backend.unit_context(unit);
                let trace = crate::trace::TraceContext::of(&event.metadata);
                let apply = Deliverable::apply_to(event, &mut self.projection, context)
                    .instrument(event_span(P::NAME, event));
                crate::trace::scope_if_needed(trace, apply).await?;
                applied += 1;
                continue;
            }
            let span = event_span(P::NAME, event);
            match self
                .apply_with_retries(unit, event)
                .instrument(span)
                .await?
            {
                Attempt::Applied | Attempt::Duplicate => applied += 1,
                Attempt::Failed(failure) => {
                    tracing::warn!(
                        projection = P::NAME, stream = %event.stream, version = event.version,
                        attempts = failure.attempts, error = %failure.error,
                        "parking the event as a dead letter"
                    );
                    self.park(unit, event, &failure).await?;
                    parked += 1;
                    if self.policy.mode == FailureMode::BlockStream {
                        blocked.insert(event.stream.clone());
                    }
                }
            }
        }
        if !B::TRANSACTIONAL {
            // Compare-and-set from the window's start; on any other outcome nothing more is done.
            self.backend.advance_checkpoint(unit, from, last).await?;
        }
        Ok(Batch {
            read: page.len(),
            applied,
            parked,
            checkpoint: last,
        })
    }

    pub(super) async fn park<T>(
        &mut self,
        unit: &mut B::Unit,
        event: &StoredEvent<T>,
        failure: &Failure,
    ) -> Result<(), DeliveryError> {
        self.no_dead_letters = false;
        self.backend
            .park_event(
                unit,
                Parked {
                    event_id: event.event_id,
                    stream: &event.stream,
                    version: event.version,
                    failure,
                },
            )
            .await
    }

    /// Applies one event by the policy's retries (inside a savepoint on a transactional
    /// backend), claiming it first ([`DeliveryBackend::claim`]).
    ///
    /// # Errors
    /// A failing backend, or the handler's error when it is an outage
    /// ([`DeliveryBackend::is_outage`]): not the event's fault, so it is neither retried nor
    /// parked.
    pub(super) async fn apply_with_retries<T: Deliverable>(
        &mut self,
        unit: &mut B::Unit,
        event: &StoredEvent<T>,
    ) -> Result<Attempt, DeliveryError> {
        let mut retries = self.policy.retries();
        loop {
            if B::TRANSACTIONAL {
                self.backend.savepoint(unit, Savepoint::Set).await?;
            }
            if !self.backend.claim(unit, event).await? {
                if B::TRANSACTIONAL {
                    self.backend.savepoint(unit, Savepoint::Release).await?;
                }
                return Ok(Attempt::Duplicate);
            }
            let context = self.backend.unit_context(unit);
            // In the event's trace: what the handler sends (a command) continues it.
            let trace = crate::trace::TraceContext::of(&event.metadata);
            let applied = T::apply_to(event, &mut self.projection, context);
            match crate::trace::scope_if_needed(trace, applied).await {
                Ok(_) => {
                    if B::TRANSACTIONAL {
                        self.backend.savepoint(unit, Savepoint::Release).await?;
                    }
                    return Ok(Attempt::Applied);
                }
                Err(error) => {
                    if B::TRANSACTIONAL {
                        self.backend.savepoint(unit, Savepoint::Rollback).await?;
                    }
                    if self.backend.is_outage(&error) {
                        return Err(error.into());
                    }
                    if let Some(failure) = retries.failed(&error).await {
                        return Ok(Attempt::Failed(failure));
                    }
                }
            }
        }
    }
}
