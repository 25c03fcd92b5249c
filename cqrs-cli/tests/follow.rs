//! `cqrs events tail --follow` against the real PostgreSQL: the last events first, then each new
//! one as it commits, until the process is stopped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::EventData;
use evently_core::prelude::*;
use evently_postgres::PostgresEventStore;

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

/// The schema `pg::fresh_store("cli_follow")` makes.
const SCHEMA: &str = "t_cli_follow";

async fn deposit(store: &PostgresEventStore, cents: u64) {
    let event = AccountEvent::Deposited(Deposit {
        amount_cents: cents,
        reference: format!("deposit {cents}"),
    });
    let data = EventData::from_event(&event, Metadata::default()).unwrap_or_else(|e| panic!("{e}"));
    store
        .append(
            &StreamId::new("account", "f-1"),
            ExpectedVersion::Any,
            vec![data],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The next line the child printed, within `wait`.
fn next_line(lines: &mpsc::Receiver<String>, wait: Duration) -> String {
    lines
        .recv_timeout(wait)
        .unwrap_or_else(|_| panic!("no line from `cqrs events tail --follow` within {wait:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_prints_new_events_as_they_commit() {
    let store = pg::fresh_store("cli_follow").await;
    deposit(&store, 101).await;
    // Readers stop below the cluster's oldest open transaction: wait until the event is readable.
    while store
        .read_all(evently_core::Checkpoint::START, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args([
            "--schema", SCHEMA, "events", "tail", "--follow", "--limit", "5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });

    let first = next_line(&lines, Duration::from_secs(30));
    assert!(
        first.contains("account/f-1 v1 MoneyDeposited") && first.contains("101"),
        "{first}"
    );
    for (version, cents) in [(2, 202), (3, 303)] {
        deposit(&store, cents).await;
        let line = next_line(&lines, Duration::from_secs(30));
        assert!(
            line.contains(&format!("account/f-1 v{version} MoneyDeposited"))
                && line.contains(&cents.to_string()),
            "{line}"
        );
    }
    assert!(
        child.try_wait().unwrap_or_else(|e| panic!("{e}")).is_none(),
        "--follow keeps running"
    );
    child.kill().unwrap_or_else(|e| panic!("{e}"));
    child.wait().unwrap_or_else(|e| panic!("{e}"));
}
