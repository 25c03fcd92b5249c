//! The `cqrs` binary against the real PostgreSQL: each command's output, one-line errors and exit
//! codes (0 success, 1 failure, 2 usage).

use std::process::Output;
use std::sync::Arc;

use cqrs_examples::bank::{Account, AccountCommand, Deposit};
use cqrs_examples::fulfillment::{Fulfillment, FulfillmentSaga, Services};
use evently_core::prelude::*;
use evently_core::saga::Orchestrator;
use evently_postgres::PostgresEventStore;
use evently_postgres::saga::PostgresSagaStore;
use sqlx::AssertSqlSafe;

const SCHEMA: &str = "t_cli";

fn cqrs(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(["--schema", SCHEMA])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run cqrs: {e}"))
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Each line of a successful command's output, parsed as JSON.
fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// The one line of a failed command and its exit code.
fn failure(output: &Output) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

#[tokio::test]
async fn every_command_against_a_real_store() {
    let url = evently_postgres::database_url();
    let pool = sqlx::PgPool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let first = stdout(&cqrs(&["migrate"]));
    assert!(
        first.starts_with("applied ") && first.contains("migrations to schema `t_cli`"),
        "{first}"
    );
    let applied = first.lines().count() - 1;
    assert!(applied >= 9, "{first}");
    assert_eq!(
        stdout(&cqrs(&["migrate"])),
        format!("schema `t_cli` is up to date ({applied} migrations, none to apply)\n"),
        "idempotent"
    );

    let store = PostgresEventStore::new(pool.clone(), SCHEMA).unwrap_or_else(|e| panic!("{e}"));
    let accounts = CommandGateway::<Account, _>::new(store.clone());
    accounts
        .execute(
            "a-1",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
            CommandMetadata::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    accounts
        .execute(
            "a-1",
            AccountCommand::Deposit(Deposit {
                amount_cents: 1_250,
                reference: "salary".into(),
            }),
            CommandMetadata::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let shown = stdout(&cqrs(&["events", "show", "account/a-1"]));
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(lines[0].contains("account/a-1 v1 AccountOpened") && lines[0].contains("\"Ada\""));
    assert!(lines[1].contains("v2 MoneyDeposited (schema 2)") && lines[1].contains("1250"));
    // The same as JSON, one object per line.
    let objects = json_lines(&cqrs(&["events", "show", "account/a-1", "--json"]));
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0]["stream"], "account/a-1");
    assert_eq!(objects[0]["aggregate_id"], "a-1");
    assert_eq!(objects[0]["event_type"], "AccountOpened");
    assert_eq!(objects[0]["payload"]["owner"], "Ada");
    assert_eq!(objects[1]["version"], 2);
    assert_eq!(objects[1]["schema_version"], 2);
    assert_eq!(objects[1]["payload"]["amount_cents"], 1_250);
    assert!(objects[1]["position"].as_u64().is_some_and(|p| p > 0));
    assert!(
        objects[1]["recorded_at"]
            .as_str()
            .is_some_and(|t| t.contains('T'))
    );
    assert!(objects[1]["metadata"].is_object());
    assert_eq!(
        failure(&cqrs(&["events", "show", "account/nobody"])),
        (1, "cqrs: no events in stream account/nobody\n".to_owned())
    );
    assert_eq!(failure(&cqrs(&["events", "show", "no-slash"])).0, 1);

    // The horizon is the cluster's: other tests' transactions can hold the newest events back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let tail = loop {
        let tail = stdout(&cqrs(&["events", "tail", "--limit", "1"]));
        if tail.contains("MoneyDeposited") || std::time::Instant::now() > deadline {
            break tail;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.contains("MoneyDeposited"), "{tail}");

    // A projection with a checkpoint, an owner and a dead letter, as a worker leaves them.
    for sql in [
        "INSERT INTO t_cli.projection_checkpoints (projection, transaction_id, global_position, owner, epoch, lease_until) \
         SELECT 'balances', transaction_id, global_position, 'worker-1', 3, now() + interval '1 minute' \
         FROM t_cli.events WHERE global_position = 1",
        "INSERT INTO t_cli.projection_dead_letters (projection, event_id, aggregate_type, aggregate_id, version, error, attempts, first_failed_at, last_failed_at) \
         SELECT 'balances', event_id, aggregate_type, aggregate_id, version, 'balance table is locked', 3, now(), now() \
         FROM t_cli.events WHERE version = 2",
    ] {
        sqlx::query(sql)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let listed = stdout(&cqrs(&["projections", "list"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with("balances"))
        .unwrap_or_else(|| panic!("{listed}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    // projection, position, lag, lag in seconds, epoch, owner, dead letters, updated.
    assert_eq!(&columns[..3], ["balances", "1", "1"], "{row}");
    assert!(columns[3].parse::<f64>().is_ok(), "{row}");
    assert_eq!(&columns[4..7], ["3", "worker-1", "1"], "{row}");

    let object = &json_lines(&cqrs(&["projections", "list", "--json"]))[0];
    assert_eq!(object["name"], "balances");
    assert_eq!(object["owner"], "worker-1");
    assert_eq!(object["leased"], true);
    assert_eq!(
        (object["epoch"].clone(), object["dead_letters"].clone()),
        (3.into(), 1.into())
    );
    let status = &json_lines(&cqrs(&["projections", "status", "balances", "--json"]))[0];
    assert_eq!(status["lag"], 1);
    assert!(status["head"].as_u64().is_some_and(|h| h >= 2), "{status}");
    // A long name widens its column; the others stay aligned under their headers.
    sqlx::query(
        "INSERT INTO t_cli.projection_checkpoints (projection, transaction_id, global_position) \
         SELECT 'a_projection_with_a_name_longer_than_any_column', transaction_id, global_position \
         FROM t_cli.events WHERE global_position = 1",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let table = stdout(&cqrs(&["projections", "list"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let lag_column = lines[0].find("lag").unwrap_or_else(|| panic!("{table}"));
    for line in &lines[1..] {
        assert_eq!(
            line.split_whitespace().count(),
            10,
            "one value per column (the date has two; `-` for no segments): {table}"
        );
        assert_eq!(&line[lag_column..lag_column + 1], "1", "{table}");
    }
    sqlx::query("DELETE FROM t_cli.projection_checkpoints WHERE projection <> 'balances'")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let letter = &json_lines(&cqrs(&["dlq", "list", "balances", "--json"]))[0];
    assert_eq!(letter["stream"], "account/a-1");
    assert_eq!(letter["version"], 2);
    assert_eq!(letter["attempts"], 3);
    assert_eq!(letter["reason"], "failed");
    assert_eq!(letter["error"], "balance table is locked");
    let letters = stdout(&cqrs(&["dlq", "list", "balances"]));
    assert!(
        letters.contains("account/a-1 v2")
            && letters.contains("attempts 3")
            && letters.contains("balance table is locked"),
        "{letters}"
    );
    assert!(
        stdout(&cqrs(&["dlq", "purge", "balances", "--older-than", "1d"])).contains("purged 0")
    );
    // Ages that are not ages are usage errors, never a panic or a purge of everything.
    for bad in ["7é", "-5d", "99999999999999d", "5", "d"] {
        let (code, usage) = failure(&cqrs(&[
            "dlq",
            "purge",
            "balances",
            &format!("--older-than={bad}"),
        ]));
        assert_eq!(code, 2, "{bad}: {usage}");
        assert!(
            usage.contains(&format!("`{bad}`")) && !usage.contains("panicked"),
            "{usage}"
        );
    }
    assert!(
        stdout(&cqrs(&[
            "dlq",
            "purge",
            "balances",
            "--older-than",
            "1h 30m",
            "--dry-run"
        ]))
        .contains("would purge 0 dead letters of `balances` that last failed before")
    );
    assert_eq!(
        stdout(&cqrs(&["dlq", "purge", "balances", "--dry-run"])),
        "would purge all 1 dead letters of `balances`\n"
    );
    // Without a terminal to ask on, a purge needs --yes; nothing is purged without it.
    let (code, line) = failure(&cqrs(&["dlq", "purge", "balances"]));
    assert_eq!(code, 1);
    assert!(line.contains("pass --yes"), "{line}");
    assert!(stdout(&cqrs(&["dlq", "list", "balances"])).contains("attempts 3"));
    assert!(stdout(&cqrs(&["dlq", "purge", "balances", "--yes"])).contains("purged 1"));
    assert!(stdout(&cqrs(&["dlq", "list", "balances"])).contains("no dead letters"));
    // Completion scripts, without a database.
    for shell in ["bash", "zsh", "fish"] {
        let script = std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
            .args(["completions", shell])
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let script = stdout(&script);
        assert!(
            script.contains("cqrs") && script.contains("projections") && script.contains("json"),
            "{shell}: {script}"
        );
    }
    // A typo gets a suggestion.
    let (code, usage) = failure(&cqrs(&["projection", "list"]));
    assert_eq!(code, 2);
    assert!(usage.contains("projections"), "{usage}");

    // Sagas: one stored and not run yet.
    let sagas = PostgresSagaStore::new(store.clone());
    let services = Services::new(Arc::new(CommandGateway::new(InMemoryEventStore::new())));
    let id = Orchestrator::<FulfillmentSaga, _>::new(sagas, services, "cli-test")
        .submit(Fulfillment {
            order_id: "o-9".into(),
            items: vec![("sku".into(), 1)],
            amount_cents: 500,
            payment_id: None,
            shipment_id: None,
            decline_payment: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listed = stdout(&cqrs(&["sagas", "list", "--state", "running"]));
    assert!(
        listed.contains(&id.to_string())
            && listed.contains("order_fulfillment")
            && listed.contains("steps 0/5"),
        "{listed}"
    );
    assert!(stdout(&cqrs(&["sagas", "list", "--state", "completed"])).is_empty());
    assert!(stdout(&cqrs(&["sagas", "list", "--state", "completed", "--json"])).is_empty());
    let (code, usage) = failure(&cqrs(&["sagas", "list", "--state", "done"]));
    assert_eq!(code, 2);
    assert!(
        usage.contains("possible values") && usage.contains("compensating"),
        "{usage}"
    );
    let listed = &json_lines(&cqrs(&["sagas", "list", "--json"]))[0];
    assert_eq!(listed["id"], id.to_string());
    assert_eq!(listed["status"], "running");
    assert_eq!(
        (listed["steps_done"].clone(), listed["steps"].clone()),
        (0.into(), 5.into())
    );
    let shown = stdout(&cqrs(&["sagas", "show", &id.to_string()]));
    assert!(
        shown.contains("reserve_inventory: pending") && shown.contains("\"o-9\""),
        "{shown}"
    );
    let shown = &json_lines(&cqrs(&["sagas", "show", &id.to_string(), "--json"]))[0];
    let steps = shown["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(steps.len(), 5, "{shown}");
    assert!(
        steps
            .iter()
            .any(|s| s["name"] == "reserve_inventory" && s["outcome"] == "pending"),
        "{shown}"
    );
    assert_eq!(shown["data"]["order_id"], "o-9");
    assert_eq!(
        failure(&cqrs(&[
            "sagas",
            "show",
            "01234567-89ab-7def-8123-456789abcdef"
        ])),
        (
            1,
            "cqrs: no saga 01234567-89ab-7def-8123-456789abcdef\n".to_owned()
        )
    );

    // An instance whose state does not read at all (edited by hand) and one whose data no longer
    // fits: set aside by the next claim, listed as unreadable with the reason, retried, abandoned.
    let garbage = "01234567-89ab-7def-8123-456789abcd01";
    sqlx::query(
        "INSERT INTO t_cli.saga_instances (id, saga, status, state, version, started_at, updated_at) \
         VALUES ($1::uuid, 'order_fulfillment', 'running', '{\"not\": \"a saga\"}', 1, now() - interval '1 hour', now())",
    )
    .bind(garbage)
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("UPDATE t_cli.saga_instances SET state = jsonb_set(state, '{data,amount_cents}', '\"lots\"') WHERE id = $1")
        .bind(id.0)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let services = Services::new(Arc::new(CommandGateway::new(InMemoryEventStore::new())));
    let ran = Orchestrator::<FulfillmentSaga, _>::new(
        PostgresSagaStore::new(store.clone()),
        services,
        "cli-run",
    )
    .run_due(10)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(ran.is_empty(), "{ran:?}");
    let unreadable = stdout(&cqrs(&["sagas", "list", "--state", "unreadable"]));
    assert_eq!(unreadable.lines().count(), 2, "{unreadable}");
    assert!(
        unreadable.contains(garbage) && unreadable.contains("does not read"),
        "{unreadable}"
    );
    assert!(
        unreadable.contains(&id.to_string()) && unreadable.contains("does not fit"),
        "{unreadable}"
    );
    assert!(stdout(&cqrs(&["sagas", "retry", &id.to_string()])).contains("due again"));
    assert!(stdout(&cqrs(&["sagas", "list", "--state", "running"])).contains(&id.to_string()));
    assert!(stdout(&cqrs(&["sagas", "abandon", garbage])).contains("abandoned"));
    assert_eq!(
        failure(&cqrs(&["sagas", "abandon", garbage])).0,
        1,
        "ended already"
    );
    assert_eq!(
        failure(&cqrs(&["sagas", "retry", garbage])).0,
        1,
        "nothing to retry"
    );
    assert!(stdout(&cqrs(&["sagas", "list", "--state", "unreadable"])).is_empty());

    // A reader that goes away after one line: a quiet exit, no panic.
    let events: Vec<evently_core::EventData> = (0..3_000)
        .map(|n| evently_core::EventData {
            event_id: evently_core::EventId::new(),
            event_type: "Ticked".into(),
            schema_version: 1,
            payload: serde_json::json!({ "n": n }),
            metadata: Metadata::default(),
        })
        .collect();
    store
        .append(
            &StreamId::new("ticks", "t-1"),
            ExpectedVersion::NoStream,
            events,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(["--schema", SCHEMA, "events", "tail", "--limit", "3000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run cqrs: {e}"));
    {
        use std::io::BufRead;
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("piped"));
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!first.is_empty());
    }
    let ended = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(
        ended.status.success() && stderr.is_empty(),
        "exit {:?}: {stderr}",
        ended.status.code()
    );

    // A schema never migrated: what to run.
    let (code, line) = failure(
        &std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
            .args(["--schema", "t_cli_never_migrated", "events", "tail"])
            .output()
            .unwrap_or_else(|e| panic!("run cqrs: {e}")),
    );
    assert_eq!(code, 1);
    assert!(
        line.contains("run `cqrs migrate --schema t_cli_never_migrated`"),
        "{line}"
    );

    // An unreachable database: one line, exit 1, and the password is not in it.
    let (code, line) = failure(&cqrs(&[
        "--database-url",
        "postgres://postgres:hunter2@127.0.0.1:1/x",
        "migrate",
    ]));
    assert_eq!(code, 1);
    assert!(
        line.starts_with("cqrs: cannot reach the store:")
            && line.contains("127.0.0.1:1")
            && !line.contains("hunter2")
            && line.contains("refused")
            && line.lines().count() == 1,
        "{line}"
    );
    // A password in the query string is hidden too.
    let (code, line) = failure(&cqrs(&[
        "--database-url",
        "postgres://postgres@127.0.0.1:1/x?password=hunter2",
        "migrate",
    ]));
    assert_eq!(code, 1);
    assert!(
        line.contains("password=***") && !line.contains("hunter2"),
        "{line}"
    );
}

/// `cqrs store check` and `cqrs store rebase` on a store whose transaction ids came from another
/// server (shifted past this one's counter, as a restore leaves them).
#[tokio::test]
async fn store_check_and_rebase_after_a_move() {
    const MOVED: &str = "t_cli_moved";
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
            .args(["--schema", MOVED])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run cqrs: {e}"))
    };
    let url = evently_postgres::database_url();
    let pool = sqlx::PgPool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {MOVED} CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    stdout(&run(&["migrate"]));
    let store = PostgresEventStore::new(pool.clone(), MOVED).unwrap_or_else(|e| panic!("{e}"));
    let accounts = CommandGateway::<Account, _>::new(store.clone());
    for id in ["a-1", "a-2", "a-3"] {
        accounts
            .execute(
                id,
                AccountCommand::Open {
                    owner: "ann".into(),
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        stdout(&run(&["store", "check"])),
        format!("schema `{MOVED}`: its transaction ids belong to this server\n")
    );
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {MOVED}.events SET transaction_id = (transaction_id::text::bigint + 5000000000)::text::xid8"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let (code, line) = failure(&run(&["store", "check"]));
    assert_eq!(code, 1);
    assert!(
        line.starts_with(&format!(
            "cqrs: schema `{MOVED}`: its events carry transaction ids up to"
        )) && line.contains(&format!("run `cqrs store rebase --schema {MOVED}`")),
        "{line}"
    );
    // Reads in the global order are refused, saying the same.
    let (code, line) = failure(&run(&["events", "tail"]));
    assert_eq!(code, 1);
    assert!(line.contains("cqrs store rebase"), "{line}");

    let dry = stdout(&run(&["store", "rebase", "--dry-run"]));
    assert!(
        dry.contains("past this server's next") && dry.ends_with("(dry run: nothing changed)\n"),
        "{dry}"
    );
    let (code, line) = failure(&run(&["store", "rebase"]));
    assert_eq!(code, 1);
    assert!(line.contains("pass --yes"), "{line}");

    let done = stdout(&run(&["store", "rebase", "--yes"]));
    assert!(
        done.contains("re-stamped 3 events with ")
            && done.contains("moved 0 checkpoints")
            && done.contains(&format!("schema `{MOVED}` now belongs to this server")),
        "{done}"
    );
    stdout(&run(&["store", "check"]));
    let tail = stdout(&run(&["events", "tail"]));
    assert_eq!(tail.matches("AccountOpened").count(), 3, "{tail}");
    assert_eq!(
        stdout(&run(&["store", "rebase", "--yes"])),
        format!("schema `{MOVED}`: its transaction ids belong to this server; nothing to rebase\n")
    );
}
