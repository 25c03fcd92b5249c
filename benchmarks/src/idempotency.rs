//! I1: what an idempotency key adds to a command's latency. Deposits through the command
//! gateway on PostgreSQL, one after another on one account per mode, each with a new key:
//! without a key, with the key recorded by the store in the events' transaction
//! (`execute_idempotent`), and with the key in Redis (`evently_redis::RedisIdempotency::
//! execute_command`: a lock, the command, the outcome stored, the lock released). The modes
//! take turns command by command, so that they share the server's state. Needs Redis at
//! `REDIS_URL` (default redis://127.0.0.1:6379).

use std::time::Instant;

use cqrs_examples::bank::{Account, AccountCommand, Deposit};
use evently_core::{CommandGateway, CommandMetadata};
use evently_postgres::PostgresEventStore;

/// Latencies per mode, ms, and the rate of each mode's commands (commands/s of its own time).
#[derive(Debug, Default)]
pub struct IdempotencyRow {
    /// No key.
    pub plain: Vec<f64>,
    /// The key recorded by the store.
    pub store_keys: Vec<f64>,
    /// The key in Redis.
    pub redis_keys: Vec<f64>,
}

impl IdempotencyRow {
    /// Commands per second of a mode's summed latencies.
    pub fn rate(latencies: &[f64]) -> f64 {
        latencies.len() as f64 / (latencies.iter().sum::<f64>() / 1e3)
    }
}

fn deposit(n: usize) -> AccountCommand {
    AccountCommand::Deposit(Deposit {
        amount_cents: 1 + n as u64,
        reference: format!("i1-{n}"),
    })
}

/// `commands` deposits per mode, taking turns.
pub async fn i1(commands: usize) -> IdempotencyRow {
    let url = evently_postgres::database_url();
    let store = PostgresEventStore::connect(&url, "bench_idempotency")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    sqlx::query("DROP SCHEMA IF EXISTS bench_idempotency CASCADE")
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let conn = evently_redis::connect(&redis_url)
        .await
        .unwrap_or_else(|e| panic!("Redis at {redis_url}: {e}"));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let redis = evently_redis::RedisIdempotency::new(conn)
        .with_prefix(format!("bench:i1:{run}"))
        .with_result_ttl(std::time::Duration::from_secs(600));
    let accounts = CommandGateway::<Account, _>::new(store);
    for id in ["plain", "store", "redis"] {
        let open = AccountCommand::Open { owner: id.into() };
        accounts
            .execute(id, open, CommandMetadata::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut row = IdempotencyRow::default();
    for n in 0..commands {
        let at = Instant::now();
        accounts
            .execute("plain", deposit(n), CommandMetadata::new())
            .await
            .unwrap_or_else(|e| panic!("I1 plain: {e}"));
        row.plain.push(ms(at));

        let at = Instant::now();
        accounts
            .execute_idempotent(
                &format!("{run}-{n}"),
                "store",
                deposit(n),
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("I1 store keys: {e}"));
        row.store_keys.push(ms(at));

        let at = Instant::now();
        let outcome = redis
            .execute_command(
                &accounts,
                &n.to_string(),
                "redis",
                deposit(n),
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("I1 Redis keys: {e}"));
        assert!(!outcome.replayed, "a new key ran its command");
        row.redis_keys.push(ms(at));
    }
    row
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
