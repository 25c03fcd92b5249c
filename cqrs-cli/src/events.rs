//! `cqrs events`: the events of a stream, the tail of the global order.

use clap::Subcommand;
use std::time::Duration;

use evently_core::{AggregateId, EventStore, EventStoreExt, StoredEvent, StreamId};
use evently_postgres::PostgresEventStore;

use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum Events {
    /// The events of one stream, `<aggregate type>/<aggregate id>`.
    Show {
        /// The stream, e.g. `order/o-1`.
        stream: String,
    },
    /// The last events in the global order; with `--follow`, then every new one.
    Tail {
        /// How many to show first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Keep printing new events (poll every 500 ms) until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

/// Runs an `events` command.
pub(crate) async fn run(
    store: &PostgresEventStore,
    command: Events,
    json: bool,
) -> Result<(), Failure> {
    match command {
        Events::Show { stream } => {
            let Some((kind, id)) = stream.split_once('/') else {
                return Err(
                    format!("`{stream}`: write the stream as <aggregate type>/<id>").into(),
                );
            };
            let stream = StreamId::new(kind, AggregateId::new(id));
            let events = store.load_all(&stream).await?;
            if events.is_empty() {
                return Err(format!("no events in stream {stream}").into());
            }
            for event in &events {
                print_event(event, json);
            }
        }
        Events::Tail { limit, follow } => {
            let mut after = store.checkpoint_before_last(limit).await?;
            loop {
                let page = store.read_all(after, 1_000).await?;
                for event in &page {
                    print_event(event, json);
                    after = event.checkpoint;
                }
                if !follow {
                    break;
                }
                if page.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    Ok(())
}

fn print_event(event: &StoredEvent, json: bool) {
    if json {
        out!(
            "{}",
            serde_json::json!({
                "stream": event.stream.to_string(),
                "aggregate_type": event.stream.aggregate_type,
                "aggregate_id": event.stream.aggregate_id.to_string(),
                "version": event.version,
                "event_id": event.event_id.0,
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "recorded_at": event.recorded_at,
                "transaction": event.checkpoint.transaction,
                "position": event.checkpoint.position,
                "payload": event.payload,
                "metadata": event.metadata,
            })
        );
        return;
    }
    out!(
        "{} {} v{} {} (schema {}) at {} position {} {}",
        event.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        event.stream,
        event.version,
        event.event_type,
        event.schema_version,
        event.checkpoint.transaction,
        event.checkpoint.position,
        event.payload
    );
}
