//! One OpenTelemetry trace from a command to the handler of its event on the other side of a real
//! Kafka-protocol broker (`KAFKA_BROKERS`) and the real PostgreSQL: the spans the framework opens,
//! exported by the OpenTelemetry SDK through `tracing-opentelemetry`, are asserted by their names,
//! trace ids and parents.

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

#[path = "support/mod.rs"]
mod support;

mod common;
use common::*;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs_examples::bank::{Account, AccountCommand, Deposit};
use evently_core::prelude::*;
use evently_core::trace::{TRACEPARENT, TraceContext};
use evently_kafka::envelope::header;
use evently_kafka::{
    HandleError, Handled, KafkaConfig, KafkaSink, KafkaSubscriber, MessageHandler, OutboxRelay,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use support::{brokers, unique};
use tracing::Instrument as _;
use tracing::instrument::WithSubscriber as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Keeps every span the SDK exports.
#[derive(Debug, Clone, Default)]
struct Exported(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Exported {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(batch);
        Ok(())
    }
}

impl Exported {
    fn named(&self, name: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

/// The version of each event handled, and the trace it was handled in.
type Seen = Vec<(u64, Option<TraceContext>)>;

/// Remembers the trace each event was handled in, and opens a span of its own there.
#[derive(Debug, Clone, Default)]
struct Handler(Arc<Mutex<Seen>>);

#[async_trait::async_trait]
impl MessageHandler for Handler {
    fn name(&self) -> &str {
        "trace-handler"
    }

    async fn handle(&mut self, event: &evently_core::StoredEvent) -> Result<Handled, HandleError> {
        let _span = tracing::info_span!("test.handler", version = event.version).entered();
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((event.version, evently_core::trace::current()));
        Ok(Handled::Applied)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_follows_a_command_through_the_event_the_relay_kafka_and_the_consumer() {
    let exported = Exported::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("cqrs-test"))),
    );

    let store = pg::fresh_store("k_trace").await;
    let gateway = CommandGateway::<Account, _>::new(store.clone());
    // A request's root span; the commands run inside it.
    let request = async {
        let id = AggregateId::new("traced");
        gateway
            .execute(
                id.clone(),
                AccountCommand::Open {
                    owner: "ada".into(),
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        gateway
            .execute(
                id,
                AccountCommand::Deposit(Deposit {
                    amount_cents: 500,
                    reference: "r1".into(),
                }),
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let root = tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("test.request"));
    request
        .instrument(root)
        .with_subscriber(dispatch.clone())
        .await;

    // The relay publishes; the events' traceparent is in the message headers too.
    let (map, topic) = account_topics("trace", 1);
    let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "trace-relay"))
        .unwrap_or_else(|e| panic!("{e}"));
    relay
        .sink_mut()
        .create_topics(&["account"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drain(&mut relay, &store)
        .with_subscriber(dispatch.clone())
        .await;
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| r.len() >= 2).await;
    assert_eq!(read.len(), 2);
    for message in &read {
        let stored = message.event.metadata.headers.get(TRACEPARENT);
        assert!(stored.is_some(), "event without a traceparent: {message:?}");
        assert_eq!(message.headers.get(header::TRACEPARENT), stored);
    }

    // The consumer handles both events in the request's trace.
    let handled = Handler::default();
    let subscriber = KafkaSubscriber::new(
        &KafkaConfig::new(brokers()),
        unique("trace"),
        &[topic.as_str()],
        handled.clone(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(
        subscriber
            .run(async {
                let _ = stopped.await;
            })
            .with_subscriber(dispatch),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled.0.lock().map(|h| h.len()).unwrap_or(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "the consumer did not handle both"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let _ = consumer.await;
    let _ = provider.force_flush();

    let [request] = exported
        .named("test.request")
        .try_into()
        .unwrap_or_else(|s: Vec<_>| panic!("one request span expected, got {}", s.len()));
    let trace = request.span_context.trace_id();
    let executes = exported.named("cqrs.execute");
    assert_eq!(executes.len(), 2);
    for execute in &executes {
        assert_eq!(execute.span_context.trace_id(), trace);
        assert_eq!(execute.parent_span_id, request.span_context.span_id());
        let attribute = |key: &str| {
            execute
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attribute("aggregate").as_deref(), Some("account"));
        assert!(attribute("correlation_id").is_some());
        assert_eq!(attribute("outcome").as_deref(), Some("ok"));
        assert_eq!(attribute("trace_id"), Some(trace.to_string()));
    }
    // The appends are the commands' children.
    let appends = exported.named("cqrs.append");
    assert!(
        appends.len() >= 2
            && appends.iter().all(|a| a.span_context.trace_id() == trace
                && executes
                    .iter()
                    .any(|e| e.span_context.span_id() == a.parent_span_id)),
        "appends outside their commands' spans"
    );
    // Each consume span continues the span of the command that recorded the event, across the
    // broker; the handler's own span is its child, and `trace::current` there is the trace.
    let consumes = exported.named("cqrs.consume");
    assert_eq!(consumes.len(), 2, "{consumes:?}");
    for consume in &consumes {
        assert_eq!(consume.span_context.trace_id(), trace);
        assert!(consume.parent_span_is_remote);
        assert!(
            executes
                .iter()
                .any(|e| e.span_context.span_id() == consume.parent_span_id),
            "a consume span's parent is not a command's span"
        );
    }
    let handlers = exported.named("test.handler");
    assert_eq!(handlers.len(), 2);
    assert!(handlers.iter().all(|h| {
        h.span_context.trace_id() == trace
            && consumes
                .iter()
                .any(|c| c.span_context.span_id() == h.parent_span_id)
    }));
    let seen = handled.0.lock().map(|h| h.clone()).unwrap_or_default();
    assert!(
        seen.iter()
            .all(|(_, context)| context.is_some_and(|c| c.trace_id == trace.to_bytes())),
        "{seen:?}"
    );
}
