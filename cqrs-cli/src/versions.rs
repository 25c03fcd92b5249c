//! `cqrs projections versions | promote | retire`: blue/green projection versions.

use std::time::Duration;

use evently_postgres::PostgresEventStore;
use evently_postgres::versions::{self, Promotion, VersionInfo};

use crate::{Failure, table};

fn checkpoint_text(at: Option<evently_core::Checkpoint>) -> String {
    at.map_or_else(|| "-".to_owned(), |c| c.position.to_string())
}

fn info_json(v: &VersionInfo) -> serde_json::Value {
    serde_json::json!({
        "projection": v.projection,
        "version": v.version,
        "name": v.name,
        "state": v.state.as_str(),
        "tables": v.tables,
        "position": v.checkpoint.map(|c| c.position),
        "effects_after": v.effects_after.map(|c| c.position),
        "effects_through": v.effects_through.map(|c| c.position),
        "promoted_at": v.promoted_at,
        "retire_at": v.retire_at,
    })
}

/// The versions of `name`, or an error when it has none.
async fn known(store: &PostgresEventStore, name: &str) -> Result<Vec<VersionInfo>, Failure> {
    let all = versions::versions(store, name).await?;
    if all.is_empty() {
        return Err(format!(
            "projection `{name}` has no versions registered: a projection with `#[projection(version = N)]` or `tables(...)` registers its version when its worker first runs"
        )
        .into());
    }
    Ok(all)
}

/// `cqrs projections versions <name>`.
pub(crate) async fn list(
    store: &PostgresEventStore,
    name: &str,
    json: bool,
) -> Result<(), Failure> {
    let all = known(store, name).await?;
    if json {
        for v in &all {
            out!("{}", info_json(v));
        }
        return Ok(());
    }
    let mut out = table([
        "version",
        "state",
        "checkpoint",
        "position",
        "effects after",
        "effects through",
        "tables",
        "promoted",
        "retire at",
    ]);
    for v in all {
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map_or_else(
                || "-".to_owned(),
                |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
            )
        };
        out.add_row([
            v.version.to_string(),
            v.state.as_str().to_owned(),
            v.name.clone(),
            checkpoint_text(v.checkpoint),
            checkpoint_text(v.effects_after),
            checkpoint_text(v.effects_through),
            if v.tables.is_empty() {
                "-".to_owned()
            } else {
                v.tables.join(", ")
            },
            time(v.promoted_at),
            time(v.retire_at),
        ]);
    }
    out!("{out}");
    Ok(())
}

/// `cqrs projections promote <name>`.
pub(crate) async fn promote(
    store: &PostgresEventStore,
    name: &str,
    version: Option<u32>,
    wait: u64,
    retire_after: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    known(store, name).await?;
    let mut promotion = Promotion::new().wait(Duration::from_secs(wait));
    if let Some(grace) = retire_after {
        promotion = promotion.retire_after(Duration::from_secs(grace));
    }
    let promoted = versions::promote(store, name, version, promotion).await?;
    if json {
        out!(
            "{}",
            serde_json::json!({"projection": name, "version": promoted.version, "previous": promoted.previous, "handover": promoted.handover.position})
        );
    } else {
        let previous = promoted.previous.map_or_else(String::new, |p| {
            format!(
                " (was version {p}, which runs the side effects up to position {})",
                promoted.handover.position
            )
        });
        out!(
            "version {} of `{name}` is live: readers read its tables from now on{previous}",
            promoted.version
        );
    }
    Ok(())
}

/// `cqrs projections retire <name> --version N`.
pub(crate) async fn retire(
    store: &PostgresEventStore,
    name: &str,
    version: u32,
    force: bool,
    json: bool,
) -> Result<(), Failure> {
    known(store, name).await?;
    let retired = versions::retire(store, name, version, force).await?;
    if json {
        out!(
            "{}",
            serde_json::json!({"projection": name, "version": version, "retired": retired})
        );
    } else if retired {
        out!(
            "version {version} of `{name}` is retired: its tables, checkpoint and dead letters are dropped"
        );
    } else {
        out!("version {version} of `{name}` was retired already");
    }
    Ok(())
}
