//! Group commit against the real server: concurrent appends written by one statement, each on its
//! own condition; appends cut at random points and retried at once; backends terminated
//! mid-statement; writers outside the group racing it.

mod common;
mod surely;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{fresh_store, pool};
use evently_core::conformance::event;
use evently_core::prelude::*;
use evently_core::{Checkpoint, EventData, EventStoreExt, StoreError};
use evently_postgres::{GroupCommit, PostgresEventStore};
use rand::SeedableRng;
use surely::append_surely;

fn stream(id: &str) -> StreamId {
    StreamId::new("test", id)
}

/// Many writers at once, each append on its own expectation: a stale one fails alone with its
/// conflict, the others of its group commit; groups did form.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflict_fails_only_its_own_append() {
    let store = fresh_store("gc_conflict")
        .await
        .with_group_commit(GroupCommit::default());
    let shared = stream("shared");
    store
        .append(&shared, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for round in 0..40 {
        let mut tasks = Vec::new();
        for writer in 0..16u64 {
            let store = store.clone();
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                if writer == 7 {
                    // Stale: the stream is at 1 or later.
                    let stale = store
                        .append(&shared, ExpectedVersion::Exact(0), vec![event(writer)])
                        .await;
                    assert!(
                        matches!(stale, Err(StoreError::Conflict { actual, .. }) if actual >= 1),
                        "{stale:?}"
                    );
                } else {
                    let s = stream(&format!("r{round}-w{writer}"));
                    let done = store
                        .append(
                            &s,
                            ExpectedVersion::NoStream,
                            vec![event(writer), event(99)],
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{s}: {e}"));
                    assert_eq!(done.version, 2);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    for round in 0..40 {
        for writer in (0..16u64).filter(|w| *w != 7) {
            let s = stream(&format!("r{round}-w{writer}"));
            assert_eq!(
                store.load_all(&s).await.map(|e| e.len()).ok(),
                Some(2),
                "{s}"
            );
        }
    }
    assert_eq!(store.load_all(&shared).await.map(|e| e.len()).ok(), Some(1));
    let stats = store.group_commit_stats().unwrap_or_default();
    println!("{stats:?}");
    assert!(
        stats.groups > 0 && stats.grouped > stats.groups,
        "{stats:?}"
    );
}

/// 8 writers appending in a loop, each on its own stream: the answer to a group readies all its
/// writers at once, and the next group takes what they send. The leader once closed each group
/// as soon as it was woken, before the other writers it had answered ran: groups of about 4 from
/// 8 writers. It now yields to them first: most groups hold all 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_answered_together_are_grouped_together() {
    let store = fresh_store("gc_together")
        .await
        .with_group_commit(GroupCommit::default());
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = stream(&format!("together-{writer}"));
            for n in 0..150u64 {
                store
                    .append(&s, ExpectedVersion::Exact(n), vec![event(n)])
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let stats = store.group_commit_stats().unwrap_or_default();
    println!("{stats:?}");
    assert_eq!(stats.grouped + stats.alone, 8 * 150, "{stats:?}");
    let size = stats.grouped as f64 / stats.groups.max(1) as f64;
    assert!(
        size >= 5.5,
        "groups of {size:.1} appends on average: {stats:?}"
    );
}

/// 16 writers on 8 streams (two per stream, `Any`), every append cut at a random point 30% of the
/// time and retried at once with the same ids, while backends writing a group are terminated
/// every few milliseconds: every event is stored exactly once, each stream's versions have no
/// gap, and the global order holds each stream in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_and_terminated_appends_are_stored_exactly_once() {
    let store = fresh_store("gc_cuts")
        .await
        .with_group_commit(GroupCommit::default());
    let schema = store.schema().to_owned();
    let killer = pool(2).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killing = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut killed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let terminated: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE pid <> pg_backend_pid() AND query LIKE 'INSERT INTO%AS e(idx,%' \
                       AND query LIKE '%' || $1 || '%' AND state = 'active'",
                )
                .bind(format!("\"{schema}\".events"))
                .fetch_all(&killer)
                .await
                .unwrap_or_default();
                killed += terminated.len() as u64;
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
            killed
        })
    };
    let mut tasks = Vec::new();
    for writer in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(writer);
            let s = stream(&format!("s{}", writer % 8));
            let mut written = Vec::new();
            let mut cuts = 0;
            for n in 0..60u64 {
                let mut e = event(writer * 1_000 + n);
                e.metadata = e.metadata.with_header("writer", writer.to_string());
                written.push(e.event_id);
                let (_, c) =
                    append_surely(&store, &s, ExpectedVersion::Any, vec![e], &mut rng, 3_000).await;
                cuts += c;
            }
            (writer, written, cuts)
        }));
    }
    let mut expected: BTreeMap<String, Vec<evently_core::EventId>> = BTreeMap::new();
    let mut cuts = 0;
    for task in tasks {
        let (writer, written, c) = task.await.unwrap_or_else(|e| panic!("{e}"));
        cuts += c;
        expected
            .entry(format!("s{}", writer % 8))
            .or_default()
            .extend(written);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed = killing.await.unwrap_or_else(|e| panic!("{e}"));
    let mut total = 0;
    for (id, ids) in &expected {
        let stored = store
            .load_all(&stream(id))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for (e, version) in stored.iter().zip(1u64..) {
            assert_eq!(e.version, version, "{id}: gap or disorder");
        }
        let mut stored_ids: Vec<_> = stored.iter().map(|e| e.event_id).collect();
        let mut wanted = ids.clone();
        stored_ids.sort_by_key(|id| id.0);
        wanted.sort_by_key(|id| id.0);
        assert_eq!(stored_ids, wanted, "{id}: each event exactly once");
        total += stored.len();
    }
    let read = evently_core::conformance::read_settled(&store, Checkpoint::START, total).await;
    assert_eq!(read.len(), total);
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in &read {
        let previous = last.insert(e.stream.aggregate_id.as_str().to_owned(), e.version);
        assert_eq!(
            previous.unwrap_or(0) + 1,
            e.version,
            "global order by version"
        );
    }
    let stats = store.group_commit_stats().unwrap_or_default();
    println!(
        "{total} events, {cuts} appends cut and retried, {killed} group statements terminated, {stats:?}"
    );
    assert!(stats.groups > 0, "{stats:?}");
    assert!(
        killed > 0,
        "no group statement was terminated: the test proved less than it says"
    );
}

/// A writer without group commit races the grouped one on the same streams: the statements it
/// makes fail are split and their appends written one by one, and every append still ends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_outside_the_group_splits_it_and_nothing_is_lost() {
    let grouped = fresh_store("gc_outside")
        .await
        .with_group_commit(GroupCommit::default());
    let plain =
        PostgresEventStore::new(pool(8).await, grouped.schema()).unwrap_or_else(|e| panic!("{e}"));
    let mut tasks = Vec::new();
    for writer in 0..16u64 {
        let store = if writer % 2 == 0 {
            grouped.clone()
        } else {
            plain.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + writer);
            for n in 0..50u64 {
                let s = stream(&format!("o{}", (writer + n) % 4));
                append_surely(
                    &store,
                    &s,
                    ExpectedVersion::Any,
                    vec![event(writer * 1_000 + n)],
                    &mut rng,
                    0,
                )
                .await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let mut total = 0;
    for i in 0..4 {
        let stored = grouped
            .load_all(&stream(&format!("o{i}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for (e, version) in stored.iter().zip(1u64..) {
            assert_eq!(e.version, version);
        }
        total += stored.len();
    }
    assert_eq!(total, 16 * 50);
    println!("{:?}", grouped.group_commit_stats());
}

/// Appends that reuse an event id stored on another stream, made while 8 writers keep groups
/// forming: the unique index refuses the group's statement, its appends are written alone, and
/// each reuse gets the same answer as without group commit while every other append commits.
#[tokio::test]
async fn an_event_id_stored_elsewhere_fails_only_its_own_append() {
    let grouped = fresh_store("gc_reused_id")
        .await
        .with_group_commit(GroupCommit::default());
    let plain =
        PostgresEventStore::new(pool(4).await, grouped.schema()).unwrap_or_else(|e| panic!("{e}"));
    let taken: Vec<EventData> = (0..20).map(event).collect();
    grouped
        .append(&stream("taken"), ExpectedVersion::NoStream, taken.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // What a store without group commit answers for such an append.
    let alone = plain
        .append(
            &stream("thief-alone"),
            ExpectedVersion::NoStream,
            vec![taken[0].clone()],
        )
        .await
        .map(|done| done.version);
    let Err(alone) = alone else {
        panic!("an event id stored on another stream was appended again: {alone:?}")
    };
    let mut writers = Vec::new();
    for writer in 0..8u64 {
        let store = grouped.clone();
        writers.push(tokio::spawn(async move {
            let s = stream(&format!("w{writer}"));
            for n in 0..100u64 {
                let expected = if n == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(n)
                };
                store
                    .append(&s, expected, vec![event(writer * 1_000 + n)])
                    .await
                    .unwrap_or_else(|e| panic!("{s} at {n}: {e}"));
            }
        }));
    }
    let mut answers = Vec::new();
    for (i, reused) in taken.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let thief = stream(&format!("thief{i}"));
        answers.push(
            grouped
                .append(&thief, ExpectedVersion::NoStream, vec![reused.clone()])
                .await
                .map(|done| done.version),
        );
    }
    for writer in writers {
        writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    for (i, answer) in answers.into_iter().enumerate() {
        let Err(error) = answer else {
            panic!("thief{i}: an event id stored on another stream was appended again")
        };
        assert_eq!(
            std::mem::discriminant(&error),
            std::mem::discriminant(&alone),
            "thief{i}: {error}, where a store without group commit answers {alone}"
        );
        let stolen = grouped
            .load_all(&stream(&format!("thief{i}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(stolen.is_empty(), "thief{i}: {stolen:?}");
    }
    for writer in 0..8u64 {
        let stored = grouped
            .load_all(&stream(&format!("w{writer}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stored.len(), 100, "w{writer}");
    }
    let stats = grouped.group_commit_stats().unwrap_or_default();
    println!("{stats:?}; without group commit: {alone}");
    assert!(stats.groups > 0, "no group formed: {stats:?}");
    assert!(
        stats.split > 0,
        "no group held a reused id, the test proved less than it says: {stats:?}"
    );
}
