//! The event-store conformance suite: one set of checks that every [`EventStore`] must pass, so the
//! in-memory store and the PostgreSQL store cannot drift apart.
//!
//! Each check takes a fresh, empty store and panics (as a test assertion) with what went wrong.
//! [`event_store_conformance_tests!`](crate::event_store_conformance_tests) turns them into one
//! `#[tokio::test]` each:
//!
//! ```text
//! evently_core::event_store_conformance_tests!(|_test_name| async { evently_core::InMemoryEventStore::new() });
//! ```

use std::collections::{BTreeMap, HashSet};

use futures::TryStreamExt;
use serde_json::json;

use crate::envelope::{
    AggregateId, Checkpoint, EventData, EventId, Metadata, StoredEvent, StreamId,
};
use crate::store::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, StoreError};
use crate::{CausationId, CorrelationId};

/// Generates one `#[tokio::test]` per conformance check. `$make` is a closure that takes the test's
/// name (to isolate its data, e.g. in a schema of that name) and returns a future of a fresh, empty
/// store (`S: EventStore + SnapshotStore + Clone + 'static`); the calling crate depends on tokio with
/// the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! event_store_conformance_tests {
    ($make:expr) => {
        $crate::event_store_conformance_tests!(@tests $make;
            expected_version_matrix,
            idempotent_retry_with_same_ids,
            same_id_with_other_content_is_rejected,
            failed_append_writes_nothing,
            concurrent_writers_one_winner_per_version,
            read_all_order_and_resumption,
            load_from_version,
            payload_and_metadata_round_trip,
            command_keys_record_once,
            racing_command_keys_have_one_winner,
            racing_keyed_appends_at_one_version,
            snapshots_keep_the_latest,
            large_batches_behave_like_small_ones,
            racing_large_batches_one_winner_per_version,
            read_filtered_returns_matches_and_how_far_it_scanned,
            what_append_accepts_every_reader_reads,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let store = ($make)(stringify!($name)).await;
                $crate::conformance::$name(store).await;
            }
        )*
    };
}

fn stream(name: &str) -> StreamId {
    StreamId::new(
        "conformance",
        AggregateId::new(format!("{name}-{}", EventId::new())),
    )
}

/// A small event for the checks.
#[must_use]
pub fn event(n: u64) -> EventData {
    EventData {
        event_id: EventId::new(),
        event_type: "Ticked".into(),
        schema_version: 1,
        payload: json!({ "n": n }),
        metadata: Metadata::default(),
    }
}

fn events(range: std::ops::Range<u64>) -> Vec<EventData> {
    range.map(event).collect()
}

async fn load<S: EventStore>(store: &S, stream: &StreamId) -> Vec<StoredEvent> {
    match store.load(stream, 0).try_collect().await {
        Ok(events) => events,
        Err(error) => panic!("load {stream}: {error}"),
    }
}

async fn append_ok<S: EventStore>(
    store: &S,
    stream: &StreamId,
    expected: ExpectedVersion,
    batch: Vec<EventData>,
) -> u64 {
    match store.append(stream, expected, batch).await {
        Ok(result) => result.version,
        Err(error) => panic!("append to {stream} expecting {expected}: {error}"),
    }
}

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

/// `read_all` returns every event once, in increasing checkpoint order, per-stream in version order;
/// paging with the last checkpoint resumes exactly after it.
pub async fn read_all_order_and_resumption<S: EventStore>(store: S) {
    let streams: Vec<StreamId> = (0..4).map(|i| stream(&format!("global-{i}"))).collect();
    let mut appended = Vec::new();
    for round in 0..5u64 {
        for (i, s) in streams.iter().enumerate() {
            let batch = events(round * 10..round * 10 + (i as u64 % 3) + 1);
            appended.extend(batch.iter().map(|e| e.event_id));
            store
                .append(s, ExpectedVersion::Any, batch)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let everything = read_settled(&store, Checkpoint::START, appended.len()).await;
    let ours: Vec<&StoredEvent> = everything
        .iter()
        .filter(|e| streams.contains(&e.stream))
        .collect();
    assert_eq!(
        ours.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        appended,
        "global order must be append order"
    );
    for pair in everything.windows(2) {
        assert!(
            pair[0].checkpoint < pair[1].checkpoint,
            "checkpoints must increase"
        );
    }

    let mut paged = Vec::new();
    let mut after = Checkpoint::START;
    loop {
        let page = store
            .read_all(after, 3)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.checkpoint;
        paged.extend(page);
    }
    assert_eq!(
        paged.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        everything.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "paging must return every event once, in order"
    );

    let middle = everything.len() / 2;
    let rest = store
        .read_all(everything[middle].checkpoint, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rest.len(),
        everything.len() - middle - 1,
        "resume after a checkpoint"
    );
    assert_eq!(
        rest.first().map(|e| e.event_id),
        everything.get(middle + 1).map(|e| e.event_id)
    );
    let tail = store
        .read_all(after, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(tail.is_empty(), "nothing after the last checkpoint");
    let none = store
        .read_all(Checkpoint::START, 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.is_empty(), "limit 0 reads nothing");
}

/// Reads every event after `after` once `count` of them are readable. A store may hold readers
/// back while any transaction of the database is open (PostgreSQL's global order waits for the
/// oldest running transaction, of any test), never skipping; this waits that out, up to 30
/// seconds, and then returns what is readable (the caller asserts on it).
pub async fn read_settled<S: EventStore>(
    store: &S,
    after: Checkpoint,
    count: usize,
) -> Vec<StoredEvent> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let all = store
            .read_all(after, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if all.len() >= count || std::time::Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `load` from a version returns the later events only; a missing stream loads as empty.
pub async fn load_from_version<S: EventStore>(store: S) {
    let s = stream("load");
    append_ok(&store, &s, ExpectedVersion::NoStream, events(0..10)).await;
    for after in [0u64, 1, 5, 9, 10, 50] {
        let tail: Vec<StoredEvent> = store
            .load(&s, after)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let versions: Vec<u64> = tail.iter().map(|e| e.version).collect();
        assert_eq!(
            versions,
            (after + 1..=10).collect::<Vec<_>>(),
            "load after {after}"
        );
    }
    assert!(load(&store, &stream("missing")).await.is_empty());
}

/// Payloads, metadata and names with quotes, semicolons and unicode come back exactly.
pub async fn payload_and_metadata_round_trip<S: EventStore>(store: S) {
    let s = StreamId::new(
        "conformance",
        AggregateId::new(format!("it's; \"quoted\" — ünïcødé 🚀 {}", EventId::new())),
    );
    let metadata = Metadata::default()
        .with_correlation_id(CorrelationId::new())
        .with_causation_id(CausationId::new())
        .with_user_id("o'brien; DROP TABLE events;--")
        .with_header("tenant", "ä\"ö");
    let e = EventData {
        event_id: EventId::new(),
        event_type: "Named \"Thing\"; ✓".into(),
        schema_version: 7,
        // A NUL character too: stores keep payloads as JSON text (PostgreSQL's `jsonb` could
        // not hold one; the store's `json` columns can).
        payload: json!({
            "text": "line\nbreak \u{1F600} 'single' \"double\"; -- nul:\u{0}.",
            "n": -1.5,
            "list": [1, null, true],
            "nested": { "a": {} },
        }),
        metadata: metadata.clone(),
    };
    append_ok(&store, &s, ExpectedVersion::NoStream, vec![e.clone()]).await;
    let stored = load(&store, &s).await;
    assert_eq!(stored.len(), 1);
    let got = &stored[0];
    assert_eq!(got.stream, s);
    assert_eq!(got.event_id, e.event_id);
    assert_eq!(got.event_type, e.event_type);
    assert_eq!(got.schema_version, 7);
    assert_eq!(got.payload, e.payload);
    assert_eq!(got.metadata, metadata);
    assert_eq!(got.version, 1);
}

/// Nothing an append accepts is unreadable: a payload nested [`MAX_JSON_DEPTH`] deep is stored
/// and reads back through `load` and `read_all`; one level deeper is refused with
/// [`StoreError::InvalidInput`] and writes nothing.
///
/// [`MAX_JSON_DEPTH`]: crate::store::MAX_JSON_DEPTH
pub async fn what_append_accepts_every_reader_reads<S: EventStore>(store: S) {
    let nested = |depth: usize| {
        let mut value = json!("leaf");
        for level in 0..depth {
            value = if level % 2 == 0 {
                json!([value])
            } else {
                json!({ "k": value })
            };
        }
        value
    };
    let limit = crate::store::MAX_JSON_DEPTH;
    let deepest = EventData {
        payload: nested(limit),
        ..event(0)
    };
    let s = stream("deep");
    append_ok(&store, &s, ExpectedVersion::NoStream, vec![deepest.clone()]).await;
    let stored = load(&store, &s).await;
    assert_eq!(stored[0].payload, deepest.payload);
    // In the global order too, once readable (the store may hold it back while another
    // transaction of the database is open).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let all = store
            .read_all(Checkpoint::START, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("read_all past a payload {limit} deep: {e}"));
        if let Some(read) = all.iter().find(|e| e.event_id == deepest.event_id) {
            assert_eq!(read.payload, deepest.payload);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the deepest accepted payload is not in the global order"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let too_deep = s.clone();
    match store
        .append(
            &too_deep,
            ExpectedVersion::Any,
            vec![EventData {
                payload: nested(limit + 1),
                ..event(1)
            }],
        )
        .await
    {
        Err(StoreError::InvalidInput(message)) => {
            assert!(message.contains("nested"), "{message}");
        }
        other => panic!(
            "a payload {} deep: expected InvalidInput, got {other:?}",
            limit + 1
        ),
    }
    assert_eq!(
        load(&store, &s).await.len(),
        1,
        "the refused append wrote nothing"
    );
}

/// A command idempotency key is recorded with the append, once: a second use appends nothing and
/// returns the first record; an append that fails records no key; a key with no events records the
/// version.
pub async fn command_keys_record_once<S: EventStore>(store: S) {
    let s = stream("keys");
    let key = format!("key-{}", EventId::new());
    assert_eq!(
        store.find_key(&key).await.unwrap_or_else(|e| panic!("{e}")),
        None
    );

    let failed = store
        .append_with_key(&s, ExpectedVersion::Exact(3), events(0..2), &key)
        .await;
    assert!(
        matches!(failed, Err(StoreError::Conflict { .. })),
        "{failed:?}"
    );
    assert_eq!(
        store.find_key(&key).await.ok().flatten(),
        None,
        "a failed append records no key"
    );

    let done = store
        .append_with_key(&s, ExpectedVersion::NoStream, events(0..2), &key)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.version, 2);
    let record = store
        .find_key(&key)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("key not recorded"));
    assert_eq!(
        (
            record.stream.clone(),
            record.first_version,
            record.last_version
        ),
        (s.clone(), 1, 2)
    );

    match store
        .append_with_key(&s, ExpectedVersion::Any, events(5..6), &key)
        .await
    {
        Err(StoreError::KeyUsed(first)) => assert_eq!(*first, record),
        other => panic!("second use of a key: expected KeyUsed, got {other:?}"),
    }
    assert_eq!(
        load(&store, &s).await.len(),
        2,
        "a second use appends nothing"
    );

    let empty_key = format!("empty-{}", EventId::new());
    let done = store
        .append_with_key(&s, ExpectedVersion::Exact(2), Vec::new(), &empty_key)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.version, 2);
    let record = store
        .find_key(&empty_key)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("key not recorded"));
    assert_eq!(
        (record.first_version, record.last_version),
        (3, 2),
        "no events: first > last"
    );
}

/// Eight writers race to use one key on one stream: exactly one appends.
pub async fn racing_command_keys_have_one_winner<S: EventStore + Clone + 'static>(store: S) {
    let s = stream("key-race");
    let key = format!("race-{}", EventId::new());
    let mut tasks = Vec::new();
    for n in 0..8 {
        let (store, s, key) = (store.clone(), s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .append_with_key(&s, ExpectedVersion::Any, events(n..n + 1), &key)
                .await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap_or_else(|e| panic!("{e}")) {
            Ok(_) => winners += 1,
            Err(StoreError::KeyUsed(record)) => assert_eq!(record.stream, s),
            Err(other) => panic!("expected success or KeyUsed, got {other}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(load(&store, &s).await.len(), 1);
}

/// Keyed appends at an exact expected version (what the command gateway sends), racing: eight
/// writers with one key at `NoStream` give one append and seven `KeyUsed` naming it; eight
/// writers with eight keys at version 1 give one append and seven conflicts, whose keys are not
/// recorded (a retry of theirs decides again); a key used at a moved stream is a conflict that
/// records nothing, and the same key at the right version then appends.
pub async fn racing_keyed_appends_at_one_version<S: EventStore + Clone + 'static>(store: S) {
    let s = stream("keyed-race");
    let key = format!("race-{}", EventId::new());
    let mut tasks = Vec::new();
    for n in 0..8 {
        let (store, s, key) = (store.clone(), s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .append_with_key(&s, ExpectedVersion::NoStream, events(n..n + 1), &key)
                .await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap_or_else(|e| panic!("{e}")) {
            Ok(done) => {
                winners += 1;
                assert_eq!(done.version, 1);
            }
            Err(StoreError::KeyUsed(record)) => {
                assert_eq!(
                    (record.stream, record.first_version, record.last_version),
                    (s.clone(), 1, 1)
                );
            }
            Err(other) => panic!("expected success or KeyUsed, got {other}"),
        }
    }
    assert_eq!(winners, 1);

    let keys: Vec<String> = (0..8).map(|n| format!("k{n}-{}", EventId::new())).collect();
    let mut tasks = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        let (store, s, key) = (store.clone(), s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .append_with_key(
                    &s,
                    ExpectedVersion::Exact(1),
                    events(n as u64..n as u64 + 2),
                    &key,
                )
                .await
        }));
    }
    let mut winners = Vec::new();
    for (task, key) in tasks.into_iter().zip(&keys) {
        match task.await.unwrap_or_else(|e| panic!("{e}")) {
            Ok(done) => {
                assert_eq!(done.version, 3);
                winners.push(key.clone());
            }
            Err(StoreError::Conflict { .. }) => {
                assert_eq!(
                    store.find_key(key).await.unwrap_or_else(|e| panic!("{e}")),
                    None,
                    "a conflicting keyed append records no key"
                );
            }
            Err(other) => panic!("expected success or a conflict, got {other}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let record = store
        .find_key(&winners[0])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("the winner's key is recorded"));
    assert_eq!((record.first_version, record.last_version), (2, 3));
    assert_eq!(load(&store, &s).await.len(), 3);

    let late = format!("late-{}", EventId::new());
    let stale = store
        .append_with_key(&s, ExpectedVersion::Exact(1), events(0..1), &late)
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { actual: 3, .. })),
        "{stale:?}"
    );
    assert_eq!(store.find_key(&late).await.ok().flatten(), None);
    let done = store
        .append_with_key(&s, ExpectedVersion::Exact(3), events(0..1), &late)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.version, 4);
}

/// The snapshot store keeps the latest snapshot per stream and never goes back to an older one.
pub async fn snapshots_keep_the_latest<S: SnapshotStore>(store: S) {
    let s = stream("snapshot");
    assert_eq!(
        store
            .load_snapshot(&s)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    let snapshot = |version: u64| Snapshot {
        stream: s.clone(),
        version,
        schema_version: 2,
        state: json!({ "balance": version * 10, "name": "ü'\"" }),
    };
    for (save, expected) in [(100, 100), (300, 300), (200, 300)] {
        store
            .save_snapshot(snapshot(save))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got = store
            .load_snapshot(&s)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, Some(snapshot(expected)), "after saving version {save}");
    }
    assert_eq!(store.load_snapshot(&stream("other")).await.ok(), Some(None));
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

/// A filtered read returns the matching events of the scanned window in the global order, and the
/// checkpoint of the window's last event, so a reader moves past what it does not subscribe to.
pub async fn read_filtered_returns_matches_and_how_far_it_scanned<S: EventStore>(store: S) {
    use crate::projection::Subscription;
    let (a, b) = (
        stream("filter-a"),
        StreamId::new("other", AggregateId::new(format!("b-{}", EventId::new()))),
    );
    for n in 0..10u64 {
        let mut e = event(n);
        e.event_type = if n % 3 == 0 {
            "Wanted".into()
        } else {
            "Unwanted".into()
        };
        store
            .append(&a, ExpectedVersion::Any, vec![e])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut other = event(n);
        other.event_type = "Wanted".into();
        store
            .append(&b, ExpectedVersion::Any, vec![other])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let all = read_settled(&store, Checkpoint::START, 20).await;
    let filter = [Subscription {
        aggregate_type: Some("conformance"),
        event_types: &["Wanted"],
    }];
    let (first, scanned) = store
        .read_filtered(Checkpoint::START, 8, &filter)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        scanned, all[7].checkpoint,
        "the window is the next 8 events"
    );
    let expected: Vec<EventId> = all[..8]
        .iter()
        .filter(|e| e.stream == a && e.event_type == "Wanted")
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        first.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        expected
    );
    let (rest, end) = store
        .read_filtered(scanned, 100, &filter)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(end, all[19].checkpoint);
    assert_eq!(
        first.len() + rest.len(),
        4,
        "events 0, 3, 6 and 9 of stream a"
    );
    let any_aggregate = [Subscription {
        aggregate_type: None,
        event_types: &["Wanted"],
    }];
    let (wanted, _) = store
        .read_filtered(Checkpoint::START, 100, &any_aggregate)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        wanted.len(),
        14,
        "4 of stream a and 10 of the other aggregate type"
    );
    let (none, at) = store
        .read_filtered(end, 100, &filter)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.is_empty());
    assert_eq!(at, end, "nothing scanned: the checkpoint stays");
}
