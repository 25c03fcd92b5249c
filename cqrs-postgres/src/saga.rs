//! The PostgreSQL saga store: one row per instance, saved with the version it was loaded at, and
//! claimed through a lease with `FOR UPDATE SKIP LOCKED`, so two orchestrators never run one
//! instance at once and never both save the same move.

use std::time::Duration;

use cqrs_core::saga::{SagaError, SagaId, SagaState, SagaStatus, SagaStore};
use sqlx::{AssertSqlSafe, Row};

use crate::PostgresEventStore;
use crate::rows::to_i64;

/// Saga instances in the store's schema (`migrate()` creates the table).
#[derive(Debug, Clone)]
pub struct PostgresSagaStore {
    store: PostgresEventStore,
}

impl PostgresSagaStore {
    /// The saga store of `store`'s schema.
    #[must_use]
    pub fn new(store: PostgresEventStore) -> Self {
        Self { store }
    }

    fn table(&self) -> String {
        format!("{}.saga_instances", self.store.sql.quoted_schema)
    }
}

fn backend(error: impl std::fmt::Display) -> SagaError {
    SagaError::Backend(error.to_string())
}

fn status_text(status: SagaStatus) -> &'static str {
    match status {
        SagaStatus::Running => "running",
        SagaStatus::Compensating => "compensating",
        SagaStatus::Completed => "completed",
        SagaStatus::Compensated => "compensated",
        SagaStatus::Failed => "failed",
    }
}

fn lease_seconds(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

/// A row's `state` column as a saga state; a row that does not read is an error naming it.
fn state_of(row: &sqlx::postgres::PgRow) -> Result<SagaState, SagaError> {
    let id: uuid::Uuid = row.try_get("id").map_err(backend)?;
    let state: sqlx::types::Json<SagaState> =
        row.try_get("state").map_err(|e| SagaError::Data {
            id: SagaId(id),
            saga: row.try_get::<String, _>("saga").unwrap_or_default(),
            message: format!("stored state does not read: {e}"),
        })?;
    Ok(state.0)
}

#[async_trait::async_trait]
impl SagaStore for PostgresSagaStore {
    async fn create(
        &self,
        state: &SagaState,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, SagaError> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (id, saga, status, state, version, retry_at, lease_owner, lease_until, started_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8), $9, $10) \
             ON CONFLICT (id) DO NOTHING",
            self.table()
        )))
        .bind(state.id.0)
        .bind(&state.saga)
        .bind(status_text(state.status))
        .bind(sqlx::types::Json(state))
        .bind(to_i64(state.version).map_err(backend)?)
        .bind(state.retry_at)
        .bind(owner)
        .bind(lease_seconds(lease))
        .bind(state.started_at)
        .bind(state.updated_at)
        .execute(self.store.pool())
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn save(&self, state: &SagaState) -> Result<(), SagaError> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET status = $2, state = $3, version = $4, retry_at = $5, updated_at = $6 \
             WHERE id = $1 AND version = $4 - 1",
            self.table()
        )))
        .bind(state.id.0)
        .bind(status_text(state.status))
        .bind(sqlx::types::Json(state))
        .bind(to_i64(state.version).map_err(backend)?)
        .bind(state.retry_at)
        .bind(state.updated_at)
        .execute(self.store.pool())
        .await
        .map_err(backend)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        match self.load(state.id).await? {
            Some(_) => Err(SagaError::Conflict {
                id: state.id,
                expected: state.version.saturating_sub(1),
            }),
            None => Err(SagaError::NotFound(state.id)),
        }
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaState>, SagaError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, saga, state FROM {} WHERE id = $1",
            self.table()
        )))
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
        let table = self.table();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET lease_owner = $2, lease_until = now() + make_interval(secs => $3) \
             WHERE id IN ( \
               SELECT id FROM {table} \
               WHERE saga = $1 \
                 AND (status IN ('running', 'compensating') \
                      OR (status = 'failed' AND (retry_at IS NULL OR retry_at <= now()))) \
                 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= now()) \
               ORDER BY started_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING id, saga, state, started_at"
        )))
        .bind(saga)
        .bind(owner)
        .bind(lease_seconds(lease))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.store.pool())
        .await
        .map_err(backend)?;
        let mut claimed = rows.iter().map(state_of).collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|s| s.started_at);
        Ok(claimed)
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2",
            self.table()
        )))
        .bind(id.0)
        .bind(owner)
        .execute(self.store.pool())
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn list(
        &self,
        saga: Option<&str>,
        status: Option<SagaStatus>,
    ) -> Result<Vec<SagaState>, SagaError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, saga, state FROM {} \
             WHERE ($1::text IS NULL OR saga = $1) AND ($2::text IS NULL OR status = $2) \
             ORDER BY started_at, id",
            self.table()
        )))
        .bind(saga)
        .bind(status.map(status_text))
        .fetch_all(self.store.pool())
        .await
        .map_err(backend)?;
        rows.iter().map(state_of).collect()
    }
}
