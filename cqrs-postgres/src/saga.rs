//! The PostgreSQL saga store: one row per instance, saved with the version it was loaded at, and
//! claimed through a lease with `FOR UPDATE SKIP LOCKED`, so two orchestrators never run one
//! instance at once and never both save the same move.

use std::sync::Arc;
use std::time::Duration;

use evently_core::saga::{Quarantined, SagaError, SagaId, SagaState, SagaStatus, SagaStore};
use sqlx::{AssertSqlSafe, Row};

use crate::PostgresEventStore;

/// Saga instances in the store's schema (`migrate()` creates the table).
#[derive(Debug, Clone)]
pub struct PostgresSagaStore {
    store: PostgresEventStore,
    sql: Arc<SagaSql>,
}

impl PostgresSagaStore {
    /// The saga store of `store`'s schema.
    #[must_use]
    pub fn new(store: PostgresEventStore) -> Self {
        let table = format!("{}.saga_instances", store.sql.quoted_schema);
        Self {
            sql: Arc::new(SagaSql::new(&table)),
            store,
        }
    }
}

fn backend(error: sqlx::Error) -> SagaError {
    SagaError::backend(error)
}

fn lease_seconds(lease: Duration) -> f64 {
    lease.min(evently_core::saga::MAX_DURATION).as_secs_f64()
}

fn to_i64(n: u64) -> Result<i64, SagaError> {
    i64::try_from(n).map_err(|_| SagaError::InvalidInput(format!("{n} does not fit a bigint")))
}

/// A row's `state` column as a saga state (with the row's lease epoch); a row that does not read
/// is [`SagaError::Data`] naming it.
fn state_of(row: &sqlx::postgres::PgRow) -> Result<SagaState, SagaError> {
    let id: uuid::Uuid = row.try_get("id").map_err(backend)?;
    let state: sqlx::types::Json<SagaState> =
        row.try_get("state").map_err(|e| SagaError::Data {
            id: SagaId(id),
            saga: row.try_get::<String, _>("saga").unwrap_or_default(),
            message: format!("stored state does not read: {e}"),
        })?;
    let mut state = state.0;
    let epoch: i64 = row.try_get("lease_epoch").map_err(backend)?;
    state.lease_epoch = u64::try_from(epoch).unwrap_or(0);
    // The status column is the truth for an instance set aside.
    let status: String = row.try_get("status").map_err(backend)?;
    if status == SagaStatus::Unreadable.as_str() {
        state.status = SagaStatus::Unreadable;
        state.error = row.try_get("quarantine_error").map_err(backend)?;
    }
    Ok(state)
}

/// The statements of the saga store, with the table's name put in once.
#[derive(Debug)]
struct SagaSql {
    create: String,
    save: String,
    save_holder: String,
    renew: String,
    load: String,
    claim: String,
    release: String,
    quarantine: String,
    retry: String,
    abandon: String,
    quarantined: String,
    list: String,
    exists: String,
}

impl SagaSql {
    fn new(table: &str) -> Self {
        Self {
            create: format!(
                "INSERT INTO {table} (id, saga, status, state, version, retry_at, lease_owner, lease_until, lease_epoch, \
                             started_by, started_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp() + make_interval(secs => $8), 1, $9, $10, $11) \
             ON CONFLICT DO NOTHING"
            ),
            save: format!(
                "UPDATE {table} SET status = $2, state = $3, version = $4, retry_at = $5, updated_at = $6 \
             WHERE id = $1 AND version = $4 - 1 AND status <> 'unreadable' \
               AND ($7::text IS NULL OR (lease_owner = $7 AND lease_epoch = $8 AND lease_until >= clock_timestamp()))"
            ),
            save_holder: format!(
                "SELECT version, lease_owner, lease_epoch, COALESCE(lease_until >= clock_timestamp(), false) \
             FROM {table} WHERE id = $1"
            ),
            renew: format!(
                "UPDATE {table} SET lease_until = clock_timestamp() + make_interval(secs => $4) \
             WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3 AND lease_until >= clock_timestamp()"
            ),
            load: format!("SELECT {COLUMNS} FROM {table} WHERE id = $1"),
            claim: format!(
                "UPDATE {table} SET lease_owner = $2, lease_until = clock_timestamp() + make_interval(secs => $3), \
                                lease_epoch = lease_epoch + 1 \
             WHERE id IN ( \
               SELECT id FROM {table} \
               WHERE saga = $1 \
                 AND (status IN ('running', 'compensating') \
                      OR (status = 'failed' AND (retry_at IS NULL OR retry_at <= now()))) \
                 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= clock_timestamp()) \
               ORDER BY started_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING {COLUMNS}, started_at"
            ),
            release: format!(
                "UPDATE {table} SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2"
            ),
            quarantine: format!(
                "UPDATE {table} SET status = 'unreadable', quarantine_error = $2, quarantined_at = now(), \
                           lease_owner = NULL, lease_until = NULL \
             WHERE id = $1"
            ),
            retry: format!(
                "UPDATE {table} SET \
               status = CASE WHEN status <> 'unreadable' THEN status \
                             WHEN state->>'status' IN ('running', 'compensating', 'failed') THEN state->>'status' \
                             ELSE 'running' END, \
               retry_at = NULL, quarantine_error = NULL, quarantined_at = NULL \
             WHERE id = $1 AND status IN ('unreadable', 'failed') \
             RETURNING true"
            ),
            abandon: format!(
                "UPDATE {table} SET status = 'abandoned', lease_owner = NULL, lease_until = NULL, \
                           version = version + 1, updated_at = now() \
             WHERE id = $1 AND status NOT IN ('completed', 'compensated', 'abandoned') \
             RETURNING true"
            ),
            quarantined: format!(
                "SELECT id, saga, quarantine_error, quarantined_at FROM {table} \
                 WHERE status = 'unreadable' AND ($1::text IS NULL OR saga = $1) \
                 ORDER BY quarantined_at, id"
            ),
            list: format!(
                "SELECT {COLUMNS} FROM {table} \
             WHERE ($1::text IS NULL OR saga = $1) AND ($2::text IS NULL OR status = $2) \
             ORDER BY started_at, id"
            ),
            exists: format!("SELECT 1 FROM {table} WHERE id = $1"),
        }
    }
}

/// The columns every read of an instance selects.
const COLUMNS: &str = "id, saga, status, state, lease_epoch, quarantine_error";

#[async_trait::async_trait]
impl SagaStore for PostgresSagaStore {
    async fn create(
        &self,
        state: &SagaState,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, SagaError> {
        // No conflict target: a row with this id, or of this saga started by the same event,
        // makes it a no-op.
        let done = sqlx::query(AssertSqlSafe(self.sql.create.clone()))
            .bind(state.id.0)
            .bind(&state.saga)
            .bind(state.status.as_str())
            .bind(sqlx::types::Json(state))
            .bind(to_i64(state.version)?)
            .bind(state.retry_at)
            .bind(owner)
            .bind(lease_seconds(lease))
            .bind(state.started_by)
            .bind(state.started_at)
            .bind(state.updated_at)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn save(&self, state: &SagaState, fence: Option<&str>) -> Result<(), SagaError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.save.clone()))
            .bind(state.id.0)
            .bind(state.status.as_str())
            .bind(sqlx::types::Json(state))
            .bind(to_i64(state.version)?)
            .bind(state.retry_at)
            .bind(state.updated_at)
            .bind(fence)
            .bind(to_i64(state.lease_epoch)?)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let row: Option<(i64, Option<String>, i64, bool)> =
            sqlx::query_as(AssertSqlSafe(self.sql.save_holder.clone()))
                .bind(state.id.0)
                .fetch_optional(self.store.pool())
                .await
                .map_err(backend)?;
        let Some((_, holder, epoch, live)) = row else {
            return Err(SagaError::NotFound(state.id));
        };
        if let Some(owner) = fence {
            let holds = holder.as_deref() == Some(owner)
                && u64::try_from(epoch).ok() == Some(state.lease_epoch)
                && live;
            if !holds {
                return Err(SagaError::LeaseLost {
                    id: state.id,
                    owner: owner.to_owned(),
                    epoch: state.lease_epoch,
                });
            }
        }
        Err(SagaError::Conflict {
            id: state.id,
            expected: state.version.saturating_sub(1),
        })
    }

    async fn renew(
        &self,
        id: SagaId,
        owner: &str,
        epoch: u64,
        lease: Duration,
    ) -> Result<bool, SagaError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.renew.clone()))
            .bind(id.0)
            .bind(owner)
            .bind(to_i64(epoch)?)
            .bind(lease_seconds(lease))
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaState>, SagaError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.load.clone()))
            .bind(id.0)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        row.as_ref().map(state_of).transpose()
    }

    async fn claim(
        &self,
        saga: &str,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaState>, SagaError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(saga)
            .bind(owner)
            .bind(lease_seconds(lease))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.store.pool())
            .await
            .map_err(backend)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match state_of(row) {
                Ok(state) => claimed.push(state),
                // One row that does not read is set aside; the others are claimed.
                Err(error @ SagaError::Data { id, .. }) => {
                    tracing::error!(saga, %id, %error, "saga instance set aside as unreadable");
                    self.quarantine(id, &error.to_string()).await?;
                }
                Err(error) => return Err(error),
            }
        }
        claimed.sort_by_key(|s| s.started_at);
        Ok(claimed)
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        sqlx::query(AssertSqlSafe(self.sql.release.clone()))
            .bind(id.0)
            .bind(owner)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn quarantine(&self, id: SagaId, error: &str) -> Result<(), SagaError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.quarantine.clone()))
            .bind(id.0)
            .bind(error)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(SagaError::NotFound(id))
        }
    }

    async fn retry(&self, id: SagaId) -> Result<bool, SagaError> {
        // An unreadable instance goes back to the status its state holds (running when even that
        // does not read: the next claim sets it aside again, with the reason, if it still fails).
        self.update_one(id, &self.sql.retry).await
    }

    async fn abandon(&self, id: SagaId) -> Result<bool, SagaError> {
        self.update_one(id, &self.sql.abandon).await
    }

    async fn quarantined(&self, saga: Option<&str>) -> Result<Vec<Quarantined>, SagaError> {
        let rows: Vec<(
            uuid::Uuid,
            String,
            Option<String>,
            Option<chrono::DateTime<chrono::Utc>>,
        )> = sqlx::query_as(AssertSqlSafe(self.sql.quarantined.clone()))
            .bind(saga)
            .fetch_all(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|(id, saga, error, at)| Quarantined {
                id: SagaId(id),
                saga,
                error: error.unwrap_or_default(),
                at: at.unwrap_or_default(),
            })
            .collect())
    }

    async fn list(
        &self,
        saga: Option<&str>,
        status: Option<SagaStatus>,
    ) -> Result<Vec<SagaState>, SagaError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.list.clone()))
            .bind(saga)
            .bind(status.map(SagaStatus::as_str))
            .fetch_all(self.store.pool())
            .await
            .map_err(backend)?;
        // Rows whose state does not read are listed by `quarantined`.
        Ok(rows.iter().filter_map(|row| state_of(row).ok()).collect())
    }
}

impl PostgresSagaStore {
    /// Runs `sql` (an `UPDATE .. WHERE id = $1 AND <condition> RETURNING true`) on instance `id`:
    /// `true` when it changed it, `false` when the condition did not hold, [`SagaError::NotFound`]
    /// when there is no such instance.
    async fn update_one(&self, id: SagaId, sql: &str) -> Result<bool, SagaError> {
        let row: Option<(bool,)> = sqlx::query_as(AssertSqlSafe(sql.to_owned()))
            .bind(id.0)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        if row.is_some() {
            return Ok(true);
        }
        self.exists(id).await.map(|()| false)
    }

    /// `Ok` when instance `id` exists, else [`SagaError::NotFound`].
    async fn exists(&self, id: SagaId) -> Result<(), SagaError> {
        let found: Option<(i32,)> = sqlx::query_as(AssertSqlSafe(self.sql.exists.clone()))
            .bind(id.0)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        found.map(drop).ok_or(SagaError::NotFound(id))
    }
}
