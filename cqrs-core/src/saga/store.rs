//! Where saga instances are kept: the [`SagaStore`] port (leases, due instances, instances set
//! aside) and its in-memory implementation.

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::*;

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
