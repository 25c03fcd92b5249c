//! What runners do with events a projection keeps failing on: retries with exponential backoff,
//! then a dead letter; shared by the in-process runner and the PostgreSQL worker.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ProjectionError;
use crate::envelope::{EventId, StreamId};

/// What a runner does with an event its projection keeps failing on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// How many times an event is tried before it is parked as a dead letter.
    pub attempts: u32,
    /// The wait before the second try; it doubles for each further try (with jitter, see
    /// [`Backoff`](crate::Backoff)).
    pub backoff: Duration,
    /// The longest wait between tries (clamped to a day).
    pub max_backoff: Duration,
    /// Whether later events of a parked event's stream wait behind it.
    pub mode: FailureMode,
}

impl Default for FailurePolicy {
    /// 3 tries, 20 ms doubling up to 1 s, later events of the stream wait behind a dead letter.
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            mode: FailureMode::BlockStream,
        }
    }
}

/// Where events after a dead letter go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Later events of the same stream are parked behind it, in order, until a redrive: per-stream
    /// order holds. Other streams go on. The default.
    BlockStream,
    /// Only the failing event is parked; later events of its stream are applied (opt-in, for
    /// projections whose handlers do not depend on order within a stream).
    Skip,
}

/// A parked event of a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id in the dead-letter store.
    pub id: i64,
    /// The event.
    pub event_id: EventId,
    /// The event's stream.
    pub stream: StreamId,
    /// The event's version.
    pub version: u64,
    /// The last error (or, for an event parked behind another, why it waits).
    pub error: String,
    /// How many times it was tried (0: parked behind an earlier dead letter, never tried).
    pub attempts: u32,
    /// When it first failed.
    pub first_failed_at: DateTime<Utc>,
    /// When it last failed.
    pub last_failed_at: DateTime<Utc>,
}

/// Why an event parked behind an earlier dead letter of its stream waits.
pub const WAITS_BEHIND: &str = "waits behind an earlier dead letter of its stream";

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redrive {
    /// Dead letters applied and removed.
    pub applied: usize,
    /// Dead letters that failed again (they stay, with the new error).
    pub failed: usize,
}

/// An event that failed every try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The last error.
    pub error: String,
    /// How many tries.
    pub attempts: u32,
    /// When the first try failed.
    pub first_failed_at: DateTime<Utc>,
}

impl FailurePolicy {
    /// The retry state of one event under this policy.
    #[must_use]
    pub fn retries(&self) -> Retries {
        Retries {
            policy: *self,
            attempts: 0,
            first_failed_at: None,
            backoff: crate::backoff::Backoff::new(self.backoff, self.max_backoff),
        }
    }
}

/// The tries of one event so far: after each failed try, [`Retries::failed`] either waits the
/// backoff (try again) or gives up with the [`Failure`] to park.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: FailurePolicy,
    attempts: u32,
    first_failed_at: Option<DateTime<Utc>>,
    backoff: crate::backoff::Backoff,
}

impl Retries {
    /// Records a failed try: `Some(failure)` when the event has had its tries (or cannot succeed:
    /// a payload that does not decode is not retried), else `None` after waiting the backoff.
    pub async fn failed(&mut self, error: &ProjectionError) -> Option<Failure> {
        let permanent = matches!(error, ProjectionError::Decode(_));
        self.failed_with(error, permanent).await
    }

    /// [`Retries::failed`] for any error: `permanent` when trying again cannot help (the
    /// consumers of brokers say so of a malformed message).
    pub async fn failed_with(
        &mut self,
        error: &(dyn std::fmt::Display + Sync),
        permanent: bool,
    ) -> Option<Failure> {
        self.attempts += 1;
        let first = *self.first_failed_at.get_or_insert_with(Utc::now);
        if permanent || self.attempts >= self.policy.attempts.max(1) {
            return Some(Failure {
                error: error.to_string(),
                attempts: self.attempts,
                first_failed_at: first,
            });
        }
        self.backoff.wait().await;
        None
    }
}
