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

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
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

/// An instance set aside as [`SagaStatus::Unreadable`], as listed for operators (read from the
/// store's own columns: its state may not read at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The instance.
    pub id: SagaId,
    /// Its saga.
    pub saga: String,
    /// Why it was set aside.
    pub error: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// The longest lease, deadline or retry delay the orchestrator and stores take: longer ones are
/// clamped to it (so every one is a valid time and interval).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// `d` clamped to [`MAX_DURATION`], as a chrono duration.
#[must_use]
pub fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d.min(MAX_DURATION)).unwrap_or(chrono::Duration::zero())
}

/// Where saga instances are kept.
///
/// Every instance is leased to one orchestrator at a time, under an epoch that each claim by
/// another orchestrator (or after the lease expired) bumps; a fenced [`save`](Self::save) names
/// the owner and the epoch and is refused with [`SagaError::LeaseLost`] once they no longer hold.
#[async_trait::async_trait]
pub trait SagaStore: Send + Sync {
    /// Stores a new instance leased to `owner` for `lease` under epoch 1 (its creator runs it
    /// first); `false` (storing nothing) when an instance with its id, or of its saga started by
    /// the same event (`started_by`), exists.
    ///
    /// # Errors
    /// [`SagaError::Backend`].
    async fn create(
        &self,
        state: &SagaState,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, SagaError>;

    /// Saves `state` if the stored version is `state.version - 1` (the caller bumped it) and,
    /// with `fence`, only while `fence` holds a live lease on it under `state.lease_epoch`.
    ///
    /// # Errors
    /// [`SagaError::LeaseLost`] when the fence does not hold, [`SagaError::Conflict`] when the
    /// version does not match, [`SagaError::NotFound`], [`SagaError::Backend`].
    async fn save(&self, state: &SagaState, fence: Option<&str>) -> Result<(), SagaError>;

    /// Extends `owner`'s lease on `id` under `epoch` by `lease` from now (the heartbeat while a
    /// step runs); `false` when it no longer holds it.
    ///
    /// # Errors
    /// [`SagaError::Backend`].
    async fn renew(
        &self,
        id: SagaId,
        owner: &str,
        epoch: u64,
        lease: Duration,
    ) -> Result<bool, SagaError>;

    /// One instance.
    ///
    /// # Errors
    /// [`SagaError::Data`] when its stored state does not read, [`SagaError::Backend`].
    async fn load(&self, id: SagaId) -> Result<Option<SagaState>, SagaError>;

    /// Claims up to `limit` unfinished instances of `saga` that are due (running, compensating, or
    /// failed with `retry_at` passed) and not leased by another owner, leasing them to `owner`
    /// until `now + lease` under a new epoch (set in each returned state's `lease_epoch`). An
    /// instance whose stored state does not read is set aside ([`SagaStatus::Unreadable`]) and
    /// not returned: one bad row never stops the others.
    ///
    /// # Errors
    /// [`SagaError::Backend`].
    async fn claim(
        &self,
        saga: &str,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaState>, SagaError>;

    /// Releases `owner`'s lease on `id`.
    ///
    /// # Errors
    /// [`SagaError::Backend`].
    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError>;

    /// Sets instance `id` aside as [`SagaStatus::Unreadable`] with `error`, releasing any lease:
    /// claims skip it until [`retry`](Self::retry).
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Backend`].
    async fn quarantine(&self, id: SagaId, error: &str) -> Result<(), SagaError>;

    /// Makes an unreadable or failed instance due now (after a fix): an unreadable one goes back
    /// to the status its state holds. `false` when it is neither.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Backend`].
    async fn retry(&self, id: SagaId) -> Result<bool, SagaError>;

    /// Ends an unfinished instance as [`SagaStatus::Abandoned`] (an operator's decision: nothing
    /// more runs or compensates). `false` when it had ended already.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Backend`].
    async fn abandon(&self, id: SagaId) -> Result<bool, SagaError>;

    /// The instances set aside, of `saga` (all with `None`), oldest first.
    ///
    /// # Errors
    /// [`SagaError::Backend`].
    async fn quarantined(&self, saga: Option<&str>) -> Result<Vec<Quarantined>, SagaError>;

    /// The instances of `saga` (all sagas with `None`) in `status` (any with `None`), oldest first.
    /// Instances whose stored state does not read are left out (see
    /// [`quarantined`](Self::quarantined)).
    ///
    /// # Errors
    /// [`SagaError::Backend`].
    async fn list(
        &self,
        saga: Option<&str>,
        status: Option<SagaStatus>,
    ) -> Result<Vec<SagaState>, SagaError>;
}

/// Saga instances in process memory (clones share them).
#[derive(Debug, Clone, Default)]
pub struct InMemorySagaStore {
    inner: Arc<Mutex<HashMap<SagaId, Entry>>>,
}

/// A stored instance, its lease (owner, until when) and lease epoch, and why it was set aside.
#[derive(Debug)]
struct Entry {
    state: SagaState,
    lease: Option<(String, DateTime<Utc>)>,
    epoch: u64,
    quarantined: Option<(String, DateTime<Utc>)>,
}

impl Entry {
    /// Whether `owner` holds a live lease on the instance under `epoch`.
    fn held_by(&self, owner: &str, epoch: u64) -> bool {
        let now = Utc::now();
        self.epoch == epoch
            && self
                .lease
                .as_ref()
                .is_some_and(|(holder, until)| holder == owner && *until >= now)
    }
}

impl InMemorySagaStore {
    /// No instances yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SagaId, Entry>> {
        // Every writer replaces whole fields: the map is consistent even after a panic elsewhere.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl SagaStore for InMemorySagaStore {
    async fn create(
        &self,
        state: &SagaState,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, SagaError> {
        let mut inner = self.lock();
        let started_twice = state.started_by.is_some()
            && inner
                .values()
                .any(|e| e.state.saga == state.saga && e.state.started_by == state.started_by);
        if started_twice || inner.contains_key(&state.id) {
            return Ok(false);
        }
        let mut stored = state.clone();
        stored.lease_epoch = 1;
        inner.insert(
            state.id,
            Entry {
                state: stored,
                lease: Some((owner.to_owned(), lease_end(lease))),
                epoch: 1,
                quarantined: None,
            },
        );
        Ok(true)
    }

    async fn save(&self, state: &SagaState, fence: Option<&str>) -> Result<(), SagaError> {
        let mut inner = self.lock();
        let Some(entry) = inner.get_mut(&state.id) else {
            return Err(SagaError::NotFound(state.id));
        };
        if let Some(owner) = fence
            && !entry.held_by(owner, state.lease_epoch)
        {
            return Err(SagaError::LeaseLost {
                id: state.id,
                owner: owner.to_owned(),
                epoch: state.lease_epoch,
            });
        }
        if entry.state.version + 1 != state.version {
            return Err(SagaError::Conflict {
                id: state.id,
                expected: state.version.saturating_sub(1),
            });
        }
        entry.state = state.clone();
        entry.state.lease_epoch = entry.epoch;
        Ok(())
    }

    async fn renew(
        &self,
        id: SagaId,
        owner: &str,
        epoch: u64,
        lease: Duration,
    ) -> Result<bool, SagaError> {
        let mut inner = self.lock();
        let Some(entry) = inner.get_mut(&id) else {
            return Ok(false);
        };
        let holds = entry.held_by(owner, epoch);
        if holds {
            entry.lease = Some((owner.to_owned(), lease_end(lease)));
        }
        Ok(holds)
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaState>, SagaError> {
        Ok(self.lock().get(&id).map(|e| e.state.clone()))
    }

    async fn claim(
        &self,
        saga: &str,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaState>, SagaError> {
        let now = Utc::now();
        let until = lease_end(lease);
        let mut inner = self.lock();
        let mut due: Vec<&mut Entry> = inner
            .values_mut()
            .filter(|e| {
                e.state.saga == saga
                    && e.quarantined.is_none()
                    && due_now(&e.state, now)
                    && e.lease
                        .as_ref()
                        .is_none_or(|(holder, until)| holder == owner || *until <= now)
            })
            .collect();
        due.sort_by_key(|e| e.state.started_at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|entry| {
                entry.epoch += 1;
                entry.lease = Some((owner.to_owned(), until));
                entry.state.lease_epoch = entry.epoch;
                entry.state.clone()
            })
            .collect())
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        if let Some(entry) = self.lock().get_mut(&id)
            && entry
                .lease
                .as_ref()
                .is_some_and(|(holder, _)| holder == owner)
        {
            entry.lease = None;
        }
        Ok(())
    }

    async fn quarantine(&self, id: SagaId, error: &str) -> Result<(), SagaError> {
        let mut inner = self.lock();
        let entry = inner.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        entry.quarantined = Some((error.to_owned(), Utc::now()));
        entry.lease = None;
        Ok(())
    }

    async fn retry(&self, id: SagaId) -> Result<bool, SagaError> {
        let mut inner = self.lock();
        let entry = inner.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        if entry.quarantined.take().is_some() {
            return Ok(true);
        }
        if entry.state.status == SagaStatus::Failed {
            entry.state.retry_at = None;
            return Ok(true);
        }
        Ok(false)
    }

    async fn abandon(&self, id: SagaId) -> Result<bool, SagaError> {
        let mut inner = self.lock();
        let entry = inner.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        if entry.state.status.is_final() && entry.quarantined.is_none() {
            return Ok(false);
        }
        entry.quarantined = None;
        entry.lease = None;
        entry.state.status = SagaStatus::Abandoned;
        entry.state.version += 1;
        entry.state.updated_at = Utc::now();
        Ok(true)
    }

    async fn quarantined(&self, saga: Option<&str>) -> Result<Vec<Quarantined>, SagaError> {
        let mut found: Vec<Quarantined> = self
            .lock()
            .values()
            .filter(|e| saga.is_none_or(|n| e.state.saga == n))
            .filter_map(|e| {
                e.quarantined.as_ref().map(|(error, at)| Quarantined {
                    id: e.state.id,
                    saga: e.state.saga.clone(),
                    error: error.clone(),
                    at: *at,
                })
            })
            .collect();
        found.sort_by_key(|q| (q.at, q.id));
        Ok(found)
    }

    async fn list(
        &self,
        saga: Option<&str>,
        status: Option<SagaStatus>,
    ) -> Result<Vec<SagaState>, SagaError> {
        let mut found: Vec<SagaState> = self
            .lock()
            .values()
            .map(|e| {
                let mut state = e.state.clone();
                if let Some((error, _)) = &e.quarantined {
                    state.status = SagaStatus::Unreadable;
                    state.error = Some(error.clone());
                }
                state
            })
            .filter(|s| saga.is_none_or(|n| s.saga == n) && status.is_none_or(|st| s.status == st))
            .collect();
        found.sort_by_key(|s| (s.started_at, s.id));
        Ok(found)
    }
}

/// When a lease of `lease` taken now ends.
fn lease_end(lease: Duration) -> DateTime<Utc> {
    Utc::now() + chrono_duration(lease)
}

/// Whether an unfinished saga should run now.
fn due_now(state: &SagaState, now: DateTime<Utc>) -> bool {
    match state.status {
        SagaStatus::Running | SagaStatus::Compensating => true,
        SagaStatus::Failed => state.retry_at.is_none_or(|at| at <= now),
        SagaStatus::Completed
        | SagaStatus::Compensated
        | SagaStatus::Unreadable
        | SagaStatus::Abandoned => false,
    }
}

mod fixture;
mod orchestrator;
mod starter;

pub use fixture::{SagaFixture, SagaRun};
pub use orchestrator::{MIN_LEASE, Orchestrator};
pub use starter::{SagaStarter, StartedBy, started_id};

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
