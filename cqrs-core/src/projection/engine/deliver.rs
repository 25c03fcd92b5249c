//! Delivering events received from a broker (no checkpoint: the broker's acknowledgements are
//! one), each claimed once through the backend.

use crate::envelope::{Checkpoint, StoredEvent};
use crate::projection::Projection;
use crate::projection::failure::{Failure, FailureMode, LetterReason, WAITS_BEHIND};
use crate::projection::runner::{Batch, event_span};
use crate::store::CorruptEvent;
use chrono::Utc;
use std::time::Duration;
use tracing::Instrument as _;

use super::*;

impl<P, B> Engine<P, B>
where
    P: Projection,
    B: DeliveryBackend<P>,
{
    /// Applies events received from a broker (in the order received) in one unit of work, by
    /// the same rules as a window of the store: each is claimed in the backend's inbox (a
    /// redelivery is [`Delivered::Duplicate`]), applied with the policy's retries, and parked
    /// when it keeps failing; under [`FailureMode::BlockStream`] an event whose stream has a
    /// dead letter is parked behind it ([`WAITS_BEHIND`]). An event that is itself the first
    /// dead letter of its stream (an operator sent it back) is tried again: applied, its letter
    /// is removed and the events parked behind it may follow; failed, the letter keeps the new
    /// error. An event of one of the projection's aggregate types whose event type it does not
    /// know is parked at once (a producer newer than this consumer, or a foreign message).
    ///
    /// There is no checkpoint to move: the caller acknowledges the messages to the broker after
    /// this returns `Ok` (the unit committed), and sends the parked ones to the broker's
    /// dead-letter place first. On `Err` nothing of the batch was kept: acknowledge nothing and
    /// try again later (the inbox drops what a lost commit acknowledgment kept after all).
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`] (a backend that owns nothing never says it), a failing
    /// backend, a handler's outage ([`DeliveryBackend::is_outage`]).
    pub async fn deliver(
        &mut self,
        events: &[StoredEvent],
    ) -> Result<Vec<Delivered>, DeliveryError> {
        self.owns()?;
        // Sealed personal fields (published as stored) are opened by the backend first.
        let opened;
        let events = if events
            .iter()
            .any(|e| !crate::personal::Openable::sealed_subjects(&e.payload).is_empty())
        {
            let mut owned = events.to_vec();
            self.backend.open_payloads(&mut owned).await?;
            opened = owned;
            &opened[..]
        } else {
            events
        };
        let started = std::time::Instant::now();
        let outcome = if B::TRANSACTIONAL {
            match self.deliver_unit(events, false).await {
                Err(DeliveryError::Projection(error)) if !self.backend.is_outage(&error) => {
                    tracing::debug!(projection = P::NAME, %error, "a handler failed: delivering event by event");
                    self.deliver_unit(events, true).await
                }
                done => done,
            }
        } else {
            self.deliver_unit(events, true).await
        };
        let delivered = match outcome {
            Ok(delivered) => delivered,
            Err(error) => {
                self.count_failure();
                return Err(error);
            }
        };
        let step = Batch {
            read: events.len(),
            applied: delivered
                .iter()
                .filter(|d| **d == Delivered::Applied)
                .count(),
            parked: delivered
                .iter()
                .filter(|d| matches!(d, Delivered::Parked(_)))
                .count(),
            checkpoint: Checkpoint::START,
        };
        self.count(&step, started.elapsed());
        Ok(delivered)
    }

    async fn deliver_unit(
        &mut self,
        events: &[StoredEvent],
        careful: bool,
    ) -> Result<Vec<Delivered>, DeliveryError> {
        let mut unit = self.backend.begin_unit().await?;
        let heartbeat = self.backend.ownership_heartbeat();
        let outcome = tokio::select! {
            outcome = async {
                let mut delivered = Vec::with_capacity(events.len());
                for event in events {
                    let one = self
                        .deliver_one(&mut unit, event, careful)
                        .instrument(event_span(P::NAME, event))
                        .await?;
                    delivered.push(one);
                }
                Ok(delivered)
            } => outcome,
            never = heartbeat => match never {},
        };
        self.end(unit, outcome).await
    }

    async fn deliver_one(
        &mut self,
        unit: &mut B::Unit,
        event: &StoredEvent,
        careful: bool,
    ) -> Result<Delivered, DeliveryError> {
        let unknown = if P::subscribes_to(event) {
            None
        } else {
            match unknown_event_type::<P, _>(event) {
                None => return Ok(Delivered::Skipped),
                Some(reason) => Some(reason),
            }
        };
        // The first dead letter of the stream, and this event's own letter if it has one.
        let head = self
            .backend
            .letters_of(unit, &event.stream, None, 1)
            .await?
            .pop();
        let own = match &head {
            None => None,
            Some(head) if head.event_id == event.event_id => Some(head.id),
            Some(_) => self
                .backend
                .letters_of(unit, &event.stream, event.version.checked_sub(1), 1)
                .await?
                .pop()
                .filter(|letter| letter.event_id == event.event_id)
                .map(|letter| letter.id),
        };
        // An earlier event than the dead letter (a redelivery) does not wait behind it.
        let behind = head
            .is_some_and(|head| head.event_id != event.event_id && event.version >= head.version);
        if behind && self.policy.mode == FailureMode::BlockStream {
            let waits = Failure {
                reason: LetterReason::WaitsBehind,
                error: WAITS_BEHIND.to_owned(),
                attempts: 0,
                first_failed_at: Utc::now(),
            };
            // Already parked behind it (sent back too early): it stays as it was.
            if own.is_none() {
                self.park(unit, event, &waits).await?;
            }
            return Ok(Delivered::Parked(waits));
        }
        let attempt = if let Some(reason) = unknown {
            Attempt::Failed(Failure {
                reason: LetterReason::Failed,
                error: reason,
                attempts: 0,
                first_failed_at: Utc::now(),
            })
        } else if careful {
            self.apply_with_retries(unit, event).await?
        } else if self.backend.claim(unit, event).await? {
            let context = self.backend.unit_context(unit);
            self.projection.apply(event, context).await?;
            Attempt::Applied
        } else {
            Attempt::Duplicate
        };
        match attempt {
            Attempt::Applied | Attempt::Duplicate => {
                if let Some(id) = own {
                    self.backend.resolve_letter(unit, id).await?;
                }
                Ok(if attempt == Attempt::Applied {
                    Delivered::Applied
                } else {
                    Delivered::Duplicate
                })
            }
            Attempt::Failed(failure) => {
                tracing::warn!(
                    projection = P::NAME, stream = %event.stream, version = event.version,
                    attempts = failure.attempts, error = %failure.error,
                    "parking the event as a dead letter"
                );
                match own {
                    Some(id) => {
                        self.backend
                            .fail_letter_again(unit, id, &failure.error)
                            .await?;
                    }
                    None => self.park(unit, event, &failure).await?,
                }
                Ok(Delivered::Parked(failure))
            }
        }
    }

    /// Parks a stored row that cannot be read as an event (the first after `from`) as a dead
    /// letter naming it, if the projection subscribes to its type, and moves the checkpoint past
    /// it, in one unit: one bad row never stops the projection. Under
    /// [`FailureMode::BlockStream`] later events of its stream wait behind it, as behind any dead
    /// letter.
    pub(super) async fn pass_corrupt(
        &mut self,
        from: Checkpoint,
        corrupt: &CorruptEvent,
    ) -> Result<Batch, DeliveryError> {
        let subscribed = P::SUBSCRIPTIONS
            .iter()
            .any(|s| s.matches_type(&corrupt.stream.aggregate_type, &corrupt.event_type))
            && self
                .segment
                .as_ref()
                .is_none_or(|segment| segment.segment.contains(&corrupt.stream));
        self.no_dead_letters = false;
        let mut unit = self.backend.begin_unit().await?;
        let outcome = async {
            // Fence first, as a batch does (see `apply_batch_in`).
            if B::TRANSACTIONAL {
                self.backend
                    .advance_checkpoint(&mut unit, from, corrupt.checkpoint)
                    .await?;
            }
            if subscribed {
                tracing::warn!(projection = P::NAME, stream = %corrupt.stream, version = corrupt.version, checkpoint = %corrupt.checkpoint, error = %corrupt, "parking an unreadable stored event as a dead letter");
                let failure = Failure {
                    reason: LetterReason::Failed,
                    error: corrupt.to_string(),
                    attempts: 1,
                    first_failed_at: Utc::now(),
                };
                self.backend
                    .park_event(
                        &mut unit,
                        Parked {
                            event_id: corrupt.event_id,
                            stream: &corrupt.stream,
                            version: corrupt.version,
                            failure: &failure,
                        },
                    )
                    .await?;
            }
            if !B::TRANSACTIONAL {
                self.backend
                    .advance_checkpoint(&mut unit, from, corrupt.checkpoint)
                    .await?;
            }
            Ok(())
        }
        .await;
        self.end(unit, outcome).await?;
        let step = Batch {
            read: 1,
            applied: 0,
            parked: usize::from(subscribed),
            checkpoint: corrupt.checkpoint,
        };
        self.count(&step, Duration::ZERO);
        Ok(step)
    }
}
