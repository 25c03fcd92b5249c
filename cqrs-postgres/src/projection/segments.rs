//! A projection shared by several worker processes: it runs in segments (see
//! [`crate::segments`]), each owned through its own lease, and the processes balance the
//! segments between them.

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use evently_core::StoreError;
use evently_core::projection::{FailurePolicy, Projection};
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::errors::backend;
use crate::segments::{Layout, ensure, layout};
use crate::{CheckpointLease, PostgresEventStore};

use super::{ProjectionWorker, Reset, WorkerError, is_permanent};

/// Runs a projection in segments together with the other processes doing the same: each process
/// owns some segments through their leases and applies their streams, so a read model's load is
/// spread over processes (nodes) while each stream is applied by one of them, in order.
///
/// Every `lease / 3` the worker renews its membership (`projection_members`), reads the layout
/// and balances: with `m` live members and `n` segments it holds at most `ceil(n / m)` of them,
/// hands the extra ones over (stops their engines, releases their leases) and takes free ones
/// (never leased, released, or whose owner's lease expired: a process killed with `kill -9` loses
/// its segments after one lease). Each segment runs on the core's engine like a
/// [`ProjectionWorker`]: the read-model change and its segment's checkpoint move commit in one
/// transaction, the move a compare-and-set under the segment lease's epoch. Dead letters and
/// blocked streams stay per stream (a stream belongs to one segment), under the projection's name.
///
/// The first worker to start segments the projection in [`with_segments`](Self::with_segments)
/// (default 1) segments, taking over where the projection as a whole stood; after that the stored
/// layout rules, and an operator changes it while everything runs with
/// [`scale`](crate::segments::scale) (`cqrs projections scale`). A projection that runs in
/// segments is not taken by a plain [`ProjectionWorker`] any more: it waits, idle.
///
/// Rebuilds on request are served by the first worker that sees them, with the reset given to
/// [`with_reset`](Self::with_reset).
pub struct SegmentedWorker<P, F> {
    store: PostgresEventStore,
    factory: Arc<F>,
    owner: String,
    segments: u32,
    lease: Duration,
    batch: usize,
    /// The most a segment's window grows to while behind, if set.
    max_batch: Option<usize>,
    policy: FailurePolicy,
    reset: Option<Reset>,
    auto_promote: Option<crate::versions::Promotion>,
    projection: PhantomData<fn() -> P>,
}

impl<P, F> std::fmt::Debug for SegmentedWorker<P, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentedWorker")
            .field("owner", &self.owner)
            .field("segments", &self.segments)
            .field("lease", &self.lease)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// A segment this process runs.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl<P, F> SegmentedWorker<P, F>
where
    P: Projection<Context = PgConnection> + 'static,
    F: Fn() -> P + Send + Sync + 'static,
{
    /// A worker named `owner` (unique per process) building one projection per segment it runs
    /// with `factory`; a 30 s lease, batches of 2,000 events, the default [`FailurePolicy`].
    pub fn new(store: PostgresEventStore, owner: impl Into<String>, factory: F) -> Self {
        Self {
            store,
            factory: Arc::new(factory),
            owner: owner.into(),
            segments: 1,
            lease: Duration::from_secs(30),
            batch: 2_000,
            max_batch: None,
            policy: FailurePolicy::default(),
            reset: None,
            auto_promote: None,
            projection: PhantomData,
        }
    }

    /// How many segments to run the projection in if it does not run in segments yet (1 to
    /// 1,024; the stored layout wins otherwise).
    #[must_use]
    pub fn with_segments(mut self, segments: u32) -> Self {
        self.segments = segments;
        self
    }

    /// How long a segment's lease (and this worker's membership) lasts without renewal: the
    /// time after which the segments of a process that died are taken over.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(crate::lease::MIN_LEASE);
        self
    }

    /// How many events one step of a segment reads when it is not behind (see
    /// [`ProjectionWorker::with_batch`]).
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// The most events one step of a segment reads while it is behind (see
    /// [`ProjectionWorker::with_max_batch`]).
    #[must_use]
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = Some(max_batch);
        self
    }

    /// What to do with events the projection keeps failing on.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Promotes this version of the projection by itself once it has caught up with the live one
    /// (as [`ProjectionWorker::with_auto_promote`](super::ProjectionWorker::with_auto_promote);
    /// the worker running segment 0 checks after its catch-ups).
    #[must_use]
    pub fn with_auto_promote(mut self, promotion: crate::versions::Promotion) -> Self {
        self.auto_promote = Some(promotion);
        self
    }

    /// How to empty the read model (e.g. `TRUNCATE` its tables), for the rebuilds operators ask
    /// for (`cqrs projections rebuild`): the first worker to see the request runs it in one
    /// transaction with the segment rows locked (batches in flight waited for, their workers
    /// fenced), restarts every segment from the first event under a new generation and drops the
    /// dead letters; the workers then replay the log together. Give every worker of the
    /// projection the same reset: one without it answers the request with an error saying so.
    #[must_use]
    pub fn with_reset<R>(mut self, reset: R) -> Self
    where
        R: for<'c> Fn(
                &'c mut PgConnection,
            ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + Sync
            + 'static,
    {
        self.reset = Some(Arc::new(reset));
        self
    }

    /// Runs segments until `shutdown` completes (then stops them, each rolling back its batch in
    /// flight, and releases their leases so others take them at once). Database failures are
    /// ridden out (logged, tried again at the next round); `poll` is each segment's wait between
    /// catch-ups when no commit wakes it.
    ///
    /// # Errors
    /// What waiting cannot heal ([`is_permanent`]): a missing schema or table, refused privileges;
    /// a segment count out of range.
    pub async fn run(
        self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        evently_core::projection::Segment::new(0, self.segments).map_err(|e| {
            StoreError::InvalidInput(format!("SegmentedWorker::with_segments: {e}"))
        })?;
        crate::rls::refuse_shared_registry::<P>(&self.store, "segmented")?;
        let mut shutdown = std::pin::pin!(shutdown);
        let round = (self.lease / 3).max(Duration::from_millis(30));
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut laid_out = false;
        let outcome = loop {
            match self.balance(&mut running, &mut laid_out, poll).await {
                Ok(()) => {}
                Err(error) if is_permanent(&error) => break Err(error),
                Err(error) => {
                    tracing::warn!(projection = P::NAME, owner = %self.owner, %error, "balancing segments failed; trying again");
                }
            }
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                () = tokio::time::sleep(round) => {}
            }
        };
        for (_, segment) in std::mem::take(&mut running) {
            stop(segment).await;
        }
        let left = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {}.projection_members WHERE projection = $1 AND member = $2",
            self.store.sql.quoted_schema
        )))
        .bind(P::NAME)
        .bind(&self.owner)
        .execute(self.store.pool())
        .await;
        if let Err(error) = left {
            tracing::debug!(projection = P::NAME, %error, "leaving the members failed: the row expires");
        }
        outcome
    }

    /// One round: reap ended segments, renew the membership, stop what is not ours any more or
    /// above the fair share, take free segments up to it.
    async fn balance(
        &self,
        running: &mut BTreeMap<String, Running>,
        laid_out: &mut bool,
        poll: Duration,
    ) -> Result<(), WorkerError> {
        let ended: Vec<String> = running
            .iter()
            .filter(|(_, segment)| segment.task.is_finished())
            .map(|(name, _)| name.clone())
            .collect();
        for name in ended {
            if let Some(segment) = running.remove(&name) {
                match segment.task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) if is_permanent(&error) => return Err(error),
                    Ok(Err(error)) => {
                        tracing::warn!(projection = P::NAME, segment = %name, %error, "a segment stopped");
                    }
                    Err(panic) => {
                        tracing::error!(projection = P::NAME, segment = %name, %panic, "a segment's task panicked");
                    }
                }
            }
        }
        if !*laid_out {
            ensure(&self.store, P::NAME, self.segments).await?;
            *laid_out = true;
        }
        let members = self.renew_membership().await?;
        self.serve_rebuild().await?;
        let Some(layout) = layout(&self.store, P::NAME).await? else {
            // An operator cannot unsegment a projection: the row was deleted by hand.
            *laid_out = false;
            return Ok(());
        };
        self.drop_lost(running, &layout).await;
        let fair = layout.count().div_ceil(members.max(1));
        while running.len() > fair {
            if let Some((_, segment)) = running.pop_last() {
                stop(segment).await;
            }
        }
        let free: Vec<_> = layout
            .segments
            .iter()
            .filter(|s| !running.contains_key(&s.name))
            .filter(|s| !s.leased || s.owner.as_deref() == Some(&self.owner))
            .take(fair.saturating_sub(running.len()))
            .map(|s| s.name.clone())
            .collect();
        for name in free {
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(run_segment(
                self.store.clone(),
                (self.factory)(),
                self.owner.clone(),
                name.clone(),
                (
                    self.lease,
                    (self.batch, self.max_batch),
                    self.policy,
                    poll,
                    self.auto_promote,
                ),
                stopped,
            ));
            running.insert(name, Running { stop, task });
        }
        Ok(())
    }

    /// Serves a rebuild an operator asked for, if any (see [`with_reset`](Self::with_reset)).
    async fn serve_rebuild(&self) -> Result<(), WorkerError> {
        let Some(count) = crate::segments::rebuild_requested(&self.store, P::NAME).await? else {
            return Ok(());
        };
        let Some(reset) = &self.reset else {
            let error = format!(
                "the SegmentedWorker `{}` of `{}` has no reset: build every worker of the projection with SegmentedWorker::with_reset to allow rebuilds",
                self.owner,
                P::NAME
            );
            crate::segments::refuse_rebuild(&self.store, P::NAME, &error).await?;
            return Ok(());
        };
        match crate::segments::rebuild(&self.store, P::NAME, count, &**reset).await {
            Ok(()) => {
                tracing::info!(projection = P::NAME, owner = %self.owner, "rebuilding: every segment starts again from the first event (unless another worker did)");
                Ok(())
            }
            Err(StoreError::Backend(source)) if crate::is_outage(&*source) => {
                Err(StoreError::Backend(source).into())
            }
            Err(StoreError::Backend(source)) if crate::errors::is_rolled_back(&*source) => {
                // The request stands: the next round tries again.
                tracing::warn!(projection = P::NAME, owner = %self.owner, error = %source, "the rebuild's transaction was rolled back by the server: trying again");
                Ok(())
            }
            Err(error) => {
                crate::segments::refuse_rebuild(&self.store, P::NAME, &error.to_string()).await?;
                Ok(())
            }
        }
    }

    /// Stops the segments whose rows a rescale replaced or whose lease another owner holds now.
    async fn drop_lost(&self, running: &mut BTreeMap<String, Running>, layout: &Layout) {
        let lost: Vec<String> = running
            .keys()
            .filter(|name| {
                layout
                    .segments
                    .iter()
                    .find(|s| &&s.name == name)
                    .is_none_or(|s| s.leased && s.owner.as_deref() != Some(self.owner.as_str()))
            })
            .cloned()
            .collect();
        for name in lost {
            if let Some(segment) = running.remove(&name) {
                stop(segment).await;
            }
        }
    }

    /// Renews this process's membership; returns how many members are live.
    async fn renew_membership(&self) -> Result<usize, WorkerError> {
        let s = &self.store.sql.quoted_schema;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.projection_members (projection, member, seen_until) \
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
             ON CONFLICT (projection, member) DO UPDATE SET seen_until = EXCLUDED.seen_until"
        )))
        .bind(P::NAME)
        .bind(&self.owner)
        .bind(self.lease.as_secs_f64())
        .execute(self.store.pool())
        .await
        .map_err(backend)?;
        let live: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {s}.projection_members \
             WHERE projection = $1 AND seen_until >= clock_timestamp()"
        )))
        .bind(P::NAME)
        .fetch_one(self.store.pool())
        .await
        .map_err(backend)?;
        Ok(usize::try_from(live).unwrap_or(1))
    }
}

/// Stops a running segment and waits for it (its batch in flight rolls back; it releases its
/// lease).
async fn stop(segment: Running) {
    let _ = segment.stop.send(());
    match segment.task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "a segment stopped with an error"),
        Err(panic) => tracing::error!(%panic, "a segment's task panicked"),
    }
}

/// Runs the segment of row `name` until `stopped` fires (or its sender is dropped): takes its
/// lease, reads what the segment applies, runs the engine, releases the lease.
async fn run_segment<P: Projection<Context = PgConnection>>(
    store: PostgresEventStore,
    projection: P,
    owner: String,
    name: String,
    (lease, (batch, max_batch), policy, poll, auto_promote): (
        Duration,
        (usize, Option<usize>),
        FailurePolicy,
        Duration,
        Option<crate::versions::Promotion>,
    ),
    stopped: oneshot::Receiver<()>,
) -> Result<(), WorkerError> {
    let mut worker = ProjectionWorker::new(store.clone(), projection, owner.clone())
        .with_batch(batch)
        .with_failure_policy(policy);
    if let Some(max_batch) = max_batch {
        worker = worker.with_max_batch(max_batch);
    }
    worker.engine.backend_mut().lease =
        CheckpointLease::segment(store.clone(), &name, owner, lease);
    worker.engine.backend_mut().auto_promote = auto_promote;
    if !worker.acquire().await? {
        return Ok(());
    }
    let Some(state) = crate::segments::segment_state(&store, &name).await? else {
        return Ok(());
    };
    tracing::debug!(projection = P::NAME, segment = %state.segment, row = %name, "running a segment");
    worker.engine.backend_mut().segment = Some(state.segment);
    worker.engine.set_segment(Some(state));
    let outcome = worker
        .engine
        .run(poll, async {
            let _ = stopped.await;
        })
        .await;
    if let Err(error) = worker.engine.backend_mut().lease.release().await {
        tracing::debug!(projection = P::NAME, segment = %name, %error, "releasing a segment's lease failed: it expires");
    }
    outcome
}
