//! The order-fulfillment service driven over HTTP: embedded, on PostgreSQL, and on PostgreSQL +
//! the real Kafka-protocol broker (`KAFKA_BROKERS`, started by `scripts/kafka-up.sh`).

use std::time::{Duration, Instant};

use evently::EventStoreExt;
use evently::postgres::PostgresEventStore;
use evently::postgres::saga::PostgresSagaStore;
use evently::saga::{SagaStatus, SagaStore};
use evently::{EventStore, StreamId};
use order_fulfillment::{Accepted, Backend, ErrorBody, OrderView, Service};
use reqwest::StatusCode;
use serde_json::json;

fn order(decline_payment: bool) -> serde_json::Value {
    json!({
        "customer_id": "ada",
        "items": [
            {"sku": "keyboard", "quantity": 2, "unit_price_cents": 4500},
            {"sku": "cable", "quantity": 1, "unit_price_cents": 700}
        ],
        "decline_payment": decline_payment,
    })
}

async fn place(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client.post(format!("{url}/orders")).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /orders: {e}"))
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> T {
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading the body: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Polls `GET /orders/{id}` until the order is in `status`.
async fn wait_for(client: &reqwest::Client, url: &str, id: &str, status: &str) -> OrderView {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    loop {
        let response = client
            .get(format!("{url}/orders/{id}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET: {e}"));
        if response.status() == StatusCode::OK {
            let view: OrderView = json(response).await;
            if format!("{:?}", view.summary.status) == status {
                return view;
            }
            last = format!("{:?}", view.summary.status);
        }
        assert!(
            Instant::now() < deadline,
            "order {id} never became {status} (last seen: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What every mode must do; returns the ids of the confirmed and the cancelled order.
async fn exercise(service: &Service) -> (String, String) {
    let url = format!("http://{}", service.addr());
    let client = reqwest::Client::new();

    let index: serde_json::Value = json(
        client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    assert_eq!(index["backend"], service.backend().name());
    let health = client
        .get(format!("{url}/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(health.status(), StatusCode::OK);
    let health: serde_json::Value = json(health).await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"], "reachable", "{health}");
    assert_eq!(health["background_tasks"]["ended"], 0, "{health}");
    assert!(
        health["background_tasks"]["running"]
            .as_u64()
            .is_some_and(|n| n >= 3),
        "{health}"
    );

    // A total past 2^64 cents is refused (it panicked in the read model and the saga starter
    // before, killing them: every later order answered 202, then 404 for good); the orders
    // below prove the background tasks alive.
    let huge = json!({
        "customer_id": "ada",
        "items": [{"sku": "gold", "quantity": u32::MAX, "unit_price_cents": u64::MAX}],
    });
    let response = place(&client, &url, &huge, &[]).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = json(response).await;
    assert!(body.error.contains("does not fit"), "{}", body.error);

    // An order that completes: 202 with the id, a correlation id and where to follow it.
    let correlation = uuid::Uuid::now_v7().to_string();
    let response = place(
        &client,
        &url,
        &order(false),
        &[("x-correlation-id", &correlation)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let confirmed: Accepted = json(response).await;
    assert_eq!(confirmed.correlation_id, correlation);
    assert_eq!(location.as_deref(), Some(confirmed.location.as_str()));
    assert_eq!(
        confirmed.location,
        format!("/orders/{}", confirmed.order_id)
    );
    let view = wait_for(&client, &url, &confirmed.order_id, "Confirmed").await;
    assert_eq!(view.summary.total_cents, 2 * 4500 + 700);
    assert_eq!(view.summary.customer_id, "ada");
    assert_eq!(view.summary.version, 2, "created, confirmed");

    // A declined payment: the saga compensates down to cancelling the order.
    let response = place(&client, &url, &order(true), &[]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let declined: Accepted = json(response).await;
    assert_ne!(declined.order_id, confirmed.order_id);
    // Read-your-writes: with the 202's checkpoint the first read finds the order (no polling).
    let checkpoint = declined
        .checkpoint
        .as_deref()
        .expect("a 202 carries its checkpoint");
    let response = client
        .get(format!(
            "{url}/orders/{}?after={checkpoint}",
            declined.order_id
        ))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    let view: OrderView = json(response).await;
    assert_eq!(view.order_id, declined.order_id);
    let response = client
        .get(format!("{url}/orders/{}?after=nope", declined.order_id))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: ErrorBody = json(response).await;
    assert_eq!(
        body.error,
        "`nope` is not a checkpoint: expected `<transaction>:<position>`, two unsigned integers"
    );
    assert!(declined.correlation_id.parse::<uuid::Uuid>().is_ok());
    let view = wait_for(&client, &url, &declined.order_id, "Cancelled").await;
    assert_eq!(view.summary.version, 2, "created, cancelled");

    // A retried request with the same idempotency key is the same order.
    let key = uuid::Uuid::now_v7().to_string();
    let key = [("idempotency-key", key.as_str())];
    let first: Accepted = json(place(&client, &url, &order(false), &key).await).await;
    let again = place(&client, &url, &order(false), &key).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Accepted = json(again).await;
    assert_eq!(again, first);
    wait_for(&client, &url, &first.order_id, "Confirmed").await;
    // The same key with another body is not that order.
    let other = place(&client, &url, &order(true), &key).await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = json(other).await;
    assert!(
        body.error.contains("another request body"),
        "{}",
        body.error
    );

    // A key is scoped to its client: another customer sending the same key places its own order.
    let mut grace = order(false);
    grace["customer_id"] = json!("grace");
    let theirs = place(&client, &url, &grace, &key).await;
    assert_eq!(theirs.status(), StatusCode::ACCEPTED);
    let theirs: Accepted = json(theirs).await;
    assert_ne!(theirs.order_id, first.order_id);
    let view = wait_for(&client, &url, &theirs.order_id, "Confirmed").await;
    assert_eq!(view.summary.customer_id, "grace");
    // An empty key is refused, not shared by everyone who sends one.
    for empty in ["", "  "] {
        let response = place(&client, &url, &order(false), &[("idempotency-key", empty)]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{empty:?}");
        let body: ErrorBody = json(response).await;
        assert!(
            body.error.contains("Idempotency-Key is empty"),
            "{}",
            body.error
        );
    }

    // Bad input: one clear line each, with the right status.
    let empty = json!({"customer_id": "ada", "items": []});
    let response = place(&client, &url, &empty, &[]).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = json(response).await;
    assert!(body.error.contains("at least one item"), "{}", body.error);

    for (bad, says) in [
        (
            json!({"customer_id": " ", "items": [{"sku": "a", "quantity": 1, "unit_price_cents": 1}]}),
            "customer_id",
        ),
        (
            json!({"customer_id": "ada", "items": [{"sku": "", "quantity": 1, "unit_price_cents": 1}]}),
            "sku",
        ),
        (
            json!({"customer_id": "ada", "items": [{"sku": "a", "quantity": 1, "unit_price_cents": 1}], "coupon": "FREE"}),
            "coupon",
        ),
    ] {
        let response = place(&client, &url, &bad, &[]).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let body: ErrorBody = json(response).await;
        assert!(body.error.contains(says), "{bad}: {}", body.error);
    }
    // Unknown routes and methods answer JSON too.
    for (request, status) in [
        (client.get(format!("{url}/nowhere")), StatusCode::NOT_FOUND),
        (
            client.get(format!("{url}/orders")),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status(), status);
        let body: ErrorBody = json(response).await;
        assert!(body.error.contains("see GET /"), "{}", body.error);
    }

    let response = place(&client, &url, &json!({"customer": "ada"}), &[]).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = json(response).await;
    assert!(body.error.contains("customer_id"), "{}", body.error);

    let response = client
        .post(format!("{url}/orders"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: ErrorBody = json(response).await;
    assert!(!body.error.is_empty());

    let response = place(
        &client,
        &url,
        &order(false),
        &[("x-correlation-id", "nope")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: ErrorBody = json(response).await;
    assert!(
        body.error.contains("`nope` is not a UUID"),
        "{}",
        body.error
    );

    let response = client
        .get(format!("{url}/orders/no-such-order"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: ErrorBody = json(response).await;
    assert!(body.error.contains("no-such-order"), "{}", body.error);

    (confirmed.order_id, declined.order_id)
}

fn database_url() -> String {
    evently::postgres::database_url()
}

fn unique(name: &str) -> String {
    format!("{name}_{}", uuid::Uuid::now_v7().simple())
}

/// Starts the service on `backend` (tables in `schema`), places the two orders, stops it, and
/// checks what it wrote.
async fn round_trip(schema: &str, backend: Backend) {
    let service = order_fulfillment::start(([127, 0, 0, 1], 0).into(), backend)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (confirmed, declined) = exercise(&service).await;
    service.stop().await;
    check_store(schema, &confirmed, &declined).await;
}

/// The store and sagas the service wrote, checked from outside.
async fn check_store(schema: &str, confirmed: &str, declined: &str) {
    let store = PostgresEventStore::connect(&database_url(), schema)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let events = store
        .load_all(&StreamId::new("order", confirmed))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["OrderCreated", "OrderConfirmed"]);
    let events = store
        .load_all(&StreamId::new("order", declined))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["OrderCreated", "OrderCancelled"]);
    let sagas = PostgresSagaStore::new(store.clone());
    let states = sagas
        .list(Some("order_fulfillment"), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status_of = |order: &str| {
        states
            .iter()
            .filter(|s| s.data["order_id"] == order)
            .map(|s| s.status)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        status_of(confirmed),
        [SagaStatus::Completed],
        "one saga per order"
    );
    assert_eq!(status_of(declined), [SagaStatus::Compensated]);
    assert!(
        store
            .head()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
}

/// Without the `nats` feature, asking for NATS is a clear error, not a silent fallback.
#[cfg(not(feature = "nats"))]
#[tokio::test]
async fn nats_mode_without_the_feature_is_refused() {
    let backend = Backend::PostgresNats {
        database_url: database_url(),
        schema: unique("of_nonats"),
        url: "nats://127.0.0.1:4222".into(),
        prefix: String::new(),
    };
    let error = order_fulfillment::start(([127, 0, 0, 1], 0).into(), backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("started without NATS support"));
    assert!(error.to_string().contains("--features nats"), "{error}");
}

/// Without the `sqs` feature, asking for SQS is a clear error, not a silent fallback.
#[cfg(not(feature = "sqs"))]
#[tokio::test]
async fn sqs_mode_without_the_feature_is_refused() {
    let backend = Backend::PostgresSqs {
        database_url: database_url(),
        schema: unique("of_nosqs"),
        endpoint: Some("http://127.0.0.1:4566".into()),
        queue: "order-fulfillment.fifo".into(),
    };
    let error = order_fulfillment::start(([127, 0, 0, 1], 0).into(), backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("started without SQS support"));
    assert!(error.to_string().contains("--features sqs"), "{error}");
}

/// Without the `kafka` feature, asking for Kafka is a clear error, not a silent fallback.
#[cfg(not(feature = "kafka"))]
#[tokio::test]
async fn kafka_mode_without_the_feature_is_refused() {
    let backend = Backend::PostgresKafka {
        database_url: database_url(),
        schema: unique("of_nokafka"),
        brokers: "127.0.0.1:9092".into(),
        topic_prefix: String::new(),
    };
    let error = order_fulfillment::start(([127, 0, 0, 1], 0).into(), backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("started without Kafka support"));
    assert!(error.to_string().contains("--features kafka"), "{error}");
}

/// Without the `redis` feature, asking for Redis keys is a clear error.
#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn redis_keys_without_the_feature_are_refused() {
    let keys = order_fulfillment::Keys::Redis {
        url: "redis://127.0.0.1:6379".into(),
        prefix: "of".into(),
    };
    let error = order_fulfillment::start_with(([127, 0, 0, 1], 0).into(), Backend::Embedded, keys)
        .await
        .err()
        .unwrap_or_else(|| panic!("started without Redis support"));
    assert!(error.to_string().contains("--features redis"), "{error}");
}

/// `Idempotency-Key`s through Redis: the whole service check, then 8 concurrent retries of one
/// key place one order and all get its answer, the key with another body is refused, and an
/// unreachable Redis is a clear start error.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_service_with_redis_keys_over_http() {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let keys = order_fulfillment::Keys::Redis {
        url: redis,
        prefix: unique("of_idem"),
    };
    let service =
        order_fulfillment::start_with(([127, 0, 0, 1], 0).into(), Backend::Embedded, keys)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    exercise(&service).await;

    let url = format!("http://{}", service.addr());
    let client = reqwest::Client::new();
    let key = uuid::Uuid::now_v7().to_string();
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            tokio::spawn(async move {
                let response =
                    place(&client, &url, &order(false), &[("idempotency-key", &key)]).await;
                assert_eq!(response.status(), StatusCode::ACCEPTED);
                json::<Accepted>(response).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in racing {
        answers.push(task.await.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    wait_for(&client, &url, &answers[0].order_id, "Confirmed").await;

    let response = place(&client, &url, &order(true), &[("idempotency-key", &key)]).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = json(response).await;
    assert!(
        body.error.contains("another request body"),
        "{}",
        body.error
    );
    service.stop().await;

    let keys = order_fulfillment::Keys::Redis {
        url: "redis://user:secret@127.0.0.1:1".into(),
        prefix: "of".into(),
    };
    let error = order_fulfillment::start_with(([127, 0, 0, 1], 0).into(), Backend::Embedded, keys)
        .await
        .err()
        .unwrap_or_else(|| panic!("started without Redis"));
    let message = error.to_string();
    assert!(
        message.contains("127.0.0.1:1") && !message.contains("secret"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_service_over_http() {
    let service = order_fulfillment::start(([127, 0, 0, 1], 0).into(), Backend::Embedded)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    exercise(&service).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_service_over_http() {
    let schema = unique("of_pg");
    let backend = Backend::Postgres {
        database_url: database_url(),
        schema: schema.clone(),
    };
    round_trip(&schema, backend).await;
}

/// Events leave through the outbox relay; the sagas start only from the Kafka consumer group, so
/// an order confirmed or cancelled proves the round trip through the broker.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_kafka_service_over_http() {
    let schema = unique("of_kafka");
    let backend = Backend::PostgresKafka {
        database_url: database_url(),
        schema: schema.clone(),
        brokers: evently::kafka::KafkaConfig::from_env().brokers().to_owned(),
        topic_prefix: format!("{schema}."),
    };
    round_trip(&schema, backend).await;
}

/// Events leave through the outbox relay to RabbitMQ; the sagas start only from the queue's
/// consumer, so an order confirmed or cancelled proves the round trip through the broker.
#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_rabbitmq_service_over_http() {
    let schema = unique("of_rabbit");
    let backend = Backend::PostgresRabbitMq {
        database_url: database_url(),
        schema: schema.clone(),
        url: evently::rabbitmq::RabbitConfig::from_env().url().to_owned(),
        prefix: format!("{schema}."),
    };
    round_trip(&schema, backend).await;
}

/// The same through NATS JetStream.
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_nats_service_over_http() {
    let schema = unique("of_nats");
    let backend = Backend::PostgresNats {
        database_url: database_url(),
        schema: schema.clone(),
        url: evently::nats::NatsConfig::from_env().url().to_owned(),
        prefix: format!("{schema}_"),
    };
    round_trip(&schema, backend).await;
}

/// The same through an SQS FIFO queue on the local server.
#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_sqs_service_over_http() {
    let schema = unique("of_sqs");
    let backend = Backend::PostgresSqs {
        database_url: database_url(),
        schema: schema.clone(),
        endpoint: Some(
            std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned()),
        ),
        queue: format!("{}.fifo", schema.replace('.', "_")),
    };
    round_trip(&schema, backend).await;
}

/// `--help` shows which variables it reads, never their values (a password in the URL).
#[test]
fn help_never_prints_a_secret_from_the_environment() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_order-fulfillment"))
        .arg("--help")
        .env("DATABASE_URL", "postgres://app:s3cr3t@db:5432/x")
        .env("AMQP_URL", "amqp://u:s3cr3t@mq:5672/%2f")
        .env("REDIS_URL", "redis://:s3cr3t@cache:6379")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{help}");
    assert!(
        help.contains("DATABASE_URL") && !help.contains("s3cr3t"),
        "{help}"
    );
}

/// A request's `traceparent` reaches the events its command recorded; `GET /metrics` serves the
/// framework's metrics in the Prometheus text format (the command just counted, the projection's
/// events and lag, the store's appends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_reaches_its_events_and_metrics_are_served() {
    let schema = unique("of_trace");
    let backend = Backend::Postgres {
        database_url: database_url(),
        schema: schema.clone(),
    };
    let service = order_fulfillment::start(([127, 0, 0, 1], 0).into(), backend)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{}", service.addr());
    let client = reqwest::Client::new();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = place(
        &client,
        &url,
        &order(false),
        &[("traceparent", traceparent)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Accepted = json(response).await;
    wait_for(&client, &url, &accepted.order_id, "Confirmed").await;
    // A broken traceparent is ignored, not refused.
    let response = place(&client, &url, &order(false), &[("traceparent", "00-zz")]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);

    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("text/plain")))
    );
    let text = metrics.text().await.unwrap_or_else(|e| panic!("{e}"));
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
    };
    assert!(
        value(r#"cqrs_commands_total{aggregate="order",command="CreateOrder",outcome="ok"}"#)
            >= 2.0
    );
    assert!(value(r#"cqrs_events_appended_total{store="postgres",aggregate="order"}"#) >= 2.0);
    assert!(value(r#"cqrs_projection_events_total{projection="order_summary_http"}"#) >= 1.0);
    assert!(text.contains("# HELP cqrs_commands_total"), "{text}");
    assert!(
        text.contains("cqrs_projection_lag_events{projection="),
        "{text}"
    );
    service.stop().await;

    let store = PostgresEventStore::connect(&database_url(), &schema)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let events = store
        .load_all(&StreamId::new("order", accepted.order_id.as_str()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let created = &events[0];
    assert_eq!(created.event_type, "OrderCreated");
    let stored = created
        .metadata
        .headers
        .get(evently::trace::TRACEPARENT)
        .unwrap_or_else(|| panic!("no traceparent on {created:?}"));
    // The same trace; the parent is the command's span when OpenTelemetry is on, else the
    // request's.
    let context = evently::trace::TraceContext::parse(stored).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(context.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
}
