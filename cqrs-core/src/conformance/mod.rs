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

mod append;
mod keys;
mod read;
mod tenants;

pub use append::*;
pub use keys::*;
pub use read::*;
pub use tenants::*;

use futures::TryStreamExt;
use serde_json::json;

use crate::envelope::{
    AggregateId, Checkpoint, EventData, EventId, Metadata, StoredEvent, StreamId,
};
use crate::store::{EventStore, ExpectedVersion};

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
