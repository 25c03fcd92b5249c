#![doc = include_str!("../README.md")]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cqrs_examples::fulfillment::{DECLINE_HEADER, FulfillmentSaga, Services};
use cqrs_examples::order::{Order, OrderCommand, OrderError, OrderEvent, OrderItem};
use cqrs_examples::order_summary::{self, OrderSummary};
use evently::RecordedEvent;
#[cfg(feature = "kafka")]
use evently::kafka::{InProcess, KafkaConfig, KafkaSink, KafkaSubscriber, OutboxRelay, TopicMap};
use evently::postgres::PostgresEventStore;
use evently::postgres::saga::PostgresSagaStore;
use evently::prelude::*;
use evently::projection::{
    HandlerError, InMemoryCheckpoints, NotCaughtUp, ProjectionRunner, wait_until_caught_up,
};
use evently::saga::{InMemorySagaStore, Orchestrator, SagaStarter, SagaStore};
use evently::{Checkpoint, CorrelationId, EventStore};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the service keeps its events and how they travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The in-memory store, sagas started in process: nothing to install, nothing survives a
    /// restart.
    Embedded,
    /// PostgreSQL (events, sagas), sagas started in process from the store's global order.
    Postgres {
        /// The database (its password is never printed).
        database_url: String,
        /// The schema holding the tables.
        schema: String,
    },
    /// PostgreSQL, every event published to Kafka by the outbox relay, sagas started by a Kafka
    /// consumer group.
    PostgresKafka {
        /// The database.
        database_url: String,
        /// The schema holding the tables.
        schema: String,
        /// The brokers, `host:port[,host:port...]`.
        brokers: String,
        /// Prefixes the topics and the consumer group (one service's topics apart from
        /// another's on a shared broker).
        topic_prefix: String,
    },
    /// PostgreSQL, every event published to RabbitMQ by the outbox relay (a topic exchange),
    /// sagas started by a consumer of a quorum queue bound to the order events.
    PostgresRabbitMq {
        /// The database.
        database_url: String,
        /// The schema holding the tables.
        schema: String,
        /// The broker, `amqp://user:password@host:5672/%2f`.
        url: String,
        /// Prefixes the exchange and the queue.
        prefix: String,
    },
    /// PostgreSQL, every event published to a NATS JetStream stream by the outbox relay, sagas
    /// started by a durable consumer filtered to the order events.
    PostgresNats {
        /// The database.
        database_url: String,
        /// The schema holding the tables.
        schema: String,
        /// The server, `nats://host:4222`.
        url: String,
        /// Prefixes the stream, its subjects and the consumer (letters, digits, `_`).
        prefix: String,
    },
    /// PostgreSQL, every event sent to an SQS FIFO queue by the outbox relay, sagas started by a
    /// consumer of that queue.
    PostgresSqs {
        /// The database.
        database_url: String,
        /// The schema holding the tables.
        schema: String,
        /// A local server's endpoint (`http://127.0.0.1:4566`), or `None` for AWS (`AWS_REGION`
        /// and the normal credentials).
        endpoint: Option<String>,
        /// The FIFO queue (`<name>.fifo`).
        queue: String,
    },
}

impl Backend {
    /// What [`Backend::Embedded`] or the others are called in logs and answers.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Embedded => "embedded (in-memory store, in-process delivery)",
            Self::Postgres { .. } => "PostgreSQL (in-process delivery)",
            Self::PostgresKafka { .. } => "PostgreSQL + Kafka",
            Self::PostgresRabbitMq { .. } => "PostgreSQL + RabbitMQ",
            Self::PostgresNats { .. } => "PostgreSQL + NATS JetStream",
            Self::PostgresSqs { .. } => "PostgreSQL + SQS",
        }
    }

    /// The cargo feature this backend needs, if any.
    fn feature(&self) -> Option<(&'static str, bool)> {
        match self {
            Self::Embedded | Self::Postgres { .. } => None,
            Self::PostgresKafka { .. } => Some(("kafka", cfg!(feature = "kafka"))),
            Self::PostgresRabbitMq { .. } => Some(("rabbitmq", cfg!(feature = "rabbitmq"))),
            Self::PostgresNats { .. } => Some(("nats", cfg!(feature = "nats"))),
            Self::PostgresSqs { .. } => Some(("sqs", cfg!(feature = "sqs"))),
        }
    }
}

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be reached or migrated.
    #[error("PostgreSQL: {0}")]
    Store(#[from] evently::StoreError),
    /// The broker could not be reached or its topics, exchanges or streams not declared.
    #[error(transparent)]
    Broker(#[from] evently::transport::TransportError),
    /// A broker (or Redis) was asked for in a build without its feature.
    #[error(
        "this build has no {0} support: run with `cargo run -p order-fulfillment --features {0}`"
    )]
    MissingFeature(&'static str),
    /// Redis could not be reached.
    #[error("Redis at {url}: {reason}")]
    Redis {
        /// The URL asked for (its password hidden).
        url: String,
        /// Why.
        reason: String,
    },
}

/// Where the service records the `Idempotency-Key`s of `POST /orders`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Keys {
    /// In the event store, in the transaction of the order's events
    /// (`CommandGateway::execute_idempotent`): a key and its order commit together.
    #[default]
    Store,
    /// In Redis (feature `redis`): the request body is fingerprinted (the same key with another
    /// body is refused with 422), the first answer is kept a day and returned to every retry, a
    /// concurrent retry waits for it (up to 5 s, then 409). Not in the events' transaction: see
    /// the cqrs-redis docs for the window that leaves.
    Redis {
        /// `redis://host:6379`.
        url: String,
        /// Prefixes the Redis keys (one service's keys apart from another's).
        prefix: String,
    },
}

/// A running service: its address, and a handle to stop it.
#[derive(Debug)]
pub struct Service {
    addr: SocketAddr,
    backend: Backend,
    stop: watch::Sender<bool>,
    tasks: Tasks,
}

impl Service {
    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it keeps its events.
    #[must_use]
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Stops accepting requests, lets the background workers reach a safe point (a projection
    /// batch, a relay step, a consumer commit) and waits for them.
    pub async fn stop(self) {
        // Every receiver may be gone already (tasks that ended): nothing to tell then.
        self.stop.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            if let Err(error) = task.await {
                tracing::warn!(%error, "a service task ended abnormally");
            }
        }
    }

    /// Runs until Ctrl-C (or SIGTERM), then stops.
    pub async fn run_until_signal(self) {
        shutdown_signal().await;
        self.stop().await;
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

/// The body of `POST /orders` (a field it does not know is refused).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// Who orders.
    pub customer_id: String,
    /// What.
    pub items: Vec<OrderItem>,
    /// Makes the fake payment service decline this order, so the saga compensates (the order
    /// ends cancelled, its inventory released).
    #[serde(default)]
    pub decline_payment: bool,
}

/// The answer to `POST /orders` (202 Accepted: the order is recorded, its fulfillment runs in
/// the background).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The new order's id.
    pub order_id: String,
    /// The correlation id every event of this order's fulfillment carries.
    pub correlation_id: String,
    /// Where to follow it: `/orders/{order_id}`.
    pub location: String,
    /// The order's place in the global order (`<transaction>:<position>`): `GET
    /// /orders/{order_id}?after={checkpoint}` waits until the read model has it (read-your-writes).
    /// Absent on a retry answered from an earlier request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// The answer to `GET /orders/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// The order's id.
    pub order_id: String,
    /// The summary the read model holds.
    #[serde(flatten)]
    pub summary: OrderSummary,
}

/// An error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in one line.
    pub error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The read model behind `GET /orders/{id}`: the example's [`OrderSummary`] logic over a map the
/// HTTP handlers read while the projection runner writes it.
#[derive(Debug, Clone, Default, Projection)]
#[projection(name = "order_summary_http", events(OrderEvent))]
pub struct SharedSummaries {
    /// Summaries by order id.
    pub orders: Arc<RwLock<BTreeMap<String, OrderSummary>>>,
}

#[async_trait::async_trait]
impl Handles<OrderEvent> for SharedSummaries {
    async fn handle(
        &mut self,
        event: &RecordedEvent<OrderEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        let mut orders = self
            .orders
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        order_summary::apply(&mut orders, event)
    }
}

struct AppState<S: EventStore> {
    orders: Arc<CommandGateway<Order, S>>,
    summaries: SharedSummaries,
    /// How far the summaries' runner got: what `?after=` waits on.
    summaries_progress: Arc<InMemoryCheckpoints>,
    backend: &'static str,
    /// The background tasks, for `/health`.
    tasks: Tasks,
    /// How many were restarted after a panic, for `/health`.
    restarts: Arc<std::sync::atomic::AtomicU64>,
    #[cfg(feature = "redis")]
    redis: Option<evently::redis::RedisIdempotency>,
}

impl<S: EventStore> Clone for AppState<S> {
    fn clone(&self) -> Self {
        Self {
            orders: self.orders.clone(),
            summaries: self.summaries.clone(),
            summaries_progress: Arc::clone(&self.summaries_progress),
            backend: self.backend,
            tasks: self.tasks.clone(),
            restarts: Arc::clone(&self.restarts),
            #[cfg(feature = "redis")]
            redis: self.redis.clone(),
        }
    }
}

fn router<S: EventStore + Clone + 'static>(state: AppState<S>) -> Router {
    Router::new()
        .route("/", get(index::<S>))
        .route("/health", get(health::<S>))
        .route("/metrics", get(prometheus_metrics))
        .route("/orders", post(place_order::<S>))
        .route("/orders/{id}", get(get_order::<S>))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route: see GET /") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route: see GET /",
            )
        })
        .with_state(state)
}

async fn index<S: EventStore>(State(state): State<AppState<S>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "service": "order-fulfillment",
        "backend": state.backend,
        "routes": ["POST /orders", "GET /orders/{id}", "GET /health", "GET /metrics"],
    }))
}

/// The process's Prometheus recorder: installed as the `metrics` recorder by the first call (the
/// framework's metrics, [`evently::telemetry`], go to it from then on); `None` when the
/// application installed another recorder before.
pub fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    evently::telemetry::describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("another metrics recorder is installed: GET /metrics is off");
                    None
                }
            }
        })
        .as_ref()
}

/// `GET /metrics`: the framework's metrics in the Prometheus text format.
async fn prometheus_metrics() -> Response {
    match prometheus() {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "metrics go to the application's own recorder",
        ),
    }
}

/// `GET /health`: 200 when the store answers (within 2 s) and every background task (projection,
/// saga starter and orchestrator, relay, consumer, HTTP server) still runs; else 503 saying
/// which part is not well. Nothing internal is shown: the store's error goes to the log.
async fn health<S: EventStore>(State(state): State<AppState<S>>) -> Response {
    let store =
        match tokio::time::timeout(Duration::from_secs(2), state.orders.store().head()).await {
            Ok(Ok(head)) => Ok(head.map_or(0, |h| h.position)),
            Ok(Err(error)) => {
                tracing::warn!(%error, "health: the event store failed");
                Err("failing")
            }
            Err(_) => Err("not answering within 2 s"),
        };
    let (running, ended) = {
        let tasks = state
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ended = tasks.iter().filter(|t| t.is_finished()).count();
        (tasks.len() - ended, ended)
    };
    let healthy = store.is_ok() && ended == 0;
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "store": match &store {
            Ok(_) => "reachable",
            Err(why) => why,
        },
        "head": store.ok(),
        "background_tasks": {
            "running": running,
            "ended": ended,
            "restarted_after_a_panic": state.restarts.load(std::sync::atomic::Ordering::Relaxed),
        },
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// `POST /orders`: dispatches `CreateOrder`. An `Idempotency-Key` header makes a retried request
/// return the first order instead of placing another; an `X-Correlation-Id` header (a UUID) is
/// used as the correlation id, else a new one is made.
async fn place_order<S: EventStore>(
    State(state): State<AppState<S>>,
    headers: HeaderMap,
    body: Result<axum::Json<PlaceOrder>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(order) = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let correlation = match headers.get("x-correlation-id").map(|v| v.to_str()) {
        None => CorrelationId::new(),
        Some(Ok(text)) => match text.parse() {
            Ok(uuid) => CorrelationId(uuid),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("X-Correlation-Id `{text}` is not a UUID"),
                );
            }
        },
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "X-Correlation-Id is not visible ASCII",
            );
        }
    };
    let mut metadata = CommandMetadata::new().correlated(correlation);
    // A W3C `traceparent` from the caller: the command and its events join that trace (an
    // invalid one is ignored, as the recommendation asks).
    if let Some(trace) = headers
        .get(evently::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| evently::trace::TraceContext::parse(v).ok())
    {
        metadata = metadata.with_trace(trace);
    }
    if order.decline_payment {
        metadata = metadata.with_header(DECLINE_HEADER, "true");
    }
    let id = AggregateId::generate();
    let command = OrderCommand::CreateOrder {
        customer_id: order.customer_id.clone(),
        items: order.items.clone(),
    };
    // A key is the client's: two customers who happen to send the same key place two orders.
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if key.trim().is_empty() => {
            return error(StatusCode::BAD_REQUEST, "Idempotency-Key is empty");
        }
        Some(Ok(key)) if key.len() > MAX_KEY_LEN => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("Idempotency-Key is longer than {MAX_KEY_LEN} characters"),
            );
        }
        Some(Ok(key)) => Some(client_key(&order.customer_id, key)),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is not visible ASCII",
            );
        }
    };
    #[cfg(feature = "redis")]
    if let (Some(redis), Some(key)) = (&state.redis, &key) {
        let request = (id, command, metadata, correlation);
        return place_through_redis(redis, &state.orders, key, &order, request).await;
    }
    let outcome = match &key {
        None => state.orders.execute(id, command, metadata).await,
        Some(key) => {
            state
                .orders
                .execute_idempotent(key, id, command, metadata)
                .await
        }
    };
    let executed = match outcome {
        Ok(executed) => executed,
        // The key placed an order before: that one is the answer, if it was this request.
        Err(CommandError::KeyReused { used_for, .. }) => {
            let first = state.orders.store().load(&used_for, 0).next().await;
            return match first {
                Some(Ok(event)) if !same_order(&event, &order) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Idempotency-Key was used with another request body",
                ),
                Some(Ok(event)) => accepted(
                    used_for.aggregate_id.as_str(),
                    event.metadata.correlation_id.unwrap_or(correlation),
                    Some(event.checkpoint),
                ),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the order an idempotency key placed");
                    unavailable()
                }
                None => error(
                    StatusCode::CONFLICT,
                    format!("Idempotency-Key was used for {used_for}, which has no events"),
                ),
            };
        }
        Err(CommandError::Rejected(rejection)) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, rejection.to_string());
        }
        Err(other) => return command_failed(&other),
    };
    let correlation = executed
        .events
        .first()
        .and_then(|e| e.metadata.correlation_id)
        .unwrap_or(correlation);
    accepted(
        executed.stream.aggregate_id.as_str(),
        correlation,
        executed.checkpoint(),
    )
}

/// The longest `Idempotency-Key` accepted.
const MAX_KEY_LEN: usize = 255;

/// The key as recorded: scoped to the customer (the client of this service), length-prefixed
/// so that no customer id and key can spell another pair's.
fn client_key(customer_id: &str, key: &str) -> String {
    format!("{}:{customer_id}:{key}", customer_id.len())
}

/// Whether `first`, the first event of the order an idempotency key placed, is the order `body`
/// asks for (the same customer, items and payment flag).
fn same_order(first: &evently::StoredEvent, body: &PlaceOrder) -> bool {
    let declined = first
        .metadata
        .headers
        .get(DECLINE_HEADER)
        .is_some_and(|v| v == "true");
    matches!(
        first.decode::<OrderEvent>(),
        Ok(OrderEvent::OrderCreated { customer_id, items })
            if customer_id == body.customer_id && items == body.items && declined == body.decline_payment
    )
}

/// `POST /orders` with its `Idempotency-Key` recorded in Redis: the first answer to the key
/// and this body is kept and returned to every retry.
#[cfg(feature = "redis")]
async fn place_through_redis<S: EventStore>(
    redis: &evently::redis::RedisIdempotency,
    orders: &CommandGateway<Order, S>,
    key: &str,
    order: &PlaceOrder,
    (id, command, metadata, correlation): (
        AggregateId,
        OrderCommand,
        CommandMetadata,
        CorrelationId,
    ),
) -> Response {
    use evently::redis::IdempotencyError;
    let outcome = redis
        .execute(key, order, || async {
            let executed = orders.execute(id, command, metadata).await?;
            let correlation = executed
                .events
                .first()
                .and_then(|e| e.metadata.correlation_id)
                .unwrap_or(correlation);
            Ok(accepted_body(
                executed.stream.aggregate_id.as_str(),
                correlation,
                executed.checkpoint(),
            ))
        })
        .await;
    match outcome {
        Ok(outcome) => accepted_response(outcome.value),
        Err(IdempotencyError::KeyReused { .. }) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key was used with another request body",
        ),
        Err(IdempotencyError::InProgress { .. }) => error(
            StatusCode::CONFLICT,
            "a request with this Idempotency-Key is still being processed: retry later",
        ),
        Err(IdempotencyError::Operation(CommandError::Rejected(rejection))) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, rejection.to_string())
        }
        Err(IdempotencyError::Operation(other)) => command_failed(&other),
        Err(failure @ IdempotencyError::Redis(_)) => {
            tracing::warn!(error = %failure, "idempotency record unavailable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the idempotency record is unavailable: retry later",
            )
        }
        Err(failure) => {
            tracing::error!(error = %failure, "idempotency record unusable");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the idempotency record is unusable (the service logged why)",
            )
        }
    }
}

fn accepted_body(
    order_id: &str,
    correlation: CorrelationId,
    checkpoint: Option<Checkpoint>,
) -> Accepted {
    let location = format!("/orders/{order_id}");
    Accepted {
        order_id: order_id.to_owned(),
        correlation_id: correlation.to_string(),
        location,
        checkpoint: checkpoint.map(|c| c.to_string()),
    }
}

fn accepted_response(body: Accepted) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, body.location.clone())],
        axum::Json(body),
    )
        .into_response()
}

fn accepted(
    order_id: &str,
    correlation: CorrelationId,
    checkpoint: Option<Checkpoint>,
) -> Response {
    accepted_response(accepted_body(order_id, correlation, checkpoint))
}

fn command_failed(failure: &CommandError<OrderError>) -> Response {
    tracing::warn!(error = %failure, "command failed");
    // What went wrong inside stays in the log: the client gets what it can act on.
    match failure {
        CommandError::Store(_) => unavailable(),
        CommandError::TooManyConflicts { .. } | CommandError::AlreadyExists { .. } => {
            error(StatusCode::CONFLICT, failure.to_string())
        }
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the order could not be placed (the service logged why)",
        ),
    }
}

/// 503 with a body that names no internals.
fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the order store is unavailable: retry later",
    )
}

/// The query of `GET /orders/{id}`.
#[derive(Debug, Deserialize)]
struct ReadAfter {
    /// A checkpoint from a `202`: answer once the read model has reached it.
    after: Option<String>,
}

/// The longest `GET /orders/{id}?after=` waits for the read model.
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(5);

/// `GET /orders/{id}`: the read model's summary (eventually consistent: a few milliseconds
/// behind the `202`). With `?after={checkpoint}` (the `checkpoint` of a `202`) it answers once
/// the read model has passed that point, so a client reads its own write; `503` with
/// `Retry-After` if the read model does not get there within 5 s.
async fn get_order<S: EventStore>(
    State(state): State<AppState<S>>,
    Path(id): Path<String>,
    query: Result<Query<ReadAfter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let after = match query {
        Ok(Query(ReadAfter { after: None })) => None,
        Ok(Query(ReadAfter { after: Some(text) })) => match text.parse::<Checkpoint>() {
            Ok(checkpoint) => Some(checkpoint),
            Err(invalid) => return error(StatusCode::BAD_REQUEST, invalid.to_string()),
        },
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    if let Some(after) = after {
        let waited = wait_until_caught_up(
            state.summaries_progress.as_ref(),
            SharedSummaries::NAME,
            after,
            READ_YOUR_WRITES_WAIT,
        )
        .await;
        match waited {
            Ok(_) => {}
            Err(NotCaughtUp::TimedOut { reached, .. }) => {
                tracing::warn!(%after, %reached, "read model did not catch up in time");
                let mut response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the read model has not reached {after} yet (it is at {reached}): retry later"
                    ),
                );
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
                return response;
            }
            Err(failure @ NotCaughtUp::Store { .. }) => {
                tracing::warn!(error = %failure, "reading the read model's checkpoint");
                return unavailable();
            }
        }
    }
    let found = state
        .summaries
        .orders
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .cloned();
    match found {
        Some(summary) => axum::Json(OrderView {
            order_id: id,
            summary,
        })
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no order `{id}` (the read model follows a 202 within milliseconds)"),
        ),
    }
}

/// The service's background tasks: awaited by [`Service::stop`], looked at by `/health`.
type Tasks = Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>;

/// What the service runs besides the HTTP server.
struct Runtime {
    stop: watch::Sender<bool>,
    tasks: Tasks,
    /// Background tasks restarted after a panic.
    restarts: Arc<std::sync::atomic::AtomicU64>,
}

impl Runtime {
    fn new() -> Self {
        Self {
            stop: watch::Sender::new(false),
            tasks: Tasks::default(),
            restarts: Arc::default(),
        }
    }

    /// A future that completes when the service stops.
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        stopped(&self.stop)
    }

    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tokio::spawn(task));
    }

    /// Supervises the task `make` builds: runs it until the service stops, and if it panics (a
    /// bug: a bad request cannot reach one, see the overflow checks), logs it and starts a new
    /// one after a second, so one bad event does not leave the service answering 202 and then
    /// 404 for good. `/health` counts the restarts.
    fn supervise<F, Fut>(&mut self, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut stop = self.stop.subscribe();
        let restarts = Arc::clone(&self.restarts);
        self.spawn(async move {
            loop {
                match tokio::spawn(make()).await {
                    Err(error) if error.is_panic() => {
                        restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(
                            task = name,
                            "a background task panicked; restarting it in 1 s"
                        );
                    }
                    // Ended (the service stops) or cancelled.
                    _ => return,
                }
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }

    /// Runs `projection` over `store` until the service stops; a failing store is logged and the
    /// runner started again from its last checkpoint after a second (and after a panic, by the
    /// supervisor).
    fn project<P, S>(
        &mut self,
        store: S,
        projection: impl Fn() -> P + Send + Sync + 'static,
        poll: Duration,
    ) -> Arc<InMemoryCheckpoints>
    where
        P: Projection<Context = ()> + Sync + 'static,
        S: EventStore + Clone + 'static,
    {
        let checkpoints = Arc::new(InMemoryCheckpoints::new());
        let progress = Arc::clone(&checkpoints);
        let projection = Arc::new(projection);
        let stop = self.stop.clone();
        self.supervise(P::NAME, move || {
            let (store, projection, checkpoints) =
                (store.clone(), Arc::clone(&projection), Arc::clone(&checkpoints));
            let stopped = futures_shared(stopped(&stop));
            let mut stop = stop.subscribe();
            async move {
                loop {
                    let runner = ProjectionRunner::new(store.clone(), projection(), ())
                        .with_checkpoints(checkpoints.clone());
                    match runner.run(poll, stopped.clone()).await {
                        Ok(_) => return,
                        Err(error) => {
                            tracing::warn!(projection = P::NAME, %error, "projection failed; restarting in 1 s");
                        }
                    }
                    tokio::select! {
                        _ = stop.wait_for(|stopped| *stopped) => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        });
        progress
    }

    fn orchestrate<St: SagaStore + Clone + 'static>(&mut self, sagas: St, services: Services) {
        let stop = self.stop.clone();
        self.supervise("saga orchestrator", move || {
            let (sagas, services) = (sagas.clone(), services.clone());
            let stopped = stopped(&stop);
            async move {
                Orchestrator::<FulfillmentSaga, _>::new(sagas, services, owner())
                    .run(Duration::from_millis(20), 32, stopped)
                    .await;
            }
        });
    }
}

/// This process's name for leases (a restarted process takes its leases back at once; two
/// processes never share one).
fn owner() -> String {
    format!("order-fulfillment-{}", std::process::id())
}

/// Starts a fulfillment saga per `OrderCreated` (idempotent: one instance per starting event).
fn starter<St: SagaStore>(sagas: St) -> SagaStarter<FulfillmentSaga, OrderEvent, St> {
    SagaStarter::new(sagas, owner())
}

/// A future that completes when `stop` is set (or dropped: the service is gone too).
fn stopped(stop: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + use<> {
    let mut stop = stop.subscribe();
    async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    }
}

/// A clonable future that completes when `stopped` does.
fn futures_shared(
    stopped: impl Future<Output = ()> + Send + 'static,
) -> futures::future::Shared<futures::future::BoxFuture<'static, ()>> {
    use futures::FutureExt;
    stopped.boxed().shared()
}

/// Starts the service on `addr` (port 0 picks a free one) with `backend`: migrates the schema
/// and creates the topics first when there are any, then serves.
///
/// # Errors
/// [`StartError`] when the address cannot be bound, the database or the broker cannot be reached.
pub async fn start(addr: SocketAddr, backend: Backend) -> Result<Service, StartError> {
    start_with(addr, backend, Keys::Store).await
}

/// [`start`], with the `Idempotency-Key`s recorded where `keys` says.
///
/// # Errors
/// As [`start`], and when Redis cannot be reached or the build has no `redis` feature.
pub async fn start_with(
    addr: SocketAddr,
    backend: Backend,
    keys: Keys,
) -> Result<Service, StartError> {
    if let Some((feature, false)) = backend.feature() {
        return Err(StartError::MissingFeature(feature));
    }
    // The metrics recorder before anything reports.
    let _ = prometheus();
    #[cfg(feature = "redis")]
    let redis = match &keys {
        Keys::Store => None,
        Keys::Redis { url, prefix } => {
            let conn = evently::redis::connect(url)
                .await
                .map_err(|e| StartError::Redis {
                    url: without_userinfo(url),
                    reason: e.to_string(),
                })?;
            Some(
                evently::redis::RedisIdempotency::new(conn)
                    .with_prefix(prefix.clone())
                    .with_wait(Duration::from_secs(5)),
            )
        }
    };
    #[cfg(not(feature = "redis"))]
    if let Keys::Redis { .. } = keys {
        return Err(StartError::MissingFeature("redis"));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let mut runtime = Runtime::new();
    let summaries = SharedSummaries::default();
    let app = match &backend {
        Backend::Embedded => {
            let events = InMemoryEventStore::new();
            let orders = Arc::new(CommandGateway::<Order, _>::new(events.clone()));
            let sagas = InMemorySagaStore::new();
            let poll = Duration::from_secs(1);
            let read_model = summaries.clone();
            let summaries_progress =
                runtime.project(events.clone(), move || read_model.clone(), poll);
            let starts = sagas.clone();
            let _ = runtime.project(events, move || starter(starts.clone()), poll);
            runtime.orchestrate(sagas, Services::new(orders.clone()));
            router(AppState {
                orders,
                summaries,
                summaries_progress,
                backend: backend.name(),
                tasks: runtime.tasks.clone(),
                restarts: Arc::clone(&runtime.restarts),
                #[cfg(feature = "redis")]
                redis: redis.clone(),
            })
        }
        Backend::Postgres {
            database_url,
            schema,
        }
        | Backend::PostgresKafka {
            database_url,
            schema,
            ..
        }
        | Backend::PostgresRabbitMq {
            database_url,
            schema,
            ..
        }
        | Backend::PostgresNats {
            database_url,
            schema,
            ..
        }
        | Backend::PostgresSqs {
            database_url,
            schema,
            ..
        } => {
            let events =
                PostgresEventStore::connect_within(database_url, schema, Duration::from_secs(10))
                    .await?;
            events.migrate().await?;
            let orders = Arc::new(CommandGateway::<Order, _>::new(events.clone()));
            let sagas = PostgresSagaStore::new(events.clone());
            // PostgreSQL has no in-process commit signal: the runners poll.
            let poll = Duration::from_millis(25);
            let read_model = summaries.clone();
            let summaries_progress =
                runtime.project(events.clone(), move || read_model.clone(), poll);
            match &backend {
                #[cfg(feature = "kafka")]
                Backend::PostgresKafka {
                    brokers,
                    topic_prefix,
                    ..
                } => {
                    let starter = starter(sagas.clone());
                    publish_and_subscribe(&mut runtime, &events, brokers, topic_prefix, starter)
                        .await?;
                }
                #[cfg(feature = "rabbitmq")]
                Backend::PostgresRabbitMq { url, prefix, .. } => {
                    let starter = starter(sagas.clone());
                    over_rabbitmq(&mut runtime, &events, url, prefix, starter).await?;
                }
                #[cfg(feature = "nats")]
                Backend::PostgresNats { url, prefix, .. } => {
                    let starter = starter(sagas.clone());
                    over_nats(&mut runtime, &events, url, prefix, starter).await?;
                }
                #[cfg(feature = "sqs")]
                Backend::PostgresSqs {
                    endpoint, queue, ..
                } => {
                    let starter = starter(sagas.clone());
                    over_sqs(&mut runtime, &events, endpoint.as_deref(), queue, starter).await?;
                }
                Backend::Postgres { .. } => {
                    let starts = sagas.clone();
                    let _ = runtime.project(events.clone(), move || starter(starts.clone()), poll);
                }
                // A backend whose feature is off was refused above.
                other => {
                    return Err(StartError::MissingFeature(
                        other.feature().map_or("?", |f| f.0),
                    ));
                }
            }
            runtime.orchestrate(sagas, Services::new(orders.clone()));
            router(AppState {
                orders,
                summaries,
                summaries_progress,
                backend: backend.name(),
                tasks: runtime.tasks.clone(),
                restarts: Arc::clone(&runtime.restarts),
                #[cfg(feature = "redis")]
                redis: redis.clone(),
            })
        }
    };
    let stopped = runtime.stopped();
    runtime.spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(%error, "the HTTP server failed");
        }
    });
    tracing::info!(%addr, backend = backend.name(), "order-fulfillment service started");
    Ok(Service {
        addr,
        backend,
        stop: runtime.stop,
        tasks: runtime.tasks,
    })
}

/// `url` without its user and password, for messages.
#[cfg(feature = "redis")]
fn without_userinfo(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}

/// Runs `relay` and `consumer` until the service stops, logging why either stopped early.
#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "sqs"))]
fn run_broker<S, F, C>(runtime: &mut Runtime, relay: evently::transport::Relay<S>, consume: F)
where
    S: evently::transport::Sink,
    F: FnOnce(futures::future::BoxFuture<'static, ()>) -> C,
    C: std::future::Future<
            Output = Result<
                evently::transport::ConsumerMetrics,
                evently::transport::TransportError,
            >,
        > + Send
        + 'static,
{
    let stopped = runtime.stopped();
    runtime.spawn(async move {
        if let Err(error) = relay.run(Duration::from_millis(250), stopped).await {
            tracing::error!(%error, "the outbox relay stopped");
        }
    });
    let consumer = consume(Box::pin(runtime.stopped()));
    runtime.spawn(async move {
        if let Err(error) = consumer.await {
            tracing::error!(%error, "the saga starter's consumer stopped");
        }
    });
}

/// The relay publishing every event to RabbitMQ, and a quorum-queue consumer starting the sagas
/// from the order events (its queue declared before the relay publishes).
#[cfg(feature = "rabbitmq")]
async fn over_rabbitmq(
    runtime: &mut Runtime,
    events: &PostgresEventStore,
    url: &str,
    prefix: &str,
    starter: SagaStarter<FulfillmentSaga, OrderEvent, PostgresSagaStore>,
) -> Result<(), StartError> {
    use evently::rabbitmq::{InProcess, RabbitConfig, RabbitConsumer, RabbitRelay, RabbitSink};
    let config = RabbitConfig::new(url).with_exchange(format!("{prefix}order-fulfillment.events"));
    let consumer = RabbitConsumer::new(
        &config,
        format!("{prefix}order-fulfillment.sagas"),
        InProcess(starter),
    )
    .with_bindings([format!("{}.#", Order::NAME)])
    .with_single_active_consumer(true);
    consumer.declare().await?;
    let relay = RabbitRelay::new(events.clone(), RabbitSink::new(config), owner())
        .with_name(format!("{prefix}rabbitmq-relay"));
    run_broker(runtime, relay, |stopped| consumer.run(stopped));
    Ok(())
}

/// The relay publishing every event to NATS JetStream, and a durable consumer starting the sagas
/// from the order events' subjects.
#[cfg(feature = "nats")]
async fn over_nats(
    runtime: &mut Runtime,
    events: &PostgresEventStore,
    url: &str,
    prefix: &str,
    starter: SagaStarter<FulfillmentSaga, OrderEvent, PostgresSagaStore>,
) -> Result<(), StartError> {
    use evently::nats::{InProcess, NatsConfig, NatsConsumer, NatsRelay, NatsSink};
    let config = NatsConfig::new(url).with_stream(
        format!("{}ORDER_FULFILLMENT", prefix.to_uppercase()),
        format!("{}order-fulfillment", prefix.replace('.', "_")),
    )?;
    let consumer = NatsConsumer::new(&config, format!("{prefix}sagas"), InProcess(starter))?
        .with_aggregate_type(Order::NAME);
    consumer.declare().await?;
    let relay = NatsRelay::new(events.clone(), NatsSink::new(config), owner())
        .with_name(format!("{prefix}nats-relay"));
    run_broker(runtime, relay, |stopped| consumer.run(stopped));
    Ok(())
}

/// The relay sending every event to an SQS FIFO queue (a message group per order), and a
/// consumer of that queue starting the sagas (other aggregates' events are skipped).
#[cfg(feature = "sqs")]
async fn over_sqs(
    runtime: &mut Runtime,
    events: &PostgresEventStore,
    endpoint: Option<&str>,
    queue: &str,
    starter: SagaStarter<FulfillmentSaga, OrderEvent, PostgresSagaStore>,
) -> Result<(), StartError> {
    use evently::sqs::{InProcess, SqsConfig, SqsConsumer, SqsRelay, SqsSink};
    let config = match endpoint {
        Some(endpoint) => SqsConfig::local(endpoint),
        None => SqsConfig::from_env(),
    }
    .with_queue(queue)?;
    let consumer =
        SqsConsumer::new(&config, queue, InProcess(starter))?.with_wait(Duration::from_secs(1));
    consumer.declare().await?;
    let base = queue.trim_end_matches(".fifo");
    let relay = SqsRelay::new(events.clone(), SqsSink::new(config), owner())
        .with_name(format!("{base}-sqs-relay"));
    run_broker(runtime, relay, |stopped| consumer.run(stopped));
    Ok(())
}

/// The relay publishing every event to Kafka, and a consumer group starting the sagas from the
/// order topic.
#[cfg(feature = "kafka")]
async fn publish_and_subscribe(
    runtime: &mut Runtime,
    events: &PostgresEventStore,
    brokers: &str,
    prefix: &str,
    starter: SagaStarter<FulfillmentSaga, OrderEvent, PostgresSagaStore>,
) -> Result<(), StartError> {
    let config = KafkaConfig::new(brokers).client_id("order-fulfillment");
    let map = TopicMap::new().with_prefix(prefix)?;
    let topic = map.topic(Order::NAME);
    let mut sink = KafkaSink::new(&config)?.with_topics(map)?;
    // The consumer subscribes before the first event: its topic must exist.
    sink.create_topics(&[Order::NAME]).await?;
    let relay =
        OutboxRelay::new(events.clone(), sink, owner()).with_name(format!("{prefix}kafka-relay"));
    let subscriber = KafkaSubscriber::new(
        &config,
        format!("{prefix}order-fulfillment"),
        &[&topic],
        InProcess(starter),
    )?;
    let stopped = runtime.stopped();
    runtime.spawn(async move {
        if let Err(error) = relay.run(Duration::from_millis(250), stopped).await {
            tracing::error!(%error, "the outbox relay stopped");
        }
    });
    let stopped = runtime.stopped();
    runtime.spawn(async move {
        if let Err(error) = subscriber.run(stopped).await {
            tracing::error!(%error, "the saga starter's consumer stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervised task that panics is logged and started again; one that ends is not.
    #[tokio::test]
    async fn a_panicking_background_task_is_restarted() {
        let mut runtime = Runtime::new();
        let starts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&starts);
        runtime.supervise("flaky", move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                assert!(n >= 2, "a bug in the task (start {n})");
            }
        });
        let supervisor = runtime
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .expect("the supervisor");
        tokio::time::timeout(Duration::from_secs(10), supervisor)
            .await
            .expect("the task ends on its third start")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(
            runtime.restarts.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
    }

    /// `/health` answers 503 naming the part once a background task has ended, 200 before.
    #[tokio::test]
    async fn health_is_unavailable_once_a_background_task_ended() {
        let tasks = Tasks::default();
        let state = AppState {
            orders: Arc::new(CommandGateway::<Order, _>::new(InMemoryEventStore::new())),
            summaries: SharedSummaries::default(),
            summaries_progress: Arc::default(),
            backend: "embedded",
            tasks: tasks.clone(),
            restarts: Arc::default(),
            #[cfg(feature = "redis")]
            redis: None,
        };
        let running = tokio::spawn(std::future::pending::<()>());
        let running_abort = running.abort_handle();
        tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(running);
        let healthy = health(State(state.clone())).await;
        assert_eq!(healthy.status(), StatusCode::OK);

        let ended = tokio::spawn(async {});
        while !ended.is_finished() {
            tokio::task::yield_now().await;
        }
        tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(ended);
        let response = health(State(state)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let body: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["store"], "reachable");
        assert_eq!(body["background_tasks"]["ended"], 1);
        assert_eq!(body["background_tasks"]["running"], 1);
        running_abort.abort();
    }
}
