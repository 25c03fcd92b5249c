//! The order-fulfillment service: `cargo run -p order-fulfillment [-- --demo]`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use order_fulfillment::{Accepted, Backend, OrderView, PlaceOrder, Service};

/// Runs the order-fulfillment service: in memory by default, on PostgreSQL with a database URL,
/// on PostgreSQL + Kafka with brokers too.
#[derive(Parser)]
#[command(name = "order-fulfillment", version, about)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// PostgreSQL (default: in memory).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// The PostgreSQL schema.
    #[arg(long, default_value = "order_fulfillment")]
    schema: String,
    /// Kafka brokers; needs a database too.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Prefixes the Kafka topics and the consumer group.
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// Start, place an order that completes and one that is declined over HTTP, print what
    /// happened, stop.
    #[arg(long)]
    demo: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let backend = match (args.database_url, args.kafka_brokers) {
        (None, None) => Backend::Embedded,
        (Some(database_url), None) => Backend::Postgres {
            database_url,
            schema: args.schema,
        },
        (Some(database_url), Some(brokers)) => Backend::PostgresKafka {
            database_url,
            schema: args.schema,
            brokers,
            topic_prefix: args.topic_prefix,
        },
        (None, Some(_)) => {
            eprintln!(
                "error: Kafka needs PostgreSQL (the relay publishes the store's events): set DATABASE_URL or --database-url"
            );
            return ExitCode::from(2);
        }
    };
    let addr = if args.demo {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        args.addr
    };
    let service = match order_fulfillment::start(addr, backend).await {
        Ok(service) => service,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    if args.demo {
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
