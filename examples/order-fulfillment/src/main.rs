//! The order-fulfillment service: `cargo run -p order-fulfillment [-- --demo]`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use order_fulfillment::{Accepted, Backend, Keys, OrderView, PlaceOrder, Service};

/// Runs the order-fulfillment service: in memory by default, on PostgreSQL with a database URL,
/// on PostgreSQL + Kafka, RabbitMQ, NATS or SQS with a broker too (one of them).
#[derive(Parser)]
#[command(name = "order-fulfillment", version, about)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// PostgreSQL (default: in memory).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The PostgreSQL schema.
    #[arg(long, default_value = "order_fulfillment")]
    schema: String,
    /// Kafka brokers; needs a database too.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Prefixes the Kafka topics and the consumer group (and the RabbitMQ exchange and queue, the
    /// NATS stream and consumer).
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// RabbitMQ (`amqp://user:password@host:5672/%2f`); needs a database too (feature `rabbitmq`).
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// NATS with JetStream (`nats://host:4222`); needs a database too (feature `nats`).
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    nats_url: Option<String>,
    /// A local SQS server (`http://127.0.0.1:4566`); needs a database too (feature `sqs`). For
    /// AWS itself set `SQS_QUEUE` without it (`AWS_REGION` and the normal credentials).
    #[arg(long, env = "SQS_ENDPOINT")]
    sqs_endpoint: Option<String>,
    /// The SQS FIFO queue (with `SQS_ENDPOINT`, default `order-fulfillment.fifo`); or
    /// `SQS_QUEUE_URL`, the queue's URL (its last path segment is the name).
    #[arg(long, env = "SQS_QUEUE")]
    sqs_queue: Option<String>,
    /// Record `Idempotency-Key`s in Redis (`redis://host:6379`) instead of the event store
    /// (feature `redis`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Start, place an order that completes and one that is declined over HTTP, print what
    /// happened, stop.
    #[arg(long)]
    demo: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    #[cfg(feature = "otlp")]
    let tracer = init_tracing();
    #[cfg(not(feature = "otlp"))]
    init_tracing();
    let code = serve().await;
    #[cfg(feature = "otlp")]
    if let Some(provider) = tracer {
        // Sends what is still buffered.
        if let Err(error) = provider.shutdown() {
            eprintln!("warning: the OTLP exporter did not shut down cleanly: {error}");
        }
    }
    code
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); with the feature `otlp` and
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are also
/// exported over OTLP/HTTP (the standard `OTEL_*` variables configure the exporter; the service
/// name defaults to `order-fulfillment`).
#[cfg(feature = "otlp")]
fn init_tracing() -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    let provider = if configured {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                    resource = resource.with_service_name("order-fulfillment");
                }
                Some(
                    opentelemetry_sdk::trace::SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.build())
                        .build(),
                )
            }
            Err(error) => {
                eprintln!("warning: no OTLP export: {error}");
                None
            }
        }
    } else {
        None
    };
    // Spans at `info` and above: the commands, the consumers, the saga steps (the store's calls
    // are `debug`).
    let otel = provider.as_ref().map(|provider| {
        use tracing_subscriber::Layer as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("order-fulfillment"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(log_layer())
        .with(otel)
        .init();
    provider
}

/// [`init_tracing`] without OTLP: logs only.
#[cfg(not(feature = "otlp"))]
fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry().with(log_layer()).init();
}

/// Human-readable logs on stderr, by `RUST_LOG` (default `info`), coloured on a terminal unless
/// `NO_COLOR` is set.
fn log_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_filter(filter)
}

async fn serve() -> ExitCode {
    let mut args = Args::parse();
    if args.sqs_queue.is_none()
        && let Ok(url) = std::env::var("SQS_QUEUE_URL")
    {
        args.sqs_queue = url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .map(str::to_owned);
    }
    let brokers = [
        args.kafka_brokers.as_ref().map(|_| "KAFKA_BROKERS"),
        args.amqp_url.as_ref().map(|_| "AMQP_URL"),
        args.nats_url.as_ref().map(|_| "NATS_URL"),
        (args.sqs_endpoint.is_some() || args.sqs_queue.is_some())
            .then_some("SQS_ENDPOINT/SQS_QUEUE"),
    ];
    let chosen: Vec<&str> = brokers.into_iter().flatten().collect();
    if chosen.len() > 1 {
        eprintln!(
            "error: one broker at a time: {} are all set",
            chosen.join(", ")
        );
        return ExitCode::from(2);
    }
    let keys = match args.redis_url {
        Some(url) => Keys::Redis {
            url,
            prefix: "order-fulfillment:idem".to_owned(),
        },
        None => Keys::Store,
    };
    let Some(database_url) = args.database_url else {
        if let Some(broker) = chosen.first() {
            eprintln!(
                "error: {broker} needs PostgreSQL (the relay publishes the store's events): set DATABASE_URL or --database-url"
            );
            return ExitCode::from(2);
        }
        return run(args.demo, args.addr, Backend::Embedded, keys).await;
    };
    let schema = args.schema;
    let prefix = args.topic_prefix;
    let backend = if let Some(brokers) = args.kafka_brokers {
        Backend::PostgresKafka {
            database_url,
            schema,
            brokers,
            topic_prefix: prefix,
        }
    } else if let Some(url) = args.amqp_url {
        Backend::PostgresRabbitMq {
            database_url,
            schema,
            url,
            prefix,
        }
    } else if let Some(url) = args.nats_url {
        Backend::PostgresNats {
            database_url,
            schema,
            url,
            prefix,
        }
    } else if args.sqs_endpoint.is_some() || args.sqs_queue.is_some() {
        Backend::PostgresSqs {
            database_url,
            schema,
            endpoint: args.sqs_endpoint,
            queue: args
                .sqs_queue
                .unwrap_or_else(|| "order-fulfillment.fifo".to_owned()),
        }
    } else {
        Backend::Postgres {
            database_url,
            schema,
        }
    };
    run(args.demo, args.addr, backend, keys).await
}

/// Starts the service on `backend` and serves (or, with `demo`, runs the demo and stops).
async fn run(demo_only: bool, addr: SocketAddr, backend: Backend, keys: Keys) -> ExitCode {
    let args_demo = demo_only;
    let addr = if args_demo {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        addr
    };
    let service = match order_fulfillment::start_with(addr, backend, keys).await {
        Ok(service) => service,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    if args_demo {
        let outcome = demo(&service).await;
        service.stop().await;
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let url = format!("http://{}", service.addr());
    println!(
        "order-fulfillment listening on {url} ({})\n\n\
         Place an order (add \"decline_payment\": true to see the saga compensate):\n  \
         curl -si {url}/orders -H 'content-type: application/json' \\\n    \
         -d '{{\"customer_id\":\"ada\",\"items\":[{{\"sku\":\"book\",\"quantity\":2,\"unit_price_cents\":1250}}]}}'\n\
         Follow it:\n  curl -s {url}/orders/<order_id>\n\nCtrl-C stops.",
        service.backend().name()
    );
    service.run_until_signal().await;
    ExitCode::SUCCESS
}

/// Places two orders over HTTP and follows them until their sagas end.
async fn demo(service: &Service) -> Result<(), String> {
    let url = format!("http://{}", service.addr());
    println!("order-fulfillment on {url} ({})", service.backend().name());
    let client = reqwest::Client::new();
    for (decline_payment, expected) in [(false, "Confirmed"), (true, "Cancelled")] {
        let order = PlaceOrder {
            customer_id: "ada".into(),
            items: vec![cqrs_examples::order::OrderItem {
                sku: "keyboard".into(),
                quantity: 2,
                unit_price_cents: 4_500,
            }],
            decline_payment,
        };
        let response = client
            .post(format!("{url}/orders"))
            .json(&order)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let accepted: Accepted = response.json().await.map_err(|e| e.to_string())?;
        println!(
            "POST /orders (decline_payment: {decline_payment}) -> {status}: order {}, correlation {}",
            accepted.order_id, accepted.correlation_id
        );
        let started = Instant::now();
        loop {
            let response = client
                .get(format!("{url}{}", accepted.location))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status().is_success() {
                let view: OrderView = response.json().await.map_err(|e| e.to_string())?;
                let status = format!("{:?}", view.summary.status);
                if status == expected {
                    println!(
                        "GET {} -> {status} after {:?} (version {}, total {} cents)",
                        accepted.location,
                        started.elapsed(),
                        view.summary.version,
                        view.summary.total_cents
                    );
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "order {} did not become {expected}",
                    accepted.order_id
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}
