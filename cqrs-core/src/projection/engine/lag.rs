//! The engine's lag: the age of the last event applied after every batch, and how many events
//! are behind, counted by the store beside the batches.

use std::time::Duration;

use chrono::Utc;
use futures::FutureExt as _;
use tokio::time::Instant;

use super::{DeliveryBackend, Engine};
use crate::envelope::Checkpoint;
use crate::projection::{Lag, Projection};
use crate::store::{EventStore, StoreError};

/// How often a running engine counts its lag with the store, at most.
pub(super) const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The least time between the starts of two counts after one that took `took`: ten seconds, or
/// ten times as long as the last count took. A count scans every event behind, so far behind (a
/// catch-up over a hundred million events) one count takes tens of seconds: counting every ten
/// seconds would keep a server core scanning for as long as the catch-up lasts; this keeps the
/// counting to a tenth of the time at most, and the figure exact (only older).
pub(super) fn count_spacing(took: Duration) -> Duration {
    LAG_SAMPLE_EVERY.max(took.saturating_mul(10))
}

/// A count of the events behind a checkpoint, running on its own task, with how long it took.
pub(super) type Count = tokio::task::JoinHandle<(Result<Option<Lag>, StoreError>, Duration)>;

impl<P, B> Engine<P, B>
where
    P: Projection,
    B: DeliveryBackend<P>,
{
    /// After a step that read something: how far behind in time is the age of the last event it
    /// applied (every step); how many events are behind is counted by the store at most every
    /// ten seconds, and kept in between.
    ///
    /// The count (a scan of every event behind: 10 ms and more for 100,000 of them) runs on a
    /// task of its own beside the next batches, and is taken by the first step after it is
    /// done: a catch-up does not wait for it, and the figure it gives is at most a batch older
    /// than the step that reports it (as between counts, when it is as old as their spacing).
    pub(super) fn sample_lag(&mut self, at: Checkpoint, newest: Option<chrono::DateTime<Utc>>) {
        let before = self.metrics.get().lag;
        let mut events = before.map(|lag| lag.events);
        if let Some(count) = self.lag_count.take_if(|count| count.is_finished()) {
            match count.now_or_never() {
                Some(Ok((counted, took))) => {
                    self.lag_every = count_spacing(took);
                    match counted {
                        Ok(Some(lag)) => events = Some(lag.events),
                        Ok(None) => {}
                        Err(error) => {
                            tracing::debug!(projection = P::NAME, %error, "could not count the lag");
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(projection = P::NAME, %error, "the lag count's task failed");
                }
                None => {}
            }
        }
        // Outside a tokio runtime (a step driven by another executor) nothing is counted: the
        // lag is known again once caught up.
        if self.lag_count.is_none()
            && self
                .lag_counted
                .is_none_or(|counted| counted.elapsed() >= self.lag_every)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.lag_counted = Some(Instant::now());
            let store = self.backend.event_store().clone();
            self.lag_count = Some(runtime.spawn(async move {
                let started = Instant::now();
                (store.lag(at).await, started.elapsed())
            }));
        }
        let Some(events) = events else { return };
        let seconds = newest.map_or_else(
            || before.map_or(0.0, |lag| lag.seconds),
            |at| {
                (Utc::now() - at)
                    .to_std()
                    .map_or(0.0, |age| age.as_secs_f64())
            },
        );
        self.set_lag(Lag { events, seconds });
    }

    /// Caught up exactly: the lag is zero, and a count still running is of the past.
    pub(super) fn caught_up(&mut self) {
        if let Some(count) = self.lag_count.take() {
            count.abort();
        }
        self.set_lag(Lag::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_spaced_ten_seconds_or_ten_times_the_last_count() {
        assert_eq!(count_spacing(Duration::ZERO), LAG_SAMPLE_EVERY);
        assert_eq!(count_spacing(Duration::from_millis(20)), LAG_SAMPLE_EVERY);
        assert_eq!(count_spacing(Duration::from_secs(1)), LAG_SAMPLE_EVERY);
        assert_eq!(
            count_spacing(Duration::from_secs(25)),
            Duration::from_secs(250)
        );
        assert_eq!(count_spacing(Duration::MAX), Duration::MAX);
    }
}
