//! The side-effect gate read in a handler's transaction.

use evently_core::Checkpoint;
use evently_core::projection::Projection;
use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use crate::PostgresEventStore;

/// Says, inside a handler's transaction, whether this version runs an event's side effects (see
/// the [module](super) for the rule). Keep one in the projection and ask it before a side
/// effect:
///
/// ```no_run
/// # use evently_postgres::versions::EffectGate;
/// # async fn f<P: evently_core::projection::Projection>(gate: &EffectGate, conn: &mut sqlx::PgConnection, at: evently_core::Checkpoint) -> Result<(), sqlx::Error> {
/// if gate.allows::<P>(conn, at).await? {
///     // insert the e-mail into the outbox, in this transaction
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct EffectGate {
    sql: String,
}

impl EffectGate {
    /// A gate reading the registry of `store`'s schema.
    #[must_use]
    pub fn new(store: &PostgresEventStore) -> Self {
        Self {
            sql: format!(
                "SELECT state, effects_after_transaction::text AS after_transaction, effects_after_position, \
                        effects_through_transaction::text AS through_transaction, effects_through_position \
                 FROM {}.projection_versions WHERE name = $1",
                store.sql.quoted_schema
            ),
        }
    }

    /// Whether version `P` runs the side effects of the event at `at` (its
    /// [`checkpoint`](evently_core::RecordedEvent::checkpoint)), read on `conn`, the handler's
    /// transaction. A projection without versions always does.
    ///
    /// # Errors
    /// The database's; an unreadable registry row as a decode error.
    pub async fn allows<P: Projection>(
        &self,
        conn: &mut PgConnection,
        at: Checkpoint,
    ) -> Result<bool, sqlx::Error> {
        let Some(row) = sqlx::query(AssertSqlSafe(self.sql.clone()))
            .bind(P::NAME)
            .fetch_optional(conn)
            .await?
        else {
            return Ok(true);
        };
        let bound = |t: &str, p: &str| -> Result<Option<Checkpoint>, sqlx::Error> {
            let transaction: Option<String> = row.try_get(t)?;
            let position: Option<i64> = row.try_get(p)?;
            match (transaction, position) {
                (Some(t), Some(p)) => Ok(Some(Checkpoint::new(
                    t.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                    u64::try_from(p).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                ))),
                _ => Ok(None),
            }
        };
        let state: String = row.try_get("state")?;
        if !matches!(state.as_str(), "live" | "previous") {
            return Ok(false);
        }
        let after = bound("after_transaction", "effects_after_position")?;
        let through = bound("through_transaction", "effects_through_position")?;
        Ok(after.is_some_and(|after| at > after) && through.is_none_or(|through| at <= through))
    }
}
