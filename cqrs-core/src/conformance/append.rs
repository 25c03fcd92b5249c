//! Appends: the expected-version matrix, idempotent retries, atomic failures, racing writers,
//! batches of any size.

use std::collections::{BTreeMap, HashSet};

use serde_json::json;

use crate::envelope::{AggregateId, Checkpoint, EventData, EventId, Metadata, StreamId};
use crate::store::{EventStore, ExpectedVersion, StoreError};

use super::*;

/// Every expected version against a missing stream and against a stream with two events; a conflict
/// names the expected and the actual version, and changes nothing.
pub async fn expected_version_matrix<S: EventStore>(store: S) {
    use ExpectedVersion::{Any, Exact, NoStream, StreamExists};
    // (expectation, succeeds on a missing stream, succeeds on a stream at version 2)
    let cases = [
        (Any, true, true),
        (NoStream, true, false),
        (StreamExists, false, true),
        (Exact(0), true, false),
        (Exact(1), false, false),
        (Exact(2), false, true),
        (Exact(3), false, false),
    ];
    for (expected, on_missing, on_existing) in cases {
        for (existing, should_pass) in [(false, on_missing), (true, on_existing)] {
            let s = stream("matrix");
            let before = if existing {
                append_ok(&store, &s, NoStream, events(0..2)).await
            } else {
                0
            };
            let result = store.append(&s, expected, vec![event(9)]).await;
            match (should_pass, result) {
                (true, Ok(done)) => {
                    assert_eq!(done.version, before + 1, "{expected} on version {before}");
                    assert_eq!(done.events.len(), 1);
                    assert_eq!(done.events[0].version, before + 1);
                }
                (
                    false,
                    Err(StoreError::Conflict {
                        stream: at,
                        expected: e,
                        actual,
                    }),
                ) => {
                    assert_eq!(at, s);
                    assert_eq!(e, expected);
                    assert_eq!(
                        actual, before,
                        "{expected}: the conflict must report the actual version"
                    );
                }
                (pass, other) => panic!(
                    "{expected} on a stream at version {before}: expected {}, got {other:?}",
                    if pass { "success" } else { "a conflict" }
                ),
            }
            let version = store
                .stream_version(&s)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                version,
                before + u64::from(should_pass),
                "{expected} on version {before}"
            );
            assert_eq!(load(&store, &s).await.len() as u64, version);
        }
    }
}
/// Appending the same ids again (a retry after an unknown outcome) is recognised: nothing is
/// duplicated and the first outcome is returned.
pub async fn idempotent_retry_with_same_ids<S: EventStore>(store: S) {
    let s = stream("idempotent");
    append_ok(&store, &s, ExpectedVersion::NoStream, events(0..1)).await;
    let batch = events(1..4);
    let first = match store
        .append(&s, ExpectedVersion::Exact(1), batch.clone())
        .await
    {
        Ok(result) => result,
        Err(error) => panic!("first append: {error}"),
    };
    // The retry carries the same expectation, which no longer holds: idempotency wins over it.
    for expected in [
        ExpectedVersion::Exact(1),
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
    ] {
        match store.append(&s, expected, batch.clone()).await {
            Err(StoreError::AlreadyAppended(original)) => {
                assert_eq!(original.stream, s);
                assert_eq!(original.version, 4);
                assert_eq!(original.events.len(), 3);
                for (a, b) in original.events.iter().zip(&first.events) {
                    assert_eq!(
                        (a.event_id, a.version, a.checkpoint),
                        (b.event_id, b.version, b.checkpoint)
                    );
                }
            }
            other => panic!(
                "retrying the same ids expecting {expected}: expected AlreadyAppended, got {other:?}"
            ),
        }
    }
    let stored = load(&store, &s).await;
    assert_eq!(stored.len(), 4, "a retry must not duplicate events");
    let ids: HashSet<EventId> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 4);
}
/// An id that is stored already, sent with other content, to another stream, or twice in one batch, is
/// a typed error and nothing is written.
pub async fn same_id_with_other_content_is_rejected<S: EventStore>(store: S) {
    let s = stream("reuse");
    let original = event(1);
    append_ok(
        &store,
        &s,
        ExpectedVersion::NoStream,
        vec![original.clone()],
    )
    .await;

    let mut changed = original.clone();
    changed.payload = json!({ "n": 2 });
    let other_stream = stream("reuse-other");
    let mut twice = event(5);
    twice.event_id = EventId::new();
    let attempts = [
        ("other payload", s.clone(), vec![changed]),
        ("other stream", other_stream.clone(), vec![original.clone()]),
        (
            "a stored id among new ones",
            s.clone(),
            vec![event(3), original.clone()],
        ),
        (
            "the same id twice in one batch",
            s.clone(),
            vec![twice.clone(), twice],
        ),
    ];
    for (what, target, batch) in attempts {
        match store.append(&target, ExpectedVersion::Any, batch).await {
            Err(StoreError::EventIdReused { .. }) => {}
            other => panic!("{what}: expected EventIdReused, got {other:?}"),
        }
    }
    assert_eq!(
        load(&store, &s).await.len(),
        1,
        "a rejected append must write nothing"
    );
    assert_eq!(load(&store, &other_stream).await.len(), 0);
}
/// A multi-event append that fails writes none of its events, and an empty append checks the
/// expectation without writing.
pub async fn failed_append_writes_nothing<S: EventStore>(store: S) {
    let s = stream("atomic");
    append_ok(&store, &s, ExpectedVersion::NoStream, events(0..2)).await;
    let result = store
        .append(&s, ExpectedVersion::Exact(1), events(2..12))
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict { actual: 2, .. })),
        "{result:?}"
    );
    assert_eq!(load(&store, &s).await.len(), 2);

    assert_eq!(
        append_ok(&store, &s, ExpectedVersion::Exact(2), Vec::new()).await,
        2
    );
    let empty = store
        .append(&s, ExpectedVersion::NoStream, Vec::new())
        .await;
    assert!(
        matches!(empty, Err(StoreError::Conflict { .. })),
        "{empty:?}"
    );
    let missing = stream("atomic-empty");
    assert_eq!(
        append_ok(&store, &missing, ExpectedVersion::NoStream, Vec::new()).await,
        0
    );
    assert_eq!(store.stream_version(&missing).await.ok(), Some(0));
}
/// 8 writers race on one stream, each reading the version `v` and appending at `Exact(v)`, retrying
/// on conflict: exactly one winner per version, every loser gets the typed conflict, no gaps, no
/// duplicates.
pub async fn concurrent_writers_one_winner_per_version<S: EventStore + Clone + 'static>(store: S) {
    const WRITERS: u64 = 8;
    const ROUNDS: u64 = 25;
    let s = stream("race");
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (store, s) = (store.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0u64;
            while (won.len() as u64) < ROUNDS {
                let v = store
                    .stream_version(&s)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let mut e = event(writer * 1000 + won.len() as u64);
                e.metadata = e.metadata.with_header("writer", writer.to_string());
                let id = e.event_id;
                match store.append(&s, ExpectedVersion::Exact(v), vec![e]).await {
                    Ok(done) => {
                        assert_eq!(done.version, v + 1);
                        won.push((v + 1, id));
                    }
                    Err(StoreError::Conflict { actual, .. }) => {
                        assert!(
                            actual > v,
                            "a conflict at {v} must report a newer version, got {actual}"
                        );
                        conflicts += 1;
                    }
                    Err(other) => {
                        panic!("writer {writer}: expected success or a conflict, got {other}")
                    }
                }
                tokio::task::yield_now().await;
            }
            (won, conflicts)
        }));
    }
    let mut winners = BTreeMap::new();
    for task in tasks {
        let (won, _) = task.await.unwrap_or_else(|e| panic!("writer task: {e}"));
        for (version, id) in won {
            assert!(
                winners.insert(version, id).is_none(),
                "two winners for version {version}"
            );
        }
    }
    let stored = load(&store, &s).await;
    assert_eq!(stored.len() as u64, WRITERS * ROUNDS);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "gap or disorder in the stream");
        assert_eq!(
            winners.get(&e.version),
            Some(&e.event_id),
            "the stored event is not the winner's"
        );
    }
}
/// Batches of thousands of events (which a store may write another way, e.g. PostgreSQL's COPY)
/// follow the same rules: expectations, idempotent retries, conflicts, and content with backslashes,
/// tabs, newlines and unicode round-trips exactly.
pub async fn large_batches_behave_like_small_ones<S: EventStore>(store: S) {
    let s = StreamId::new(
        "conformance",
        AggregateId::new(format!("big\t\\n\n ü {}", EventId::new())),
    );
    let tricky = |n: u64| {
        let mut e = event(n);
        e.payload = json!({ "n": n, "text": "tab\there\nnewline \\ backslash \\n not-a-newline 'q' \"dq\" 🚀" });
        e.metadata = Metadata::default().with_header("k\tey", "va\\lue\n");
        e.event_type = "Big\tEvent\\".into();
        e
    };
    let first: Vec<EventData> = (0..2_500).map(tricky).collect();
    let done = store
        .append(&s, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((done.version, done.events.len()), (2_500, 2_500));
    for pair in done.events.windows(2) {
        assert!(
            pair[0].checkpoint < pair[1].checkpoint,
            "positions follow versions within a batch"
        );
    }
    match store
        .append(&s, ExpectedVersion::NoStream, first.clone())
        .await
    {
        Err(StoreError::AlreadyAppended(original)) => assert_eq!(original.version, 2_500),
        other => panic!("retrying a large batch: expected AlreadyAppended, got {other:?}"),
    }
    let second: Vec<EventData> = (0..1_500).map(event).collect();
    let stale = store
        .append(&s, ExpectedVersion::Exact(2_499), second.clone())
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { actual: 2_500, .. })),
        "{stale:?}"
    );
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Exact(2_500), second)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .version,
        4_000
    );
    let stored = load(&store, &s).await;
    assert_eq!(stored.len(), 4_000);
    for (e, appended) in stored.iter().zip(&done.events) {
        assert_eq!(
            (e.event_id, e.version, e.checkpoint, e.recorded_at),
            (
                appended.event_id,
                appended.version,
                appended.checkpoint,
                appended.recorded_at
            ),
            "what the append reported is what was stored"
        );
    }
    for (e, original) in stored.iter().zip(&first) {
        assert_eq!(
            (&e.event_type, &e.payload, &e.metadata),
            (&original.event_type, &original.payload, &original.metadata)
        );
        assert_eq!(e.stream, s);
    }
}
/// Writers racing large batches (thousands of events each, which a store may write another way)
/// onto one stream: exactly one wins each base version, the losers get a conflict and write
/// nothing, `Any` appends all go in one after another, and the global order holds every batch
/// whole and in version order.
pub async fn racing_large_batches_one_winner_per_version<S: EventStore + Clone + 'static>(
    store: S,
) {
    const WRITERS: u64 = 4;
    const BATCH: u64 = 1_200;
    let s = stream("big-race");
    let batch = |writer: u64| -> Vec<EventData> {
        (0..BATCH)
            .map(|n| {
                let mut e = event(writer * 10_000 + n);
                e.metadata = e.metadata.with_header("writer", writer.to_string());
                e
            })
            .collect()
    };
    let race = |expected: ExpectedVersion| {
        (0..WRITERS)
            .map(|writer| {
                let (store, s, events) = (store.clone(), s.clone(), batch(writer));
                tokio::spawn(async move { store.append(&s, expected, events).await })
            })
            .collect::<Vec<_>>()
    };
    let mut won = 0;
    for task in race(ExpectedVersion::NoStream) {
        match task.await.unwrap_or_else(|e| panic!("writer task: {e}")) {
            Ok(done) => {
                assert_eq!(done.version, BATCH);
                won += 1;
            }
            Err(StoreError::Conflict { actual, .. }) => assert!(actual >= BATCH, "{actual}"),
            Err(other) => panic!("expected success or a conflict, got {other}"),
        }
    }
    assert_eq!(won, 1, "one winner for NoStream");
    for task in race(ExpectedVersion::Any) {
        task.await
            .unwrap_or_else(|e| panic!("writer task: {e}"))
            .unwrap_or_else(|e| panic!("an Any append of a large batch: {e}"));
    }
    let stored = load(&store, &s).await;
    assert_eq!(stored.len() as u64, BATCH * (WRITERS + 1));
    for (chunk, i) in stored.chunks(BATCH as usize).zip(0u64..) {
        let writer = chunk[0].metadata.headers.get("writer").cloned();
        for (e, n) in chunk.iter().zip(0u64..) {
            assert_eq!(
                e.version,
                i * BATCH + n + 1,
                "gap or disorder in the stream"
            );
            assert_eq!(
                e.metadata.headers.get("writer").cloned(),
                writer,
                "two batches interleaved at version {}",
                e.version
            );
        }
    }
    let read: Vec<u64> = read_settled(&store, Checkpoint::START, stored.len())
        .await
        .into_iter()
        .filter(|e| e.stream == s)
        .map(|e| e.version)
        .collect();
    let expected: Vec<u64> = (1..=BATCH * (WRITERS + 1)).collect();
    assert_eq!(
        read, expected,
        "the global order holds the stream in version order"
    );
}
