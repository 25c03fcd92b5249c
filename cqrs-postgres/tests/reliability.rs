//! Reliability of the PostgreSQL store against the real server: racing writers, skewed commits,
//! a randomized soak, unknown outcomes, transactions dying midway, bad stored data, hostile names.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{fresh_store, fresh_store_with, pool};
use cqrs_examples::bank::{Account, AccountCommand};
use evently_core::conformance::event;
use evently_core::prelude::*;
use evently_core::{Checkpoint, EventData, EventId, EventStoreExt, StoreError, StoredEvent};
use evently_postgres::PostgresEventStore;
use futures::TryStreamExt;
use rand::{Rng, SeedableRng};
use sqlx::AssertSqlSafe;

fn stream(id: &str) -> StreamId {
    StreamId::new("test", id)
}

/// Inserts one event of `stream` at `version` inside an open transaction, bypassing the store: the
/// tests hold transactions open, which the store's API never does.
async fn raw_insert(
    tx: &mut sqlx::PgConnection,
    schema: &str,
    stream: &StreamId,
    version: i64,
) -> EventId {
    let id = EventId::new();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
         VALUES ($1, $2, $3, $4, 'Ticked', 1, '{{}}', '{{}}')"
    )))
    .bind(id.0)
    .bind(&stream.aggregate_type)
    .bind(stream.aggregate_id.as_str())
    .bind(version)
    .execute(tx)
    .await
    .unwrap_or_else(|e| panic!("raw insert: {e}"));
    id
}

async fn read_everything(store: &PostgresEventStore) -> Vec<StoredEvent> {
    store
        .read_all(Checkpoint::START, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// 64 tasks x 200 rounds of "read v, append expecting v" on one stream: one winner per version,
/// every loser a typed conflict, no other error, no gap, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_one_winner_per_version() {
    const TASKS: usize = 64;
    const ROUNDS: usize = 200;
    let store = fresh_store_with("racing_writers", 32).await;
    let s = stream("hot");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, s) = (store.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let (mut won, mut conflicts, mut other) = (Vec::new(), 0usize, Vec::new());
            for _ in 0..ROUNDS {
                let v = store
                    .stream_version(&s)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let e = event(v);
                let id = e.event_id;
                match store.append(&s, ExpectedVersion::Exact(v), vec![e]).await {
                    Ok(done) => won.push((done.version, id)),
                    Err(StoreError::Conflict { actual, .. }) if actual != v => conflicts += 1,
                    Err(StoreError::Conflict { .. }) => conflicts += 1,
                    Err(error) => other.push(error.to_string()),
                }
            }
            (won, conflicts, other)
        }));
    }
    let mut winners = BTreeMap::new();
    let (mut conflicts, mut others) = (0, Vec::new());
    for task in tasks {
        let (won, c, o) = task.await.unwrap_or_else(|e| panic!("{e}"));
        conflicts += c;
        others.extend(o);
        for (version, id) in won {
            assert!(
                winners.insert(version, id).is_none(),
                "two winners for version {version}"
            );
        }
    }
    assert!(others.is_empty(), "generic errors: {others:?}");
    assert_eq!(
        winners.len() + conflicts,
        TASKS * ROUNDS,
        "every round won or got a conflict"
    );
    let stored = store.load_all(&s).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored.len(), winners.len(), "no duplicates");
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "no gaps");
        assert_eq!(winners.get(&e.version), Some(&e.event_id));
    }
    eprintln!(
        "racing writers: {} winners, {conflicts} typed conflicts, 0 other errors",
        winners.len()
    );
}

/// Transaction A takes a lower position and stays open while K later transactions commit: readers
/// see nothing past A until it commits, then A before the others. If A rolls back, the reader moves
/// past it on the next read.
#[tokio::test]
async fn skewed_commits_are_never_skipped() {
    const K: usize = 5;
    for outcome in ["commit", "rollback"] {
        let store = fresh_store(&format!("skewed_{outcome}")).await;
        let schema = store.schema().to_owned();
        let before = store
            .append(&stream("before"), ExpectedVersion::NoStream, vec![event(0)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let before_id = before.events[0].event_id;
        // xmin is cluster-wide: another test's open transaction may hold every reader back for a
        // moment (never making it skip). Wait until `before` is readable.
        assert_eq!(read_until(&store, 1).await, vec![before_id]);
        let mut a = store.pool().begin().await.unwrap_or_else(|e| panic!("{e}"));
        let a_id = raw_insert(&mut a, &schema, &stream("a"), 1).await;
        let mut later = Vec::new();
        for k in 0..K {
            let done = store
                .append(
                    &stream(&format!("later-{k}")),
                    ExpectedVersion::NoStream,
                    vec![event(k as u64)],
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            later.push(done.events[0].event_id);
        }
        // Committed rows with higher positions exist, but A (lower position, open) blocks them.
        for _ in 0..3 {
            let seen = read_everything(&store).await;
            assert_eq!(
                seen.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                vec![before_id]
            );
            let after_first = store
                .read_all(before.events[0].checkpoint, 100)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(after_first.is_empty(), "nothing past A while A is open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut expected = vec![before_id];
        if outcome == "commit" {
            a.commit().await.unwrap_or_else(|e| panic!("{e}"));
            expected.push(a_id);
        } else {
            a.rollback().await.unwrap_or_else(|e| panic!("{e}"));
        }
        expected.extend(later);
        let seen = read_until(&store, expected.len()).await;
        assert_eq!(seen, expected, "{outcome}: A first, nothing skipped");
    }
}

/// Reads everything until `count` events are readable (other tests' transactions may hold the
/// cluster-wide xmin back for a moment), in the global order.
async fn read_until(store: &PostgresEventStore, count: usize) -> Vec<EventId> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<EventId> = read_everything(store)
            .await
            .iter()
            .map(|e| e.event_id)
            .collect();
        if seen.len() >= count || std::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the soak's reader keeps of each event of a page, whatever its payload.
fn seen_all<P>(page: Vec<StoredEvent<P>>) -> Vec<(EventId, StreamId, u64, Checkpoint)> {
    page.into_iter()
        .map(|e| (e.event_id, e.stream, e.version, e.checkpoint))
        .collect()
}

/// 16 writers append 100,000 events in transactions with random short delays, 5% rolled back,
/// while one reader follows `read_all`: the reader gets exactly the committed events, each stream
/// in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_soak_delivers_exactly_the_committed_events() {
    const WRITERS: usize = 16;
    const TOTAL: usize = 100_000;
    const BATCH: usize = 25;
    let store = fresh_store_with("soak", 24).await;
    let schema: Arc<str> = store.schema().into();
    // 0 while writers run, then the number of committed events: the reader stops once it has them
    // all (an empty page alone proves nothing: another test's open transaction may hold the
    // cluster-wide xmin back for a while).
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let reader = {
        let (store, done) = (store.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = Checkpoint::START;
            let mut deadline = None;
            let mut pages = 0_u64;
            loop {
                let target = done.load(std::sync::atomic::Ordering::SeqCst);
                let finished = target > 0 && seen.len() >= target;
                if target > 0 && deadline.is_none() {
                    deadline = Some(std::time::Instant::now() + Duration::from_secs(60));
                }
                if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                    break;
                }
                // Pages of 333 cut transactions of 25 in the middle, which paging must survive;
                // every other page is read raw (the relay's read) and large (read in a
                // transaction with sorts disabled).
                pages += 1;
                let page: Vec<_> = if pages.is_multiple_of(2) {
                    store.read_all(after, 333).await.map(seen_all)
                } else {
                    store.read_all_raw(after, 2_500).await.map(seen_all)
                }
                .unwrap_or_else(|e| panic!("{e}"));
                if let Some(last) = page.last() {
                    after = last.3;
                } else if finished {
                    break;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                seen.extend(page);
            }
            seen
        })
    };

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, schema) = (store.clone(), Arc::clone(&schema));
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut committed = Vec::new();
            let mut versions: HashMap<StreamId, i64> = HashMap::new();
            let mut batches = 0;
            while batches * BATCH < TOTAL / WRITERS {
                let mut tx = store.pool().begin().await.unwrap_or_else(|e| panic!("{e}"));
                let mut pending = Vec::new();
                for _ in 0..BATCH {
                    let s = stream(&format!("w{w}-s{}", rng.random_range(0..20)));
                    let v = versions.get(&s).copied().unwrap_or(0)
                        + 1
                        + pending.iter().filter(|(p, _)| *p == s).count() as i64;
                    let id = raw_insert(&mut tx, &schema, &s, v).await;
                    pending.push((s, id));
                    if rng.random_bool(0.05) {
                        tokio::time::sleep(Duration::from_micros(rng.random_range(0..2_000))).await;
                    }
                }
                if rng.random_bool(0.05) {
                    tx.rollback().await.unwrap_or_else(|e| panic!("{e}"));
                    continue;
                }
                tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
                for (s, id) in pending {
                    *versions.entry(s).or_insert(0) += 1;
                    committed.push(id);
                }
                batches += 1;
            }
            committed
        }));
    }
    let mut committed = HashSet::new();
    for writer in writers {
        committed.extend(writer.await.unwrap_or_else(|e| panic!("{e}")));
    }
    done.store(committed.len(), std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.unwrap_or_else(|e| panic!("{e}"));

    let delivered: HashSet<EventId> = seen.iter().map(|(id, _, _, _)| *id).collect();
    if delivered.len() != seen.len() {
        let mut counts: HashMap<EventId, Vec<Checkpoint>> = HashMap::new();
        for (id, _, _, c) in &seen {
            counts.entry(*id).or_default().push(*c);
        }
        let dups: Vec<_> = counts.iter().filter(|(_, v)| v.len() > 1).take(5).collect();
        eprintln!("duplicates: {dups:?}");
    }
    assert_eq!(delivered.len(), seen.len(), "no event delivered twice");
    assert_eq!(committed.len(), WRITERS * (TOTAL / WRITERS / BATCH) * BATCH);
    let missing = committed.difference(&delivered).count();
    let extra = delivered.difference(&committed).count();
    assert_eq!(
        (missing, extra),
        (0, 0),
        "delivered set equals committed set (missing, not committed)"
    );
    let mut last: HashMap<&StreamId, u64> = HashMap::new();
    for (_, s, version, _) in &seen {
        let previous = last.insert(s, *version).unwrap_or(0);
        assert_eq!(*version, previous + 1, "{s}: per-stream order");
    }
    eprintln!(
        "soak: {} committed, {} delivered, 0 skipped",
        committed.len(),
        delivered.len()
    );

    // A raw read is the parsed read with the payload left as text.
    let parsed = store
        .read_all(Checkpoint::START, 3_000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let raw = store
        .read_all_raw(Checkpoint::START, 3_000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.len(), 3_000);
    let reparsed: Vec<StoredEvent> = raw
        .iter()
        .map(|e| e.parse().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(reparsed, parsed);
    // The n-th event's checkpoint, without reading the events.
    let nth = |after, n| {
        let store = store.clone();
        async move {
            store
                .checkpoint_after(after, n)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(
        nth(Checkpoint::START, 3_000).await,
        Some(parsed[2_999].checkpoint)
    );
    assert_eq!(
        nth(parsed[99].checkpoint, 1).await,
        Some(parsed[100].checkpoint)
    );
    assert_eq!(
        nth(parsed[99].checkpoint, 0).await,
        Some(parsed[99].checkpoint)
    );
    assert_eq!(nth(Checkpoint::START, committed.len() + 1).await, None);
}

/// The append's future is dropped at random points (its outcome unknown to the caller), then the
/// append is retried with the same event ids: the events are stored exactly once.
#[tokio::test]
async fn unknown_outcome_retried_with_the_same_ids_is_stored_once() {
    let store = fresh_store("unknown_outcome").await;
    let mut rng = rand::rng();
    let (mut landed_first, mut replays) = (0, 0);
    for i in 0..200 {
        let s = stream(&format!("u{i}"));
        let batch: Vec<EventData> = (0..3).map(event).collect();
        let cut = Duration::from_micros(rng.random_range(0..3_000));
        let first = tokio::time::timeout(
            cut,
            store.append(&s, ExpectedVersion::NoStream, batch.clone()),
        )
        .await;
        if matches!(first, Ok(Ok(_))) {
            landed_first += 1;
        }
        match store
            .append(&s, ExpectedVersion::NoStream, batch.clone())
            .await
        {
            Ok(_) => {}
            Err(StoreError::AlreadyAppended(original)) => {
                replays += 1;
                assert_eq!(original.version, 3);
            }
            Err(other) => panic!("retry {i}: {other}"),
        }
        let stored = store.load_all(&s).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            stored.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            batch.iter().map(|e| e.event_id).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "unknown outcome: 200 retries, {replays} recognised as already appended ({landed_first} completed before the cut), 0 duplicates"
    );
}

/// The server kills the appending connection (pg_terminate_backend) while a 2,000-event append
/// runs: afterwards the stream holds all 2,000 events or none, and a retry with the same ids
/// completes it exactly once.
#[tokio::test]
async fn an_append_killed_midway_is_all_or_nothing() {
    let store = fresh_store("killed_midway").await;
    let killer = pool(2).await;
    let schema = store.schema().to_owned();
    let (mut none, mut all) = (0, 0);
    for i in 0..12u64 {
        let s = stream(&format!("k{i}"));
        let batch: Vec<EventData> = (0..2_000).map(event).collect();
        let appending = {
            let (store, s, batch) = (store.clone(), s.clone(), batch.clone());
            tokio::spawn(async move { store.append(&s, ExpectedVersion::NoStream, batch).await })
        };
        tokio::time::sleep(Duration::from_micros(i * 1_500)).await;
        // Every backend writing this schema's events (a batch this large goes by COPY).
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%' \
               AND (query LIKE 'INSERT%' OR query LIKE 'COPY%' OR query LIKE 'WITH inserted%')",
        )
        .bind(format!("\"{schema}\".events"))
        .execute(&killer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let first = appending.await.unwrap_or_else(|e| panic!("{e}"));
        let count = store
            .load_all(&s)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len();
        assert!(
            count == 0 || count == 2_000,
            "partial append: {count} events"
        );
        if count == 0 {
            none += 1;
            assert!(first.is_err(), "no events, yet the append reported success");
        } else {
            all += 1;
        }
        // The retry completes it, once.
        match store.append(&s, ExpectedVersion::NoStream, batch).await {
            Ok(_) | Err(StoreError::AlreadyAppended(_)) => {}
            Err(other) => panic!("retry: {other}"),
        }
        assert_eq!(
            store
                .load_all(&s)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .len(),
            2_000
        );
    }
    eprintln!("killed midway: {none} appends left nothing, {all} completed; 0 partial");
}

/// Corrupt rows (a payload that does not fit, an unknown type, unreadable metadata) make loading
/// their stream a typed error naming the row; other streams load; nothing panics.
#[tokio::test]
async fn bad_stored_data_is_a_typed_error_naming_the_row() {
    let store = fresh_store("bad_data").await;
    let gateway = CommandGateway::<Account, _>::new(store.clone()).with_cache_capacity(0);
    for id in ["good", "bad-payload", "bad-type", "bad-metadata"] {
        gateway
            .execute(
                id,
                AccountCommand::Open { owner: "o".into() },
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let schema = store.schema().to_owned();
    let corrupt = |id: &str, event_type: &str, payload: &str, metadata: &str| {
        format!(
            "INSERT INTO \"{schema}\".events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
             VALUES (gen_random_uuid(), 'account', '{id}', 2, '{event_type}', 2, '{payload}', '{metadata}')"
        )
    };
    for sql in [
        corrupt(
            "bad-payload",
            "MoneyDeposited",
            r#"{"amount_cents": "lots"}"#,
            "{}",
        ),
        corrupt("bad-type", "MoneyExploded", "{}", "{}"),
        corrupt(
            "bad-metadata",
            "MoneyDeposited",
            r#"{"amount_cents": 1, "reference": ""}"#,
            r#"{"correlation_id": 42}"#,
        ),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    match gateway.load("bad-payload").await {
        Err(StoreError::Decode {
            stream,
            version,
            event_type,
            error,
        }) => {
            assert_eq!(
                (stream, version, event_type.as_str()),
                (StreamId::new("account", "bad-payload"), 2, "MoneyDeposited")
            );
            assert!(error.to_string().contains("does not fit"), "{error}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    match gateway.load("bad-type").await {
        Err(StoreError::Decode {
            version: 2,
            event_type,
            error,
            ..
        }) => {
            assert_eq!(event_type, "MoneyExploded");
            assert!(matches!(
                *error,
                evently_core::DecodeError::UnknownType { .. }
            ));
        }
        other => panic!("expected an unknown-type error, got {other:?}"),
    }
    // Unreadable metadata: reading the envelope names the row; rebuilding the aggregate, which
    // needs only the payload, still works.
    match store
        .load_all(&StreamId::new("account", "bad-metadata"))
        .await
    {
        Err(StoreError::Corrupt(corrupt)) => {
            assert_eq!(corrupt.version, 2);
            assert_eq!(corrupt.stream, StreamId::new("account", "bad-metadata"));
            assert!(
                corrupt.message.starts_with("metadata"),
                "{}",
                corrupt.message
            );
        }
        other => panic!("expected a corrupt-record error, got {other:?}"),
    }
    assert_eq!(
        gateway
            .load("bad-metadata")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .1,
        2
    );
    let deposit = AccountCommand::Deposit(cqrs_examples::bank::Deposit {
        amount_cents: 5,
        reference: String::new(),
    });
    assert_eq!(
        gateway
            .execute("good", deposit, CommandMetadata::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .version,
        2
    );
    // The global reader reads up to the corrupt metadata row, then reports it, naming it and its
    // checkpoint, instead of skipping it or failing the events before it; a reader goes on after
    // that checkpoint (once the rows are below the cluster-wide xmin, which another test's open
    // transaction may hold back a moment).
    let (read, corrupt) = read_log_past_corrupt_rows(&store, false, 8).await;
    for row in &corrupt {
        assert!(row.message.starts_with("metadata"), "{}", row.message);
    }
    let corrupt: Vec<_> = corrupt
        .iter()
        .map(|row| (row.stream.aggregate_id.to_string(), row.version))
        .collect();
    assert_eq!(corrupt, [("bad-metadata".to_owned(), 2)]);
    // The rows whose payload or type is wrong are whole rows: decoding them is the reader's.
    assert!(read.contains(&("bad-payload".to_owned(), 2)), "{read:?}");
    assert!(read.contains(&("good".to_owned(), 2)), "{read:?}");
}

/// `recorded_at` is the store's (appends never set it), but PostgreSQL holds times no reader can:
/// `'infinity'`, `'-infinity'`, the year 294000 (past chrono's range), set by a restore or an
/// operator's `UPDATE`. sqlx's decoder panicked on each, in every reader of the log; each is now a
/// `Corrupt` row naming itself and what it holds, the readers go on after it, and the stream's
/// aggregate still rebuilds (replay reads no time).
#[tokio::test]
async fn times_no_reader_can_hold_are_corrupt_rows_not_panics() {
    let store = fresh_store("far_times").await;
    let streams: Vec<StreamId> = (0..4).map(|i| stream(&format!("far-{i}"))).collect();
    for s in &streams {
        store
            .append(s, ExpectedVersion::NoStream, vec![event(1), event(2)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let schema = store.schema().to_owned();
    let far = [
        (1, 2_u64, "'infinity'", "infinity"),
        (2, 1, "'-infinity'", "-infinity"),
        (
            3,
            2,
            "'294000-01-01 00:00:00+00'",
            "microseconds after 2000-01-01",
        ),
    ];
    for (i, version, time, _) in far {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{schema}\".events SET recorded_at = {time} \
             WHERE aggregate_id = $1 AND version = $2"
        )))
        .bind(streams[i].aggregate_id.as_str())
        .bind(version.cast_signed())
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        store
            .load_all(&streams[0])
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        2
    );
    for (i, version, _, says) in far {
        match store.load_all(&streams[i]).await {
            Err(StoreError::Corrupt(row)) => {
                assert_eq!((&row.stream, row.version), (&streams[i], version));
                assert!(row.message.starts_with("recorded_at"), "{}", row.message);
                assert!(row.message.contains(says), "{}", row.message);
            }
            other => panic!("expected a corrupt row, got {other:?}"),
        }
        let replayed: Vec<_> = store
            .replay(&streams[i], 0)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replayed.len(), 2, "replay reads no time");
    }
    // The log's readers, parsed and raw (what relays forward), report each row and go on.
    for raw in [false, true] {
        let (read, corrupt) = read_log_past_corrupt_rows(&store, raw, 8).await;
        for row in &corrupt {
            assert!(row.message.starts_with("recorded_at"), "{}", row.message);
        }
        let mut corrupt: Vec<_> = corrupt
            .iter()
            .map(|row| (row.stream.aggregate_id.to_string(), row.version))
            .collect();
        corrupt.sort();
        assert_eq!(
            corrupt,
            [
                ("far-1".to_owned(), 2),
                ("far-2".to_owned(), 1),
                ("far-3".to_owned(), 2)
            ],
            "raw: {raw}"
        );
        assert_eq!(read.len(), 5, "raw: {raw}");
    }
}

/// Reads the log from the start (`read_all_raw` if `raw`, else `read_all`) until `rows` rows were
/// read or reported corrupt, going on after each corrupt one from its checkpoint, which must lie
/// past what was read (rows below the cluster-wide xmin only, which another test's open
/// transaction may hold back a moment): the (stream id, version) of the events read, and the
/// corrupt rows.
async fn read_log_past_corrupt_rows(
    store: &PostgresEventStore,
    raw: bool,
    rows: usize,
) -> (Vec<(String, u64)>, Vec<evently_core::store::CorruptEvent>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut after, mut read, mut corrupt) = (Checkpoint::START, Vec::new(), Vec::new());
    while read.len() + corrupt.len() < rows {
        assert!(
            std::time::Instant::now() < deadline,
            "read {read:?}, corrupt {corrupt:?}"
        );
        let page = if raw {
            store.read_all_raw(after, 100).await.map(|page| {
                page.into_iter()
                    .map(|e| (e.stream.aggregate_id.to_string(), e.version, e.checkpoint))
                    .collect::<Vec<_>>()
            })
        } else {
            store.read_all(after, 100).await.map(|page| {
                page.into_iter()
                    .map(|e| (e.stream.aggregate_id.to_string(), e.version, e.checkpoint))
                    .collect::<Vec<_>>()
            })
        };
        match page {
            Ok(page) if page.is_empty() => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(page) => {
                after = page.last().map_or(after, |e| e.2);
                read.extend(page.into_iter().map(|(id, version, _)| (id, version)));
            }
            Err(StoreError::Corrupt(row)) => {
                assert!(row.checkpoint > after, "{} after {after}", row.checkpoint);
                after = row.checkpoint;
                corrupt.push(*row);
            }
            Err(other) => panic!("expected events or a corrupt-row error, got {other:?}"),
        }
    }
    (read, corrupt)
}

/// Schema names, stream ids, event types and metadata with quotes, semicolons and unicode round-trip
/// intact; every value is a bind parameter and the schema name a quoted identifier.
#[tokio::test]
async fn hostile_names_round_trip() {
    let store = fresh_store("hostile\"; DROP TABLE x; -- ünï 🚀").await;
    assert_eq!(store.schema(), "t_hostile\"; DROP TABLE x; -- ünï 🚀");
    let s = StreamId::new("ty'pe; --", "id\"); DELETE FROM events; -- 名前");
    let mut e = event(1);
    e.event_type = "Ev'ent\"; DROP SCHEMA public; --".into();
    e.metadata = Metadata::default().with_header("h'; --", "v\"ü");
    store
        .append(&s, ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stored = store.load_all(&s).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (
            &stored[0].stream,
            &stored[0].event_type,
            &stored[0].metadata
        ),
        (&s, &e.event_type, &e.metadata)
    );
    assert_eq!(read_until(&store, 1).await.len(), 1);
    assert!(matches!(
        PostgresEventStore::new(store.pool().clone(), ""),
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        PostgresEventStore::new(store.pool().clone(), &"x".repeat(64)),
        Err(StoreError::InvalidInput(_))
    ));
}

/// A commit wakes a listener; without a notification, polling still finds the events.
#[tokio::test]
async fn commits_wake_listeners() {
    let store = fresh_store("wakeups").await;
    let mut wakeups = store.listen().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !wakeups
            .next_within(Duration::from_millis(100))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    store
        .append(&stream("w"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wakeups
            .next_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        "no wake-up after a commit"
    );
    // Another schema's commits do not wake this listener.
    let other = fresh_store("wakeups_other").await;
    other
        .append(&stream("w"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !wakeups
            .next_within(Duration::from_millis(300))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
}

/// Idempotency keys and snapshots through the gateway on PostgreSQL; two gateways (as two
/// processes) racing with one key execute the command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keys_and_snapshots_on_postgres() {
    use evently_core::SnapshotStore;
    let store = fresh_store("gateway_pg").await;
    let open = CommandGateway::<Account, _>::new(store.clone()).with_snapshots(store.clone());
    open.execute(
        "acc",
        AccountCommand::Open { owner: "o".into() },
        CommandMetadata::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let deposit = || {
        AccountCommand::Deposit(cqrs_examples::bank::Deposit {
            amount_cents: 1,
            reference: String::new(),
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let gateway = CommandGateway::<Account, _>::new(store.clone());
        tasks.push(tokio::spawn(async move {
            gateway
                .execute_idempotent("pay-once", "acc", deposit(), CommandMetadata::new())
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(
            task.await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    assert!(
        outcomes.windows(2).all(|w| w[0] == w[1]),
        "one outcome for every caller"
    );
    assert_eq!(
        open.load("acc")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .0
            .balance_cents,
        1
    );

    for _ in 0..150 {
        open.execute("acc", deposit(), CommandMetadata::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let snapshot = store
        .load_snapshot(&StreamId::new("account", "acc"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("a snapshot at version 100"));
    assert_eq!(snapshot.version, 100);
    let (account, version) = open.load("acc").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((account.balance_cents, version), (151, 152));
}

/// Keyed commands cut at random points (also after the statement that records the key and the
/// events was sent) and retried at once with the same key, as a client that timed out would:
/// each key's deposit is recorded once, and the retry answers with the first command's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_commands_cut_and_retried_at_once_execute_once() {
    let store = fresh_store("keyed_cut").await;
    let accounts = CommandGateway::<Account, _>::new(store.clone());
    accounts
        .execute(
            "acc",
            AccountCommand::Open { owner: "o".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deposit = |n: u64| {
        AccountCommand::Deposit(cqrs_examples::bank::Deposit {
            amount_cents: n,
            reference: format!("d{n}"),
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut cut, mut total) = (0, 0);
    for n in 1..=300u64 {
        let key = format!("deposit-{n}");
        let after = Duration::from_micros(rng.random_range(0..2_500));
        let first = tokio::time::timeout(
            after,
            accounts.execute_idempotent(&key, "acc", deposit(n), CommandMetadata::new()),
        )
        .await;
        if first.is_err() {
            cut += 1;
        }
        let retried = accounts
            .execute_idempotent(&key, "acc", deposit(n), CommandMetadata::new())
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(retried.events.len(), 1, "{key}: the first command's event");
        if let Ok(Ok(first)) = first {
            assert_eq!(first.events[0].event_id, retried.events[0].event_id);
        }
        total += n;
    }
    let (account, version) = accounts.load("acc").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (account.balance_cents, version),
        (total, 301),
        "every deposit once ({cut} of 300 first tries cut)"
    );
    assert!(cut > 30, "the cuts land: {cut}");
}

/// Whether the pool's next connection is still inside a transaction begun by an earlier
/// statement: `SAVEPOINT` is refused outside a transaction block.
async fn inside_a_stale_transaction(pool: &sqlx::PgPool) -> bool {
    let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    match sqlx::query("SAVEPOINT probe").execute(&mut *conn).await {
        Ok(_) => {
            sqlx::query("ROLLBACK")
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            true
        }
        Err(error) => {
            assert!(
                error.to_string().contains("transaction block"),
                "unexpected: {error}"
            );
            false
        }
    }
}

/// Appends that open a transaction (with an idempotency key; 1,000 events by COPY) are cut at
/// random points on a pool of one connection: the connection is never handed on inside the cut
/// transaction (sqlx 0.9.0's own `begin` would, transact-rs/sqlx#4393), and a later append commits
/// for real (another pool sees it).
#[tokio::test]
async fn cut_transactions_never_leak_into_the_next_use_of_the_connection() {
    let store = fresh_store_with("cut_transactions", 1).await;
    let other = pool(1).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut cut_mid_flight = 0;
    for i in 0..150 {
        let s = stream(&format!("c{i}"));
        let cut = Duration::from_micros(rng.random_range(0..4_000));
        let append = async {
            if i % 2 == 0 {
                store
                    .append_with_key(
                        &s,
                        ExpectedVersion::NoStream,
                        vec![event(0)],
                        &format!("k{i}"),
                    )
                    .await
            } else {
                store
                    .append(
                        &s,
                        ExpectedVersion::NoStream,
                        (0..1_000).map(event).collect(),
                    )
                    .await
            }
        };
        if tokio::time::timeout(cut, append).await.is_err() {
            cut_mid_flight += 1;
        }
        assert!(
            !inside_a_stale_transaction(store.pool()).await,
            "cut {i} after {cut:?} left the connection inside its transaction"
        );
    }
    let last = stream("after-the-cuts");
    store
        .append(&last, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".events WHERE aggregate_id = 'after-the-cuts'",
        store.schema()
    )))
    .fetch_one(&other)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen, 1, "the append after the cuts is committed");
    assert!(cut_mid_flight > 30, "only {cut_mid_flight} of 150 were cut");
    eprintln!("cut transactions: {cut_mid_flight} of 150 appends cut mid-flight, 0 leaked");
}

/// `checkpoint_before_last(n)`: reading after it gives exactly the last `n` events of the global
/// order (what `cqrs events tail` starts from), for every `n` from 0 past the log's length.
#[tokio::test]
async fn the_last_n_events_start_after_checkpoint_before_last() {
    let store = fresh_store("before_last").await;
    for (s, n) in [("a", 7u64), ("b", 11), ("c", 5)] {
        for chunk in 0..n {
            store
                .append(
                    &stream(s),
                    ExpectedVersion::Exact(chunk),
                    vec![event(chunk)],
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // Another test's open transaction holds the cluster's read horizon back: wait it out.
    let all = evently_core::conformance::read_settled(&store, Checkpoint::START, 23).await;
    assert_eq!(all.len(), 23);
    for n in [0, 1, 10, 22, 23, 24, 1_000] {
        let start = store
            .checkpoint_before_last(n)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let tail = store
            .read_all(start, 1_000)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let expected = &all[all.len().saturating_sub(n)..];
        assert_eq!(
            tail.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            expected.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "the last {n}"
        );
    }
}
