//! The segment layout of a projection in the checkpoint table: how many segments it runs in,
//! each segment's row (checkpoint, lease, what earlier segments applied), and the rescale that
//! replaces them (`cqrs projections scale`).
//!
//! A projection's own row says how many segments it runs in (`segments`) and names the
//! generation of its segment rows (its `epoch`, bumped by every rescale). Segment rows are named
//! `<projection>#<index>/<count>@<generation>`: a worker still running a segment of a replaced
//! layout finds no row of its name, so it can neither move a checkpoint nor take a lease again,
//! and the rescale's row locks wait for any batch in flight to commit before reading where each
//! segment stands.

use evently_core::projection::segment::{AppliedPart, rescale};
use evently_core::projection::{Segment, SegmentState};
use evently_core::{Checkpoint, StoreError};
use sqlx::{AssertSqlSafe, Row};

use crate::PostgresEventStore;
use crate::errors::backend;
use crate::rows::to_i64;

/// The name of a segment's row.
#[must_use]
pub fn row_name(projection: &str, segment: Segment, generation: i64) -> String {
    format!("{projection}#{segment}@{generation}")
}

/// One segment of a projection, for operators and for the workers sharing it.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentStatus {
    /// The segment.
    pub segment: Segment,
    /// Its row's name in the checkpoint table.
    pub name: String,
    /// Where it stands.
    pub checkpoint: Checkpoint,
    /// The worker holding (or last holding) its lease.
    pub owner: Option<String>,
    /// Whether that lease is live now.
    pub leased: bool,
}

/// How a projection is segmented.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The projection.
    pub projection: String,
    /// The generation of the segment rows (bumped by every rescale).
    pub generation: i64,
    /// Its segments, by index.
    pub segments: Vec<SegmentStatus>,
}

impl Layout {
    /// How many segments there are.
    #[must_use]
    pub fn count(&self) -> usize {
        self.segments.len()
    }
}

/// The layout of `projection`; `None` when it does not run in segments.
///
/// # Errors
/// [`StoreError::Backend`] when the database fails.
pub async fn layout(
    store: &PostgresEventStore,
    projection: &str,
) -> Result<Option<Layout>, StoreError> {
    let s = &store.sql.quoted_schema;
    let generation: Option<(Option<i32>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT segments, epoch FROM {s}.projection_checkpoints \
         WHERE projection = $1 AND segment_of IS NULL"
    )))
    .bind(projection)
    .fetch_optional(store.pool())
    .await
    .map_err(backend)?;
    let Some((Some(_), generation)) = generation else {
        return Ok(None);
    };
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT projection, segment_index, segment_count, owner, \
                COALESCE(lease_until >= clock_timestamp(), false) AS leased, \
                transaction_id::text AS transaction_text, global_position \
         FROM {s}.projection_checkpoints WHERE segment_of = $1 ORDER BY segment_index"
    )))
    .bind(projection)
    .fetch_all(store.pool())
    .await
    .map_err(backend)?;
    let segments = rows
        .iter()
        .map(|row| {
            Ok(SegmentStatus {
                segment: segment_of_row(row)?,
                name: row.try_get("projection").map_err(backend)?,
                checkpoint: crate::rows::checkpoint(row)?,
                owner: row.try_get("owner").map_err(backend)?,
                leased: row.try_get("leased").map_err(backend)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Some(Layout {
        projection: projection.to_owned(),
        generation,
        segments,
    }))
}

fn segment_of_row(row: &sqlx::postgres::PgRow) -> Result<Segment, StoreError> {
    let index: i32 = row.try_get("segment_index").map_err(backend)?;
    let count: i32 = row.try_get("segment_count").map_err(backend)?;
    let (Ok(index), Ok(count)) = (u32::try_from(index), u32::try_from(count)) else {
        return Err(StoreError::backend(format!(
            "a segment row holds segment {index}/{count}"
        )));
    };
    Segment::new(index, count).map_err(StoreError::backend)
}

fn state_of_row(row: &sqlx::postgres::PgRow) -> Result<SegmentState, StoreError> {
    let text: String = row.try_get("applied_text").map_err(backend)?;
    let applied: Vec<AppliedPart> = serde_json::from_str(&text).map_err(|e| {
        StoreError::backend(format!(
            "the `applied` column of a segment row is unreadable ({e}): {text}"
        ))
    })?;
    Ok(SegmentState {
        segment: segment_of_row(row)?,
        checkpoint: crate::rows::checkpoint(row)?,
        applied,
    })
}

/// The stored state of the segment row `name` (what its worker filters by); `None` when there is
/// no such row (a rescale replaced it).
///
/// # Errors
/// [`StoreError::Backend`] when the database fails or the row is unreadable.
pub(crate) async fn segment_state(
    store: &PostgresEventStore,
    name: &str,
) -> Result<Option<SegmentState>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT segment_index, segment_count, applied::text AS applied_text, \
                transaction_id::text AS transaction_text, global_position \
         FROM {}.projection_checkpoints WHERE projection = $1 AND segment_of IS NOT NULL",
        store.sql.quoted_schema
    )))
    .bind(name)
    .fetch_optional(store.pool())
    .await
    .map_err(backend)?;
    row.as_ref().map(state_of_row).transpose()
}

/// Runs `projection` in `count` segments from now on: the segments it ran in (or the projection
/// as a whole, the first time) are replaced in one transaction by `count` new ones, each starting
/// where none of its events is skipped or applied twice
/// ([`rescale`]). Their workers lose their leases at
/// their next checkpoint move (a batch in flight is waited for, then rolled back by the fence),
/// and the workers sharing the projection take the new segments. A projection that already runs
/// in `count` segments is left as it is.
///
/// # Errors
/// [`StoreError::InvalidInput`] for a count of 0 or above 1,024, or a name that is a segment's
/// row; [`StoreError::Backend`] when the database fails or a segment row is unreadable.
pub async fn scale(
    store: &PostgresEventStore,
    projection: &str,
    count: u32,
) -> Result<Layout, StoreError> {
    relayout(store, projection, count, Mode::Scale).await
}

/// Segments `projection` in `count` segments unless it runs in segments already (what the first
/// [`SegmentedWorker`](crate::projection::SegmentedWorker) to start does).
pub(crate) async fn ensure(
    store: &PostgresEventStore,
    projection: &str,
    count: u32,
) -> Result<Layout, StoreError> {
    relayout(store, projection, count, Mode::Keep).await
}

/// A reset of the read model, run inside the rebuild's transaction.
pub(crate) type ResetFn<'r> = &'r (
        dyn for<'c> Fn(
    &'c mut sqlx::PgConnection,
) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + Sync
    );

/// Serves an operator's rebuild request on segmented `projection` (what a
/// [`SegmentedWorker`](crate::projection::SegmentedWorker) with a reset does in its rounds): in
/// one transaction, with the segment rows locked (batches in flight waited for, their workers
/// fenced), runs `reset`, replaces the segments by as many new ones at the start of the log, drops
/// the dead letters and answers the request; `count` is the segment count
/// [`rebuild_requested`] found (nothing is done when another worker served the request
/// meanwhile).
///
/// # Errors
/// [`StoreError::Backend`] when the database or the reset fails (nothing is changed then).
pub(crate) async fn rebuild(
    store: &PostgresEventStore,
    projection: &str,
    count: u32,
    reset: ResetFn<'_>,
) -> Result<(), StoreError> {
    relayout(store, projection, count, Mode::Rebuild(reset)).await?;
    Ok(())
}

/// The segment count of `projection` when a rebuild of it is requested.
pub(crate) async fn rebuild_requested(
    store: &PostgresEventStore,
    projection: &str,
) -> Result<Option<u32>, StoreError> {
    let requested: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT segments FROM {}.projection_checkpoints \
         WHERE projection = $1 AND segments IS NOT NULL AND rebuild_requested_at IS NOT NULL",
        store.sql.quoted_schema
    )))
    .bind(projection)
    .fetch_optional(store.pool())
    .await
    .map_err(backend)?;
    Ok(requested.and_then(|n| u32::try_from(n).ok()))
}

/// Records why a rebuild request on `projection` could not be served.
pub(crate) async fn refuse_rebuild(
    store: &PostgresEventStore,
    projection: &str,
    error: &str,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {}.projection_checkpoints SET rebuild_requested_at = NULL, request_error = $2 \
         WHERE projection = $1 AND rebuild_requested_at IS NOT NULL",
        store.sql.quoted_schema
    )))
    .bind(projection)
    .bind(error)
    .execute(store.pool())
    .await
    .map_err(backend)?;
    Ok(())
}

/// What a relayout does.
#[derive(Clone, Copy)]
enum Mode<'r> {
    /// Rescale to the count.
    Scale,
    /// Segment an unsegmented projection; keep a segmented one as it is.
    Keep,
    /// Start every segment again from the first event after the reset, if a rebuild is still
    /// requested.
    Rebuild(ResetFn<'r>),
}

async fn relayout(
    store: &PostgresEventStore,
    projection: &str,
    count: u32,
    mode: Mode<'_>,
) -> Result<Layout, StoreError> {
    Segment::new(0, count).map_err(|e| StoreError::InvalidInput(e.to_string()))?;
    if crate::versions::is_retired(store, projection).await? {
        return Err(StoreError::InvalidInput(format!(
            "`{projection}` is a retired projection version: its segments are not made again"
        )));
    }
    let s = &store.sql.quoted_schema;
    let mut tx = crate::tx::Transaction::begin(store.pool())
        .await
        .map_err(backend)?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING"
    )))
    .bind(projection)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    // Waits for a batch of the projection's worker in flight to commit, then reads what it stored.
    let own = sqlx::query(AssertSqlSafe(format!(
        "SELECT segments, epoch, rebuild_requested_at, transaction_id::text AS transaction_text, global_position \
         FROM {s}.projection_checkpoints WHERE projection = $1 AND segment_of IS NULL FOR UPDATE"
    )))
    .bind(projection)
    .fetch_optional(&mut *tx)
    .await
    .map_err(backend)?
    .ok_or_else(|| {
        StoreError::InvalidInput(format!(
            "`{projection}` names a segment's row, not a projection"
        ))
    })?;
    let segments: Option<i32> = own.try_get("segments").map_err(backend)?;
    if let Mode::Rebuild(_) = mode {
        let still: Option<chrono::DateTime<chrono::Utc>> =
            own.try_get("rebuild_requested_at").map_err(backend)?;
        if still.is_none() || segments.is_none() {
            // Served by another worker meanwhile.
            tx.rollback().await;
            return current_layout(store, projection).await;
        }
    }
    let epoch: i64 = own.try_get("epoch").map_err(backend)?;
    let old = if segments.is_some() {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT segment_index, segment_count, applied::text AS applied_text, \
                    transaction_id::text AS transaction_text, global_position \
             FROM {s}.projection_checkpoints WHERE segment_of = $1 ORDER BY segment_index FOR UPDATE"
        )))
        .bind(projection)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(state_of_row)
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![SegmentState {
            segment: Segment::WHOLE,
            checkpoint: crate::rows::checkpoint(&own)?,
            applied: Vec::new(),
        }]
    };
    let unchanged = segments.and_then(|n| u32::try_from(n).ok()) == Some(count);
    let keep = match mode {
        Mode::Scale => unchanged,
        Mode::Keep => segments.is_some(),
        Mode::Rebuild(_) => false,
    };
    if keep {
        tx.rollback().await;
        return current_layout(store, projection).await;
    }
    let mut new = rescale(&old, count)
        .map_err(|e| StoreError::backend(format!("the stored segments of `{projection}`: {e}")))?;
    if let Mode::Rebuild(reset) = mode {
        reset(&mut tx).await.map_err(backend)?;
        for state in &mut new {
            state.checkpoint = Checkpoint::START;
            state.applied.clear();
        }
        sqlx::query(AssertSqlSafe(store.sql.reset_dead_letters.clone()))
            .bind(projection)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
    }
    let generation = epoch + 1;
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {s}.projection_checkpoints WHERE segment_of = $1"
    )))
    .bind(projection)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    for state in &new {
        let applied = serde_json::to_string(&state.applied).map_err(StoreError::backend)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.projection_checkpoints \
               (projection, transaction_id, global_position, segment_of, segment_index, segment_count, applied) \
             VALUES ($1, $2::text::xid8, $3, $4, $5, $6, $7::jsonb)"
        )))
        .bind(row_name(projection, state.segment, generation))
        .bind(state.checkpoint.transaction.to_string())
        .bind(to_i64(state.checkpoint.position)?)
        .bind(projection)
        .bind(i32::try_from(state.segment.index()).map_err(StoreError::backend)?)
        .bind(i32::try_from(state.segment.count()).map_err(StoreError::backend)?)
        .bind(applied)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    }
    // Fences the projection's plain worker (its epoch is gone, and it never takes a segmented
    // projection's own lease) and names the new generation.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.projection_checkpoints \
         SET segments = $2, epoch = $3, owner = NULL, lease_until = NULL, updated_at = clock_timestamp(), \
             rebuild_requested_at = CASE WHEN $4 THEN NULL ELSE rebuild_requested_at END, \
             rebuilt_at = CASE WHEN $4 THEN clock_timestamp() ELSE rebuilt_at END, \
             request_error = CASE WHEN $4 THEN NULL ELSE request_error END \
         WHERE projection = $1"
    )))
    .bind(projection)
    .bind(i32::try_from(count).map_err(StoreError::backend)?)
    .bind(generation)
    .bind(matches!(mode, Mode::Rebuild(_)))
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    tx.commit().await.map_err(backend)?;
    tracing::info!(
        projection,
        from = old.len(),
        to = count,
        generation,
        "projection rescaled"
    );
    current_layout(store, projection).await
}

/// The layout of `projection` just written or found segmented.
async fn current_layout(
    store: &PostgresEventStore,
    projection: &str,
) -> Result<Layout, StoreError> {
    layout(store, projection)
        .await?
        .ok_or_else(|| StoreError::backend("the layout vanished while it was read"))
}
