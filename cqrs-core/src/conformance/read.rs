//! Reads: the global order and resuming in it, a stream from a version, what append accepts read
//! back by every reader, filtered reads.

use futures::TryStreamExt;
use serde_json::json;

use crate::envelope::{
    AggregateId, Checkpoint, EventData, EventId, Metadata, StoredEvent, StreamId,
};
use crate::store::{EventStore, ExpectedVersion, StoreError};
use crate::{CausationId, CorrelationId};

use super::*;

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
    // A field shaped like a sealed personal field that is not one would read as its placeholder:
    // refused. (A `$personal` key deeper down is only data.)
    let forged = json!({ "note": { "$personal": { "subject": "m-1", "data": "…" } }, "x": [{ "$personal": 1 }] });
    match store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![EventData {
                payload: forged,
                ..event(2)
            }],
        )
        .await
    {
        Err(StoreError::InvalidInput(message)) => {
            assert!(message.contains("`$personal`"), "{message}");
        }
        other => panic!("a payload with a `$personal` key: expected InvalidInput, got {other:?}"),
    }
    assert_eq!(
        load(&store, &s).await.len(),
        1,
        "the refused appends wrote nothing"
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
