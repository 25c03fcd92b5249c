//! The benchmark suite: this framework, `cqrs-es` + `postgres-es`, `esrs` and raw sqlx, each
//! running the same workloads against the same `DATABASE_URL` in one run, with the raw limits of
//! PostgreSQL beside them. Prints a markdown table and writes it with a JSON file and two plots.
//!
//! ```text
//! cargo bench -p cqrs-bench                         # the full run, into benchmarks/results/
//! cargo bench -p cqrs-bench -- --quick              # a smoke run (the test suite's)
//! cargo bench -p cqrs-bench -- --only W1,L1 --out /tmp/report
//! ```

mod brokers;
mod compile_cost;
mod framework;
mod idempotency;
mod kafka;
mod ours;
mod peers;
mod raw;
mod report;
mod sqs;
mod workloads;

/// The commands per mode of I1.
const I1_COMMANDS: u64 = 2_000;
/// The events of S1 (see where it runs).
const S1_EVENTS: u64 = 10_000;

use std::path::PathBuf;
use std::sync::Arc;

use evently_postgres::{PostgresEventStore, database_url};
use framework::Framework;
use report::{Cell, Figure, Report, buckets, percentile};
use workloads::{FULL, QUICK, Run, Sizes};

/// Which framework a fresh instance is made of.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Ours,
    CqrsEs,
    Esrs,
    Raw,
}

const KINDS: [Kind; 4] = [Kind::Ours, Kind::CqrsEs, Kind::Esrs, Kind::Raw];

impl Kind {
    /// Its column title (what its [`Framework::name`] says), without making an instance.
    fn name(self) -> &'static str {
        report::FRAMEWORKS[self as usize]
    }
}

/// A fresh instance of `kind` on an empty schema named after `tag`.
async fn make(kind: Kind, tag: &str, connections: u32) -> Arc<dyn Framework> {
    let url = database_url();
    match kind {
        Kind::Ours => Arc::new(ours::Ours::new(
            ours_store(&format!("bench_ours_{tag}"), connections).await,
        )),
        Kind::CqrsEs => Arc::new(
            peers::cqrs_es_impl::CqrsEs::new(&url, &format!("bench_cqrs_es_{tag}"), connections)
                .await,
        ),
        Kind::Esrs => Arc::new(
            peers::esrs_impl::Esrs::new(&url, &format!("bench_esrs_{tag}"), connections).await,
        ),
        Kind::Raw => Arc::new(raw::Raw::new(&url, &format!("bench_raw_{tag}"), connections).await),
    }
}

/// This framework's store on an empty `schema`.
async fn ours_store(schema: &str, connections: u32) -> PostgresEventStore {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
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
    store
}

/// Loads of a `len`-event account through a snapshot 50 events before its end, in ms.
async fn snapshot_loads(len: u64, s: &Sizes) -> Vec<f64> {
    let ours = ours::Ours::new(ours_store("bench_ours_w4s", 4).await);
    ours.bulk(4, len).await.unwrap_or_else(|e| panic!("{e}"));
    ours.snapshot(4, len.saturating_sub(50))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expected: u64 = (0..len).map(framework::amount).sum();
    let mut times = Vec::new();
    for _ in 0..s.runs.max(3) {
        let start = std::time::Instant::now();
        let balance = ours
            .balance_from_snapshot(4)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(balance, expected, "W4s: the balance through the snapshot");
    }
    times
}

struct Args {
    quick: bool,
    only: Vec<String>,
    out: PathBuf,
}

fn args() -> Args {
    let mut quick = false;
    let mut only = Vec::new();
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                only = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|w| w.trim().to_uppercase())
                    .collect();
            }
            "--out" => out = args.next().map(PathBuf::from),
            // `cargo bench` passes `--bench`.
            "--bench" => {}
            other => {
                eprintln!("unknown argument `{other}`: --quick, --only W1,W2,..., --out DIR");
                std::process::exit(2);
            }
        }
    }
    let dir = if quick { "results-quick" } else { "results" };
    Args {
        quick,
        only,
        out: out.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)),
    }
}

fn cell(workload: &str, framework: &str, unit: &str, figure: Figure) -> Cell {
    Cell {
        workload: workload.to_owned(),
        framework: framework.to_owned(),
        unit: unit.to_owned(),
        figure,
        p50_ms: None,
        p99_ms: None,
        note: None,
    }
}

/// A throughput cell from runs, with the latencies of all of them.
fn throughput(workload: &str, framework: &str, unit: &str, runs: &[Run]) -> Cell {
    let latencies: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    Cell {
        p50_ms: Some(percentile(&latencies, 0.5)),
        p99_ms: Some(percentile(&latencies, 0.99)),
        ..cell(
            workload,
            framework,
            unit,
            Figure::of(runs.iter().map(|r| r.rate).collect()),
        )
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let s: Sizes = if args.quick { QUICK } else { FULL };
    let wanted =
        |w: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(w));
    let url = database_url();
    let mut report = Report::default();
    report.context.insert("runs".into(), s.runs.to_string());
    report.context.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    report.context.insert(
        "date".into(),
        chrono::Utc::now().format("%Y-%m-%d").to_string(),
    );
    report.context.insert(
        "mode".into(),
        if args.quick { "quick" } else { "full" }.into(),
    );
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(
            &sqlx::PgPool::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    report.context.insert("PostgreSQL".into(), version);

    report.workload(
        "W1",
        format!("one stream, {} sequential commands", s.sequential),
    );
    report.workload(
        "W2",
        format!(
            "{} aggregates x {} commands, 8 tasks",
            s.aggregates, s.per_aggregate
        ),
    );
    report.workload(
        "W3",
        format!(
            "8 tasks on one aggregate, {} commands, retry on conflict",
            s.same_aggregate
        ),
    );
    report.workload(
        "W1g",
        "W1 with the store's group commit on (this framework only)",
    );
    report.workload(
        "W2g",
        "W2 with the store's group commit on (this framework only)",
    );
    report.workload(
        "W3g",
        "W3 with the store's group commit on (this framework only)",
    );
    report.workload("W4", format!("rehydrate a {}-event stream", s.stream));
    report.workload(
        "W4s",
        format!(
            "rehydrate a {}-event stream from a snapshot 50 events behind",
            s.stream
        ),
    );
    report.workload(
        "W4s'",
        format!(
            "the same with a {}-event stream (flat: ~W4s)",
            s.stream / 10
        ),
    );
    report.workload("W5", format!("bulk append {} events", s.bulk));
    report.workload("P1", format!("projection catch-up over {} events", s.bulk));
    report.workload(
        "K1",
        format!(
            "publish {} events to Kafka (raw: an rdkafka producer of the same bytes)",
            s.bulk
        ),
    );
    report.workload(
        "R1",
        format!(
            "publish {} events to RabbitMQ, confirms awaited (raw: a lapin publisher of the same bytes)",
            s.bulk
        ),
    );
    report.workload(
        "N1",
        format!(
            "publish {} events to NATS JetStream, acks awaited (raw: an async-nats publisher of the same bytes)",
            s.bulk
        ),
    );
    report.workload(
        "S1",
        format!(
            "send {} events to an SQS FIFO queue on a local server, answers awaited (raw: the SDK sending the same batches)",
            s.bulk.min(S1_EVENTS)
        ),
    );
    report.workload(
        "I1",
        format!(
            "{} sequential deposits on PostgreSQL, a new idempotency key each: without a key",
            s.sequential.min(I1_COMMANDS)
        ),
    );
    report.workload(
        "I1s",
        "the same, the key recorded by the store (execute_idempotent)",
    );
    report.workload(
        "I1r",
        "the same, the key in Redis (RedisIdempotency::execute_command)",
    );
    report.workload(
        "L1",
        format!("single-row insert transactions, {}", s.sequential),
    );
    report.workload(
        "L4",
        format!(
            "single-row insert transactions, 8 connections, {}",
            s.aggregates * s.per_aggregate
        ),
    );
    report.workload("L3", format!("COPY {} rows", s.bulk));
    report.workload(
        "L3f",
        format!(
            "COPY {} rows into this framework's own events table (its four indexes, two json columns)",
            s.bulk
        ),
    );
    report.workload(
        "L5",
        format!("select + deserialize {} whole rows", s.stream),
    );
    report.workload(
        "L5'",
        format!("select + deserialize {} payloads only", s.stream),
    );

    for kind in KINDS {
        let name = kind.name();
        eprintln!("== {name}");
        if wanted("W1") {
            let mut runs = Vec::new();
            for _ in 0..s.runs {
                let f = make(kind, "w1", 4).await;
                runs.push(workloads::w1(&*f, &s).await);
            }
            let mut median = runs.iter().map(|r| r.rate).collect::<Vec<_>>();
            median.sort_by(f64::total_cmp);
            let middle = runs
                .iter()
                .find(|r| r.rate == median[median.len() / 2])
                .map_or(Vec::new(), |r| r.latencies.clone());
            let bucket = (s.sequential / 20).max(1) as usize;
            report
                .w1_latency
                .insert(name.to_owned(), buckets(&middle, bucket));
            report.cells.push(throughput("W1", name, "cmd/s", &runs));
            eprintln!("   W1 {:.0} cmd/s", median[median.len() / 2]);
        }
        if wanted("W2") {
            let mut runs = Vec::new();
            for _ in 0..s.runs {
                runs.push(workloads::w2(make(kind, "w2", 10).await, &s).await);
            }
            report.cells.push(throughput("W2", name, "cmd/s", &runs));
        }
        if matches!(kind, Kind::Ours) {
            for key in ["W1g", "W2g", "W3g"] {
                if !wanted(key) {
                    continue;
                }
                let mut runs = Vec::new();
                let mut stats = Vec::new();
                for _ in 0..s.runs {
                    let store = ours_store(&format!("bench_ours_{}", key.to_lowercase()), 10)
                        .await
                        .with_group_commit(evently_postgres::GroupCommit::default());
                    let f: Arc<dyn Framework> = Arc::new(ours::Ours::new(store.clone()));
                    runs.push(match key {
                        "W1g" => workloads::w1(&*f, &s).await,
                        "W2g" => workloads::w2(f, &s).await,
                        _ => workloads::w3(f, &s).await.0,
                    });
                    stats.push(store.group_commit_stats().unwrap_or_default());
                }
                let mut c = throughput(key, name, "cmd/s", &runs);
                let (grouped, groups, alone) = stats.iter().fold((0, 0, 0), |a, g| {
                    (a.0 + g.grouped, a.1 + g.groups, a.2 + g.alone)
                });
                c.note = Some(format!(
                    "group commit: {groups} groups of {:.1} appends on average, {alone} appends alone",
                    grouped as f64 / groups.max(1) as f64
                ));
                report.cells.push(c);
            }
        }
        if wanted("W3") {
            let (mut runs, mut conflicts) = (Vec::new(), 0);
            for _ in 0..s.runs {
                let (run, c) = workloads::w3(make(kind, "w3", 10).await, &s).await;
                runs.push(run);
                conflicts += c;
            }
            let mut c = throughput("W3", name, "cmd/s", &runs);
            c.note = Some(format!(
                "{} conflicts retried over {} runs; final event count = commands + 1 checked",
                conflicts, s.runs
            ));
            report.cells.push(c);
        }
        if wanted("W4") {
            let f = make(kind, "w4", 4).await;
            workloads::w4_prepare(&*f, &s).await;
            let mut times = Vec::new();
            for _ in 0..s.runs.max(3) {
                times.push(workloads::w4(&*f, &s).await * 1e3);
            }
            report.cells.push(cell("W4", name, "ms", Figure::of(times)));
            if matches!(kind, Kind::Ours) {
                for (key, len) in [("W4s", s.stream), ("W4s'", s.stream / 10)] {
                    let times = snapshot_loads(len, &s).await;
                    report.cells.push(cell(key, name, "ms", Figure::of(times)));
                }
            }
        }
        if wanted("W5") || (wanted("P1") && matches!(kind, Kind::Ours)) {
            let mut rates = Vec::new();
            for _ in 0..s.runs {
                let f = make(kind, "w5", 4).await;
                rates.push(workloads::w5(&*f, &s).await);
            }
            let mut c = cell("W5", name, "events/s", Figure::of(rates));
            c.note = match kind {
                Kind::Ours => Some("appends of 10,000 events (COPY inside)".into()),
                Kind::CqrsEs | Kind::Esrs => {
                    Some("one command deciding 10,000 events, as its API allows".into())
                }
                Kind::Raw => Some("COPY".into()),
            };
            if wanted("W5") {
                report.cells.push(c);
            }
        }
    }
    if wanted("P1") {
        // Each side takes well under a second, so one scheduling hiccup or a burst of the
        // server's background writing moves a median of three by 10%: several pairs per written
        // table, the side that goes first alternating (whoever reads first also pays for
        // whatever the writes left the server to do).
        let pairs = if args.quick { 1 } else { 3 };
        let (mut projected, mut raw) = (Vec::new(), Vec::new());
        for run in 0..s.runs {
            let store = ours_store("bench_ours_p1", 4).await;
            let ours = ours::Ours::new(store.clone());
            for i in 0..10 {
                ours.bulk(60_000 + i, s.bulk / 10)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            // Readers wait for the cluster's horizon: give the last appends a moment to be
            // readable.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            for pair in 0..pairs {
                if (run * pairs + pair) % 2 == 0 {
                    projected.push(workloads::p1_worker(&store, &s).await);
                    raw.push(workloads::p1_raw(&store).await);
                } else {
                    raw.push(workloads::p1_raw(&store).await);
                    projected.push(workloads::p1_worker(&store, &s).await);
                }
            }
        }
        let mut c = cell(
            "P1",
            report::FRAMEWORKS[0],
            "events/s",
            Figure::of(projected),
        );
        c.note = Some("a ProjectionWorker (batches of 2,000 growing to 16,000 while behind, checkpoint in each batch's transaction), three catch-ups from the start per written table, alternating with the raw read in which goes first; the peers have no catch-up runner to compare (cqrs-es runs queries inline with the command, esrs rebuilds through its own handlers)".into());
        report.cells.push(c);
        let mut r = cell("P1", report::FRAMEWORKS[3], "rows/s", Figure::of(raw));
        r.note =
            Some("one ordered SELECT of the same rows, payload and metadata deserialized (paired with each catch-up)".into());
        report.cells.push(r);
    }
    if wanted("K1") {
        let samples = if args.quick { 20 } else { 300 };
        // A run of each side takes well under a second, so one scheduling hiccup on the shared
        // cores moves a median of 3: at least 5 runs.
        let runs = if args.quick { s.runs } else { s.runs.max(5) };
        let k = kafka::k1(s.bulk, runs, samples).await;
        let parts = format!(
            "the outbox relay from the store (reading the log alone {:.0} events/s, serializing alone {:.0} events/s); latency append -> consumer over {samples} single appends",
            Figure::of(k.read).median,
            Figure::of(k.serialize).median
        );
        report.cells.push(Cell {
            p50_ms: Some(percentile(&k.latencies, 0.5)),
            p99_ms: Some(percentile(&k.latencies, 0.99)),
            note: Some(parts),
            ..cell("K1", report::FRAMEWORKS[0], "events/s", Figure::of(k.relay))
        });
        let mut r = cell("K1", report::FRAMEWORKS[3], "events/s", Figure::of(k.raw));
        r.note = Some(
            "a raw rdkafka producer with the relay's settings, same bytes, headers and keys".into(),
        );
        report.cells.push(r);
    }
    if wanted("R1") || wanted("N1") {
        let runs = if args.quick { s.runs } else { s.runs.max(5) };
        let samples = if args.quick { 20 } else { 300 };
        let (rabbit, nats) = brokers::r1_n1(s.bulk, runs, samples).await;
        for (key, row, relay_note, raw_note) in [
            (
                "R1",
                rabbit,
                "the outbox relay from the store through cqrs-rabbitmq (one confirm channel, pages of 5,000, two in flight)",
                "a raw lapin publisher on a confirm channel: same bytes, persistent, every confirm awaited",
            ),
            (
                "N1",
                nats,
                "the outbox relay from the store through cqrs-nats (Nats-Msg-Id, Nats-Expected-Last-Msg-Id, pages of 5,000, two in flight)",
                "a raw async-nats JetStream publisher: same bytes, Nats-Msg-Id, Nats-Expected-Last-Msg-Id, every ack awaited",
            ),
        ] {
            if !wanted(key) {
                continue;
            }
            report.cells.push(Cell {
                p50_ms: Some(percentile(&row.latencies, 0.5)),
                p99_ms: Some(percentile(&row.latencies, 0.99)),
                note: Some(format!(
                    "{relay_note}; latency append -> consumer over {samples} single appends"
                )),
                ..cell(
                    key,
                    report::FRAMEWORKS[0],
                    "events/s",
                    Figure::of(row.relay),
                )
            });
            let mut r = cell(key, report::FRAMEWORKS[3], "events/s", Figure::of(row.raw));
            r.note = Some(raw_note.into());
            report.cells.push(r);
        }
    }
    if wanted("S1") {
        let runs = if args.quick { s.runs } else { s.runs.max(5) };
        let samples = if args.quick { 20 } else { 300 };
        // A local server's FIFO send time grows with the queue's length (ministack scans it for
        // duplicates): at most 10,000 events, so that S1 measures the relay, not the scan.
        let row = sqs::s1(s.bulk.min(S1_EVENTS), runs, samples).await;
        report.cells.push(Cell {
            p50_ms: Some(percentile(&row.latencies, 0.5)),
            p99_ms: Some(percentile(&row.latencies, 0.99)),
            note: Some(format!(
                "the outbox relay from the store through cqrs-sqs (batches of ten, 16 in flight, a group never in two at once, pages of 5,000); latency append -> a receive loop over {samples} single appends"
            )),
            ..cell("S1", report::FRAMEWORKS[0], "events/s", Figure::of(row.relay))
        });
        let mut r = cell("S1", report::FRAMEWORKS[3], "events/s", Figure::of(row.raw));
        r.note = Some(
            "the raw SDK: the same batches of ten (bodies, group and deduplication ids, attributes), 16 requests in flight".into(),
        );
        report.cells.push(r);
    }
    if wanted("I1") {
        let row = idempotency::i1(s.sequential.min(I1_COMMANDS) as usize).await;
        for (key, latencies, note) in [
            ("I1", &row.plain, "CommandGateway::execute, no key"),
            (
                "I1s",
                &row.store_keys,
                "CommandGateway::execute_idempotent: the key in the events' transaction",
            ),
            (
                "I1r",
                &row.redis_keys,
                "cqrs-redis RedisIdempotency::execute_command: one script looks for the outcome and takes the lock, the command, one script stores the outcome and releases the lock (2 Redis round trips)",
            ),
        ] {
            report.cells.push(Cell {
                p50_ms: Some(percentile(latencies, 0.5)),
                p99_ms: Some(percentile(latencies, 0.99)),
                note: Some(note.into()),
                ..cell(
                    key,
                    report::FRAMEWORKS[0],
                    "commands/s",
                    Figure::of(vec![idempotency::IdempotencyRow::rate(latencies)]),
                )
            });
        }
    }
    let limits = [
        ("L1", 1, s.sequential),
        ("L4", 8, s.aggregates * s.per_aggregate),
        ("L3", 0, s.bulk),
        ("L3f", 0, s.bulk),
    ];
    for (key, tasks, rows) in limits {
        if !wanted(key) {
            continue;
        }
        let mut rates = Vec::new();
        for _ in 0..s.runs {
            rates.push(match tasks {
                0 if key == "L3f" => raw::copy_into_store_table(&url, rows).await,
                0 => raw::copy_rows(&url, rows).await,
                tasks => raw::inserts(&url, tasks, rows).await,
            });
        }
        report.cells.push(cell(
            key,
            report::FRAMEWORKS[3],
            "rows/s",
            Figure::of(rates),
        ));
    }
    if wanted("L5") {
        for (key, whole) in [("L5", true), ("L5'", false)] {
            let mut times = Vec::new();
            for _ in 0..s.runs.max(3) {
                times.push(raw::select(&url, s.stream, whole).await * 1e3);
            }
            report
                .cells
                .push(cell(key, report::FRAMEWORKS[3], "ms", Figure::of(times)));
        }
    }

    if wanted("C1") {
        let aggregates = if args.quick { 5 } else { 50 };
        let dir = std::env::temp_dir().join(format!("cqrs-compile-cost-{}", std::process::id()));
        match compile_cost::measure(&dir, aggregates, s.runs) {
            Ok(t) => {
                report.compile = Some(report::CompileCost {
                    aggregates,
                    clean_derive: Figure::of(t.clean_derive),
                    clean_hand: Figure::of(t.clean_hand),
                    incremental_derive: Figure::of(t.incremental_derive),
                    incremental_hand: Figure::of(t.incremental_hand),
                });
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(error) => {
                eprintln!("error: the compile-cost crates: {error}");
                std::process::exit(1);
            }
        }
    }

    let markdown = report.markdown();
    println!("{markdown}");
    match report.write(&args.out) {
        Ok(()) => eprintln!("written to {}", args.out.display()),
        Err(error) => {
            eprintln!(
                "error: writing the report to {}: {error}",
                args.out.display()
            );
            std::process::exit(1);
        }
    }
}
