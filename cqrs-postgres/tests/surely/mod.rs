//! Appends retried until they are known to be stored once, for the tests that cut them (kept
//! apart from `common`, which the tests of other crates include without `rand`).

use evently_core::EventStore as _;
use evently_postgres::PostgresEventStore;
use rand::Rng as _;

/// Appends `events` with `expected` until it is known to be stored once: cut at a random point
/// (`cut_within`, zero for never) and retried at once with the same ids; a retry of what went in
/// is answered `AlreadyAppended`; outages are retried too.
pub async fn append_surely(
    store: &PostgresEventStore,
    s: &evently_core::StreamId,
    expected: evently_core::ExpectedVersion,
    events: Vec<evently_core::EventData>,
    rng: &mut rand::rngs::StdRng,
    cut_within: u64,
) -> (u64, u64) {
    let mut cuts = 0;
    loop {
        let append = store.append(s, expected, events.clone());
        let outcome = if cut_within > 0 && rng.random_bool(0.3) {
            let cut = std::time::Duration::from_micros(rng.random_range(0..cut_within));
            match tokio::time::timeout(cut, append).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    cuts += 1;
                    continue;
                }
            }
        } else {
            append.await
        };
        match outcome {
            Ok(done) => return (done.version, cuts),
            Err(evently_core::StoreError::AlreadyAppended(original)) => {
                return (original.version, cuts);
            }
            Err(error) if evently_postgres::is_outage(&error) => {}
            Err(other) => panic!("{s}: {other}"),
        }
    }
}
