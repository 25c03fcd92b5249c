//! Runs saga instances through their step tables, saving before every move.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;

use futures::FutureExt as _;
use tracing::Instrument as _;

use super::{
    Saga, SagaError, SagaId, SagaState, SagaStatus, SagaStore, StepError, StepKey, StepOutcome,
    chrono_duration,
};

/// The shortest lease an orchestrator takes: shorter ones are raised to it.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// Runs the instances of saga `S` kept in store `St`, with the steps' context.
///
/// Each move is saved before the next, fenced: the save names this orchestrator and the epoch of
/// the lease it claimed the instance under, so once another orchestrator has taken the instance
/// over (this one stalled past its lease) the save is refused with [`SagaError::LeaseLost`] and
/// this one stops before the next side effect. While a step runs, its lease is renewed every third
/// of its duration, so a step longer than the lease still runs once. What remains: a process that
/// stalls mid-step (no heartbeat) past its lease lets another orchestrator run that step again,
/// with the same [`StepKey`], which is why steps get it to dedupe on.
///
/// One bad instance never holds the others up: an instance whose stored state or data cannot be
/// read (after a change to the data type) is set aside as [`SagaStatus::Unreadable`] and the run
/// goes on with the next; a step or compensation that panics counts as a failed try of that step.
pub struct Orchestrator<S: Saga, St> {
    store: St,
    context: S::Context,
    owner: String,
    lease: Duration,
    retry_failed_after: Duration,
    deadline: Option<Duration>,
}

impl<S: Saga, St> std::fmt::Debug for Orchestrator<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("saga", &S::NAME)
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<S: Saga, St: SagaStore> Orchestrator<S, St> {
    /// An orchestrator named `owner` (unique per process) with a 60 s lease; a compensation that
    /// keeps failing is tried again after 30 s.
    pub fn new(store: St, context: S::Context, owner: impl Into<String>) -> Self {
        Self {
            store,
            context,
            owner: owner.into(),
            lease: Duration::from_secs(60),
            retry_failed_after: Duration::from_secs(30),
            deadline: None,
        }
    }

    /// Every instance this orchestrator starts must complete within `within`: one still running
    /// then (a step retrying, an orchestrator down) compensates instead of going on. The deadline
    /// is stored with the instance, so it fires after a restart too, on whichever orchestrator
    /// runs the instance next; [`Orchestrator::cancel_deadline`] lifts it.
    #[must_use]
    pub fn with_deadline(mut self, within: Duration) -> Self {
        self.deadline = Some(within.min(super::MAX_DURATION));
        self
    }

    /// Lifts the deadline of instance `id`: it never fires. Returns whether there was one to lift
    /// (a deadline that fired already cannot be cancelled).
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Conflict`] when another orchestrator moved the
    /// instance meanwhile (load and try again), a failing store.
    pub async fn cancel_deadline(&self, id: SagaId) -> Result<bool, SagaError> {
        let mut state = self.store.load(id).await?.ok_or(SagaError::NotFound(id))?;
        if state.deadline_at.is_none() || state.deadline_fired {
            return Ok(false);
        }
        state.deadline_at = None;
        state.version += 1;
        state.updated_at = Utc::now();
        self.store.save(&state, None).await?;
        Ok(true)
    }

    /// A new instance under `id`, with this orchestrator's deadline.
    fn instance(&self, id: SagaId, data: &S::Data) -> Result<SagaState, SagaError> {
        let mut state = SagaState::start::<S>(id, data)?;
        state.deadline_at = self
            .deadline
            .and_then(|d| state.started_at.checked_add_signed(chrono_duration(d)));
        Ok(state)
    }

    /// How long a claimed instance stays this orchestrator's without a renewal (renewed every
    /// third of it while a step runs); clamped to between [`MIN_LEASE`] and
    /// [`MAX_DURATION`](super::MAX_DURATION).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.clamp(MIN_LEASE, super::MAX_DURATION);
        self
    }

    /// How long a saga whose compensation keeps failing waits before it is tried again (clamped
    /// to [`MAX_DURATION`](super::MAX_DURATION)).
    #[must_use]
    pub fn with_compensation_retry(mut self, after: Duration) -> Self {
        self.retry_failed_after = after.min(super::MAX_DURATION);
        self
    }

    /// The steps' context.
    pub fn context(&self) -> &S::Context {
        &self.context
    }

    /// The steps' context, taking the orchestrator apart.
    pub fn into_context(self) -> S::Context {
        self.context
    }

    /// Starts an instance with `data` under a new id and runs it; returns the id and where it
    /// ended (completed, compensated, or failed and waiting for a retry).
    ///
    /// # Errors
    /// A failing store, or data that does not serialize ([`SagaError::Data`]).
    pub async fn start(&self, data: S::Data) -> Result<(SagaId, SagaStatus), SagaError> {
        let id = SagaId::new();
        let state = self.start_with_id(id, data).await?;
        Ok((id, state.status))
    }

    /// Stores a new instance with `data` without running it: the next [`Orchestrator::run_due`]
    /// of any orchestrator of this saga on the store runs it.
    ///
    /// # Errors
    /// As [`Orchestrator::start`].
    pub async fn submit(&self, data: S::Data) -> Result<SagaId, SagaError> {
        let state = self.instance(SagaId::new(), &data)?;
        self.store
            .create(&state, &self.owner, Duration::ZERO)
            .await?;
        Ok(state.id)
    }

    /// Starts an instance under `id` (e.g. derived from the event that starts it) and runs it. An
    /// instance stored under `id` already is not started again: it is returned as stored.
    ///
    /// # Errors
    /// As [`Orchestrator::start`].
    pub async fn start_with_id(&self, id: SagaId, data: S::Data) -> Result<SagaState, SagaError> {
        let mut state = self.instance(id, &data)?;
        if !self.store.create(&state, &self.owner, self.lease).await? {
            return self.store.load(id).await?.ok_or(SagaError::NotFound(id));
        }
        state.lease_epoch = 1;
        let outcome = self.drive(state).await;
        self.store.release(id, &self.owner).await?;
        outcome
    }

    /// Claims up to `limit` due instances (unfinished after a crash, or failed and due for another
    /// try), runs each as far as it goes and releases it; returns them as they ended.
    ///
    /// An instance whose data cannot be read as `S::Data` (or whose stored steps are not the
    /// saga's) is set aside as [`SagaStatus::Unreadable`] with the reason and the run goes on; one
    /// another orchestrator saved or took over meanwhile is skipped.
    ///
    /// # Errors
    /// A failing store.
    pub async fn run_due(&self, limit: usize) -> Result<Vec<SagaState>, SagaError> {
        let claimed = self
            .store
            .claim(S::NAME, &self.owner, self.lease, limit)
            .await?;
        let mut ended = Vec::with_capacity(claimed.len());
        for state in claimed {
            let id = state.id;
            let outcome = self.drive(state).await;
            match outcome {
                Ok(state) => {
                    self.store.release(id, &self.owner).await?;
                    ended.push(state);
                }
                Err(error @ SagaError::Data { .. }) => {
                    tracing::error!(saga = S::NAME, %id, %error, "saga instance set aside as unreadable");
                    self.store.quarantine(id, &error.to_string()).await?;
                }
                Err(error @ (SagaError::Conflict { .. } | SagaError::LeaseLost { .. })) => {
                    tracing::warn!(saga = S::NAME, %id, %error, "saga instance taken over by another orchestrator; left to it");
                }
                Err(error) => {
                    self.store.release(id, &self.owner).await?;
                    return Err(error);
                }
            }
        }
        Ok(ended)
    }

    /// Runs due instances until `shutdown` completes: claims up to `limit` at a time with
    /// [`Orchestrator::run_due`], again at once while there were any, else after `poll`. A failing
    /// store is logged and tried again with a backoff up to 5 s (the instances stay stored and
    /// are claimed again once their lease ends). A shutdown cuts the instance being driven
    /// between two saves (every move is saved before the next, and steps are keyed for
    /// idempotence); once its lease lapses, another orchestrator (or this one, restarted) takes
    /// it up where it was.
    pub async fn run(&self, poll: Duration, limit: usize, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
        loop {
            let wait = tokio::select! {
                biased;
                () = &mut shutdown => return,
                outcome = self.run_due(limit) => match outcome {
                    Ok(ended) if !ended.is_empty() => {
                        backoff.reset();
                        continue;
                    }
                    Ok(_) => {
                        backoff.reset();
                        poll
                    }
                    Err(error) => {
                        tracing::warn!(saga = S::NAME, owner = %self.owner, %error, "claiming due sagas failed; retrying");
                        backoff.next_delay()
                    }
                },
            };
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs an instance from where it is until it ends or a compensation keeps failing, saving
    /// after every step.
    async fn drive(&self, mut state: SagaState) -> Result<SagaState, SagaError> {
        let names: Vec<&str> = state.steps.iter().map(|(n, _)| n.as_str()).collect();
        let table: Vec<&str> = S::STEPS.iter().map(|s| s.name).collect();
        if names != table {
            return Err(SagaError::Data {
                id: state.id,
                saga: state.saga.clone(),
                message: format!("stored steps {names:?} are not the saga's steps {table:?}"),
            });
        }
        let mut data: S::Data = serde_json::from_value(state.data.clone())
            .map_err(|e| data_error::<S>(state.id, &e))?;
        loop {
            match state.status {
                SagaStatus::Completed
                | SagaStatus::Compensated
                | SagaStatus::Abandoned
                | SagaStatus::Unreadable => return Ok(state),
                SagaStatus::Running => {
                    if let Some(at) = state.deadline_at.filter(|at| *at <= Utc::now()) {
                        tracing::warn!(saga = S::NAME, id = %state.id, %at, "deadline passed: compensating");
                        state.deadline_fired = true;
                        state.error = Some(format!("the deadline passed at {at}"));
                        state.status = SagaStatus::Compensating;
                        crate::telemetry::saga_status(S::NAME, state.status.as_str());
                        self.save(&mut state, &data).await?;
                        continue;
                    }
                    let Some(step) = state
                        .steps
                        .iter()
                        .position(|(_, o)| *o == StepOutcome::Pending)
                    else {
                        state.status = SagaStatus::Completed;
                        crate::telemetry::saga_status(S::NAME, state.status.as_str());
                        self.save(&mut state, &data).await?;
                        continue;
                    };
                    let outcome = self.attempt(&state, step, false, &mut data).await?;
                    crate::telemetry::saga_step(
                        S::NAME,
                        S::STEPS[step].name,
                        if outcome.is_ok() { "ok" } else { "failed" },
                    );
                    match outcome {
                        Ok(()) => state.steps[step].1 = StepOutcome::Executed,
                        Err(error) => {
                            tracing::warn!(saga = S::NAME, id = %state.id, step = S::STEPS[step].name, %error, "step failed: compensating");
                            state.steps[step].1 = StepOutcome::Failed {
                                error: error.clone(),
                            };
                            state.error = Some(error);
                            state.status = SagaStatus::Compensating;
                            crate::telemetry::saga_status(S::NAME, state.status.as_str());
                        }
                    }
                    self.save(&mut state, &data).await?;
                }
                SagaStatus::Compensating | SagaStatus::Failed => {
                    // The last executed step with a compensation, compensations in reverse order.
                    let Some(step) = state
                        .steps
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(i, (_, o))| *o == StepOutcome::Executed && S::STEPS[*i].compensable)
                        .map(|(i, _)| i)
                    else {
                        state.status = SagaStatus::Compensated;
                        crate::telemetry::saga_status(S::NAME, state.status.as_str());
                        state.retry_at = None;
                        self.save(&mut state, &data).await?;
                        continue;
                    };
                    let outcome = self.attempt(&state, step, true, &mut data).await?;
                    crate::telemetry::saga_step(
                        S::NAME,
                        S::STEPS[step].name,
                        if outcome.is_ok() {
                            "compensated"
                        } else {
                            "compensation_failed"
                        },
                    );
                    match outcome {
                        Ok(()) => {
                            state.steps[step].1 = StepOutcome::Compensated;
                            state.status = SagaStatus::Compensating;
                            state.retry_at = None;
                            self.save(&mut state, &data).await?;
                        }
                        Err(error) => {
                            tracing::error!(saga = S::NAME, id = %state.id, step = S::STEPS[step].name, %error, "compensation failed: the saga is failed until it is tried again");
                            state.status = SagaStatus::Failed;
                            crate::telemetry::saga_status(S::NAME, state.status.as_str());
                            state.error = Some(format!(
                                "compensation of `{}` failed: {error}",
                                S::STEPS[step].name
                            ));
                            state.retry_at = Utc::now()
                                .checked_add_signed(chrono_duration(self.retry_failed_after));
                            self.save(&mut state, &data).await?;
                            return Ok(state);
                        }
                    }
                }
            }
        }
    }

    /// Tries step `step` (or its compensation) by its retry policy and timeout; the inner result
    /// is the step's (its last error as text; a panic counts as a failed try). Before each try the
    /// lease is renewed, and while a try runs a heartbeat renews it every third of its duration:
    /// the outer error is [`SagaError::LeaseLost`] once this orchestrator no longer holds the
    /// instance, and then no further try starts.
    async fn attempt(
        &self,
        state: &SagaState,
        step: usize,
        compensate: bool,
        data: &mut S::Data,
    ) -> Result<Result<(), String>, SagaError> {
        let id = state.id;
        let spec = S::STEPS[step];
        let key = StepKey {
            saga: id,
            step: spec.name,
            compensate,
        };
        let span = tracing::info_span!(
            "cqrs.saga.step",
            saga = S::NAME,
            id = %id,
            step = spec.name,
            compensate,
            attempts = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // In the trace the instance started in: what the step sends continues it.
        let trace = state
            .trace
            .as_deref()
            .and_then(|t| crate::trace::TraceContext::parse(t).ok());
        if let Some(trace) = &trace {
            crate::trace::follow(&span, trace);
        }
        let work = self
            .attempt_in(state, step, compensate, data, key)
            .instrument(span);
        crate::trace::scope_if_needed(trace, work).await
    }

    async fn attempt_in(
        &self,
        state: &SagaState,
        step: usize,
        compensate: bool,
        data: &mut S::Data,
        key: StepKey,
    ) -> Result<Result<(), String>, SagaError> {
        let id = state.id;
        let spec = S::STEPS[step];
        let attempts = spec.retry.attempts.max(1);
        let seed = id.0.as_u64_pair().1;
        let mut last = String::new();
        for attempt in 1..=attempts {
            tracing::Span::current().record("attempts", attempt);
            self.fence(state).await?;
            let run = async {
                let run = async {
                    if compensate {
                        S::compensate(step, &self.context, data, &key).await
                    } else {
                        S::execute(step, &self.context, data, &key).await
                    }
                };
                // A panicking step is that instance's failure, never the orchestrator's.
                match std::panic::AssertUnwindSafe(run).catch_unwind().await {
                    Ok(result) => result,
                    Err(panic) => {
                        Err(format!("panicked: {}", crate::panic_message(&*panic)).into())
                    }
                }
            };
            let run = async {
                match spec.timeout {
                    Some(limit) => tokio::time::timeout(limit, run)
                        .await
                        .unwrap_or_else(|_| Err(format!("timed out after {limit:?}").into())),
                    None => run.await,
                }
            };
            let result: Result<(), StepError> = tokio::select! {
                result = run => result,
                never = self.heartbeat(state) => match never {},
            };
            match result {
                Ok(()) => return Ok(Ok(())),
                Err(error) => last = error.to_string(),
            }
            if attempt < attempts {
                tokio::time::sleep(spec.retry.delay(attempt, seed)).await;
            }
        }
        Ok(Err(last))
    }

    /// Renews the lease on `state` now, or [`SagaError::LeaseLost`].
    async fn fence(&self, state: &SagaState) -> Result<(), SagaError> {
        if self
            .store
            .renew(state.id, &self.owner, state.lease_epoch, self.lease)
            .await?
        {
            Ok(())
        } else {
            Err(SagaError::LeaseLost {
                id: state.id,
                owner: self.owner.clone(),
                epoch: state.lease_epoch,
            })
        }
    }

    /// Renews the lease on `state` every third of its duration while a step runs; after a lost
    /// lease or a failing store it only waits (the save after the step decides).
    async fn heartbeat(&self, state: &SagaState) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(self.lease / 3).await;
            match self.fence(state).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(saga = S::NAME, id = %state.id, %error, "saga lease not renewed during a step");
                    break;
                }
            }
        }
        std::future::pending().await
    }

    /// Saves the next version of `state` with `data`.
    async fn save(&self, state: &mut SagaState, data: &S::Data) -> Result<(), SagaError> {
        state.data = serde_json::to_value(data).map_err(|e| data_error::<S>(state.id, &e))?;
        state.version += 1;
        state.updated_at = Utc::now();
        self.store.save(state, Some(&self.owner)).await
    }
}

pub(super) fn data_error<S: Saga>(id: SagaId, error: &serde_json::Error) -> SagaError {
    SagaError::Data {
        id,
        saga: S::NAME.to_owned(),
        message: error.to_string(),
    }
}
