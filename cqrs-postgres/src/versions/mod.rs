//! Blue/green projection versions: a new version of a read model catches up beside the live one,
//! is promoted atomically for readers, and the old one is retired.
//!
//! A projection declares its version and its tables (`#[projection(name = "balances",
//! version = 2, tables("balances"))]`). Each version is a projection of its own (`balances@v2`:
//! checkpoint, lease, dead letters, segments) writing its own tables ([`Projection::table`]:
//! `balances_v2`), and readers read the plain names (`balances`), views over the live version's
//! tables. The registry (`projection_versions`) says which version is live:
//!
//! - a worker registers its version when it first takes its lease: the first version of a
//!   projection becomes live at once (its views are created), later ones catch up beside it;
//! - [`promote`] switches readers to a caught-up version in one transaction: it waits until the
//!   version has applied everything the live one has (so readers never see fewer events
//!   applied than a moment before), replaces the views and records the handover; readers see the
//!   old version or the new one, whole, never a mix;
//! - [`retire`] drops a version's tables, checkpoint and dead letters; a promotion can ask for
//!   it after a grace period ([`Promotion::retire_after`]), done by the live version's worker;
//! - side effects: [`EffectGate::allows`] says whether this version runs the side effects of an
//!   event. The rule: a version runs them for the events after the point where it was promoted
//!   (the *handover*: the furthest either version had reached), and the version live before it for
//!   the events up to that point, so each event's effects run in exactly one version; a version
//!   catching up runs none. The handover is read in the batch's own transaction, which holds its
//!   checkpoint row from its first statement and which a promotion waits for, so a batch sees the
//!   registry as it is for the events it applies.

use std::time::Duration;

use evently_core::projection::Projection;
use evently_core::{Checkpoint, StoreError};
use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use crate::PostgresEventStore;
use crate::errors::backend;
use crate::rows::{to_i64, to_u64, xid};
use crate::sql::quote_ident;

mod gate;
mod lifecycle;

pub use gate::EffectGate;
pub(crate) use lifecycle::tend;
pub use lifecycle::{promote, retire};

/// Where a version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// Readers read it.
    Live,
    /// Built beside the live version, not read yet.
    CatchingUp,
    /// Live before the last promotion: still runs the side effects up to the handover.
    Previous,
    /// Its tables, checkpoint and dead letters are gone.
    Retired,
}

impl VersionState {
    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "live" => Self::Live,
            "catching_up" => Self::CatchingUp,
            "previous" => Self::Previous,
            "retired" => Self::Retired,
            other => {
                return Err(StoreError::backend(format!(
                    "projection_versions holds an unknown state `{other}`"
                )));
            }
        })
    }

    /// The state as stored and shown.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::CatchingUp => "catching_up",
            Self::Previous => "previous",
            Self::Retired => "retired",
        }
    }
}

/// One version of a projection, as the registry has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The projection's base name.
    pub projection: String,
    /// The version.
    pub version: u32,
    /// Its checkpoint's name (`balances`, `balances@v2`).
    pub name: String,
    /// The read model's tables by the names readers use.
    pub tables: Vec<String>,
    /// Where it stands.
    pub state: VersionState,
    /// It runs the side effects of events after this position (none while catching up).
    pub effects_after: Option<Checkpoint>,
    /// ... and up to this one (set when another version was promoted over it).
    pub effects_through: Option<Checkpoint>,
    /// When it was promoted.
    pub promoted_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it is to be retired.
    pub retire_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The slowest of its checkpoints (segments), `None` when it has none.
    pub checkpoint: Option<Checkpoint>,
}

/// How [`promote`] goes about it.
#[derive(Debug, Clone, Copy)]
pub struct Promotion {
    wait: Duration,
    retire_after: Option<Duration>,
}

impl Default for Promotion {
    fn default() -> Self {
        Self::new()
    }
}

impl Promotion {
    /// Promote now if the version has caught up, without waiting; keep the old version.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            wait: Duration::ZERO,
            retire_after: None,
        }
    }

    /// Wait up to `wait` for the version to catch up with the live one.
    #[must_use]
    pub const fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Retire the old version `grace` after the promotion (its tables are dropped then, by the
    /// live version's worker, once it has run its side effects up to the handover).
    #[must_use]
    pub const fn retire_after(mut self, grace: Duration) -> Self {
        self.retire_after = Some(grace);
        self
    }
}

/// What [`promote`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The version now live.
    pub version: u32,
    /// The version live before, if any.
    pub previous: Option<u32>,
    /// Side effects of events up to here are the previous version's, after it the new one's.
    pub handover: Checkpoint,
}

/// Whether a projection uses versions: a version above 1, or tables readers read through views.
pub(crate) fn is_versioned<P: Projection>() -> bool {
    P::VERSION > 1 || !P::TABLES.is_empty()
}

/// `schema.name` for a table readers call `logical` (in the store's schema unless qualified).
fn qualified(store: &PostgresEventStore, logical: &str) -> String {
    match logical.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => format!("{}.{}", store.sql.quoted_schema, quote_ident(logical)),
    }
}

/// Registers `P`'s version (the first worker of it to take its lease does): the first version of
/// a projection becomes live (its views are created); a later one catches up beside the live one.
/// A version 2 or later of a projection that ran before versions existed registers that one as
/// its live version 1, so side effects are not run twice.
///
/// # Errors
/// [`StoreError::InvalidInput`] when the version was retired; [`StoreError::Backend`] when the
/// database fails.
pub async fn register<P: Projection>(
    store: &PostgresEventStore,
) -> Result<VersionState, StoreError> {
    let s = &store.sql.quoted_schema;
    let base = P::base_name();
    let tables: Vec<String> = P::TABLES.iter().map(|t| (*t).to_owned()).collect();
    let mut tx = crate::tx::Transaction::begin(store.pool())
        .await
        .map_err(backend)?;
    // One registration of a projection at a time: "is any version live" must not race.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("evently.versions:{}:{base}", store.schema()))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, state FROM {s}.projection_versions WHERE projection = $1"
    )))
    .bind(base)
    .fetch_all(&mut *tx)
    .await
    .map_err(backend)?;
    let mut live = false;
    for row in &rows {
        let version: i32 = row.try_get("version").map_err(backend)?;
        let state = VersionState::parse(row.try_get("state").map_err(backend)?)?;
        if u32::try_from(version).ok() == Some(P::VERSION) {
            drop(tx);
            return if state == VersionState::Retired {
                Err(retired::<P>())
            } else {
                Ok(state)
            };
        }
        live |= state == VersionState::Live;
    }
    if !live && P::VERSION > 1 {
        // A first version that ran without the registry: it is the live one.
        let ran: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {s}.projection_checkpoints WHERE projection = $1)"
        )))
        .bind(base)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        if ran {
            insert(&mut tx, store, base, 1, base, &[], VersionState::Live).await?;
            live = true;
        }
    }
    let state = if live {
        VersionState::CatchingUp
    } else {
        VersionState::Live
    };
    insert(&mut tx, store, base, P::VERSION, P::NAME, &tables, state).await?;
    if state == VersionState::Live {
        point_views(&mut tx, store, &tables, P::VERSION).await?;
    }
    tx.commit().await.map_err(backend)?;
    tracing::info!(
        projection = base,
        version = P::VERSION,
        state = state.as_str(),
        "projection version registered"
    );
    Ok(state)
}

pub(crate) fn retired<P: Projection>() -> StoreError {
    StoreError::InvalidInput(format!(
        "version {} of projection `{}` is retired: its tables and checkpoint are gone; run a newer version",
        P::VERSION,
        P::base_name()
    ))
}

async fn insert(
    conn: &mut PgConnection,
    store: &PostgresEventStore,
    base: &str,
    version: u32,
    name: &str,
    tables: &[String],
    state: VersionState,
) -> Result<(), StoreError> {
    // A version live from the start runs every event's side effects.
    let after = (state == VersionState::Live).then_some(Checkpoint::START);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.projection_versions \
           (projection, version, name, tables, state, effects_after_transaction, effects_after_position) \
         VALUES ($1, $2, $3, $4, $5, $6::text::xid8, $7)",
        store.sql.quoted_schema
    )))
    .bind(base)
    .bind(i32::try_from(version).map_err(StoreError::backend)?)
    .bind(name)
    .bind(tables)
    .bind(state.as_str())
    .bind(after.map(|c| c.transaction.to_string()))
    .bind(after.map(|c| to_i64(c.position)).transpose()?)
    .execute(conn)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Points the views readers read (`tables`) at `version`'s tables.
async fn point_views(
    conn: &mut PgConnection,
    store: &PostgresEventStore,
    tables: &[String],
    version: u32,
) -> Result<(), StoreError> {
    for logical in tables {
        let view = qualified(store, logical);
        let table = qualified(store, &format!("{logical}_v{version}"));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP VIEW IF EXISTS {view}; CREATE VIEW {view} AS SELECT * FROM {table}"
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| {
            StoreError::backend(format!(
                "pointing the view {view} at {table} (create the version's table before its worker starts): {e}"
            ))
        })?;
    }
    Ok(())
}

fn info_of(row: &sqlx::postgres::PgRow) -> Result<VersionInfo, StoreError> {
    let pair = |t: &str, p: &str| -> Result<Option<Checkpoint>, StoreError> {
        let transaction: Option<String> = row.try_get(t).map_err(backend)?;
        let position: Option<i64> = row.try_get(p).map_err(backend)?;
        match (transaction, position) {
            (Some(t), Some(p)) => Ok(Some(Checkpoint::new(xid(&t)?, to_u64(p)?))),
            _ => Ok(None),
        }
    };
    let version: i32 = row.try_get("version").map_err(backend)?;
    Ok(VersionInfo {
        projection: row.try_get("projection").map_err(backend)?,
        version: u32::try_from(version).map_err(StoreError::backend)?,
        name: row.try_get("name").map_err(backend)?,
        tables: row.try_get("tables").map_err(backend)?,
        state: VersionState::parse(row.try_get("state").map_err(backend)?)?,
        effects_after: pair("after_transaction", "effects_after_position")?,
        effects_through: pair("through_transaction", "effects_through_position")?,
        promoted_at: row.try_get("promoted_at").map_err(backend)?,
        retire_at: row.try_get("retire_at").map_err(backend)?,
        checkpoint: None,
    })
}

const COLUMNS: &str = "projection, version, name, tables, state, \
    effects_after_transaction::text AS after_transaction, effects_after_position, \
    effects_through_transaction::text AS through_transaction, effects_through_position, \
    promoted_at, retire_at";

/// The versions of `projection` (its base name), oldest first, with how far each has applied.
///
/// # Errors
/// [`StoreError::Backend`] when the database fails.
pub async fn versions(
    store: &PostgresEventStore,
    projection: &str,
) -> Result<Vec<VersionInfo>, StoreError> {
    let mut conn = store.pool().acquire().await.map_err(backend)?;
    let mut all = read_versions(&mut conn, store, projection, false).await?;
    for info in &mut all {
        info.checkpoint = progress(&mut conn, store, &info.name, false)
            .await?
            .map(|(min, _)| min);
    }
    Ok(all)
}

async fn read_versions(
    conn: &mut PgConnection,
    store: &PostgresEventStore,
    projection: &str,
    lock: bool,
) -> Result<Vec<VersionInfo>, StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM {}.projection_versions WHERE projection = $1 ORDER BY version{}",
        store.sql.quoted_schema,
        if lock { " FOR UPDATE" } else { "" }
    )))
    .bind(projection)
    .fetch_all(conn)
    .await
    .map_err(backend)?
    .iter()
    .map(info_of)
    .collect()
}

/// The slowest and the furthest checkpoint of the projection named `name` (its segments', if it
/// runs in segments), locking its rows if asked (which waits for its batches in flight and holds
/// the next ones back); `None` when it has no checkpoint yet.
async fn progress(
    conn: &mut PgConnection,
    store: &PostgresEventStore,
    name: &str,
    lock: bool,
) -> Result<Option<(Checkpoint, Checkpoint)>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT segments, transaction_id::text AS transaction_text, global_position \
         FROM {}.projection_checkpoints WHERE projection = $1 OR segment_of = $1{}",
        store.sql.quoted_schema,
        if lock { " FOR UPDATE" } else { "" }
    )))
    .bind(name)
    .fetch_all(conn)
    .await
    .map_err(backend)?;
    let mut range: Option<(Checkpoint, Checkpoint)> = None;
    for row in &rows {
        // A segmented projection's own row stands for its segments.
        if row
            .try_get::<Option<i32>, _>("segments")
            .map_err(backend)?
            .is_some()
        {
            continue;
        }
        let at = crate::rows::checkpoint(row)?;
        range = Some(range.map_or((at, at), |(min, max)| (min.min(at), max.max(at))));
    }
    Ok(range)
}

fn not_found(projection: &str, what: &str) -> StoreError {
    StoreError::InvalidInput(format!("projection `{projection}` has {what}"))
}

/// Whether the version named `name` (a checkpoint's name) is retired.
pub(crate) async fn is_retired(store: &PostgresEventStore, name: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {}.projection_versions WHERE name = $1 AND state = 'retired')",
        store.sql.quoted_schema
    )))
    .bind(name)
    .fetch_one(store.pool())
    .await
    .map_err(backend)
}
