//! Promoting and retiring versions, and what a versioned worker tends to after catching up.

use std::time::Duration;

use evently_core::projection::Projection;
use evently_core::{Checkpoint, EventStore, StoreError};
use sqlx::AssertSqlSafe;

use super::{
    Promoted, Promotion, VersionState, not_found, point_views, progress, qualified, read_versions,
};
use crate::PostgresEventStore;
use crate::errors::backend;
use crate::rows::to_i64;

/// Promotes a version of `projection` (its base name; the newest version catching up when
/// `version` is `None`): once it has applied everything the live version has (the whole log as
/// it was a moment ago, without a live version), in one transaction, readers' views are pointed at its tables, it becomes
/// live and the version live before becomes the previous one, which runs the side effects up to
/// the handover. Waits up to [`Promotion::wait`] for it to catch up.
///
/// # Errors
/// [`StoreError::InvalidInput`] for an unknown projection or version, or one that is not
/// catching up (live, previous or retired versions are not promoted: to go back, deploy the old
/// code as a new version), or that has not caught up within the wait (the message says where it
/// stands); [`StoreError::Backend`] when the database fails.
pub async fn promote(
    store: &PostgresEventStore,
    projection: &str,
    version: Option<u32>,
    promotion: Promotion,
) -> Result<Promoted, StoreError> {
    let deadline = tokio::time::Instant::now() + promotion.wait;
    loop {
        match try_promote(store, projection, version, promotion).await? {
            Ok(promoted) => return Ok(promoted),
            Err(behind) if tokio::time::Instant::now() >= deadline => {
                return Err(StoreError::InvalidInput(behind));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One try: `Ok(Err(why))` when the version has not caught up yet.
async fn try_promote(
    store: &PostgresEventStore,
    projection: &str,
    version: Option<u32>,
    promotion: Promotion,
) -> Result<Result<Promoted, String>, StoreError> {
    let head = store.head().await?.unwrap_or(Checkpoint::START);
    let s = &store.sql.quoted_schema;
    let mut tx = crate::tx::Transaction::begin(store.pool())
        .await
        .map_err(backend)?;
    let all = read_versions(&mut tx, store, projection, true).await?;
    if all.is_empty() {
        return Err(not_found(
            projection,
            "no versions registered (a versioned worker registers its version when it starts)",
        ));
    }
    // A version deployed a moment ago may not have registered yet: waited for like catching up.
    let target = match version {
        Some(v) => all.iter().find(|i| i.version == v),
        None => all
            .iter()
            .rev()
            .find(|i| i.state == VersionState::CatchingUp),
    };
    let Some(target) = target else {
        tx.rollback().await;
        return Ok(Err(format!(
            "projection `{projection}` has {} (a version registers when its worker first runs)",
            version.map_or_else(
                || "no version catching up".to_owned(),
                |v| format!("no version {v}")
            )
        )));
    };
    if target.state != VersionState::CatchingUp {
        return Err(StoreError::InvalidInput(format!(
            "version {} of `{projection}` is {}: only a version catching up is promoted (to go back, deploy the old code as a new version)",
            target.version,
            target.state.as_str()
        )));
    }
    let live = all.iter().find(|i| i.state == VersionState::Live);
    let theirs = progress(&mut tx, store, &target.name, true).await?;
    let ours = match live {
        Some(live) => progress(&mut tx, store, &live.name, true).await?,
        None => None,
    };
    let (slowest, furthest) = theirs.unwrap_or((Checkpoint::START, Checkpoint::START));
    // Caught up: it has applied everything the live version has (readers lose nothing), or,
    // without a live version, the whole log as it was a moment ago.
    let live_furthest = match live {
        Some(_) => ours.map_or(Checkpoint::START, |(_, max)| max),
        None => head,
    };
    if slowest < live_furthest {
        tx.rollback().await;
        return Ok(Err(format!(
            "version {} of `{projection}` has not caught up: it has applied through {slowest}, the live version (or the log, without one) through {live_furthest}",
            target.version
        )));
    }
    let handover = furthest.max(live_furthest);
    let (t, p) = (handover.transaction.to_string(), to_i64(handover.position)?);
    let grace = promotion.retire_after.map(|d| d.as_secs_f64());
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.projection_versions SET state = 'previous', \
           effects_through_transaction = $2::text::xid8, effects_through_position = $3, \
           retire_at = CASE WHEN $4::float8 IS NULL THEN NULL ELSE clock_timestamp() + make_interval(secs => $4) END \
         WHERE projection = $1 AND state = 'live'"
    )))
    .bind(projection)
    .bind(&t)
    .bind(p)
    .bind(grace)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.projection_versions SET state = 'live', promoted_at = clock_timestamp(), \
           effects_after_transaction = $3::text::xid8, effects_after_position = $4 \
         WHERE projection = $1 AND version = $2"
    )))
    .bind(projection)
    .bind(i32::try_from(target.version).map_err(StoreError::backend)?)
    .bind(&t)
    .bind(p)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    point_views(&mut tx, store, &target.tables, target.version).await?;
    tx.commit().await.map_err(backend)?;
    let promoted = Promoted {
        version: target.version,
        previous: live.map(|l| l.version),
        handover,
    };
    tracing::info!(projection, version = promoted.version, previous = ?promoted.previous, %handover, "projection version promoted");
    Ok(Ok(promoted))
}

/// Retires a version of `projection`: drops its tables (`<table>_v<version>`), its checkpoint
/// rows (segments included) and dead letters, and marks it retired, so its workers stop (they
/// never take a retired version's lease again). `Ok(false)` when it was retired already.
///
/// # Errors
/// [`StoreError::InvalidInput`] for an unknown version, the live one, or a previous version that
/// has not run its side effects up to the handover yet, unless `force`; [`StoreError::Backend`]
/// when the database fails.
pub async fn retire(
    store: &PostgresEventStore,
    projection: &str,
    version: u32,
    force: bool,
) -> Result<bool, StoreError> {
    let s = &store.sql.quoted_schema;
    let mut tx = crate::tx::Transaction::begin(store.pool())
        .await
        .map_err(backend)?;
    let all = read_versions(&mut tx, store, projection, true).await?;
    let info = all
        .iter()
        .find(|i| i.version == version)
        .ok_or_else(|| not_found(projection, &format!("no version {version}")))?;
    match info.state {
        VersionState::Retired => {
            tx.rollback().await;
            return Ok(false);
        }
        VersionState::Live => {
            return Err(StoreError::InvalidInput(format!(
                "version {version} of `{projection}` is live: promote another version first"
            )));
        }
        VersionState::Previous | VersionState::CatchingUp => {}
    }
    // Locks its rows: a batch in flight ends before its tables go.
    let reached = progress(&mut tx, store, &info.name, true).await?;
    if let (Some(through), false) = (info.effects_through, force) {
        let at = reached.map_or(Checkpoint::START, |(min, _)| min);
        if at < through {
            return Err(StoreError::InvalidInput(format!(
                "version {version} of `{projection}` still runs side effects up to {through} and has applied through {at}: let its worker reach the handover, or retire it with force"
            )));
        }
    }
    for logical in &info.tables {
        let table = qualified(store, &format!("{logical}_v{version}"));
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
    }
    for sql in [
        format!("DELETE FROM {s}.projection_checkpoints WHERE projection = $1 OR segment_of = $1"),
        format!("DELETE FROM {s}.projection_dead_letters WHERE projection = $1"),
        format!("DELETE FROM {s}.projection_members WHERE projection = $1"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .bind(&info.name)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
    }
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.projection_versions SET state = 'retired', retired_at = clock_timestamp() \
         WHERE projection = $1 AND version = $2"
    )))
    .bind(projection)
    .bind(i32::try_from(version).map_err(StoreError::backend)?)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    tx.commit().await.map_err(backend)?;
    tracing::info!(projection, version, "projection version retired");
    Ok(true)
}

/// What a versioned worker does after catching up: promotes its own version when asked to
/// (`auto`) and it is caught up, and retires previous versions whose grace period is over and
/// whose side effects are done. Failures are logged: they are tried again after the next
/// catch-up.
pub(crate) async fn tend<P: Projection>(store: &PostgresEventStore, auto: Option<Promotion>) {
    let base = P::base_name();
    // One query per catch-up: the registry rows, without the versions' progress.
    let all = match store.pool().acquire().await {
        Ok(mut conn) => read_versions(&mut conn, store, base, false).await,
        Err(error) => Err(backend(error)),
    };
    let all = match all {
        Ok(all) => all,
        Err(error) => {
            tracing::warn!(projection = base, %error, "reading the projection's versions failed");
            return;
        }
    };
    let mine = all.iter().find(|i| i.version == P::VERSION);
    if let Some(promotion) = auto
        && mine.is_some_and(|i| i.state == VersionState::CatchingUp)
    {
        match try_promote(store, base, Some(P::VERSION), promotion).await {
            Ok(Ok(_) | Err(_)) => {}
            Err(error) => tracing::warn!(projection = base, %error, "promoting failed"),
        }
    }
    let now = chrono::Utc::now();
    for due in all
        .iter()
        .filter(|i| i.state == VersionState::Previous && i.retire_at.is_some_and(|at| at <= now))
    {
        if let Err(error) = retire(store, base, due.version, false).await {
            tracing::debug!(projection = base, version = due.version, %error, "not retired yet");
        }
    }
}
