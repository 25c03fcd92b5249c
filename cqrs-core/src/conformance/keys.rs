//! Idempotency keys of commands: recorded once, one winner among racing callers; and snapshots.

use serde_json::json;

use crate::envelope::EventId;
use crate::store::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, StoreError};

use super::*;

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
