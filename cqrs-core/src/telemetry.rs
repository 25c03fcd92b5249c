//! Metrics through the [`metrics`] facade, with stable names: install any recorder (Prometheus,
//! OpenTelemetry, StatsD, ...) before starting the gateway and the workers, and every part of the
//! framework reports into it. Gateways and stores register their handles once per label set
//! and keep them, so install the recorder before creating them.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `cqrs_commands_total` | counter | `aggregate`, `command`, `outcome` | commands executed; `outcome` is `ok`, `rejected`, `not_found`, `already_exists`, `conflict` (retries ran out) or `error` |
//! | `cqrs_command_duration_seconds` | histogram | `aggregate`, `command` | from the call to the outcome |
//! | `cqrs_command_conflicts_total` | counter | `aggregate` | version conflicts the gateway retried |
//! | `cqrs_events_appended_total` | counter | `store`, `aggregate` | events appended |
//! | `cqrs_append_duration_seconds` | histogram | `store` | one append, to its commit |
//! | `cqrs_projection_events_total` | counter | `projection` | events a projection applied |
//! | `cqrs_dead_letters_total` | counter | `source`, `name` | events parked (`source` = `projection`) or messages dead-lettered (`source` = `consumer`) |
//! | `cqrs_projection_failed_batches_total` | counter | `projection` | batches rolled back |
//! | `cqrs_projection_lag_events` | gauge | `projection` | committed events after its checkpoint (sampled at most once a second) |
//! | `cqrs_projection_lag_seconds` | gauge | `projection` | age of the oldest of them |
//! | `cqrs_saga_steps_total` | counter | `saga`, `step`, `outcome` | step tries' outcomes: `ok`, `failed`, `compensated`, `compensation_failed` |
//! | `cqrs_sagas_total` | counter | `saga`, `status` | instances reaching a status (`completed`, `compensated`, `failed`, ...) |
//! | `cqrs_relay_events_total` | counter | `relay`, `broker` | events the broker confirmed |
//! | `cqrs_relay_failures_total` | counter | `relay`, `broker` | relay steps that failed and restarted |
//! | `cqrs_relay_events_per_second` | gauge | `relay`, `broker` | rate of the last step |
//! | `cqrs_consumer_messages_total` | counter | `consumer`, `outcome` | messages handled: `applied`, `duplicate`, `skipped`, `dead_lettered` |
//! | `cqrs_consumer_retries_total` | counter | `consumer` | handler tries that failed and ran again |
//!
//! The spans, at `info` for what an operator follows and `debug` for the store's calls:
//! `cqrs.execute` (`aggregate`, `id`, `command`, `command_id`, `correlation_id`, `causation_id`,
//! `trace_id`), `cqrs.append` (`stream`, `events`), `cqrs.load` (`stream`), `cqrs.read` (`after`,
//! `limit`), `cqrs.projection.batch` (`projection`, `events`), `cqrs.saga.step` (`saga`, `id`,
//! `step`, `compensate`, `trace_id`), `cqrs.relay.batch` (`broker`, `relay`, `read`, `delivered`),
//! `cqrs.consume` (`consumer`, `event_type`, `stream`, `version`, `trace_id`). See [`crate::trace`]
//! for how one trace follows a command to its consumers.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The metric names, for dashboards and tests.
pub mod names {
    /// Commands executed.
    pub const COMMANDS: &str = "cqrs_commands_total";
    /// Command duration.
    pub const COMMAND_DURATION: &str = "cqrs_command_duration_seconds";
    /// Version conflicts retried.
    pub const COMMAND_CONFLICTS: &str = "cqrs_command_conflicts_total";
    /// Events appended.
    pub const EVENTS_APPENDED: &str = "cqrs_events_appended_total";
    /// Append duration.
    pub const APPEND_DURATION: &str = "cqrs_append_duration_seconds";
    /// Events projections applied.
    pub const PROJECTION_EVENTS: &str = "cqrs_projection_events_total";
    /// Events parked or messages dead-lettered.
    pub const DEAD_LETTERS: &str = "cqrs_dead_letters_total";
    /// Projection batches rolled back.
    pub const PROJECTION_FAILED_BATCHES: &str = "cqrs_projection_failed_batches_total";
    /// Events a projection has still to read.
    pub const PROJECTION_LAG_EVENTS: &str = "cqrs_projection_lag_events";
    /// Age of the oldest event a projection has still to read.
    pub const PROJECTION_LAG_SECONDS: &str = "cqrs_projection_lag_seconds";
    /// Saga step outcomes.
    pub const SAGA_STEPS: &str = "cqrs_saga_steps_total";
    /// Saga instances reaching a status.
    pub const SAGAS: &str = "cqrs_sagas_total";
    /// Events relays delivered.
    pub const RELAY_EVENTS: &str = "cqrs_relay_events_total";
    /// Relay steps that failed.
    pub const RELAY_FAILURES: &str = "cqrs_relay_failures_total";
    /// A relay's last rate.
    pub const RELAY_RATE: &str = "cqrs_relay_events_per_second";
    /// Messages consumers handled.
    pub const CONSUMER_MESSAGES: &str = "cqrs_consumer_messages_total";
    /// Consumer handler retries.
    pub const CONSUMER_RETRIES: &str = "cqrs_consumer_retries_total";
}

use names::*;

/// Registers the descriptions and units of every metric above with the installed recorder (call
/// once, after installing it; exporters show them as `# HELP` lines).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(COMMANDS, "Commands executed, by outcome");
    describe_histogram!(COMMAND_DURATION, Unit::Seconds, "Command duration");
    describe_counter!(COMMAND_CONFLICTS, "Version conflicts the gateway retried");
    describe_counter!(EVENTS_APPENDED, "Events appended");
    describe_histogram!(APPEND_DURATION, Unit::Seconds, "Append duration");
    describe_counter!(PROJECTION_EVENTS, "Events projections applied");
    describe_counter!(DEAD_LETTERS, "Events parked or messages dead-lettered");
    describe_counter!(PROJECTION_FAILED_BATCHES, "Projection batches rolled back");
    describe_gauge!(
        PROJECTION_LAG_EVENTS,
        "Events a projection has still to read"
    );
    describe_gauge!(
        PROJECTION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest event a projection has still to read"
    );
    describe_counter!(SAGA_STEPS, "Saga step tries, by outcome");
    describe_counter!(SAGAS, "Saga instances reaching a status");
    describe_counter!(RELAY_EVENTS, "Events the broker confirmed to a relay");
    describe_counter!(RELAY_FAILURES, "Relay steps that failed");
    describe_gauge!(RELAY_RATE, "Events per second of a relay's last step");
    describe_counter!(CONSUMER_MESSAGES, "Messages consumers handled, by outcome");
    describe_counter!(CONSUMER_RETRIES, "Consumer handler tries that failed");
}

/// The command metrics of one gateway: handles registered on first use per command and outcome,
/// then kept (registering builds and hashes the labels; a kept handle is an atomic add). Install
/// the recorder before creating the gateway.
#[derive(Debug, Default)]
pub(crate) struct CommandMetrics(Mutex<HashMap<(&'static str, &'static str), Timed>>);

/// A counter and a histogram.
type Timed = (metrics::Counter, metrics::Histogram);

impl CommandMetrics {
    /// Records a command's outcome and duration.
    pub(crate) fn record(
        &self,
        aggregate: &'static str,
        command: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        let mut handles = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, duration) = handles.entry((command, outcome)).or_insert_with(|| {
            (
                metrics::counter!(COMMANDS, "aggregate" => aggregate, "command" => command, "outcome" => outcome),
                metrics::histogram!(COMMAND_DURATION, "aggregate" => aggregate, "command" => command),
            )
        });
        count.increment(1);
        duration.record(took.as_secs_f64());
    }
}

/// The append metrics of one store: handles registered on first use per aggregate type, then
/// kept. Install the recorder before creating the store.
#[derive(Debug, Default)]
pub struct AppendMetrics(Mutex<HashMap<String, Timed>>);

impl AppendMetrics {
    /// Records an append of `events` events to a stream of `aggregate` by `store`.
    pub fn record(&self, store: &'static str, aggregate: &str, events: usize, took: Duration) {
        let mut handles = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !handles.contains_key(aggregate) {
            let registered = (
                metrics::counter!(EVENTS_APPENDED, "store" => store, "aggregate" => aggregate.to_owned()),
                metrics::histogram!(APPEND_DURATION, "store" => store),
            );
            handles.insert(aggregate.to_owned(), registered);
        }
        if let Some((count, duration)) = handles.get(aggregate) {
            count.increment(events as u64);
            duration.record(took.as_secs_f64());
        }
    }
}

/// Records a version conflict the gateway retries.
pub fn conflict(aggregate: &'static str) {
    metrics::counter!(COMMAND_CONFLICTS, "aggregate" => aggregate).increment(1);
}

/// Records a projection step that applied `applied` events and parked `parked`.
pub fn projection_step(projection: &'static str, applied: usize, parked: usize) {
    if applied > 0 {
        metrics::counter!(PROJECTION_EVENTS, "projection" => projection).increment(applied as u64);
    }
    if parked > 0 {
        metrics::counter!(DEAD_LETTERS, "source" => "projection", "name" => projection)
            .increment(parked as u64);
    }
}

/// Records a projection batch that rolled back.
pub fn projection_failed_batch(projection: &'static str) {
    metrics::counter!(PROJECTION_FAILED_BATCHES, "projection" => projection).increment(1);
}

/// Records how far a projection is behind.
pub fn projection_lag(projection: &'static str, events: u64, seconds: f64) {
    #[allow(clippy::cast_precision_loss)] // a gauge: f64 is its type
    metrics::gauge!(PROJECTION_LAG_EVENTS, "projection" => projection).set(events as f64);
    metrics::gauge!(PROJECTION_LAG_SECONDS, "projection" => projection).set(seconds);
}

/// Records a saga step try's outcome.
pub fn saga_step(saga: &'static str, step: &'static str, outcome: &'static str) {
    metrics::counter!(SAGA_STEPS, "saga" => saga, "step" => step, "outcome" => outcome)
        .increment(1);
}

/// Records a saga instance reaching `status` (its name: `completed`, `compensated`, ...).
pub fn saga_status(saga: &'static str, status: &'static str) {
    metrics::counter!(SAGAS, "saga" => saga, "status" => status).increment(1);
}

/// Records a relay step that delivered `events` at `rate` events per second.
pub fn relay_delivered(relay: &str, broker: &'static str, events: usize, rate: Option<f64>) {
    if events > 0 {
        metrics::counter!(RELAY_EVENTS, "relay" => relay.to_owned(), "broker" => broker)
            .increment(events as u64);
    }
    if let Some(rate) = rate {
        metrics::gauge!(RELAY_RATE, "relay" => relay.to_owned(), "broker" => broker).set(rate);
    }
}

/// Records a relay step that failed.
pub fn relay_failure(relay: &str, broker: &'static str) {
    metrics::counter!(RELAY_FAILURES, "relay" => relay.to_owned(), "broker" => broker).increment(1);
}

/// Records a message a consumer handled, by outcome.
pub fn consumed(consumer: &str, outcome: &'static str) {
    metrics::counter!(CONSUMER_MESSAGES, "consumer" => consumer.to_owned(), "outcome" => outcome)
        .increment(1);
    if outcome == "dead_lettered" {
        metrics::counter!(DEAD_LETTERS, "source" => "consumer", "name" => consumer.to_owned())
            .increment(1);
    }
}

/// Records a consumer's handler try that failed and runs again.
pub fn consumer_retry(consumer: &str) {
    metrics::counter!(CONSUMER_RETRIES, "consumer" => consumer.to_owned()).increment(1);
}

/// Runs an append of `events` events to `stream` by `store` in a `cqrs.append` span, and
/// records it in `metrics` when it commits. Stores call it around their appends.
pub async fn observe_append<F, T, E>(
    store: &'static str,
    metrics: &AppendMetrics,
    stream: &crate::StreamId,
    events: usize,
    append: F,
) -> F::Output
where
    F: Future<Output = Result<T, E>>,
{
    use tracing::Instrument;
    let span = tracing::debug_span!("cqrs.append", store, stream = %stream, events);
    let started = std::time::Instant::now();
    let result = append.instrument(span).await;
    if result.is_ok() {
        metrics.record(store, &stream.aggregate_type, events, started.elapsed());
    }
    result
}

pin_project_lite::pin_project! {
    /// A stream whose every poll runs in a span (as `Instrument` does for a future).
    #[derive(Debug)]
    pub struct InSpan<S> {
        #[pin]
        stream: S,
        span: tracing::Span,
    }
}

impl<S> InSpan<S> {
    /// `stream`, polled inside `span`.
    pub fn new(stream: S, span: tracing::Span) -> Self {
        Self { stream, span }
    }
}

impl<S: futures::Stream> futures::Stream for InSpan<S> {
    type Item = S::Item;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let this = self.project();
        let _entered = this.span.enter();
        this.stream.poll_next(cx)
    }
}

/// A running worker's counters, readable from elsewhere while `run(self)` owns the worker: take
/// it (`metrics_handle()`) before starting the worker; [`get`](Self::get) copies the counters.
#[derive(Debug, Default)]
pub struct MetricsHandle<M>(std::sync::Arc<Mutex<M>>);

impl<M> Clone for MetricsHandle<M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<M: Copy> MetricsHandle<M> {
    /// A handle on `counters`.
    pub fn new(counters: M) -> Self {
        Self(std::sync::Arc::new(Mutex::new(counters)))
    }

    /// The counters now.
    #[must_use]
    pub fn get(&self) -> M {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the counters.
    pub fn update<R>(&self, change: impl FnOnce(&mut M) -> R) -> R {
        change(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
