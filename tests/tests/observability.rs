//! Metrics and spans on the in-memory store: what the gateway, the stores and a projection
//! runner report to the `metrics` recorder (by their documented names and labels), the fields of
//! the `cqrs.execute` span, and the trace context a command's events carry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_examples::bank::{AccountEvent, Deposit};
use cqrs_examples::order::{Order, OrderCommand, OrderItem};
use evently_core::prelude::*;
use evently_core::projection::{FailureMode, FailurePolicy, HandlerError, ProjectionRunner};
use evently_core::telemetry::names;
use evently_core::trace::{TRACEPARENT, TraceContext};
use evently_core::{EventData, EventStoreExt};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing_subscriber::layer::SubscriberExt as _;

/// Runs `work` on a runtime of this thread with a recorder and a span collector of its own;
/// returns its output, the metrics (name and sorted labels -> value) and the spans.
fn observed<F: Future>(work: F) -> (F::Output, Metrics, Vec<Span>) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let output = tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&recorder, || runtime.block_on(work))
    });
    let metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels.join(",")), value)
        })
        .collect();
    let spans = spans.0.lock().unwrap().clone();
    (output, Metrics(metrics), spans)
}

struct Metrics(HashMap<(String, String), DebugValue>);

impl Metrics {
    fn counter(&self, name: &str, labels: &str) -> u64 {
        match self.0.get(&(name.to_owned(), labels.to_owned())) {
            Some(DebugValue::Counter(n)) => *n,
            Some(other) => panic!("{name}{{{labels}}} is not a counter: {other:?}"),
            None => 0,
        }
    }

    fn gauge(&self, name: &str, labels: &str) -> Option<f64> {
        match self.0.get(&(name.to_owned(), labels.to_owned())) {
            Some(DebugValue::Gauge(n)) => Some(n.into_inner()),
            _ => None,
        }
    }

    fn histogram_count(&self, name: &str, labels: &str) -> usize {
        match self.0.get(&(name.to_owned(), labels.to_owned())) {
            Some(DebugValue::Histogram(values)) => values.len(),
            _ => 0,
        }
    }
}

/// A span: its name and its fields as text.
#[derive(Debug, Clone)]
struct Span {
    name: &'static str,
    fields: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Span>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<HashMap<String, String>>()
        {
            values.record(&mut Fields(fields));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<HashMap<String, String>>()
                .cloned()
                .unwrap_or_default();
            self.0.lock().unwrap().push(Span {
                name: span.name(),
                fields,
            });
        }
    }
}

fn create() -> OrderCommand {
    OrderCommand::CreateOrder {
        customer_id: "c-1".into(),
        items: vec![OrderItem {
            sku: "sku-1".into(),
            quantity: 3,
            unit_price_cents: 500,
        }],
    }
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn the_gateway_and_the_store_report_commands_conflicts_and_appends() {
    let ((), metrics, spans) = observed(async {
        let store = InMemoryEventStore::new();
        let gateway = CommandGateway::<Order, _>::new(store.clone());
        gateway
            .execute("o-1", create(), CommandMetadata::new())
            .await
            .unwrap();
        // A second create: already exists. A confirmation of an order that does not exist.
        gateway
            .execute("o-1", create(), CommandMetadata::new())
            .await
            .unwrap_err();
        gateway
            .execute("o-2", OrderCommand::ConfirmOrder, CommandMetadata::new())
            .await
            .unwrap_err();
        // Another gateway moves o-1 on: this one's cached state is stale, one conflict, retried.
        let other = CommandGateway::<Order, _>::new(store.clone());
        other
            .execute("o-1", OrderCommand::ConfirmOrder, CommandMetadata::new())
            .await
            .unwrap();
        gateway
            .execute(
                "o-1",
                OrderCommand::CancelOrder { reason: "r".into() },
                CommandMetadata::new(),
            )
            .await
            .unwrap();
    });
    let outcome = |command: &str, outcome: &str| {
        metrics.counter(
            names::COMMANDS,
            &format!("aggregate=order,command={command},outcome={outcome}"),
        )
    };
    assert_eq!(outcome("CreateOrder", "ok"), 1);
    assert_eq!(outcome("CreateOrder", "already_exists"), 1);
    assert_eq!(outcome("ConfirmOrder", "not_found"), 1);
    assert_eq!(outcome("ConfirmOrder", "ok"), 1);
    assert_eq!(outcome("CancelOrder", "ok"), 1);
    assert_eq!(
        metrics.counter(names::COMMAND_CONFLICTS, "aggregate=order"),
        1
    );
    assert_eq!(
        metrics.counter(names::EVENTS_APPENDED, "aggregate=order,store=memory"),
        3
    );
    assert_eq!(
        metrics.histogram_count(names::APPEND_DURATION, "store=memory"),
        3
    );
    assert_eq!(
        metrics.histogram_count(
            names::COMMAND_DURATION,
            "aggregate=order,command=CreateOrder"
        ),
        2
    );
    let executes: Vec<_> = spans.iter().filter(|s| s.name == "cqrs.execute").collect();
    assert_eq!(executes.len(), 5);
    for span in &executes {
        for field in [
            "aggregate",
            "id",
            "command",
            "command_id",
            "correlation_id",
            "outcome",
        ] {
            assert!(span.fields.contains_key(field), "{field} missing: {span:?}");
        }
        // No trace anywhere: no trace id.
        assert!(!span.fields.contains_key("trace_id"), "{span:?}");
    }
    // Four tries to append (the conflicting one too), three appended.
    assert_eq!(spans.iter().filter(|s| s.name == "cqrs.append").count(), 4);
}

#[test]
fn a_commands_trace_goes_into_its_events_and_its_span() {
    let (events, _, spans) = observed(async {
        let store = InMemoryEventStore::new();
        let gateway = CommandGateway::<Order, _>::new(store.clone());
        let trace = TraceContext::parse(TRACE).unwrap();
        gateway
            .execute("o-1", create(), CommandMetadata::new().with_trace(trace))
            .await
            .unwrap();
        // A command sent while handling something in that trace continues it.
        evently_core::trace::scope(Some(trace), async {
            gateway
                .execute("o-1", OrderCommand::ConfirmOrder, CommandMetadata::new())
                .await
                .unwrap();
        })
        .await;
        // And one outside any trace carries none.
        gateway
            .execute(
                "o-1",
                OrderCommand::ShipOrder {
                    tracking: "t-1".into(),
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap();
        store
            .load_all(&StreamId::new("order", "o-1"))
            .await
            .unwrap()
    });
    let traces: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.metadata.headers.get(TRACEPARENT).map(String::as_str))
        .collect();
    assert_eq!(traces, [Some(TRACE), Some(TRACE), None]);
    let trace_ids: Vec<Option<&str>> = spans
        .iter()
        .filter(|s| s.name == "cqrs.execute")
        .map(|s| s.fields.get("trace_id").map(String::as_str))
        .collect();
    assert_eq!(
        trace_ids,
        [
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            None
        ]
    );
}

/// Sums deposits; panics on multiples of 13 (a bug in a handler: the event is parked like any
/// failure, the runner goes on).
#[derive(Clone, Default, Projection)]
#[projection(name = "observed_totals", events(AccountEvent))]
struct Totals {
    total: Arc<Mutex<u64>>,
}

#[async_trait::async_trait]
impl Handles<AccountEvent> for Totals {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        if let AccountEvent::Deposited(deposit) = &event.event {
            assert!(
                deposit.amount_cents % 13 != 0,
                "poison deposit of {}",
                deposit.amount_cents
            );
            *self.total.lock().unwrap() += deposit.amount_cents;
        }
        Ok(())
    }
}

#[test]
fn a_running_projection_reports_events_dead_letters_and_lag_through_its_handle_and_survives_panics()
{
    let ((during, after), metrics, spans) = observed(async {
        let store = InMemoryEventStore::new();
        for n in 1..=40u64 {
            let event = AccountEvent::Deposited(Deposit {
                amount_cents: n,
                reference: String::new(),
            });
            store
                .append(
                    &StreamId::new("account", format!("a{n}")),
                    ExpectedVersion::NoStream,
                    vec![EventData::from_event(&event, Metadata::default()).unwrap()],
                )
                .await
                .unwrap();
        }
        let runner = ProjectionRunner::new(store.clone(), Totals::default(), ())
            .with_batch(10)
            .with_failure_policy(FailurePolicy {
                attempts: 1,
                backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
                mode: FailureMode::Skip,
            });
        let handle = runner.metrics_handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(runner.run(Duration::from_millis(5), async {
            let _ = stopped.await;
        }));
        // Read while `run` owns the runner.
        let mut during = handle.get();
        for _ in 0..400 {
            during = handle.get();
            if during.lag.is_some_and(|l| l.events == 0) && during.applied + during.parked == 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = stop.send(());
        let runner = running.await.unwrap().unwrap();
        (during, runner.metrics())
    });
    assert_eq!((during.applied, during.parked), (37, 3), "{during:?}");
    assert_eq!(during.lag.map(|l| l.events), Some(0));
    assert_eq!(after.applied, 37);
    let projection = "projection=observed_totals";
    assert_eq!(metrics.counter(names::PROJECTION_EVENTS, projection), 37);
    assert_eq!(
        metrics.counter(
            names::DEAD_LETTERS,
            "name=observed_totals,source=projection"
        ),
        3
    );
    assert_eq!(
        metrics.gauge(names::PROJECTION_LAG_EVENTS, projection),
        Some(0.0)
    );
    assert_eq!(
        metrics.gauge(names::PROJECTION_LAG_SECONDS, projection),
        Some(0.0)
    );
    assert!(spans.iter().any(|s| s.name == "cqrs.projection.batch"
        && s.fields.get("projection").map(String::as_str) == Some("observed_totals")));
}

/// What the steps of [`Traced`] saw: the trace each ran in.
#[derive(Clone, Default)]
struct SeenTraces(Arc<Mutex<Vec<Option<TraceContext>>>>);

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Nothing {}

/// A saga of two steps that record the trace they run in.
#[derive(Debug, Saga)]
#[saga(name = "traced", data = Nothing, context = SeenTraces)]
enum Traced {
    First,
    Second,
}

impl SeenTraces {
    async fn first(
        &self,
        _: &mut Nothing,
        _: &StepKey,
    ) -> Result<(), evently_core::saga::StepError> {
        self.0.lock().unwrap().push(evently_core::trace::current());
        Ok(())
    }

    async fn second(
        &self,
        _: &mut Nothing,
        _: &StepKey,
    ) -> Result<(), evently_core::saga::StepError> {
        self.0.lock().unwrap().push(evently_core::trace::current());
        Ok(())
    }
}

#[test]
fn a_sagas_steps_run_in_the_trace_it_started_in_even_after_a_restart() {
    let ((), metrics, spans) = observed(async {
        let store = evently_core::saga::InMemorySagaStore::new();
        let seen = SeenTraces::default();
        let trace = TraceContext::parse(TRACE).unwrap();
        // Submitted in a trace, run later by another orchestrator outside it.
        let submitted =
            evently_core::saga::Orchestrator::<Traced, _>::new(store.clone(), seen.clone(), "a");
        evently_core::trace::scope(Some(trace), async {
            submitted.submit(Nothing {}).await.unwrap();
        })
        .await;
        let later =
            evently_core::saga::Orchestrator::<Traced, _>::new(store.clone(), seen.clone(), "b");
        let ran = later.run_due(10).await.unwrap();
        assert_eq!(ran.len(), 1);
        assert_eq!(ran[0].status, evently_core::saga::SagaStatus::Completed);
        assert_eq!(*seen.0.lock().unwrap(), [Some(trace), Some(trace)]);
    });
    for step in ["first", "second"] {
        assert_eq!(
            metrics.counter(
                names::SAGA_STEPS,
                &format!("outcome=ok,saga=traced,step={step}")
            ),
            1
        );
    }
    assert_eq!(
        metrics.counter(names::SAGAS, "saga=traced,status=completed"),
        1
    );
    let steps: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "cqrs.saga.step")
        .collect();
    assert_eq!(steps.len(), 2);
    assert!(
        steps
            .iter()
            .all(|s| s.fields.get("trace_id").map(String::as_str)
                == Some("4bf92f3577b34da6a3ce929d0e0e4736"))
    );
}
