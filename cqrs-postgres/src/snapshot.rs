//! Snapshots: one row per stream, the latest wins.

use evently_core::personal;
use evently_core::store::{Snapshot, SnapshotStore};
use evently_core::{StoreError, StreamId};
use sqlx::{AssertSqlSafe, Row};

use crate::errors::backend;
use crate::rows::{to_i64, to_u64};
use crate::store::PostgresEventStore;

#[async_trait::async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        self.refuse_all_tenants()?;
        let row = sqlx::query(AssertSqlSafe(self.sql.load_snapshot.clone()))
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        let snapshot = row
            .map(|row| {
                let schema_version: i32 = row.try_get("schema_version").map_err(backend)?;
                Ok::<_, StoreError>(Snapshot {
                    stream: stream.clone(),
                    version: to_u64(row.try_get("version").map_err(backend)?)?,
                    schema_version: u32::try_from(schema_version).map_err(|_| {
                        StoreError::backend(format!("snapshot schema version {schema_version}"))
                    })?,
                    state: row.try_get("state").map_err(backend)?,
                })
            })
            .transpose()?;
        let Some(mut snapshot) = snapshot else {
            return Ok(None);
        };
        // A snapshot sealed for its subjects: unreadable once one is forgotten, and then absent
        // (the aggregate is rebuilt from its events).
        if snapshot.state.get(personal::STATE_ENVELOPE).is_some() {
            let keys = self.key_store();
            match personal::open_state(std::mem::take(&mut snapshot.state), &*keys)
                .await
                .map_err(StoreError::backend)?
            {
                Some(state) => snapshot.state = state,
                None => return Ok(None),
            }
        }
        Ok(Some(snapshot))
    }

    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<(), StoreError> {
        self.refuse_all_tenants()?;
        // The subjects whose personal data the stream's events hold: the state may hold it too.
        let subjects = self
            .personal_subjects(&snapshot.stream, snapshot.version)
            .await?;
        if let Some(subjects) = subjects.as_ref().filter(|s| !s.is_empty()) {
            let keys = self.key_store();
            snapshot.state =
                personal::seal_state(std::mem::take(&mut snapshot.state), subjects, &*keys)
                    .await
                    .map_err(StoreError::backend)?;
        }
        let schema_version = i32::try_from(snapshot.schema_version).map_err(|_| {
            StoreError::InvalidInput(format!(
                "snapshot schema version {}",
                snapshot.schema_version
            ))
        })?;
        sqlx::query(AssertSqlSafe(self.sql.save_snapshot.clone()))
            .bind(&snapshot.stream.aggregate_type)
            .bind(snapshot.stream.aggregate_id.as_str())
            .bind(to_i64(snapshot.version)?)
            .bind(schema_version)
            .bind(&snapshot.state)
            .bind(subjects)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}
