//! Which server a store's transaction ids belong to: the check that refuses a store restored or
//! replicated into another server, and the rebase that repairs it.
//!
//! Events are ordered by the id of the transaction that wrote them (`pg_current_xact_id()`), and
//! readers only read below the oldest transaction still running. Those ids are one server's
//! counter. `pg_dump`/`pg_restore` and logical replication copy them into a server whose counter
//! may be far lower: there the restored events are never readable, new appends are ordered
//! before them, and a reader resuming from its checkpoint skips the new ones, all without an
//! error. So the store records the server it was written on (`store_server`), and before its
//! first global read or append on each new connection it checks that the stored ids are below the
//! server's next one and that the server is the recorded one. [`PostgresEventStore::rebase`]
//! re-stamps the ids into this server's range, keeping the order, and moves every checkpoint with
//! them.

use std::sync::atomic::Ordering;

use evently_core::{Checkpoint, MoveEvidence, StoreError, StoreMoved};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::PostgresEventStore;
use crate::errors::backend;
use crate::rows::{to_u64, xid};
use crate::sql::Sql;
use crate::tx::{Detached, Transaction};

/// What a check of the server found.
enum Found {
    /// The ids belong to this server.
    Same,
    /// The schema is not migrated (yet): nothing to check; the statement that follows says so.
    NotMigrated,
    /// The store was moved.
    Moved(MoveEvidence),
}

/// The server's state as the check reads it.
struct State {
    highest: Option<u64>,
    next: u64,
    recorded: Option<i64>,
    current: Option<i64>,
}

impl State {
    fn evidence(&self) -> Option<MoveEvidence> {
        if let Some(highest) = self.highest
            && highest >= self.next
        {
            return Some(MoveEvidence::TransactionIdsAhead {
                highest,
                next: self.next,
            });
        }
        match (self.recorded, self.current) {
            (Some(recorded), Some(current)) if recorded != current => {
                Some(MoveEvidence::ServerChanged {
                    recorded: recorded.to_string(),
                    current: current.to_string(),
                })
            }
            _ => None,
        }
    }
}

async fn state(conn: &mut PgConnection, sql: &Sql) -> Result<Option<State>, StoreError> {
    let s = &sql.quoted_schema;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT (SELECT max(transaction_id) FROM {s}.events)::text AS highest, \
                pg_snapshot_xmax(pg_current_snapshot())::text AS next, \
                (SELECT system_identifier FROM {s}.store_server) AS recorded, \
                {s}.cqrs_system_identifier() AS current"
    )))
    .fetch_one(&mut *conn)
    .await;
    let row = match row {
        Ok(row) => row,
        Err(error) if not_migrated(&error) => return Ok(None),
        Err(error) => return Err(backend(error)),
    };
    let highest: Option<String> = row.try_get("highest").map_err(backend)?;
    let next: String = row.try_get("next").map_err(backend)?;
    Ok(Some(State {
        highest: highest.map(|h| xid(&h)).transpose()?,
        next: xid(&next)?,
        recorded: row.try_get("recorded").map_err(backend)?,
        current: row.try_get("current").map_err(backend)?,
    }))
}

/// undefined_table, undefined_function, invalid_schema_name: the schema is not migrated to this
/// version.
fn not_migrated(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| matches!(&*c, "42P01" | "42883" | "3F000")))
}

async fn check(conn: &mut PgConnection, sql: &Sql) -> Result<Found, StoreError> {
    Ok(match state(conn, sql).await? {
        None => Found::NotMigrated,
        Some(state) => state.evidence().map_or(Found::Same, Found::Moved),
    })
}

/// What [`PostgresEventStore::rebase`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rebased {
    /// The events in the store.
    pub events: u64,
    /// Whether their transaction ids were re-stamped (only when they were at or past the
    /// server's next one).
    pub restamped: bool,
    /// How many distinct transaction ids they carry after the rebase (events whose order the
    /// global position alone keeps share one).
    pub transactions: u64,
    /// Transaction ids the server ran empty to make room below its counter.
    pub burned: u64,
    /// Checkpoints (projections, relays) moved with the events.
    pub checkpoints: u64,
    /// The server identity recorded before.
    pub previous_server: Option<i64>,
    /// The server identity recorded now.
    pub server: Option<i64>,
}

impl Rebased {
    /// Whether anything changed.
    #[must_use]
    pub fn changed(&self) -> bool {
        self.restamped || self.previous_server != self.server
    }
}

/// How many times the rebase makes room and tries again when appends come between.
const REBASE_ATTEMPTS: usize = 5;

impl PostgresEventStore {
    /// Refuses a global read or append on a store moved to another server (checked once per
    /// new connection of a pool the store opened; once per store on a pool given to
    /// [`PostgresEventStore::new`]).
    pub(crate) async fn same_server(&self) -> Result<(), StoreError> {
        if self.server.is_checked() {
            return Ok(());
        }
        let mut conn = self.pool().acquire().await.map_err(backend)?;
        let connections = self.server.connections.load(Ordering::Acquire);
        match check(&mut conn, &self.sql).await? {
            Found::Same => {
                self.server.checked.fetch_max(connections, Ordering::AcqRel);
                Ok(())
            }
            Found::NotMigrated => Ok(()),
            Found::Moved(evidence) => Err(self.moved(evidence)),
        }
    }

    fn moved(&self, evidence: MoveEvidence) -> StoreError {
        StoreError::Moved(Box::new(self.report(evidence)))
    }

    /// What was found, with what to do about it.
    fn report(&self, evidence: MoveEvidence) -> StoreMoved {
        let remedy = match evidence {
            MoveEvidence::CheckpointAhead { .. } => {
                "restart the reader: it reloads its stored checkpoint, which the rebase moved"
                    .to_owned()
            }
            _ => format!(
                "stop the writers and run `cqrs store rebase --schema {}` \
                 (PostgresEventStore::rebase), see docs/operations.md",
                self.schema()
            ),
        };
        StoreMoved {
            store: format!("schema `{}`", self.schema()),
            evidence,
            remedy,
        }
    }

    /// A read that found nothing after `after`: an error if `after` is past every transaction
    /// the server has run (a position from before a restore or a rebase, which would otherwise
    /// read nothing, for ever).
    pub(crate) async fn nothing_after(&self, after: Checkpoint) -> Result<(), StoreError> {
        if after.transaction == 0 {
            return Ok(());
        }
        let next: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
                .fetch_one(self.pool())
                .await
                .map_err(backend)?;
        let next = xid(&next)?;
        if after.transaction >= next {
            return Err(self.moved(MoveEvidence::CheckpointAhead {
                checkpoint: after,
                next,
            }));
        }
        Ok(())
    }

    /// Whether this store was moved to another server: `None` when its transaction ids belong to
    /// the server it is on (or the schema is not migrated), else what was found. Reads and
    /// appends answer [`StoreError::Moved`] with the same evidence.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn check_server(&self) -> Result<Option<StoreMoved>, StoreError> {
        let mut conn = self.pool().acquire().await.map_err(backend)?;
        Ok(match check(&mut conn, &self.sql).await? {
            Found::Same | Found::NotMigrated => None,
            Found::Moved(evidence) => Some(self.report(evidence)),
        })
    }

    /// Makes a store restored or replicated into this server readable and writable again,
    /// exactly where it was: when its events carry transaction ids at or past the server's next
    /// one, they are re-stamped below it in one transaction, in the same global order, and every
    /// checkpoint (projections, relays) moves with them, so each reader resumes after the same
    /// event; then this server is recorded as the store's. A store whose ids are already below
    /// the counter (e.g. after `pg_upgrade`, which keeps the counter) only has the server
    /// recorded. Running it again does nothing.
    ///
    /// Stop the writers first (appends wait for it, and are refused until it ran). Readers
    /// running across it get [`MoveEvidence::CheckpointAhead`] if they kept a position from
    /// before, and resume from the moved checkpoint when restarted; the store's own workers and
    /// relays reload it on that error.
    ///
    /// Where the server's counter is lower than the number of ids to re-stamp (a freshly
    /// created server), it first runs that many empty transactions (asynchronous commit: about
    /// 100,000 a second).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails (nothing changed: it can run again).
    pub async fn rebase(&self) -> Result<Rebased, StoreError> {
        let mut burned = 0;
        for _ in 0..REBASE_ATTEMPTS {
            match self.rebase_once(burned).await? {
                Attempt::Done(rebased) => {
                    self.server.checked.store(0, Ordering::Release);
                    return Ok(rebased);
                }
                // Ids 1..=ids must be below every id handed out from now on: make room, then
                // again (appends may come between).
                Attempt::NeedsRoom { ids, next } => {
                    let room = ids + 2 - next;
                    burn(self, room).await?;
                    burned += room;
                }
            }
        }
        Err(StoreError::backend(format!(
            "schema `{}`: events kept being appended while rebasing ({REBASE_ATTEMPTS} tries): \
             stop the writers and run it again",
            self.schema()
        )))
    }

    /// One try, under an exclusive lock of the events and checkpoints.
    async fn rebase_once(&self, burned: u64) -> Result<Attempt, StoreError> {
        let s = &self.sql.quoted_schema;
        let mut tx = Transaction::begin(self.pool()).await.map_err(backend)?;
        let outcome = async {
            let locked = sqlx::query(AssertSqlSafe(format!(
                "LOCK TABLE {s}.events, {s}.projection_checkpoints, {s}.store_server \
                 IN ACCESS EXCLUSIVE MODE"
            )))
            .execute(&mut *tx)
            .await;
            let state = match locked {
                Ok(_) => state(&mut tx, &self.sql).await?,
                Err(error) if not_migrated(&error) => None,
                Err(error) => return Err(backend(error)),
            };
            let Some(state) = state else {
                return Err(StoreError::InvalidInput(format!(
                    "schema `{}` is not migrated: run `cqrs migrate` first",
                    self.schema()
                )));
            };
            let events: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {s}.events")))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(backend)?;
            let mut rebased = Rebased {
                events: to_u64(events)?,
                restamped: false,
                transactions: 0,
                burned,
                checkpoints: 0,
                previous_server: state.recorded,
                server: state.current.or(state.recorded),
            };
            if state.highest.is_some_and(|highest| highest >= state.next) {
                match restamp(&mut tx, s, state.next).await? {
                    Restamp::Done { ids, checkpoints } => {
                        rebased.restamped = true;
                        rebased.transactions = ids;
                        rebased.checkpoints = checkpoints;
                    }
                    Restamp::NeedsRoom { ids } => {
                        return Ok(Attempt::NeedsRoom {
                            ids,
                            next: state.next,
                        });
                    }
                }
            }
            if rebased.server != rebased.previous_server {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {s}.store_server SET system_identifier = $1, recorded_at = now()"
                )))
                .bind(rebased.server)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
            Ok(Attempt::Done(rebased))
        }
        .await;
        tx.end(outcome, backend).await
    }
}

/// How one try of a rebase ended.
enum Attempt {
    Done(Rebased),
    /// The ids `1..=ids` the order needs are not all below the server's `next` one.
    NeedsRoom {
        ids: u64,
        next: u64,
    },
}

/// How a re-stamping ended.
enum Restamp {
    /// The events carry ids `1..=ids`; `checkpoints` were moved.
    Done { ids: u64, checkpoints: u64 },
    /// Nothing changed: the order needs ids `1..=ids`, not all below the server's next one.
    NeedsRoom { ids: u64 },
}

/// Runs `n` empty transactions, each taking a transaction id (asynchronous commit), so the
/// server's counter passes the ids a rebase gives.
async fn burn(store: &PostgresEventStore, n: u64) -> Result<(), StoreError> {
    tracing::info!(
        schema = store.schema(),
        transactions = n,
        "rebase: advancing the server's transaction counter"
    );
    let mut conn = Detached::acquire(store.pool()).await.map_err(backend)?;
    // A DO block that commits must be sent alone, outside a transaction block.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DO $$ BEGIN FOR i IN 1..{n} LOOP \
           PERFORM set_config('synchronous_commit', 'off', true); \
           PERFORM pg_current_xact_id(); \
           COMMIT; \
         END LOOP; END $$"
    )))
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    // Finished: the connection goes back to the pool.
    conn.release();
    Ok(())
}

/// Re-stamps the events with ids `1..=k` in their global order (a new id wherever, walking the
/// order, the global position goes down), and moves each checkpoint to the new place of the last
/// event at or before it; unless `next` leaves no room for `k`.
async fn restamp(conn: &mut PgConnection, s: &str, next: u64) -> Result<Restamp, StoreError> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TEMPORARY TABLE cqrs_rebase ON COMMIT DROP AS \
           SELECT global_position, old_xid, \
                  sum(starts) OVER (ORDER BY old_xid, global_position ROWS UNBOUNDED PRECEDING)::bigint AS new_xid \
           FROM (SELECT global_position, transaction_id AS old_xid, \
                        CASE WHEN global_position > lag(global_position) OVER (ORDER BY transaction_id, global_position) \
                             THEN 0 ELSE 1 END AS starts \
                 FROM {s}.events) ordered; \
         CREATE INDEX ON cqrs_rebase (old_xid, global_position); \
         ANALYZE cqrs_rebase"
    )))
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    let k: Option<i64> = sqlx::query_scalar("SELECT max(new_xid) FROM cqrs_rebase")
        .fetch_one(&mut *conn)
        .await
        .map_err(backend)?;
    let k = to_u64(k.unwrap_or(0))?;
    if next < k + 2 {
        return Ok(Restamp::NeedsRoom { ids: k });
    }
    let checkpoints = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.projection_checkpoints c \
         SET transaction_id = coalesce(m.new_xid, 0)::text::xid8, \
             global_position = coalesce(m.global_position, 0) \
         FROM {s}.projection_checkpoints before \
         LEFT JOIN LATERAL ( \
           SELECT new_xid, global_position FROM cqrs_rebase r \
           WHERE (r.old_xid, r.global_position) <= (before.transaction_id, before.global_position) \
           ORDER BY r.old_xid DESC, r.global_position DESC LIMIT 1) m ON true \
         WHERE c.projection = before.projection \
           AND (before.transaction_id, before.global_position) <> ('0'::xid8, 0)"
    )))
    .execute(&mut *conn)
    .await
    .map_err(backend)?
    .rows_affected();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.events e SET transaction_id = r.new_xid::text::xid8 \
         FROM cqrs_rebase r WHERE e.global_position = r.global_position"
    )))
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    sqlx::raw_sql("DROP TABLE cqrs_rebase")
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(Restamp::Done {
        ids: k,
        checkpoints,
    })
}
