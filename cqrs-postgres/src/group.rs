//! Group commit: concurrent appends written by one statement, in one transaction and one flush.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use evently_core::store::AppendResult;
use evently_core::{EventData, StoreError, StreamId};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::errors::backend;
use crate::insert::{ColumnArrays, Insert, appended, insert_at};
use crate::rows::{to_i64, to_u64, xid};
use crate::sql::Sql;

/// How a store groups concurrent appends: by one statement, in one transaction and one flush.
///
/// With [`PostgresEventStore::with_group_commit`](crate::PostgresEventStore::with_group_commit),
/// an append that finds no other append of the store in flight goes straight to the database as
/// before (no wait, no hop: a single writer's latency is unchanged). One that finds others in
/// flight is handed to a leader task, which collects what is queued (yielding once to the tasks
/// ready to run, such as the writers the last group answered, and again after each yield that
/// brought an append; with a [`window`](GroupCommit::window), what arrives within it), at most
/// one append per stream and [`max_appends`](GroupCommit::max_appends) in all, and writes them
/// with one `INSERT`: one statement is one transaction, so the group costs one commit flush.
///
/// Each append keeps its own condition. The statement inserts an append's events only if its
/// stream is exactly at the append's base version (its last version, read in the statement, is
/// the base); an append that fails its condition inserts nothing and answers as a lost race does
/// without group commit (the caller then reports the conflict, or `AlreadyAppended` for a retry,
/// whose stream its own first attempt moved on, or tries again for `Any`), while the others
/// commit. When the statement fails as a whole (a race with a writer outside the group that the
/// conditions could not see, an event id already stored elsewhere or two appends with one event
/// id: the unique indexes refuse the statement), nothing of it was written: every append of the
/// group is then written alone, as without group commit. When
/// the connection breaks mid-statement, every append of the group gets the error, as a single
/// append would: the outcome is in doubt, and a retry with the same event ids is answered exactly.
///
/// The global order is unchanged: the events of one statement share a transaction id and take
/// positions in append-then-version order, so readers see each stream in version order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    max_appends: usize,
    window: Duration,
    pipelines: usize,
}

impl Default for GroupCommit {
    /// At most 64 appends a group, no window (a group is what queued while the last one was
    /// written, and what the writers ready to run send when the leader yields to them), 1 group
    /// in flight at a time (on a 2-core server with 8 writers, 2 in flight were 4% slower with a
    /// p99 of 2.2 against 1.6 ms).
    fn default() -> Self {
        Self {
            max_appends: 64,
            window: Duration::ZERO,
            pipelines: 1,
        }
    }
}

impl GroupCommit {
    /// The defaults.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `n` appends in one group (at least 1).
    #[must_use]
    pub fn max_appends(mut self, n: usize) -> Self {
        self.max_appends = n.max(1);
        self
    }

    /// How long a group waits for more appends once its first is there (default zero: a group
    /// is what queued while the groups in flight were written, which adapts to the load by
    /// itself; a window of up to about a millisecond trades each grouped append's latency for
    /// bigger groups).
    #[must_use]
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.min(Duration::from_secs(1));
        self
    }

    /// How many groups may be written at once (at least 1), each on its own connection: the
    /// groups have `n` connections of their own, opened on the store pool's connect options
    /// (its `after_connect` hooks do not run on them) besides the store's pool, which appends
    /// written alone keep using.
    #[must_use]
    pub fn pipelines(mut self, n: usize) -> Self {
        self.pipelines = n.max(1);
        self
    }
}

/// What group commit did so far, for tests and tuning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Appends written one by one: nothing else was in flight, another append on their stream
    /// was being grouped or written, or their group's statement failed.
    pub alone: u64,
    /// Groups written by one statement.
    pub groups: u64,
    /// Appends in those groups.
    pub grouped: u64,
    /// Groups whose statement failed as a whole, their appends then written one by one.
    pub split: u64,
}

/// The group-commit state of a store (shared by its clones).
pub(crate) struct Grouper {
    config: GroupCommit,
    in_flight: AtomicUsize,
    sender: OnceLock<mpsc::UnboundedSender<Request>>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    alone: AtomicU64,
    groups: AtomicU64,
    grouped: AtomicU64,
    split: AtomicU64,
}

/// One append handed to the leader, its columns encoded by the caller.
struct Request {
    stream: StreamId,
    base: i64,
    event_ids: Vec<uuid::Uuid>,
    types: Vec<String>,
    versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    reply: oneshot::Sender<Outcome>,
}

/// The leader's answer for one append.
enum Outcome {
    Appended(AppendResult),
    /// Its condition failed: nothing of it was written.
    Lost,
    /// The group's statement failed as a whole, writing nothing: append it alone.
    Alone,
    Failed(StoreError),
}

/// Counts an append in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Grouper {
    pub(crate) fn new(config: GroupCommit) -> Self {
        Self {
            config,
            in_flight: AtomicUsize::new(0),
            sender: OnceLock::new(),
            stats: Arc::default(),
        }
    }

    /// The settings it was made with.
    pub(crate) fn config(&self) -> GroupCommit {
        self.config
    }

    pub(crate) fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            alone: self.stats.alone.load(Ordering::Relaxed),
            groups: self.stats.groups.load(Ordering::Relaxed),
            grouped: self.stats.grouped.load(Ordering::Relaxed),
            split: self.stats.split.load(Ordering::Relaxed),
        }
    }

    /// Inserts `events` at versions `base + 1..` if the stream is exactly at `base`: straight
    /// away when nothing else is in flight, otherwise in a group.
    pub(crate) async fn insert(
        &self,
        pool: &PgPool,
        sql: &Arc<Sql>,
        stream: &StreamId,
        base: u64,
        events: &[EventData],
    ) -> Result<AppendResult, Insert> {
        let others = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&self.in_flight);
        if others == 0 {
            self.stats.alone.fetch_add(1, Ordering::Relaxed);
            return insert_at(pool, sql, stream, base, events).await;
        }
        let ColumnArrays {
            ids,
            types,
            versions,
            payloads,
            metadata,
        } = ColumnArrays::of(events).map_err(Insert::Failed)?;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            stream: stream.clone(),
            base: to_i64(base).map_err(Insert::Failed)?,
            event_ids: ids,
            types: types.into_iter().map(str::to_owned).collect(),
            versions,
            payloads,
            metadata,
            reply,
        };
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(lead(
                group_pool(pool, self.config.pipelines),
                Arc::clone(sql),
                self.config,
                Arc::clone(&self.stats),
                receiver,
            ));
            sender
        });
        if sender.send(request).is_err() {
            // The leader is gone (its runtime shut down): nothing was handed over.
            return insert_at(pool, sql, stream, base, events).await;
        }
        match answer.await {
            Ok(Outcome::Appended(result)) => Ok(result),
            Ok(Outcome::Lost) => Err(Insert::Lost),
            Ok(Outcome::Failed(error)) => Err(Insert::Failed(error)),
            Ok(Outcome::Alone) => {
                self.stats.alone.fetch_add(1, Ordering::Relaxed);
                insert_at(pool, sql, stream, base, events).await
            }
            // The group's task ended without an answer: whether it was written is unknown, as
            // after a broken connection; a retry with the same ids is answered exactly.
            Err(_) => Err(Insert::Failed(StoreError::backend(
                "the group-commit task ended before answering: the append may or may not have been written",
            ))),
        }
    }
}

/// The connections groups are written on: `pipelines` of their own, on the store's connect
/// options, told to keep the generic plan of the group statement. Its arrays make PostgreSQL's
/// plan cache judge every custom plan cheaper, so without the setting the statement is planned
/// anew on each execution (0.11 ms, three times its execution for a group of three), for the
/// same plan. A generic plan is made once, maybe while the table is empty, and kept as it grows:
/// sequential scans are disabled on these connections so that it reads each stream's last
/// version through the stream index whatever the statistics said then (the plan has no other
/// scan of the table). Other statements never run on these connections.
fn group_pool(pool: &PgPool, pipelines: usize) -> PgPool {
    let options = (*pool.connect_options()).clone().options([
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_seqscan", "off"),
    ]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(pipelines).unwrap_or(u32::MAX))
        .min_connections(0)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .connect_lazy_with(options)
}

/// The leader: forms groups from the queue and writes each on a task of its own, at most
/// `pipelines` at once. Ends when the store (every sender) is gone.
async fn lead(
    pool: PgPool,
    sql: Arc<Sql>,
    config: GroupCommit,
    stats: Arc<Stats>,
    mut queue: mpsc::UnboundedReceiver<Request>,
) {
    let permits = Arc::new(Semaphore::new(config.pipelines));
    // The streams of the groups being written. A second append on one of them (in the group
    // being formed or in one in flight) would make the whole statement fail on the first one's
    // versions: it is written alone instead, racing as it would without group commit.
    let busy: Arc<std::sync::Mutex<HashSet<StreamId>>> = Arc::default();
    let take = |request: Request, group: &mut Vec<Request>, streams: &mut HashSet<StreamId>| {
        let in_flight = busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&request.stream);
        if in_flight || !streams.insert(request.stream.clone()) {
            let _ = request.reply.send(Outcome::Alone);
        } else {
            group.push(request);
        }
    };
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let (mut group, mut streams) = (Vec::new(), HashSet::new());
        take(first, &mut group, &mut streams);
        let deadline = tokio::time::Instant::now() + config.window;
        // Whether the leader yielded since it last took an append (see below).
        let mut yielded = false;
        while group.len() < config.max_appends {
            let next = match queue.try_recv() {
                Ok(request) => Some(request),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                // The writers answered by the last group are ready to run, each about to send
                // its next append, but the leader was woken first: it lets the tasks that are
                // ready run once before closing the group, and again after each yield that
                // brought an append. No timer: microseconds, not the timer's millisecond.
                Err(mpsc::error::TryRecvError::Empty) if config.window.is_zero() && !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(mpsc::error::TryRecvError::Empty) if config.window.is_zero() => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, queue.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            let Some(request) = next else { break };
            yielded = false;
            take(request, &mut group, &mut streams);
        }
        if group.is_empty() {
            continue;
        }
        busy.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(streams.iter().cloned());
        let (pool, sql, stats, busy) = (
            pool.clone(),
            Arc::clone(&sql),
            Arc::clone(&stats),
            Arc::clone(&busy),
        );
        tokio::spawn(async move {
            write_group(&pool, &sql, &stats, group).await;
            let mut busy = busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for stream in &streams {
                busy.remove(stream);
            }
            drop(permit);
        });
    }
}

/// Writes a group with one statement and answers each append.
async fn write_group(pool: &PgPool, sql: &Sql, stats: &Stats, group: Vec<Request>) {
    // Replies to appends whose caller went away are dropped: their outcome is in doubt for them
    // as after a cut, and a retry with the same ids is answered exactly.
    let total: usize = group.iter().map(|r| r.event_ids.len()).sum();
    let mut index = Vec::with_capacity(total);
    let mut aggregate_types = Vec::with_capacity(total);
    let mut aggregate_ids = Vec::with_capacity(total);
    let mut bases = Vec::with_capacity(total);
    let mut ords = Vec::with_capacity(total);
    let (mut ids, mut types, mut versions, mut payloads, mut metadata) = (
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
    );
    let mut requests = Vec::with_capacity(group.len());
    for (i, request) in group.into_iter().enumerate() {
        let Request {
            stream,
            base,
            event_ids,
            types: event_types,
            versions: schema_versions,
            payloads: event_payloads,
            metadata: event_metadata,
            reply,
        } = request;
        let count = event_ids.len();
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let i32_index = i as i32;
        for ord in 1..=count {
            index.push(i32_index);
            aggregate_types.push(stream.aggregate_type.clone());
            aggregate_ids.push(stream.aggregate_id.as_str().to_owned());
            bases.push(base);
            #[allow(clippy::cast_possible_wrap)]
            ords.push(ord as i64);
        }
        ids.extend(event_ids.iter().copied());
        types.extend(event_types);
        versions.extend(schema_versions);
        payloads.extend(event_payloads);
        metadata.extend(event_metadata);
        requests.push((stream, base, event_ids, reply));
    }
    let rows = sqlx::query(AssertSqlSafe(sql.insert_group.clone()))
        .bind(&index)
        .bind(&aggregate_types)
        .bind(&aggregate_ids)
        .bind(&bases)
        .bind(&ords)
        .bind(&ids)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metadata)
        .fetch_all(pool)
        .await;
    stats.groups.fetch_add(1, Ordering::Relaxed);
    stats
        .grouped
        .fetch_add(requests.len() as u64, Ordering::Relaxed);
    let rows = match rows {
        Ok(rows) => rows,
        Err(error @ sqlx::Error::Database(_)) if !crate::errors::is_outage(&error) => {
            // The server refused the statement (a unique violation from a writer outside the
            // group, say): nothing of it was written.
            stats.split.fetch_add(1, Ordering::Relaxed);
            for (_, _, _, reply) in requests {
                let _ = reply.send(Outcome::Alone);
            }
            return;
        }
        Err(error) => {
            // The connection broke or the server went away: written or not is unknown, for each
            // append as for a single one. Each caller gets the error as an outage (an I/O
            // error), to retry with the same ids.
            for (_, _, _, reply) in requests {
                let _ = reply.send(Outcome::Failed(in_doubt(&error)));
            }
            return;
        }
    };
    let index: HashMap<(&str, &str), usize> = requests
        .iter()
        .enumerate()
        .map(|(i, (stream, ..))| {
            (
                (stream.aggregate_type.as_str(), stream.aggregate_id.as_str()),
                i,
            )
        })
        .collect();
    match positions_of(&rows, &index) {
        Ok((mut positions, transaction, recorded_at)) => {
            for (i, (stream, base, event_ids, reply)) in requests.into_iter().enumerate() {
                let outcome = match positions.remove(&i) {
                    None => Outcome::Lost,
                    Some(mut written) => {
                        written.sort_unstable();
                        group_member(
                            &stream,
                            base,
                            &event_ids,
                            &written,
                            transaction,
                            recorded_at,
                        )
                    }
                };
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            for (_, _, _, reply) in requests {
                let _ = reply.send(Outcome::Failed(StoreError::backend(error.to_string())));
            }
        }
    }
}

/// The error each append of a group whose statement's outcome is unknown gets.
fn in_doubt(error: &sqlx::Error) -> StoreError {
    StoreError::backend(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("a group commit's statement did not complete: {error}"),
    ))
}

/// Each append's `(version, position)` pairs, by the append's index in the group.
type Written = HashMap<usize, Vec<(i64, i64)>>;

fn positions_of(
    rows: &[sqlx::postgres::PgRow],
    index: &HashMap<(&str, &str), usize>,
) -> Result<(Written, u64, chrono::DateTime<chrono::Utc>), StoreError> {
    let mut written: Written = HashMap::new();
    let (mut transaction, mut recorded_at) = (0, chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
    for row in rows {
        let aggregate_type: &str = row.try_get("aggregate_type").map_err(backend)?;
        let aggregate_id: &str = row.try_get("aggregate_id").map_err(backend)?;
        let version: i64 = row.try_get("version").map_err(backend)?;
        let position: i64 = row.try_get("global_position").map_err(backend)?;
        transaction = xid(row.try_get("transaction_text").map_err(backend)?)?;
        recorded_at = row.try_get("recorded_at").map_err(backend)?;
        let Some(&i) = index.get(&(aggregate_type, aggregate_id)) else {
            return Err(StoreError::backend(format!(
                "a group wrote to {aggregate_type}/{aggregate_id}, which none of its appends names"
            )));
        };
        written.entry(i).or_default().push((version, position));
    }
    Ok((written, transaction, recorded_at))
}

/// The outcome of one append of the group from its `(version, position)` pairs in version order.
fn group_member(
    stream: &StreamId,
    base: i64,
    event_ids: &[uuid::Uuid],
    written: &[(i64, i64)],
    transaction: u64,
    recorded_at: chrono::DateTime<chrono::Utc>,
) -> Outcome {
    if written.len() != event_ids.len() {
        return Outcome::Failed(StoreError::backend(format!(
            "{stream}: {} of {} events written by a group",
            written.len(),
            event_ids.len()
        )));
    }
    let positions: Vec<i64> = written.iter().map(|&(_, position)| position).collect();
    let result = to_u64(base).and_then(|base| {
        appended(
            stream,
            base,
            event_ids.iter().map(|&id| evently_core::EventId(id)),
            &positions,
            transaction,
            recorded_at,
        )
    });
    match result {
        Ok(result) => Outcome::Appended(result),
        Err(error) => Outcome::Failed(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{append_thousand, empty_schema};

    /// The group statement's plan as the group connections keep it: made once on an empty
    /// table, then used on one of thousands of rows. It reads each stream's last version
    /// through the stream index and never scans the table, then as before.
    #[tokio::test]
    async fn the_kept_group_plan_never_scans_the_table() {
        let store = empty_schema("unit_group_plan").await;
        store.migrate().await.unwrap();
        let pool = group_pool(store.pool(), 1);
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "PREPARE grouped(int4[], text[], text[], int8[], int8[], uuid[], text[], int4[], text[], text[]) AS {}",
            store.sql.insert_group
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let explain = "EXPLAIN (FORMAT JSON) EXECUTE grouped('{0}', '{thing}', '{t0}', '{0}', '{1}', \
                       ARRAY[gen_random_uuid()], '{Happened}', '{1}', '{\"{}\"}', '{\"{}\"}')";
        let mut plans = Vec::new();
        for n in 0..4u32 {
            let plan: serde_json::Value = sqlx::query(explain)
                .fetch_one(&mut *conn)
                .await
                .unwrap()
                .get(0);
            plans.push((n * 1_000, plan.to_string()));
            append_thousand(&store, n).await;
        }
        for (events, plan) in plans {
            assert!(
                !plan.contains("Seq Scan"),
                "at {events} events the group statement scans the table: {plan}"
            );
            assert!(
                plan.contains("events_stream_version_key"),
                "at {events} events the group statement does not read the stream index: {plan}"
            );
        }
    }
}
