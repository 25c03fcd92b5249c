//! W1-W5 for any [`Framework`], and P1 for this framework's projections.

use std::sync::Arc;
use std::time::Instant;

use cqrs_examples::bank::AccountEvent;
use evently_core::RecordedEvent;
use evently_core::prelude::*;
use evently_postgres::PostgresEventStore;

use crate::framework::{Failure, Framework};

/// How big each workload is.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sizes {
    /// Runs per figure.
    pub runs: usize,
    /// W1: sequential commands on one stream.
    pub sequential: u64,
    /// W2: aggregates.
    pub aggregates: u64,
    /// W2: commands per aggregate.
    pub per_aggregate: u64,
    /// W3: commands on one aggregate from 8 tasks.
    pub same_aggregate: u64,
    /// W4 and L5: stream length.
    pub stream: u64,
    /// W5, L3, P1: events.
    pub bulk: u64,
}

/// The sizes.
pub const FULL: Sizes = Sizes {
    runs: 3,
    sequential: 10_000,
    aggregates: 1_000,
    per_aggregate: 10,
    same_aggregate: 2_000,
    stream: 10_000,
    bulk: 100_000,
};

/// A smoke run.
pub const QUICK: Sizes = Sizes {
    runs: 1,
    sequential: 200,
    aggregates: 40,
    per_aggregate: 5,
    same_aggregate: 96,
    stream: 500,
    bulk: 2_000,
};

/// One run of a throughput workload: the rate, and the latencies of its commands in ms.
#[derive(Debug, Default)]
pub struct Run {
    /// Per second.
    pub rate: f64,
    /// Each command's latency, in order, in ms.
    pub latencies: Vec<f64>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn check(outcome: Result<(), Failure>, what: &str) {
    if let Err(error) = outcome {
        panic!("{what}: {error}");
    }
}

/// W1: open one account, then `sequential` deposits one after another.
pub async fn w1(f: &dyn Framework, s: &Sizes) -> Run {
    check(f.open(1).await, "W1 open");
    let mut latencies = Vec::with_capacity(s.sequential as usize);
    let start = Instant::now();
    for n in 0..s.sequential {
        let at = Instant::now();
        check(f.deposit(1, n).await, "W1 deposit");
        latencies.push(ms(at));
    }
    Run {
        rate: s.sequential as f64 / start.elapsed().as_secs_f64(),
        latencies,
    }
}

/// W2: `aggregates` accounts x `per_aggregate` commands (an open and deposits) from 8 tasks.
pub async fn w2(f: Arc<dyn Framework>, s: &Sizes) -> Run {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let f = Arc::clone(&f);
        let (aggregates, per) = (s.aggregates, s.per_aggregate);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for a in (t..aggregates).step_by(8) {
                let at = Instant::now();
                check(f.open(1_000 + a).await, "W2 open");
                latencies.push(ms(at));
                for n in 1..per {
                    let at = Instant::now();
                    check(f.deposit(1_000 + a, n).await, "W2 deposit");
                    latencies.push(ms(at));
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap_or_else(|e| panic!("{e}")));
    }
    Run {
        rate: (s.aggregates * s.per_aggregate) as f64 / start.elapsed().as_secs_f64(),
        latencies,
    }
}

/// W3: 8 tasks depositing into one account, `same_aggregate` commands in all, each retried on a
/// conflict until it lands. Checks that the account has one event per command (and its open).
/// Returns the run and the conflicts met.
pub async fn w3(f: Arc<dyn Framework>, s: &Sizes) -> (Run, u64) {
    check(f.open(7).await, "W3 open");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let f = Arc::clone(&f);
        let per = s.same_aggregate / 8 + u64::from(t < s.same_aggregate % 8);
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut conflicts) = (Vec::new(), 0);
            for n in 0..per {
                let at = Instant::now();
                loop {
                    match f.deposit(7, n).await {
                        Ok(()) => break,
                        Err(Failure::Conflict) => conflicts += 1,
                        Err(other) => panic!("W3 deposit: {other}"),
                    }
                }
                latencies.push(ms(at));
            }
            (latencies, conflicts)
        }));
    }
    let (mut latencies, mut conflicts) = (Vec::new(), 0);
    for task in tasks {
        let (l, c) = task.await.unwrap_or_else(|e| panic!("{e}"));
        latencies.extend(l);
        conflicts += c;
    }
    let rate = s.same_aggregate as f64 / start.elapsed().as_secs_f64();
    let events = f
        .events(7)
        .await
        .unwrap_or_else(|e| panic!("W3 count: {e}"));
    assert_eq!(
        events,
        s.same_aggregate + 1,
        "W3 on {}: the final event count must equal the successful commands (+ the open)",
        f.name()
    );
    (Run { rate, latencies }, conflicts)
}

/// W4: rehydrates a stream of `stream` deposits (written with the framework's bulk path): seconds.
pub async fn w4_prepare(f: &dyn Framework, s: &Sizes) {
    check(f.bulk(4, s.stream).await, "W4 stream");
}

/// One W4 load: seconds.
pub async fn w4(f: &dyn Framework, s: &Sizes) -> f64 {
    let start = Instant::now();
    let balance = f
        .balance(4)
        .await
        .unwrap_or_else(|e| panic!("W4 load: {e}"));
    let elapsed = start.elapsed().as_secs_f64();
    let expected: u64 = (0..s.stream).map(crate::framework::amount).sum();
    assert_eq!(balance, expected, "W4 on {}: the balance", f.name());
    elapsed
}

/// W5: `bulk` events written as 10 streams of `bulk / 10`: events per second.
pub async fn w5(f: &dyn Framework, s: &Sizes) -> f64 {
    let per = s.bulk / 10;
    let start = Instant::now();
    for i in 0..10 {
        check(f.bulk(50_000 + i, per).await, "W5 bulk");
    }
    (per * 10) as f64 / start.elapsed().as_secs_f64()
}

/// Counts deposits in memory: the framework's cost of a catch-up, without a read model's.
#[derive(evently_core::Projection)]
#[projection(name = "deposit_count", events(AccountEvent), context = sqlx::PgConnection)]
struct DepositCount {
    deposits: u64,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, sqlx::PgConnection> for DepositCount {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        _: &mut sqlx::PgConnection,
    ) -> Result<(), evently_core::projection::HandlerError> {
        if matches!(event.event, AccountEvent::Deposited(_)) {
            self.deposits += 1;
        }
        Ok(())
    }
}

/// A deposit's payload, as a raw reader deserializes it.
#[derive(serde::Deserialize)]
#[allow(dead_code)] // read to be deserialized, as a raw reader would
struct DepositPayload {
    amount_cents: Option<u64>,
    reference: Option<String>,
}

/// P1, this framework's side: a fresh `ProjectionWorker` catching up from the start over the
/// `bulk` events of `store` (written by the suite). Events/s.
pub async fn p1_worker(store: &PostgresEventStore, s: &Sizes) -> f64 {
    // The previous pair's checkpoint and lease go: this worker starts from the beginning.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {}.projection_checkpoints WHERE projection = $1",
        store.schema()
    )))
    .bind(<DepositCount as Projection>::NAME)
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut worker = evently_postgres::projection::ProjectionWorker::new(
        store.clone(),
        DepositCount { deposits: 0 },
        format!("bench-{}", uuid::Uuid::now_v7()),
    )
    .with_batch(2_000);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let start = Instant::now();
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let projected = start.elapsed().as_secs_f64();
    assert_eq!(worker.projection().deposits, s.bulk, "P1: every deposit");
    s.bulk as f64 / projected
}

/// P1, the raw side: one ordered read of every row of `store` with serde, as a raw reader
/// deserializes payload and metadata. Rows/s.
pub async fn p1_raw(store: &PostgresEventStore) -> f64 {
    let sql = format!(
        "SELECT * FROM {}.events ORDER BY transaction_id, global_position",
        store.schema()
    );
    let start = Instant::now();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for row in &rows {
        use sqlx::Row;
        let payload: sqlx::types::Json<DepositPayload> =
            row.try_get("payload").unwrap_or_else(|e| panic!("{e}"));
        let metadata: sqlx::types::Json<Metadata> =
            row.try_get("metadata").unwrap_or_else(|e| panic!("{e}"));
        std::hint::black_box((payload, metadata));
    }
    rows.len() as f64 / start.elapsed().as_secs_f64()
}
