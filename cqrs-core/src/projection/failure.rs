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
    /// Why it is parked: it kept failing, or it waits behind an earlier dead letter of its stream.
    pub reason: LetterReason,
    /// The last error (or, for an event parked behind another, [`WAITS_BEHIND`]).
    pub error: String,
    /// How many times it was tried (0: parked behind an earlier dead letter, never tried).
    pub attempts: u32,
    /// When it first failed.
    pub first_failed_at: DateTime<Utc>,
    /// When it last failed.
    pub last_failed_at: DateTime<Utc>,
}

/// The error text of an event parked behind an earlier dead letter of its stream.
pub const WAITS_BEHIND: &str = "waits behind an earlier dead letter of its stream";

/// Why an event is a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LetterReason {
    /// Its projection kept failing on it (or could not decode it): the letter's `error` is the
    /// last error.
    Failed,
    /// It was never tried: an earlier dead letter of its stream blocks it
    /// ([`FailureMode::BlockStream`]); a redrive applies it after that one.
    WaitsBehind,
}

impl LetterReason {
    /// The name stored and printed: `failed`, `waits_behind`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::WaitsBehind => "waits_behind",
        }
    }
}

impl std::fmt::Display for LetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason name that is not one of [`LetterReason`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a dead-letter reason (expected failed or waits_behind)")]
pub struct UnknownLetterReason(pub String);

impl std::str::FromStr for LetterReason {
    type Err = UnknownLetterReason;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "failed" => Ok(Self::Failed),
            "waits_behind" => Ok(Self::WaitsBehind),
            other => Err(UnknownLetterReason(other.to_owned())),
        }
    }
}

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
    /// Why the event is parked.
    pub reason: LetterReason,
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
                reason: LetterReason::Failed,
                error: error.to_string(),
                attempts: self.attempts,
                first_failed_at: first,
            });
        }
        self.backoff.wait().await;
        None
    }
}
