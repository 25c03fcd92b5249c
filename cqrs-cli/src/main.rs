#![doc = include_str!("../README.md")]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Prints a line to stdout; a closed pipe (`cqrs events tail | head -1`) ends the program
/// quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::print_line(format_args!($($arg)*))
    };
}

mod brokers;
mod scaffold;
use evently_core::saga::{SagaId, SagaStatus, SagaStore};
use evently_core::{AggregateId, EventStore, EventStoreExt, StoredEvent, StreamId};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::{Control, LetterState};
use evently_postgres::control::{DeadLetters, ProjectionStatus, projections, read_checkpoint};
use evently_postgres::saga::PostgresSagaStore;

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
    /// Print what read commands find as JSON, one object per line (events, projections, dead
    /// letters, sagas); nothing for an empty list.
    #[arg(long, global = true)]
    json: bool,
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
    /// Dead letters of projections, and of Kafka, RabbitMQ and NATS consumers.
    #[command(subcommand)]
    Dlq(Dlq),
    /// Saga instances.
    #[command(subcommand)]
    Sagas(Sagas),
    /// The store itself: whether it is on the server its transaction ids belong to, and the
    /// repair after a restore or a move to another server.
    #[command(subcommand)]
    Store(Store),
    /// Print a completion script for a shell, e.g. `cqrs completions bash >
    /// ~/.local/share/bash-completion/completions/cqrs`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
}

#[derive(Subcommand)]
enum Store {
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

#[derive(Subcommand)]
enum Dlq {
    /// The dead-letter topic (`<topic>.dlq`) of a Kafka subscriber (brokers at `KAFKA_BROKERS`).
    /// Ids are `<partition>:<offset>`; what was retried or purged is recorded as the offsets of
    /// consumer group `cqrs-dlq.<dead-letter topic>` (the topic itself is never written to).
    Kafka {
        /// The dead-letter topic, e.g. `cqrs.order.dlq`.
        topic: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// The dead-letter queue (`<queue>.dlq`) of a RabbitMQ consumer (broker at `AMQP_URL`).
    Rabbitmq {
        /// The consumer's queue.
        queue: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// The dead letters of a NATS JetStream consumer in the dead-letter stream (server at
    /// `NATS_URL`).
    Nats {
        /// The durable consumer's name.
        consumer: String,
        /// The events stream (its dead-letter stream is `<stream>_DLQ`).
        #[arg(long, default_value = "CQRS_EVENTS")]
        stream: String,
        /// The events' subject prefix.
        #[arg(long, default_value = "cqrs.events")]
        prefix: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// The dead-letter queue (`<queue>-dlq.fifo`, `<queue>-dlq` for a standard queue) of an
    /// SQS consumer (`SQS_ENDPOINT` for a local server, else AWS with `AWS_REGION` and the normal
    /// credentials). Ids are the dead letters' message ids; on a FIFO queue a letter behind an
    /// earlier one of its message group (aggregate) is reached only after that one.
    Sqs {
        /// The consumer's queue, e.g. `shop-events.fifo` (or a standard queue, `shop-events`).
        queue: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// A projection's dead letters.
    List {
        /// The projection's name.
        projection: String,
    },
    /// Asks the projection's worker to apply dead letter `id` again (after the letters before
    /// it in its stream, to keep per-stream order) and waits for the outcome.
    Retry {
        /// The dead letter's id (`#id` in `dlq list`).
        id: i64,
        /// How long to wait for the worker, in seconds (exit code 3 after).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Asks for every dead letter of a projection to be applied again and waits for the outcome.
    RetryAll {
        /// The projection's name.
        projection: String,
        /// How long to wait for the worker, in seconds (exit code 3 after).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Drop dead letters without applying them.
    Purge {
        /// The projection's name.
        projection: String,
        /// Only those that last failed longer ago than this (`30m`, `12h`, `7d`, `2w`, `1h 30m`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<chrono::Duration>,
        /// Say how many would be purged, purge nothing.
        #[arg(long)]
        dry_run: bool,
        /// Purge without asking (needed when the input is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum Sagas {
    /// Saga instances, oldest first.
    List {
        /// Only this saga.
        #[arg(long)]
        saga: Option<String>,
        /// Only in this state.
        #[arg(long, value_parser = state_parser())]
        state: Option<SagaStatus>,
    },
    /// One instance with its steps.
    Show {
        /// The instance's id.
        id: uuid::Uuid,
    },
    /// Makes an unreadable instance (set aside because its state or data did not read) or a
    /// failed one due again now, after a fix: the next orchestrator run picks it up.
    Retry {
        /// The instance's id.
        id: uuid::Uuid,
    },
    /// Ends an unfinished instance for good (nothing more runs or compensates).
    Abandon {
        /// The instance's id.
        id: uuid::Uuid,
    },
}

/// An age: `30s`, `30m`, `12h`, `7d`, `2w`, `1h 30m` (humantime's units; never negative), at
/// most what a date can go back.
fn parse_age(text: &str) -> Result<chrono::Duration, String> {
    let age = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (expected an age such as 30m, 12h, 7d or 2w)"))?;
    chrono::Duration::from_std(age)
        .ok()
        .filter(|age| chrono::Utc::now().checked_sub_signed(*age).is_some())
        .ok_or_else(|| format!("`{text}`: longer than any date can go back"))
}

/// Asks on the terminal whether to go on (`y`/`yes`); without a terminal, says to pass
/// `--yes`.
fn confirmed(question: &str) -> Result<bool, Box<dyn std::error::Error>> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(format!("{question}: the input is not a terminal, pass --yes to go on").into());
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// The saga states `--state` takes, listed in `--help` and suggested on a typo.
fn state_parser() -> impl clap::builder::TypedValueParser<Value = SagaStatus> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(SagaStatus::ALL.map(SagaStatus::as_str))
        .try_map(|state: String| state.parse::<SagaStatus>())
}

/// Writes a line to stdout; exits with success when the reader went away.
fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cqrs: cannot write the output: {error}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logs();
    let cli = Cli::parse();
    let schema = cli.schema.clone();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = error.to_string();
            // The server names the missing table, with a position in our SQL: say what to do.
            if message.contains("relation \"") && message.contains("does not exist") {
                eprintln!(
                    "cqrs: schema `{schema}` has no framework tables (is it the right schema? if so, run `cqrs migrate --schema {schema}`): {message}"
                );
            } else {
                eprintln!("cqrs: {message}");
            }
            if error.downcast_ref::<NoAnswer>().is_some() {
                ExitCode::from(3)
            } else if error.downcast_ref::<brokers::OverThreshold>().is_some() {
                ExitCode::from(4)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The framework's logs (a relay or a worker saying why it stopped) on stderr, by `RUST_LOG`
/// (default `warn`: the commands' own output is on stdout), coloured on a terminal unless
/// `NO_COLOR` is set.
fn init_logs() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
}

type Failure = Box<dyn std::error::Error>;

/// No worker answered a request in time (exit code 3): the request stands.
#[derive(Debug)]
struct NoAnswer(String);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoAnswer {}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    match &cli.command {
        Command::New(New::Aggregate { name, path }) => return new_aggregate(name, path),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "cqrs", &mut script);
            out!("{}", String::from_utf8_lossy(&script).trim_end());
            return Ok(());
        }
        // A broker's dead letters need no database.
        Command::Dlq(Dlq::Kafka { topic, action }) => {
            let dead = evently_kafka::KafkaDeadLetters::new(
                &evently_kafka::KafkaConfig::from_env(),
                topic.clone(),
            );
            return brokers::run(&dead, action.clone()).await;
        }
        Command::Dlq(Dlq::Rabbitmq { queue, action }) => {
            let dead = evently_rabbitmq::RabbitDeadLetters::new(
                &evently_rabbitmq::RabbitConfig::from_env(),
                queue.clone(),
            );
            return brokers::run(&dead, action.clone()).await;
        }
        Command::Dlq(Dlq::Nats {
            consumer,
            stream,
            prefix,
            action,
        }) => {
            let config =
                evently_nats::NatsConfig::from_env().with_stream(stream.clone(), prefix.clone())?;
            let dead = evently_nats::NatsDeadLetters::new(&config, consumer.clone());
            return brokers::run(&dead, action.clone()).await;
        }
        Command::Dlq(Dlq::Sqs { queue, action }) => {
            let config = evently_sqs::SqsConfig::from_env();
            let dead =
                evently_sqs::SqsDeadLetters::new(&config, evently_sqs::dead_letter_queue(queue));
            return brokers::run(&dead, action.clone()).await;
        }
        _ => {}
    }
    let url = cli
        .database_url
        .unwrap_or_else(evently_postgres::database_url);
    // The error names the server without its password.
    let store = PostgresEventStore::connect_within(&url, &cli.schema, Duration::from_secs(5))
        .await
        .map_err(|e| format!("cannot reach the store: {e}"))?;
    match cli.command {
        Command::New(_)
        | Command::Completions { .. }
        | Command::Dlq(
            Dlq::Kafka { .. } | Dlq::Rabbitmq { .. } | Dlq::Nats { .. } | Dlq::Sqs { .. },
        ) => {}
        Command::Migrate => {
            let before = store.applied_migrations().await?;
            store.migrate().await?;
            let after = store.applied_migrations().await?;
            let new: Vec<&(i64, String)> = after.iter().filter(|m| !before.contains(m)).collect();
            if new.is_empty() {
                out!(
                    "schema `{}` is up to date ({} migrations, none to apply)",
                    cli.schema,
                    after.len()
                );
            } else {
                out!(
                    "applied {} migrations to schema `{}`; it is up to date:",
                    new.len(),
                    cli.schema
                );
                for (version, description) in new {
                    out!("  {version} {description}");
                }
            }
        }
        Command::Store(Store::Check) => match store.check_server().await? {
            None => out!(
                "schema `{}`: its transaction ids belong to this server",
                cli.schema
            ),
            Some(moved) => return Err(moved.to_string().into()),
        },
        Command::Store(Store::Rebase { dry_run, yes }) => {
            let moved = store.check_server().await?;
            match (&moved, dry_run) {
                (None, _) => {
                    out!(
                        "schema `{}`: its transaction ids belong to this server; nothing to rebase",
                        cli.schema
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
                            cli.schema
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
                cli.schema,
                rebased
                    .server
                    .map_or_else(|| "unknown".to_owned(), |s| s.to_string())
            );
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
                print_event(event, json);
            }
        }
        Command::Events(Events::Tail { limit, follow }) => {
            let mut after = store.checkpoint_before_last(limit).await?;
            loop {
                let page = store.read_all(after, 1_000).await?;
                for event in &page {
                    print_event(event, json);
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
            let all = projections(&store).await?;
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
                "updated",
            ]);
            for p in all {
                let owner = match (&p.owner, p.leased) {
                    (Some(owner), true) => owner.clone(),
                    (Some(owner), false) => format!("({owner})"),
                    (None, _) => "-".to_owned(),
                };
                table.add_row([
                    p.name,
                    p.checkpoint.position.to_string(),
                    p.lag.to_string(),
                    format!("{:.1}", p.lag_seconds),
                    p.epoch.to_string(),
                    owner,
                    p.dead_letters.to_string(),
                    p.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                ]);
            }
            out!("{table}");
        }
        Command::Projections(Projections::Status { name }) => {
            status(&store, &name, json).await?;
        }
        Command::Projections(Projections::Rebuild {
            name,
            no_wait,
            timeout,
        }) => {
            rebuild(&store, &name, no_wait, Duration::from_secs(timeout)).await?;
        }
        Command::Dlq(Dlq::Retry { id, timeout }) => {
            retry(&store, id, Duration::from_secs(timeout)).await?;
        }
        Command::Dlq(Dlq::RetryAll {
            projection,
            timeout,
        }) => {
            retry_all(&store, &projection, Duration::from_secs(timeout)).await?;
        }
        Command::Dlq(Dlq::List { projection }) => {
            let letters = DeadLetters::new(store).list(&projection).await?;
            if json {
                for l in &letters {
                    out!(
                        "{}",
                        serde_json::json!({
                            "id": l.id,
                            "projection": projection,
                            "stream": l.stream.to_string(),
                            "version": l.version,
                            "event_id": l.event_id.0,
                            "attempts": l.attempts,
                            "first_failed_at": l.first_failed_at,
                            "last_failed_at": l.last_failed_at,
                            "error": l.error,
                        })
                    );
                }
                return Ok(());
            }
            if letters.is_empty() {
                out!("no dead letters for `{projection}`");
            }
            for l in letters {
                out!(
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
            dry_run,
            yes,
        }) => {
            let now = chrono::Utc::now();
            // The parser checked that the age fits.
            let before = older_than.and_then(|age| now.checked_sub_signed(age));
            let letters = DeadLetters::new(store);
            let matching = letters
                .list(&projection)
                .await?
                .into_iter()
                .filter(|l| before.is_none_or(|before| l.last_failed_at < before))
                .count();
            let which = match before {
                Some(before) => format!(
                    "{matching} dead letters of `{projection}` that last failed before {}",
                    before.format("%Y-%m-%d %H:%M:%S UTC")
                ),
                None => format!("all {matching} dead letters of `{projection}`"),
            };
            if dry_run {
                out!("would purge {which}");
                return Ok(());
            }
            if matching == 0 {
                out!("purged 0 dead letters of `{projection}`");
                return Ok(());
            }
            if !yes && !confirmed(&format!("purge {which}"))? {
                out!("purged nothing");
                return Ok(());
            }
            let purged = letters.purge(&projection, before).await?;
            out!("purged {purged} dead letters of `{projection}`");
        }
        Command::Sagas(Sagas::Retry { id }) => {
            let sagas = PostgresSagaStore::new(store);
            if sagas.retry(SagaId(id)).await? {
                out!("saga {id} is due again");
            } else {
                return Err(format!(
                    "saga {id} is neither unreadable nor failed: nothing to retry"
                )
                .into());
            }
        }
        Command::Sagas(Sagas::Abandon { id }) => {
            let sagas = PostgresSagaStore::new(store);
            if sagas.abandon(SagaId(id)).await? {
                out!("saga {id} abandoned");
            } else {
                return Err(format!("saga {id} has ended already").into());
            }
        }
        Command::Sagas(Sagas::List { saga, state }) => {
            let sagas = PostgresSagaStore::new(store);
            // Instances set aside whose state does not read at all are listed from their columns.
            if state.is_none_or(|s| s == SagaStatus::Unreadable) {
                let readable: std::collections::HashSet<SagaId> = sagas
                    .list(saga.as_deref(), Some(SagaStatus::Unreadable))
                    .await?
                    .iter()
                    .map(|s| s.id)
                    .collect();
                for q in sagas.quarantined(saga.as_deref()).await? {
                    if readable.contains(&q.id) {
                        continue;
                    }
                    if json {
                        out!(
                            "{}",
                            serde_json::json!({
                                "id": q.id.0,
                                "saga": q.saga,
                                "status": SagaStatus::Unreadable,
                                "set_aside_at": q.at,
                                "error": q.error,
                            })
                        );
                    } else {
                        out!(
                            "{} {:<24} {:<13} set aside {} error: {}",
                            q.id,
                            q.saga,
                            SagaStatus::Unreadable,
                            q.at.format("%Y-%m-%d %H:%M:%S"),
                            q.error
                        );
                    }
                }
            }
            for s in sagas.list(saga.as_deref(), state).await? {
                let done = s
                    .steps
                    .iter()
                    .filter(|(_, o)| !matches!(o, evently_core::saga::StepOutcome::Pending))
                    .count();
                if json {
                    out!(
                        "{}",
                        serde_json::json!({
                            "id": s.id.0,
                            "saga": s.saga,
                            "status": s.status,
                            "steps_done": done,
                            "steps": s.steps.len(),
                            "started_at": s.started_at,
                            "updated_at": s.updated_at,
                            "error": s.error,
                        })
                    );
                    continue;
                }
                out!(
                    "{} {:<24} {:<13} steps {done}/{} started {}{}",
                    s.id,
                    s.saga,
                    s.status.as_str(),
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
            if json {
                let steps: Vec<serde_json::Value> = s
                    .steps
                    .iter()
                    .map(|(name, outcome)| {
                        serde_json::json!({
                            "name": name,
                            "outcome": step_text(outcome).0,
                            "error": step_text(outcome).1,
                        })
                    })
                    .collect();
                out!(
                    "{}",
                    serde_json::json!({
                        "id": s.id.0,
                        "saga": s.saga,
                        "status": s.status,
                        "version": s.version,
                        "error": s.error,
                        "retry_at": s.retry_at,
                        "deadline_at": s.deadline_at,
                        "deadline_fired": s.deadline_fired,
                        "started_by": s.started_by,
                        "started_at": s.started_at,
                        "updated_at": s.updated_at,
                        "steps": steps,
                        "data": s.data,
                    })
                );
                return Ok(());
            }
            out!(
                "saga {} ({}): {}, version {}",
                s.id,
                s.saga,
                s.status,
                s.version
            );
            if let Some(error) = &s.error {
                out!("error: {error}");
            }
            if let Some(at) = s.deadline_at {
                out!(
                    "deadline: {at}{}",
                    if s.deadline_fired { " (fired)" } else { "" }
                );
            }
            for (name, outcome) in &s.steps {
                match step_text(outcome) {
                    (outcome, Some(error)) => out!("  {name}: {outcome}: {error}"),
                    (outcome, None) => out!("  {name}: {outcome}"),
                }
            }
            out!("data: {}", s.data);
        }
    }
    Ok(())
}

/// The status of projection `name`, or an error naming the known ones.
async fn find(store: &PostgresEventStore, name: &str) -> Result<ProjectionStatus, Failure> {
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
    out!("lease:        {}", lease_text(&p));
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

/// Polls `check` every 50 ms until it returns a value or `timeout` passes.
async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Result<Option<T>, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Failure>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(Some(value));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn no_answer(p: &ProjectionStatus, timeout: Duration) -> Failure {
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
    if !p.leased {
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
        let at = read_checkpoint(store, name).await?.position;
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

async fn retry(store: &PostgresEventStore, id: i64, timeout: Duration) -> Result<(), Failure> {
    let control = Control::new(store.clone());
    let Some(projection) = control.request_retry(id).await? else {
        return Err(format!("no dead letter #{id}").into());
    };
    let outcome = wait_for(timeout, || async {
        Ok(match control.letter(id).await? {
            LetterState::Pending => None,
            done => Some(done),
        })
    })
    .await?;
    match outcome {
        Some(LetterState::Gone) => {
            out!("dead letter #{id} of `{projection}` applied");
            Ok(())
        }
        Some(LetterState::Failed(error)) => {
            Err(format!("dead letter #{id} of `{projection}` failed again: {error}").into())
        }
        Some(LetterState::Pending) | None => {
            Err(no_answer(&find(store, &projection).await?, timeout))
        }
    }
}

async fn retry_all(
    store: &PostgresEventStore,
    projection: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let p = find(store, projection).await?;
    let control = Control::new(store.clone());
    let asked = control.request_retry_all(projection).await?;
    if asked == 0 {
        out!("no dead letters for `{projection}`");
        return Ok(());
    }
    let answered = wait_for(timeout, || async {
        let pending = control
            .requests(projection)
            .await?
            .map_or(0, |r| r.retries_pending);
        Ok((pending == 0).then_some(()))
    })
    .await?;
    if answered.is_none() {
        return Err(no_answer(&p, timeout));
    }
    let left = DeadLetters::new(store.clone())
        .list(projection)
        .await?
        .len() as u64;
    let applied = asked.saturating_sub(left);
    if left > 0 {
        return Err(format!(
            "retried {asked} dead letters of `{projection}`: {applied} applied, {left} still dead (see `cqrs dlq list {projection}`)"
        )
        .into());
    }
    out!("retried {asked} dead letters of `{projection}`: all applied");
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
    out!(
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
        Some(root) => out!("declared `mod {}` in {}", module.module, root.display()),
        None => out!(
            "declare it in your crate root: `pub mod {};` (if not done yet)",
            module.module
        ),
    }
    out!(
        "the crate needs: cqrs-core and thiserror in [dependencies]; then `cargo test {}`",
        module.module
    );
    Ok(())
}

/// A table for the terminal: columns as wide as their widest cell, no borders, so that a long
/// name widens its column instead of shifting the others.
fn table<const N: usize>(header: [&str; N]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    // No trailing blanks after the last column.
    if let Some(last) = table.column_mut(N.saturating_sub(1)) {
        last.set_padding((0, 0));
    }
    table
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
    })
}

/// A step's outcome in words, and its error.
fn step_text(outcome: &evently_core::saga::StepOutcome) -> (&'static str, Option<&str>) {
    use evently_core::saga::StepOutcome;
    match outcome {
        StepOutcome::Pending => ("pending", None),
        StepOutcome::Executed => ("executed", None),
        StepOutcome::Failed { error } => ("failed", Some(error)),
        StepOutcome::Compensated => ("compensated", None),
    }
}

fn print_event(event: &StoredEvent, json: bool) {
    if json {
        out!(
            "{}",
            serde_json::json!({
                "stream": event.stream.to_string(),
                "aggregate_type": event.stream.aggregate_type,
                "aggregate_id": event.stream.aggregate_id.to_string(),
                "version": event.version,
                "event_id": event.event_id.0,
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "recorded_at": event.recorded_at,
                "transaction": event.checkpoint.transaction,
                "position": event.checkpoint.position,
                "payload": event.payload,
                "metadata": event.metadata,
            })
        );
        return;
    }
    out!(
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
