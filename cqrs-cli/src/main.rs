#![doc = include_str!("../README.md")]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod scaffold;
use cqrs_core::saga::{SagaId, SagaStatus, SagaStore};
use cqrs_core::{AggregateId, Checkpoint, EventStore, EventStoreExt, StoredEvent, StreamId};
use cqrs_postgres::PostgresEventStore;
use cqrs_postgres::projection::{DeadLetters, projections};
use cqrs_postgres::saga::PostgresSagaStore;

/// Operate a cqrs PostgreSQL store.
#[derive(Parser)]
#[command(name = "cqrs", version, about)]
struct Cli {
    /// The database (default: `DATABASE_URL`, else postgres://postgres@127.0.0.1:5432/test).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// The PostgreSQL schema holding the store.
    #[arg(long, global = true, default_value = "cqrs")]
    schema: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scaffold code.
    #[command(subcommand)]
    New(New),
    /// Apply the schema (idempotent).
    Migrate,
    /// Read recorded events.
    #[command(subcommand)]
    Events(Events),
    /// Projection checkpoints, lag and leases.
    #[command(subcommand)]
    Projections(Projections),
    /// Dead letters of projections.
    #[command(subcommand)]
    Dlq(Dlq),
    /// Saga instances.
    #[command(subcommand)]
    Sagas(Sagas),
}

#[derive(Subcommand)]
enum New {
    /// A module with an aggregate, its commands, events, error and given/when/then tests.
    Aggregate {
        /// The aggregate's name, e.g. `SupportTicket` (or `support_ticket`).
        name: String,
        /// The source directory to write `<name>.rs` into; a `lib.rs` or `main.rs` there gets
        /// the `mod` line.
        #[arg(long, default_value = "src")]
        path: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum Events {
    /// The events of one stream, `<aggregate type>/<aggregate id>`.
    Show {
        /// The stream, e.g. `order/o-1`.
        stream: String,
    },
    /// The last events in the global order; with `--follow`, then every new one.
    Tail {
        /// How many to show first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Keep printing new events (poll every 500 ms) until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum Projections {
    /// Every projection: checkpoint, lag, lease and dead letters.
    List,
}

#[derive(Subcommand)]
enum Dlq {
    /// A projection's dead letters.
    List {
        /// The projection's name.
        projection: String,
    },
    /// Drop dead letters without applying them.
    Purge {
        /// The projection's name.
        projection: String,
        /// Only those that last failed longer ago than this (`30m`, `12h`, `7d`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<chrono::Duration>,
    },
}

#[derive(Subcommand)]
enum Sagas {
    /// Saga instances, oldest first.
    List {
        /// Only this saga.
        #[arg(long)]
        saga: Option<String>,
        /// Only in this state: running, compensating, completed, compensated, failed.
        #[arg(long, value_parser = parse_state)]
        state: Option<SagaStatus>,
    },
    /// One instance with its steps.
    Show {
        /// The instance's id.
        id: uuid::Uuid,
    },
}

/// `30s`, `30m`, `12h`, `7d`.
fn parse_age(text: &str) -> Result<chrono::Duration, String> {
    let split = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number and a unit, like 30m, 12h or 7d"))?;
    match unit {
        "s" => Ok(chrono::Duration::seconds(n)),
        "m" => Ok(chrono::Duration::minutes(n)),
        "h" => Ok(chrono::Duration::hours(n)),
        "d" => Ok(chrono::Duration::days(n)),
        _ => Err(format!("`{text}`: the unit is s, m, h or d")),
    }
}

fn parse_state(text: &str) -> Result<SagaStatus, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
        format!("`{text}`: one of running, compensating, completed, compensated, failed")
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cqrs: {error}");
            ExitCode::FAILURE
        }
    }
}

type Failure = Box<dyn std::error::Error>;

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::New(New::Aggregate { name, path }) = &cli.command {
        return new_aggregate(name, path);
    }
    let url = cli.database_url.unwrap_or_else(cqrs_postgres::database_url);
    // The error names the server without its password.
    let store = PostgresEventStore::connect_within(&url, &cli.schema, Duration::from_secs(5))
        .await
        .map_err(|e| format!("cannot reach the store: {e}"))?;
    match cli.command {
        Command::New(_) => {}
        Command::Migrate => {
            store.migrate().await?;
            println!("schema `{}` is up to date", cli.schema);
        }
        Command::Events(Events::Show { stream }) => {
            let Some((kind, id)) = stream.split_once('/') else {
                return Err(
                    format!("`{stream}`: write the stream as <aggregate type>/<id>").into(),
                );
            };
            let stream = StreamId::new(kind, AggregateId::new(id));
            let events = store.load_all(&stream).await?;
            if events.is_empty() {
                return Err(format!("no events in stream {stream}").into());
            }
            for event in &events {
                print_event(event);
            }
        }
        Command::Events(Events::Tail { limit, follow }) => {
            let mut after = tail_start(&store, limit).await?;
            loop {
                let page = store.read_all(after, 1_000).await?;
                for event in &page {
                    print_event(event);
                    after = event.checkpoint;
                }
                if !follow {
                    break;
                }
                if page.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Command::Projections(Projections::List) => {
            println!(
                "{:<28} {:>10} {:>8} {:>6} {:<16} {:>6}  updated",
                "projection", "position", "lag", "epoch", "owner", "dlq"
            );
            for p in projections(&store).await? {
                let owner = match (&p.owner, p.leased) {
                    (Some(owner), true) => owner.clone(),
                    (Some(owner), false) => format!("({owner})"),
                    (None, _) => "-".to_owned(),
                };
                println!(
                    "{:<28} {:>10} {:>8} {:>6} {:<16} {:>6}  {}",
                    p.name,
                    p.checkpoint.position,
                    p.lag,
                    p.epoch,
                    owner,
                    p.dead_letters,
                    p.updated_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        Command::Dlq(Dlq::List { projection }) => {
            let letters = DeadLetters::new(store).list(&projection).await?;
            if letters.is_empty() {
                println!("no dead letters for `{projection}`");
            }
            for l in letters {
                println!(
                    "#{} {} v{} event {} attempts {} first {} last {}: {}",
                    l.id,
                    l.stream,
                    l.version,
                    l.event_id.0,
                    l.attempts,
                    l.first_failed_at.format("%Y-%m-%d %H:%M:%S"),
                    l.last_failed_at.format("%Y-%m-%d %H:%M:%S"),
                    l.error
                );
            }
        }
        Command::Dlq(Dlq::Purge {
            projection,
            older_than,
        }) => {
            let before = older_than.map(|age| chrono::Utc::now() - age);
            let purged = DeadLetters::new(store).purge(&projection, before).await?;
            println!("purged {purged} dead letters of `{projection}`");
        }
        Command::Sagas(Sagas::List { saga, state }) => {
            let sagas = PostgresSagaStore::new(store);
            for s in sagas.list(saga.as_deref(), state).await? {
                let done = s
                    .steps
                    .iter()
                    .filter(|(_, o)| !matches!(o, cqrs_core::saga::StepOutcome::Pending))
                    .count();
                println!(
                    "{} {:<24} {:<13} steps {done}/{} started {}{}",
                    s.id,
                    s.saga,
                    format!("{:?}", s.status).to_lowercase(),
                    s.steps.len(),
                    s.started_at.format("%Y-%m-%d %H:%M:%S"),
                    s.error.map(|e| format!(" error: {e}")).unwrap_or_default()
                );
            }
        }
        Command::Sagas(Sagas::Show { id }) => {
            let sagas = PostgresSagaStore::new(store);
            let Some(s) = sagas.load(SagaId(id)).await? else {
                return Err(format!("no saga {id}").into());
            };
            println!(
                "saga {} ({}): {:?}, version {}",
                s.id, s.saga, s.status, s.version
            );
            if let Some(error) = &s.error {
                println!("error: {error}");
            }
            if let Some(at) = s.deadline_at {
                println!(
                    "deadline: {at}{}",
                    if s.deadline_fired { " (fired)" } else { "" }
                );
            }
            for (name, outcome) in &s.steps {
                println!("  {name}: {outcome:?}");
            }
            println!("data: {}", s.data);
        }
    }
    Ok(())
}

fn new_aggregate(name: &str, path: &std::path::Path) -> Result<(), Failure> {
    let written = scaffold::write(name, path)?;
    // Best effort: the template is formatted for typical names; long ones may wrap differently.
    let formatted = std::process::Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(&written.file)
        .status()
        .is_ok_and(|s| s.success());
    let module = &written.module;
    println!(
        "wrote {} (aggregate `{}`: 3 commands, 3 events, their tests){}",
        written.file.display(),
        module.type_name,
        if formatted {
            ""
        } else {
            "; rustfmt was not run"
        }
    );
    match &written.registered_in {
        Some(root) => println!("declared `mod {}` in {}", module.module, root.display()),
        None => println!(
            "declare it in your crate root: `pub mod {};` (if not done yet)",
            module.module
        ),
    }
    println!(
        "the crate needs: cqrs-core and thiserror in [dependencies]; then `cargo test {}`",
        module.module
    );
    Ok(())
}

/// The checkpoint after which the last `limit` readable events come.
async fn tail_start(store: &PostgresEventStore, limit: usize) -> Result<Checkpoint, Failure> {
    let mut window: std::collections::VecDeque<Checkpoint> = std::collections::VecDeque::new();
    let mut after = Checkpoint::START;
    let mut start = Checkpoint::START;
    loop {
        let page = store.read_all(after, 5_000).await?;
        let Some(last) = page.last() else {
            return Ok(start);
        };
        after = last.checkpoint;
        for event in &page {
            window.push_back(event.checkpoint);
            if window.len() > limit {
                start = window.pop_front().unwrap_or(start);
            }
        }
    }
}

fn print_event(event: &StoredEvent) {
    println!(
        "{} {} v{} {} (schema {}) at {} position {} {}",
        event.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        event.stream,
        event.version,
        event.event_type,
        event.schema_version,
        event.checkpoint.transaction,
        event.checkpoint.position,
        event.payload
    );
}
