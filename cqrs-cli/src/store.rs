//! `cqrs migrate` and `cqrs store`: the schema, and the server its transaction ids belong to.

use clap::Subcommand;
use evently_postgres::PostgresEventStore;

use crate::{Failure, confirmed};

#[derive(Subcommand)]
pub(crate) enum Store {
    /// Whether the store's transaction ids belong to this server (exit code 1 when it was
    /// restored or moved from another one, with what to run).
    Check,
    /// After a restore (`pg_restore`), a logical-replication switchover or an upgrade: re-stamps
    /// the events' transaction ids into this server's range in the same global order, moves
    /// every checkpoint with them, and records this server (see docs/operations.md). Stop the
    /// writers first.
    Rebase {
        /// Say what was found, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rebase without asking (needed when the input is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

/// Runs a `store` command on `schema`.
pub(crate) async fn run(
    store: &PostgresEventStore,
    schema: &str,
    command: Store,
) -> Result<(), Failure> {
    match command {
        Store::Check => match store.check_server().await? {
            None => out!(
                "schema `{}`: its transaction ids belong to this server",
                schema
            ),
            Some(moved) => return Err(moved.to_string().into()),
        },
        Store::Rebase { dry_run, yes } => {
            let moved = store.check_server().await?;
            match (&moved, dry_run) {
                (None, _) => {
                    out!(
                        "schema `{}`: its transaction ids belong to this server; nothing to rebase",
                        schema
                    );
                    return Ok(());
                }
                (Some(moved), true) => {
                    out!("{moved}");
                    out!("(dry run: nothing changed)");
                    return Ok(());
                }
                (Some(moved), false) => {
                    out!("{moved}");
                    if !yes
                        && !confirmed(&format!(
                            "rebase schema `{}` onto this server (writers stopped)",
                            schema
                        ))?
                    {
                        out!("nothing changed");
                        return Ok(());
                    }
                }
            }
            let rebased = store.rebase().await?;
            if rebased.restamped {
                out!(
                    "re-stamped {} events with {} transaction ids below this server's counter \
                     ({} empty transactions run to make room), in the same order; moved {} checkpoints",
                    rebased.events,
                    rebased.transactions,
                    rebased.burned,
                    rebased.checkpoints
                );
            } else {
                out!(
                    "its {} events carry transaction ids below this server's counter: kept as they are",
                    rebased.events
                );
            }
            out!(
                "schema `{}` now belongs to this server (system identifier {})",
                schema,
                rebased
                    .server
                    .map_or_else(|| "unknown".to_owned(), |s| s.to_string())
            );
        }
    }
    Ok(())
}

/// `cqrs migrate`: applies the migrations to `schema` and says which ran.
pub(crate) async fn migrate(store: &PostgresEventStore, schema: &str) -> Result<(), Failure> {
    let before = store.applied_migrations().await?;
    store.migrate().await?;
    let after = store.applied_migrations().await?;
    let new: Vec<&(i64, String)> = after.iter().filter(|m| !before.contains(m)).collect();
    if new.is_empty() {
        out!(
            "schema `{}` is up to date ({} migrations, none to apply)",
            schema,
            after.len()
        );
    } else {
        out!(
            "applied {} migrations to schema `{}`; it is up to date:",
            new.len(),
            schema
        );
        for (version, description) in new {
            out!("  {version} {description}");
        }
    }
    Ok(())
}
