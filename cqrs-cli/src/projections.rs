//! `cqrs projections`: checkpoints, lag, leases, and rebuilds asked of the workers.

use clap::Subcommand;
use std::time::Duration;

use evently_core::EventStore;
use evently_postgres::PostgresEventStore;
use evently_postgres::control::{Control, ProjectionStatus, projections};

use crate::{Failure, NoAnswer, table, wait_for};

#[derive(Subcommand)]
pub(crate) enum Projections {
    /// Every projection: checkpoint, lag, lease and dead letters.
    List,
    /// One projection in detail, with the operator requests on it.
    Status {
        /// The projection's name.
        name: String,
    },
    /// Asks the projection's worker to rebuild its read model from the first event, and follows
    /// the replay with a progress bar (the worker needs `ProjectionWorker::with_reset`).
    Rebuild {
        /// The projection's name.
        name: String,
        /// Record the request and return at once.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the worker to start it, in seconds (exit code 3 after).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Runs the projection in N segments from now on (split or merge while its workers run;
    /// `SegmentedWorker`s share the segments): each new segment starts where none of its events
    /// is skipped or applied twice.
    Scale {
        /// The projection's name.
        name: String,
        /// How many segments (1 to 1024).
        #[arg(long)]
        segments: u32,
    },
    /// The versions of a projection (`#[projection(version = N)]`): which is live, which catch
    /// up beside it, how far each has applied, where side effects pass from one to the next.
    Versions {
        /// The projection's base name (without `@vN`).
        name: String,
    },
    /// Switches readers to a version once it has applied everything the live one has, in one
    /// transaction (the views of the read model's tables point at its tables from then on).
    Promote {
        /// The projection's base name.
        name: String,
        /// The version (default: the newest one catching up).
        #[arg(long)]
        version: Option<u32>,
        /// How long to wait for it to catch up, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Retire the old version this many seconds after the promotion (by the live version's
        /// worker, once the old one ran its side effects up to the handover).
        #[arg(long)]
        retire_after: Option<u64>,
    },
    /// Drops a version that is not live: its tables, checkpoint and dead letters; its workers
    /// stop. Refused while it still owes side effects up to the handover, unless `--force`.
    Retire {
        /// The projection's base name.
        name: String,
        /// The version to retire.
        #[arg(long)]
        version: u32,
        /// Retire it even if it has not run its side effects up to the handover.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a `projections` command.
pub(crate) async fn run(
    store: &PostgresEventStore,
    command: Projections,
    json: bool,
) -> Result<(), Failure> {
    match command {
        Projections::List => {
            let all = projections(store).await?;
            if json {
                for p in &all {
                    out!("{}", projection_json(p));
                }
                return Ok(());
            }
            let mut table = table([
                "projection",
                "position",
                "lag",
                "lag (s)",
                "epoch",
                "owner",
                "dlq",
                "segments",
                "updated",
            ]);
            for p in all {
                let owner = match (&p.owner, p.leased) {
                    (Some(owner), true) => owner.clone(),
                    (Some(owner), false) => format!("({owner})"),
                    (None, _) => "-".to_owned(),
                };
                let (name, segments) = match (&p.segment_of, p.segments) {
                    (Some(_), _) => (format!("  {}", p.name), String::new()),
                    (None, Some(n)) => (p.name.clone(), n.to_string()),
                    (None, None) => (p.name.clone(), "-".to_owned()),
                };
                table.add_row([
                    name,
                    p.checkpoint.position.to_string(),
                    p.lag.to_string(),
                    format!("{:.1}", p.lag_seconds),
                    p.epoch.to_string(),
                    owner,
                    p.dead_letters.to_string(),
                    segments,
                    p.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                ]);
            }
            out!("{table}");
        }
        Projections::Status { name } => {
            status(store, &name, json).await?;
        }
        Projections::Rebuild {
            name,
            no_wait,
            timeout,
        } => {
            rebuild(store, &name, no_wait, Duration::from_secs(timeout)).await?;
        }
        Projections::Versions { name } => crate::versions::list(store, &name, json).await?,
        Projections::Promote {
            name,
            version,
            wait,
            retire_after,
        } => crate::versions::promote(store, &name, version, wait, retire_after, json).await?,
        Projections::Retire {
            name,
            version,
            force,
        } => crate::versions::retire(store, &name, version, force, json).await?,
        Projections::Scale { name, segments } => {
            // A typo must not create a projection: it has to have run (or been segmented) before.
            find(store, &name).await?;
            let before = evently_postgres::segments::layout(store, &name).await?;
            let layout = evently_postgres::segments::scale(store, &name, segments).await?;
            let was = before.map_or(1, |l| l.count());
            if json {
                out!(
                    "{}",
                    serde_json::json!({"name": name, "from": was, "segments": layout.count(), "generation": layout.generation})
                );
            } else {
                out!(
                    "`{name}` runs in {} segments (was {was}; generation {}); its workers take them over",
                    layout.count(),
                    layout.generation
                );
            }
        }
    }
    Ok(())
}

/// The status of projection `name`, or an error naming the known ones.
pub(crate) async fn find(
    store: &PostgresEventStore,
    name: &str,
) -> Result<ProjectionStatus, Failure> {
    let all = projections(store).await?;
    let known: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
    all.into_iter().find(|p| p.name == name).ok_or_else(|| {
        format!(
            "no projection `{name}` (known: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )
        .into()
    })
}

fn lease_text(p: &ProjectionStatus) -> String {
    match (&p.owner, p.leased) {
        (Some(owner), true) => format!("held by {owner} (epoch {})", p.epoch),
        (Some(owner), false) => format!("expired (last held by {owner}, epoch {})", p.epoch),
        (None, _) => "never taken".to_owned(),
    }
}

async fn status(store: &PostgresEventStore, name: &str, json: bool) -> Result<(), Failure> {
    let p = find(store, name).await?;
    let requests = Control::new(store.clone()).requests(name).await?;
    let head = store.head().await?.map_or(0, |h| h.position);
    if json {
        let mut object = projection_json(&p);
        object["head"] = head.into();
        if p.segments.is_some() {
            let parts: Vec<serde_json::Value> = projections(store)
                .await?
                .iter()
                .filter(|s| s.segment_of.as_deref() == Some(name))
                .map(projection_json)
                .collect();
            object["segment_rows"] = parts.into();
        }
        if let Some(r) = requests {
            object["rebuild_requested_at"] = serde_json::json!(r.rebuild_requested_at);
            object["rebuilt_at"] = serde_json::json!(r.rebuilt_at);
            object["retries_pending"] = r.retries_pending.into();
            object["request_error"] = serde_json::json!(r.error);
        }
        out!("{object}");
        return Ok(());
    }
    out!("projection:   {}", p.name);
    out!(
        "checkpoint:   position {} (transaction {}), head {head}, lag {} events ({:.1} s)",
        p.checkpoint.position,
        p.checkpoint.transaction,
        p.lag,
        p.lag_seconds
    );
    if p.segments.is_some() {
        out!("segments:     {}", segment_lines(store, name).await?);
    } else {
        out!("lease:        {}", lease_text(&p));
    }
    out!("dead letters: {}", p.dead_letters);
    out!("updated:      {}", p.updated_at.format("%Y-%m-%d %H:%M:%S"));
    if let Some(r) = requests {
        if let Some(at) = r.rebuild_requested_at {
            out!(
                "rebuild:      requested at {}, not started yet",
                at.format("%Y-%m-%d %H:%M:%S")
            );
        }
        if let Some(at) = r.rebuilt_at {
            out!("last rebuild: {}", at.format("%Y-%m-%d %H:%M:%S"));
        }
        if r.retries_pending > 0 {
            out!(
                "retries:      {} dead letters waiting for the worker",
                r.retries_pending
            );
        }
        if let Some(error) = r.error {
            out!("last request failed: {error}");
        }
    }
    Ok(())
}

/// The segments of `name`: a count, then a table (position, lag, lease per segment).
async fn segment_lines(store: &PostgresEventStore, name: &str) -> Result<String, Failure> {
    let rows: Vec<ProjectionStatus> = projections(store)
        .await?
        .into_iter()
        .filter(|s| s.segment_of.as_deref() == Some(name))
        .collect();
    let mut table = table(["segment", "position", "lag", "lease"]);
    for s in &rows {
        let segment = s
            .name
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('#'))
            .unwrap_or(&s.name);
        table.add_row([
            segment.to_owned(),
            s.checkpoint.position.to_string(),
            s.lag.to_string(),
            lease_text(s),
        ]);
    }
    let owners: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter(|s| s.leased)
        .filter_map(|s| s.owner.as_deref())
        .collect();
    Ok(format!(
        "{} ({} owned by {} workers; the lag counts every event after a segment's checkpoint, its own streams or not)\n{table}",
        rows.len(),
        rows.iter().filter(|s| s.leased).count(),
        owners.len()
    ))
}

pub(crate) fn no_answer(p: &ProjectionStatus, timeout: Duration) -> Failure {
    Box::new(NoAnswer(format!(
        "no worker answered within {} s (lease {}); the request stands and runs when the worker of `{}` does",
        timeout.as_secs(),
        lease_text(p),
        p.name
    )))
}

async fn rebuild(
    store: &PostgresEventStore,
    name: &str,
    no_wait: bool,
    timeout: Duration,
) -> Result<(), Failure> {
    let p = find(store, name).await?;
    let control = Control::new(store.clone());
    let Some(requested) = control.request_rebuild(name).await? else {
        return Err(format!("no projection `{name}`").into());
    };
    if !p.leased && p.segments.is_none() {
        eprintln!(
            "note: no worker holds `{name}` now ({}); it rebuilds when one starts",
            lease_text(&p)
        );
    }
    if no_wait {
        out!("rebuild of `{name}` requested");
        return Ok(());
    }
    let started = std::time::Instant::now();
    let began = wait_for(timeout, || async {
        let r = control
            .requests(name)
            .await?
            .ok_or("the projection vanished")?;
        if let Some(error) = r.error {
            return Err(format!("the worker refused: {error}").into());
        }
        let began =
            r.rebuild_requested_at.is_none() && r.rebuilt_at.is_some_and(|at| at >= requested);
        Ok(began.then_some(()))
    })
    .await?;
    if began.is_none() {
        return Err(no_answer(&p, timeout));
    }
    // The read model was reset; follow the replay to the head as it was then.
    let target = store.head().await?.map_or(0, |h| h.position);
    let bar = indicatif::ProgressBar::new(target);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_message(format!("rebuilding {name}"));
    loop {
        // A segmented projection is where its slowest segment is.
        let at = evently_core::projection::Progress::checkpoint_of(store, name)
            .await?
            .position;
        bar.set_position(at.min(target));
        if at >= target {
            break;
        }
        if let Some(error) = control.requests(name).await?.and_then(|r| r.error) {
            bar.abandon();
            return Err(format!("the rebuild failed: {error}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    out!(
        "rebuilt `{name}` up to position {target} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A projection's status as one JSON object.
fn projection_json(p: &ProjectionStatus) -> serde_json::Value {
    serde_json::json!({
        "name": p.name,
        "transaction": p.checkpoint.transaction,
        "position": p.checkpoint.position,
        "lag": p.lag,
        "lag_seconds": p.lag_seconds,
        "owner": p.owner,
        "leased": p.leased,
        "epoch": p.epoch,
        "dead_letters": p.dead_letters,
        "updated_at": p.updated_at,
        "segments": p.segments,
        "segment_of": p.segment_of,
    })
}
