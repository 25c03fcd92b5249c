//! What crypto-shredding costs: W1 (sequential commands on one stream, each event carrying an
//! e-mail marked `#[pii]`) and W4 (rehydrating a stream of such events) on a store that seals
//! them (`with_personal_data`) beside the same store that does not, in the same run, and saving a
//! snapshot of such a stream 100 events after its last one (the sealing store looks for the
//! subjects in the events since then).
//!
//! ```text
//! cargo bench -p cqrs-bench --bench personal             # into benchmarks/results/personal.md
//! cargo bench -p cqrs-bench --bench personal -- --quick  # the test suite's smoke run
//! ```

use std::time::Instant;

use evently_core::prelude::*;
use evently_core::{CommandMetadata, EventData, EventStore};
use evently_postgres::{PostgresEventStore, database_url};
use serde::{Deserialize, Serialize};

/// A member's events: every change carries personal data of the member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(aggregate = Member)]
pub enum MemberEvent {
    /// The member changed their e-mail address.
    EmailChanged {
        /// Whose.
        member_id: String,
        /// The new address.
        #[pii(subject = member_id)]
        email: String,
        /// How many changes so far.
        changes: u64,
    },
}

/// What a member can be asked to do.
#[derive(Debug, Clone, Command)]
#[command(aggregate = Member)]
pub enum MemberCommand {
    /// Change the e-mail address.
    #[command(create_or_update)]
    ChangeEmail {
        /// The new address.
        email: String,
    },
}

/// Nothing is refused.
#[derive(Debug, thiserror::Error)]
#[error("refused")]
pub struct Refused;

/// A member's state.
#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "member", command = MemberCommand, event = MemberEvent, error = Refused)]
pub struct Member {
    id: String,
    email: String,
    changes: u64,
}

impl Member {
    fn change_email(&self, email: String) -> Result<Vec<MemberEvent>, Refused> {
        Ok(vec![MemberEvent::EmailChanged {
            member_id: if self.id.is_empty() {
                "m-1".to_owned()
            } else {
                self.id.clone()
            },
            email,
            changes: self.changes + 1,
        }])
    }

    fn apply_email_changed(&mut self, member_id: &str, email: &str, changes: &u64) {
        member_id.clone_into(&mut self.id);
        email.clone_into(&mut self.email);
        self.changes = *changes;
    }
}

async fn store(schema: &str, sealed: bool) -> PostgresEventStore {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {}: {e}", database_url()));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let store = PostgresEventStore::new(pool, schema).unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    if sealed {
        store.with_personal_data::<MemberEvent>()
    } else {
        store
    }
}

/// W1: `n` sequential commands on one member: commands per second.
async fn w1(store: &PostgresEventStore, n: u64) -> f64 {
    let gateway = CommandGateway::<Member, _>::new(store.clone());
    let start = Instant::now();
    for i in 0..n {
        gateway
            .execute(
                "m-1",
                MemberCommand::ChangeEmail {
                    email: format!("member{i}@example.com"),
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("W1: {e}"));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// W4: rehydrates a stream of `n` events `runs` times: the median in milliseconds.
async fn w4(store: &PostgresEventStore, n: u64, runs: usize) -> f64 {
    let stream = StreamId::new("member", "m-4");
    let events: Vec<EventData> = (0..n)
        .map(|i| {
            EventData::from_event(
                &MemberEvent::EmailChanged {
                    member_id: "m-4".into(),
                    email: format!("member{i}@example.com"),
                    changes: i + 1,
                },
                Metadata::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gateway = CommandGateway::<Member, _>::new(store.clone()).with_cache_capacity(0);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let (member, _) = gateway
            .load("m-4")
            .await
            .unwrap_or_else(|e| panic!("W4: {e}"));
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(member.changes, n, "W4: every event applied");
        assert_eq!(
            member.email,
            format!("member{}@example.com", n - 1),
            "W4: opened"
        );
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Saving a snapshot of the `n`-event stream W4 wrote, `behind` events after the stream's last
/// snapshot (what a snapshot every `behind` events costs), `runs` times: the median in
/// milliseconds. A sealing store looks for the subjects in the events since the last snapshot.
async fn snapshot_save(store: &PostgresEventStore, n: u64, behind: u64, runs: usize) -> f64 {
    use evently_core::store::{Snapshot, SnapshotStore};
    let stream = StreamId::new("member", "m-4");
    let snapshot = |version: u64| Snapshot {
        stream: stream.clone(),
        version,
        schema_version: 1,
        state: serde_json::json!({ "id": "m-4", "email": "member@example.com", "changes": version }),
    };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {}.snapshots",
            store.schema()
        )))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        store
            .save_snapshot(snapshot(n - behind))
            .await
            .unwrap_or_else(|e| panic!("snapshot: {e}"));
        let start = Instant::now();
        store
            .save_snapshot(snapshot(n))
            .await
            .unwrap_or_else(|e| panic!("snapshot: {e}"));
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(other) = args
        .iter()
        .find(|a| !matches!(a.as_str(), "--quick" | "--bench"))
    {
        eprintln!("unknown argument `{other}`: --quick");
        std::process::exit(2);
    }
    let (commands, stream, runs) = if quick {
        (200, 1_000, 3)
    } else {
        (2_000, 10_000, 7)
    };
    let mut rows = Vec::new();
    for sealed in [false, true] {
        let name = if sealed { "sealed" } else { "plain" };
        let store = store(&format!("bench_personal_{name}"), sealed).await;
        let rate = w1(&store, commands).await;
        let load = w4(&store, stream, runs).await;
        let save = snapshot_save(&store, stream, 100, runs).await;
        if sealed {
            let raw: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM bench_personal_{name}.events WHERE payload::text LIKE '%@example.com%'"
            )))
            .fetch_one(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(raw, 0, "an e-mail in the clear in the events table");
        }
        eprintln!("   {name}: W1 {rate:.0} cmd/s, W4 {load:.1} ms, snapshot save {save:.2} ms");
        rows.push((name, rate, load, save));
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (plain_rate, plain_load, plain_save) = (rows[0].1, rows[0].2, rows[0].3);
    let mut table = format!(
        "# Crypto-shredding's cost (W1: {commands} sequential commands on one stream; W4: rehydrating a {stream}-event stream, median of {runs}; snapshot: saving one of that stream 100 events after its last, median of {runs}; each event carries one sealed field; {cores} cores, PostgreSQL on the same machine)\n\n\
         | store | W1 cmd/s | vs plain | W4 ms | vs plain | snapshot ms | vs plain |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for (name, rate, load, save) in &rows {
        table.push_str(&format!(
            "| {name} | {rate:.0} | {:.2} | {load:.1} | {:.2} | {save:.2} | {:.2} |\n",
            rate / plain_rate,
            load / plain_load,
            save / plain_save
        ));
    }
    println!("{table}");
    if !quick {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/personal.md");
        std::fs::write(&out, &table).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        println!("written to {}", out.display());
    }
}
