//! The inbox: which events a consumer has applied, claimed in the transaction of the effect.

use evently_core::StoreError;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::PostgresEventStore;
use crate::errors::backend;

/// The record of what a consumer has applied (the `inbox` table): claim an event id in the
/// transaction of its effect, and a redelivery of the same event finds it claimed.
#[derive(Debug, Clone)]
pub struct Inbox {
    claim: String,
}

impl Inbox {
    /// The inbox in `store`'s schema.
    #[must_use]
    pub fn new(store: &PostgresEventStore) -> Self {
        let s = &store.sql.quoted_schema;
        Self {
            claim: format!(
                "INSERT INTO {s}.inbox (consumer, event_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer, event_id, tenant_id) DO NOTHING"
            ),
        }
    }

    /// Records that `consumer` applies `event_id`, in `conn`'s transaction: `false` when it already
    /// did (a redelivery: skip the effect). A concurrent claim of the same id waits for the first
    /// transaction and then gets `false` if it committed.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: evently_core::EventId,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.claim.clone()))
            .bind(consumer)
            .bind(event_id.0)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }
}
