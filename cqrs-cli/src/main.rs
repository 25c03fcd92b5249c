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
mod dlq;
mod events;
mod projections;
mod sagas;
mod scaffold;
mod store;
mod tenants;
mod versions;

use dlq::Dlq;
use evently_postgres::PostgresEventStore;
use events::Events;
use projections::Projections;
use sagas::Sagas;
use scaffold::New;
use store::Store;
use tenants::Tenants;

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
    /// Operate on this tenant's store (schema-per-tenant: its schema from the registry) instead
    /// of `--schema`'s.
    #[arg(long, global = true)]
    tenant: Option<String>,
    /// The schema holding the tenant registry (`evently_tenants`).
    #[arg(long, global = true, default_value = "evently")]
    tenant_registry: String,
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
    Migrate {
        /// Also migrate the schema of every registered tenant (after an upgrade).
        #[arg(long)]
        all_tenants: bool,
        /// Turn on the tenant policies of the one-schema layout (row-level security), as the
        /// tables' owner; the application then connects as another role.
        #[arg(long)]
        row_level_security: bool,
    },
    /// The tenants of the schema-per-tenant layout.
    #[command(subcommand)]
    Tenants(Tenants),
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
    /// Forgets a person (crypto-shredding): deletes the data key of `subject`, so the personal
    /// fields sealed under it read as their placeholders everywhere from now on (loads, replays,
    /// projections and rebuilds, `events show`). It cannot be undone.
    Forget {
        /// The subject, as the events name it (the value of the `#[pii(subject = ...)]` field).
        subject: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Print a completion script for a shell, e.g. `cqrs completions bash >
    /// ~/.local/share/bash-completion/completions/cqrs`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
        Command::New(New::Aggregate { name, path }) => return scaffold::new_aggregate(name, path),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "cqrs", &mut script);
            out!("{}", String::from_utf8_lossy(&script).trim_end());
            return Ok(());
        }
        // A broker's dead letters need no database.
        Command::Dlq(dlq) if dlq.is_broker() => return dlq::run_broker(dlq).await,
        _ => {}
    }
    let url = cli
        .database_url
        .unwrap_or_else(evently_postgres::database_url);
    // The error names the server without its password.
    let mut store = PostgresEventStore::connect_within(&url, &cli.schema, Duration::from_secs(5))
        .await
        .map_err(|e| format!("cannot reach the store: {e}"))?;
    let mut schema = cli.schema.clone();
    if let Some(tenant) = &cli.tenant {
        store = tenants::store_of(&store, &cli.tenant_registry, tenant).await?;
        schema = store.schema().to_owned();
    }
    match cli.command {
        Command::New(_) | Command::Completions { .. } => {}
        Command::Migrate {
            all_tenants,
            row_level_security,
        } => {
            store::migrate(&store, &schema).await?;
            if row_level_security {
                store.enable_row_level_security().await?;
                out!("row-level security separates the tenants of schema `{schema}`");
            }
            if all_tenants {
                tenants::migrate_all(&store, &cli.tenant_registry).await?;
            }
        }
        Command::Tenants(command) => {
            tenants::run(&store, &cli.tenant_registry, command, json).await?;
        }
        Command::Store(command) => store::run(&store, &schema, command).await?,
        Command::Events(command) => events::run(&store, command, json).await?,
        Command::Projections(command) => projections::run(&store, command, json).await?,
        Command::Dlq(command) => dlq::run(&store, command, json).await?,
        Command::Sagas(command) => sagas::run(&store, command, json).await?,
        Command::Forget { subject, yes } => {
            if !yes && !confirmed(&format!("forget `{subject}` for good"))? {
                out!("forgot nothing");
                return Ok(());
            }
            let forgotten = store.forget(&subject).await?;
            if json {
                out!(
                    "{}",
                    serde_json::json!({"subject": subject, "forgotten": forgotten})
                );
            } else if forgotten {
                out!(
                    "`{subject}` is forgotten: its personal data reads as placeholders from now on"
                );
            } else {
                out!("`{subject}` has no data key: nothing of it is sealed in this store");
            }
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
