//! The relay's pipeline: a page read ahead while the last one is sent, split into chunks the
//! broker takes, sent without waiting, acknowledged in order, the checkpoint moved behind the
//! acknowledgements.

use crate::sink::{Layout, Outgoing as Message, Sink};
use crate::{EventSerializer, TransportError};
use evently_core::Checkpoint;
use evently_postgres::{Advance, LeaseLoss, PostgresEventStore};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

use super::*;

/// A read of the page after `from` running on its own task.
pub(super) struct Prefetch<H> {
    pub(super) from: Checkpoint,
    pub(super) page: tokio::task::JoinHandle<Result<Page<H>, evently_core::StoreError>>,
}
/// A page of events made into messages on the reading tasks, in chunks (one per task). The
/// events' payloads and metadata are dropped where they were read.
pub(super) struct Page<H> {
    pub(super) chunks: Vec<Chunk<H>>,
    /// Why the page stops after the events above (nothing after it is sent): an event the
    /// serializer refused, or a stored row that cannot be read as an event.
    pub(super) refused: Option<TransportError>,
}
/// Per event only what the relay needs once its message is queued, the values back to back in
/// one buffer, and the headers.
pub(super) struct Chunk<H> {
    pub(super) events: Vec<Outgoing>,
    /// The message values back to back: event `i`'s ends at `ends[i]`.
    pub(super) values: Vec<u8>,
    pub(super) ends: Vec<usize>,
    pub(super) headers: Vec<H>,
}
/// What a delivery report or a failed delivery needs of an event.
pub(super) struct Outgoing {
    pub(super) event_id: evently_core::EventId,
    pub(super) stream: evently_core::StreamId,
    pub(super) checkpoint: Checkpoint,
}
/// Pages of at least this many events are read in two halves at once.
const SPLIT_FROM: usize = 2_000;
/// Reads up to `batch` events after `from` and makes them messages. With `split` (the page
/// before was full: there is a backlog), a large page is split at the checkpoint of its middle
/// event and both halves are read at once, on two connections and two tasks (everything up to
/// the middle is settled, so the first half is exactly the events up to it; the second half is a
/// gap-safe read of its own).
pub(super) async fn load<L: Layout>(
    store: PostgresEventStore,
    serializer: Arc<dyn EventSerializer>,
    layout: L,
    from: Checkpoint,
    batch: usize,
    split: bool,
) -> Result<Page<L::Headers>, evently_core::StoreError> {
    let half = batch / 2;
    if split
        && batch >= SPLIT_FROM
        && let Some(middle) = store.checkpoint_after(from, half).await?
    {
        let second = tokio::spawn(load_part(
            store.clone(),
            serializer.clone(),
            layout.clone(),
            middle,
            batch - half,
        ));
        let mut page = load_part(store, serializer, layout, from, half).await?;
        if page.refused.is_some() || page.last().map(|e| e.checkpoint) != Some(middle) {
            // Stopped early (a refused event), or not what the split promised: the first
            // half alone; the next page starts after it.
            second.abort();
            return Ok(page);
        }
        match second
            .await
            .map_err(|e| evently_core::StoreError::backend(format!("relay read task: {e}")))?
        {
            Ok(second) => page.append(second),
            // A row of the second half cannot be read: the first half alone; the next page
            // reads up to that row and then stops at it.
            Err(evently_core::StoreError::Corrupt(_)) => {}
            Err(error) => return Err(error),
        }
        return Ok(page);
    }
    load_part(store, serializer, layout, from, batch).await
}

impl<H> Page<H> {
    /// Adds the events of `next`, which starts where this one ends.
    pub(super) fn append(&mut self, next: Self) {
        self.chunks.extend(next.chunks);
        self.refused = next.refused;
    }

    /// The last event.
    pub(super) fn last(&self) -> Option<&Outgoing> {
        self.chunks.iter().rev().find_map(|c| c.events.last())
    }

    /// How many events.
    pub(super) fn len(&self) -> usize {
        self.chunks.iter().map(|c| c.events.len()).sum()
    }
}

/// The bytes reserved per event for the message values before a part is read: an envelope of a
/// small event is ~350 bytes; growing a buffer of a few thousand values copies it whole.
const VALUE_BYTES: usize = 512;
/// Reads up to `batch` events after `from` and makes them messages, each as its row arrives (so
/// the serialization overlaps the database sending the rest of the page).
async fn load_part<L: Layout>(
    store: PostgresEventStore,
    serializer: Arc<dyn EventSerializer>,
    layout: L,
    from: Checkpoint,
    batch: usize,
) -> Result<Page<L::Headers>, evently_core::StoreError> {
    let mut chunk = Chunk {
        events: Vec::new(),
        values: Vec::new(),
        ends: Vec::new(),
        headers: Vec::new(),
    };
    let mut refused = None;
    let content_type = serializer.content_type();
    store
        .read_all_raw_each(from, batch, |event| {
            if chunk.events.is_empty() {
                // Reserved at the first event, so that a caught-up relay's empty reads allocate
                // nothing.
                let expected = batch.min(10_000);
                chunk.events.reserve(expected);
                chunk.values.reserve(expected * VALUE_BYTES);
                chunk.ends.reserve(expected);
                chunk.headers.reserve(expected);
            }
            if let Err(error) = serializer.serialize_raw_into(&event, &mut chunk.values) {
                refused = Some(TransportError::Serialize(error));
                return ControlFlow::Break(());
            }
            chunk.ends.push(chunk.values.len());
            chunk.headers.push(layout.headers(&event, content_type));
            chunk.events.push(Outgoing {
                event_id: event.event_id,
                checkpoint: event.checkpoint,
                stream: event.stream,
            });
            ControlFlow::Continue(())
        })
        .await?;
    Ok(Page {
        chunks: vec![chunk],
        refused,
    })
}

impl<S: Sink> Relay<S> {
    fn lease_lost(&self, loss: LeaseLoss) -> TransportError {
        TransportError::LeaseLost {
            relay: self.lease.name().to_owned(),
            loss,
        }
    }

    pub(super) async fn pipelined_step(&mut self) -> Result<RelayStep, TransportError> {
        let stored = match self.held {
            // Renewed recently by this relay: no other owner can have taken it since (a live
            // twin under the same owner name can, with a new epoch: this relay then publishes for
            // at most a third of the lease before its next move is refused; what it sent twice
            // is dropped by the broker's dedup or the consumer's inbox, and its order holds:
            // `conformance::two_relays_under_one_name`).
            Some((at, checkpoint))
                if self.lease.epoch().is_some() && at.elapsed() < self.lease.duration() / 3 =>
            {
                checkpoint
            }
            _ => {
                let asked = Instant::now();
                let Some(stored) = self.lease.acquire().await? else {
                    return Err(self.lease_lost(LeaseLoss::HeldElsewhere));
                };
                self.held = Some((asked, stored));
                stored
            }
        };
        let from = match self.sent {
            Some(sent) if sent >= stored => sent,
            // Nothing sent yet, or another relay moved the checkpoint past what this one sent
            // (it lost the lease meanwhile): start from the stored checkpoint.
            _ => {
                // What is in flight is forgotten on both sides: the relay's list and the sink's
                // confirms must stay one for one, or a confirm is taken for the wrong message and
                // the relay ends up waiting for one that was never sent. The sink also learns
                // that the next message does not follow the last one it sent.
                self.in_flight.clear();
                self.sink.forget();
                self.acked = None;
                stored
            }
        };
        // The lease is renewed while the step runs: a page that takes longer than the lease to
        // send and confirm (a slow broker, a large page) does not hand the relay over mid-step.
        let heartbeat = self.lease.heartbeat();
        // At most one batch is in flight here (the last step's), two while this one sends.
        let page = self.read(from).await?;
        let span = tracing::debug_span!(
            "cqrs.relay.batch",
            broker = S::BROKER,
            relay = self.lease.name(),
            read = page.len(),
            in_flight = self.in_flight.len(),
            delivered = tracing::field::Empty,
        );
        let work = async {
            let started = Instant::now();
            // Wait for what earlier steps sent; all of it when this one sent nothing or failed.
            let (sent, send_failure) = match self.send_page(page).await {
                Ok(sent) => (sent, None),
                Err(error) => (0, Some(error)),
            };
            let keep = sent;
            let base = self.acked.map_or(stored, |acked| acked.max(stored));
            let (delivered, acked, failure) = self.acknowledge(keep, base).await;
            self.acked = Some(acked);
            self.metrics.update(|m| m.delivered += delivered as u64);
            tracing::Span::current().record("delivered", delivered);
            let failure = failure.or(send_failure);
            // The checkpoint is stored at most every CHECKPOINT_EVERY while publishing (a stored
            // move costs a commit; one lost to a crash costs only duplicates), and at once when
            // the relay catches up or stops on a failure.
            let due = sent == 0
                || failure.is_some()
                || self.moved.is_none_or(|at| at.elapsed() >= CHECKPOINT_EVERY);
            let checkpoint = if acked > stored && due {
                let asked = Instant::now();
                match self.lease.advance(stored, acked).await? {
                    Advance::Done => {
                        self.held = Some((asked, acked));
                        self.moved = Some(asked);
                        acked
                    }
                    Advance::LeaseLost(loss) => return Err(self.lease_lost(loss)),
                    // An earlier move whose outcome was in doubt went through: the next move
                    // starts from what is stored.
                    Advance::Moved { stored } => {
                        self.held = Some((asked, stored));
                        stored
                    }
                }
            } else {
                stored
            };
            if let Some(error) = failure {
                if matches!(error, TransportError::Delivery(_)) {
                    // A fatal client error (a fenced producer, a closed channel) leaves the
                    // client unusable, and any failure may mean a destination went missing:
                    // start afresh.
                    self.metrics.update(|m| m.failures += 1);
                    evently_core::telemetry::relay_failure(self.lease.name(), S::BROKER);
                    self.sink.restart().await?;
                    self.metrics.update(|m| m.producers += 1);
                }
                tracing::warn!(
                    relay = self.lease.name(), %error,
                    "publishing stopped; the next step starts again from the checkpoint"
                );
                return Err(error);
            }
            let elapsed = started.elapsed().as_secs_f64();
            let mut rate = None;
            if delivered > 0 && elapsed > 0.0 {
                #[allow(clippy::cast_precision_loss)]
                let per_second = delivered as f64 / elapsed;
                self.metrics.update(|m| m.last_rate = per_second);
                rate = Some(per_second);
            }
            evently_core::telemetry::relay_delivered(self.lease.name(), S::BROKER, delivered, rate);
            Ok(RelayStep {
                sent,
                delivered,
                checkpoint,
            })
        }
        .instrument(span);
        tokio::select! {
            outcome = work => outcome,
            never = heartbeat => match never {},
        }
    }

    /// The page after `from`: the one prefetched during the last step if it starts there, else
    /// read now. A non-empty page starts the read of the next one, so the database read overlaps
    /// the serialization and sending of this one.
    pub(super) async fn read(
        &mut self,
        from: Checkpoint,
    ) -> Result<Page<HeadersOf<S>>, TransportError> {
        let now = || {
            load(
                self.store.clone(),
                self.serializer.clone(),
                self.sink.layout(),
                from,
                self.batch,
                false,
            )
        };
        let prefetched = match self.prefetch.take() {
            Some(prefetch) if prefetch.from == from => prefetch
                .page
                .await
                .map_err(|e| evently_core::StoreError::backend(format!("relay read task: {e}")))?,
            Some(stale) => {
                stale.page.abort();
                now().await
            }
            None => now().await,
        };
        let page = match prefetched {
            // The first row after `from` cannot be read as an event: nothing is sent past it (the
            // step acknowledges and checkpoints what is in flight, then stops with it).
            Err(corrupt @ evently_core::StoreError::Corrupt(_)) => Page {
                chunks: Vec::new(),
                refused: Some(TransportError::Store(corrupt)),
            },
            other => other?,
        };
        if let (Some(last), None) = (page.last(), &page.refused) {
            // A full page means a backlog: the next one is worth reading in two halves.
            let next = load(
                self.store.clone(),
                self.serializer.clone(),
                self.sink.layout(),
                last.checkpoint,
                self.batch,
                page.len() >= self.batch,
            );
            self.prefetch = Some(Prefetch {
                from: last.checkpoint,
                page: tokio::spawn(next),
            });
        }
        Ok(page)
    }

    /// Queues the messages of `page` in the sink, behind what is in flight. Returns how many
    /// were queued, or the first failure (those before it stay queued).
    async fn send_page(&mut self, page: Page<HeadersOf<S>>) -> Result<usize, TransportError> {
        let sent = page.len();
        let Page { chunks, refused } = page;
        // The aggregate types of the page (rarely more than a few).
        let mut kinds: Vec<&str> = Vec::new();
        for event in chunks.iter().flat_map(|c| &c.events) {
            let kind = event.stream.aggregate_type.as_str();
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        self.sink.prepare(&kinds).await?;
        if sent > 0 {
            self.metrics.update(|m| m.batches += 1);
        }
        for chunk in chunks {
            let Chunk {
                events,
                values,
                ends,
                headers,
            } = chunk;
            let mut start = 0;
            for ((event, end), headers) in events.into_iter().zip(ends).zip(headers) {
                let value = &values[start..end];
                start = end;
                let message = Message {
                    event_id: event.event_id,
                    stream: &event.stream,
                    value,
                    headers,
                };
                if let Err(source) = self.sink.send(message).await {
                    return Err(delivery_error(&self.sink, &event, source));
                }
                self.sent = Some(event.checkpoint);
                self.in_flight.push_back(event);
            }
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(sent),
        }
    }

    /// Awaits the confirms of everything in flight but the last `keep`, in order: the confirmed
    /// prefix, the checkpoint after it (`stored` when nothing was confirmed) and the first
    /// failure. Cancel-safe: the sink gives up a confirm only once it has arrived.
    pub(super) async fn acknowledge(
        &mut self,
        keep: usize,
        stored: Checkpoint,
    ) -> (usize, Checkpoint, Option<TransportError>) {
        let mut delivered = 0;
        let mut checkpoint = stored;
        while self.in_flight.len() > keep {
            let outcome = self.sink.confirmed().await;
            let Some(done) = self.in_flight.pop_front() else {
                break;
            };
            match outcome {
                Ok(()) => {
                    delivered += 1;
                    checkpoint = done.checkpoint;
                }
                Err(source) => {
                    let error = delivery_error(&self.sink, &done, source);
                    return (delivered, checkpoint, Some(error));
                }
            }
        }
        (delivered, checkpoint, None)
    }
}
