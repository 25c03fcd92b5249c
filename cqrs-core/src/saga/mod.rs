//! Sagas: multi-step business transactions that end completed or fully compensated, across
//! crashes.
//!
//! A saga is a table of steps ([`Saga::STEPS`], in order), each with an execute function, an
//! optional compensation, a retry policy and a timeout. The [`Orchestrator`] runs one instance at a
//! time through its [`SagaStore`]: the state and each step's outcome are saved before the next
//! move, so a restarted orchestrator resumes where the last save left off. A step that fails after
//! its retries runs the compensations of the completed steps in reverse order; a compensation that
//! keeps failing leaves the saga [`SagaStatus::Failed`] with the error, and it is tried again later
//! ([`Orchestrator::run_due`]), never dropped.
//!
//! Steps get a stable [`StepKey`] (saga id + step name): a step whose effect happened but whose
//! completion was not saved before a crash runs again with the same key, so the services it calls
//! dedupe on it. A step whose completion was saved never runs again.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one saga instance (UUID v7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SagaId(pub Uuid);

impl SagaId {
    /// A new id.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}
impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
/// The stable key of one step of one saga, for the services a step calls to dedupe on. The
/// compensation of a step has its own key (`compensate` set).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepKey {
    /// The saga instance.
    pub saga: SagaId,
    /// The step's name.
    pub step: &'static str,
    /// Whether this is the step's compensation.
    pub compensate: bool,
}
impl fmt::Display for StepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = if self.compensate {
            "compensate"
        } else {
            "execute"
        };
        write!(f, "{}/{}/{action}", self.saga, self.step)
    }
}
/// How a step (or its compensation) is retried before it counts as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (at least 1).
    pub attempts: u32,
    /// The wait before the second try; it doubles for each further try.
    pub backoff: Duration,
    /// The longest wait between tries.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// One try, no retry.
    pub const NONE: Self = Self {
        attempts: 1,
        backoff: Duration::ZERO,
        max_delay: Duration::ZERO,
    };

    /// The wait after failed try `attempt` (1-based): exponential, capped at `max_delay`, with
    /// "equal jitter" (half fixed, half spread by `seed`) so that sagas failing together do not
    /// retry together.
    #[must_use]
    pub fn delay(&self, attempt: u32, seed: u64) -> Duration {
        crate::backoff::Backoff::delay(self.backoff, self.max_delay, attempt, seed)
    }
}

/// One entry of a saga's step table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSpec {
    /// The step's stable name (stored with each outcome).
    pub name: &'static str,
    /// Whether the step has a compensation.
    pub compensable: bool,
    /// How the step and its compensation are retried.
    pub retry: RetryPolicy,
    /// How long one try may take before it counts as failed.
    pub timeout: Option<Duration>,
}
/// The error a step or compensation returns.
pub type StepError = Box<dyn std::error::Error + Send + Sync>;
/// A saga: its name, data, the context its steps run with, and its step table.
pub trait Saga: Send + Sync + 'static {
    /// The saga's stable name (stored with each instance).
    const NAME: &'static str;
    /// The steps, in execution order.
    const STEPS: &'static [StepSpec];
    /// The saga's data, stored with each instance and handed to every step.
    type Data: Serialize + serde::de::DeserializeOwned + Send + Sync;
    /// What the steps call (services, clients).
    type Context: Send + Sync;

    /// Runs step `step` (an index into [`Saga::STEPS`]).
    fn execute<'a>(
        step: usize,
        context: &'a Self::Context,
        data: &'a mut Self::Data,
        key: &'a StepKey,
    ) -> BoxFuture<'a, Result<(), StepError>>;

    /// Runs the compensation of step `step`; only called for steps with `compensable`.
    fn compensate<'a>(
        step: usize,
        context: &'a Self::Context,
        data: &'a mut Self::Data,
        key: &'a StepKey,
    ) -> BoxFuture<'a, Result<(), StepError>>;
}
/// Where a saga instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Executing its steps.
    Running,
    /// A step failed: compensating the completed ones.
    Compensating,
    /// Every step completed (final).
    Completed,
    /// A step failed and every completed step was compensated (final).
    Compensated,
    /// A compensation keeps failing: tried again at `retry_at`.
    Failed,
    /// Set aside: its stored row or data could not be read (after a change to the data type, a
    /// row edited by hand) or a step could not be driven. Never claimed; the others go on.
    /// [`SagaStore::retry`] puts it back after a fix, [`SagaStore::abandon`] ends it.
    Unreadable,
    /// Ended by an operator without completing or compensating (final).
    Abandoned,
}

impl SagaStatus {
    /// Every status, in the order of a saga's life.
    pub const ALL: [Self; 7] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Compensated,
        Self::Failed,
        Self::Unreadable,
        Self::Abandoned,
    ];

    /// Whether the saga has ended for good.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Abandoned)
    }

    /// The status's stored name (`running`, `compensating`, ...), as `cqrs sagas list --state`
    /// takes it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Unreadable => "unreadable",
            Self::Abandoned => "abandoned",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl std::str::FromStr for SagaStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown saga state `{s}`; expected one of: running, compensating, completed, \
                 compensated, failed, unreadable, abandoned"
                )
            })
    }
}
/// What happened to one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum StepOutcome {
    /// Not run yet.
    Pending,
    /// Executed.
    Executed,
    /// Failed after its retries (this triggered the compensation).
    Failed {
        /// The last error.
        error: String,
    },
    /// Compensated.
    Compensated,
}
/// A saga instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// Its id.
    pub id: SagaId,
    /// The saga's name.
    pub saga: String,
    /// Where it is.
    pub status: SagaStatus,
    /// The saga's data.
    pub data: serde_json::Value,
    /// Each step's outcome, in table order.
    pub steps: Vec<(String, StepOutcome)>,
    /// The error that made it compensate, or that keeps a compensation failing.
    pub error: Option<String>,
    /// When a failed compensation is tried again.
    pub retry_at: Option<DateTime<Utc>>,
    /// When the saga must have completed by: a saga still running then compensates. `None` when
    /// it has none or it was cancelled ([`Orchestrator::cancel_deadline`]).
    #[serde(default)]
    pub deadline_at: Option<DateTime<Utc>>,
    /// Whether the deadline fired (and made the saga compensate).
    #[serde(default)]
    pub deadline_fired: bool,
    /// The event that started it, when an event did ([`SagaStarter`]): one instance per saga
    /// and starting event, however often the event is delivered.
    #[serde(default)]
    pub started_by: Option<Uuid>,
    /// The W3C `traceparent` the instance was started in (the starting event's, or the caller's):
    /// its steps run in that trace, so the commands they send continue it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Bumped by every save: a save that names an older version is refused.
    pub version: u64,
    /// The epoch of the lease this copy was claimed under (not stored in the state: the store
    /// keeps it beside). A fenced save names it, so a save by an orchestrator whose lease was
    /// taken over is refused.
    #[serde(skip)]
    pub lease_epoch: u64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it was last saved.
    pub updated_at: DateTime<Utc>,
}

impl SagaState {
    /// A new instance of saga `S` under `id` with `data`, running, no step run yet.
    ///
    /// # Errors
    /// [`SagaError::Data`] when `data` does not serialize.
    pub fn start<S: Saga>(id: SagaId, data: &S::Data) -> Result<Self, SagaError> {
        let now = Utc::now();
        Ok(Self {
            id,
            saga: S::NAME.to_owned(),
            status: SagaStatus::Running,
            data: serde_json::to_value(data).map_err(|e| orchestrator::data_error::<S>(id, &e))?,
            steps: S::STEPS
                .iter()
                .map(|s| (s.name.to_owned(), StepOutcome::Pending))
                .collect(),
            error: None,
            retry_at: None,
            deadline_at: None,
            deadline_fired: false,
            started_by: None,
            trace: crate::trace::current().map(|t| t.to_string()),
            version: 1,
            lease_epoch: 0,
            started_at: now,
            updated_at: now,
        })
    }
}

/// Why a saga store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// Another orchestrator saved this saga since it was loaded.
    #[error("saga {id} was changed by another orchestrator (expected version {expected})")]
    Conflict {
        /// The saga.
        id: SagaId,
        /// The version this save expected.
        expected: u64,
    },
    /// This orchestrator's lease on the instance is gone (expired, or another orchestrator took
    /// the instance over): its save was refused and it must not go on with the instance.
    #[error("saga {id}: `{owner}` no longer holds its lease (epoch {epoch})")]
    LeaseLost {
        /// The saga.
        id: SagaId,
        /// The orchestrator.
        owner: String,
        /// The lease epoch it held.
        epoch: u64,
    },
    /// No saga with this id.
    #[error("no saga {0}")]
    NotFound(SagaId),
    /// The stored instance or its data cannot be read as saga `saga`.
    #[error("saga {id}: stored data does not fit `{saga}`: {message}")]
    Data {
        /// The saga.
        id: SagaId,
        /// The saga's name.
        saga: String,
        /// What does not fit.
        message: String,
    },
    /// An argument the store cannot take (a lease or delay out of range).
    #[error("saga store: invalid input: {0}")]
    InvalidInput(String),
    /// The store failed (a broken connection, a database error).
    #[error("saga store failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SagaError {
    /// A backend error from anything that is an error.
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(error.into())
    }
}

mod fixture;
mod orchestrator;
mod starter;
mod store;
pub use fixture::{SagaFixture, SagaRun};
pub use orchestrator::{MIN_LEASE, Orchestrator};
pub use starter::{SagaStarter, StartedBy, started_id};
pub use store::{InMemorySagaStore, MAX_DURATION, Quarantined, SagaStore, chrono_duration};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_exponentially_up_to_the_cap_with_jitter() {
        let policy = RetryPolicy {
            attempts: 10,
            backoff: Duration::from_millis(100),
            max_delay: Duration::from_millis(1_000),
        };
        for seed in [0, 1, 42, u64::MAX] {
            for (attempt, full) in [
                (1, 100),
                (2, 200),
                (3, 400),
                (4, 800),
                (5, 1_000),
                (9, 1_000),
            ] {
                let delay = policy.delay(attempt, seed);
                let full = Duration::from_millis(full);
                assert!(delay >= full / 2 && delay <= full, "{attempt}: {delay:?}");
            }
        }
        let spread: std::collections::BTreeSet<_> =
            (0..50u64).map(|seed| policy.delay(3, seed)).collect();
        assert!(spread.len() > 40, "sagas failing together retry apart");
        assert_eq!(RetryPolicy::NONE.delay(1, 7), Duration::ZERO);
    }
}
