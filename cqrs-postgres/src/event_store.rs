//! The [`EventStore`] trait on PostgreSQL: the front door, each method handing over to the module
//! that does the work (append, read, notify), with its span and metrics.

use evently_core::store::{AppendResult, KeyRecord, ReplayEvent};
use evently_core::{
    AggregateId, Checkpoint, EventData, EventStore, ExpectedVersion, RawStoredEvent, StoreError,
    StoredEvent, StreamId, telemetry,
};
use futures::stream::BoxStream;
use sqlx::{AssertSqlSafe, Row};
use tracing::Instrument as _;

use crate::errors::backend;
use crate::read::read_span;
use crate::rows::{self, replay_event, stored_event, to_u64};
use crate::store::PostgresEventStore;

#[async_trait::async_trait]
impl EventStore for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let count = events.len();
        telemetry::observe_append(
            "postgres",
            &self.appends,
            stream,
            count,
            self.append_unobserved(stream, expected, events),
        )
        .await
    }

    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<StoredEvent, StoreError>> {
        if let Err(error) = self.refuse_all_tenants() {
            return futures::StreamExt::boxed(futures::stream::once(async { Err(error) }));
        }
        self.open_each(
            self.stream_rows(&self.sql.load, stream, after_version, stored_event),
            |e| &mut e.payload,
        )
    }

    fn replay<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<ReplayEvent, StoreError>> {
        // Only what rehydration needs, and the payload as text: the derive deserializes it
        // straight into the event, without a `serde_json::Value` in between.
        if let Err(error) = self.refuse_all_tenants() {
            return futures::StreamExt::boxed(futures::stream::once(async { Err(error) }));
        }
        self.open_each(
            self.stream_rows(&self.sql.replay, stream, after_version, replay_event),
            |e| &mut e.payload,
        )
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.refuse_all_tenants()?;
        self.version_of(stream).await
    }

    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        let count = events.len();
        telemetry::observe_append(
            "postgres",
            &self.appends,
            stream,
            count,
            self.append_with_key_unobserved(stream, expected, events, key),
        )
        .await
    }

    async fn read_filtered(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[evently_core::projection::Subscription],
    ) -> Result<(Vec<StoredEvent>, Checkpoint), StoreError> {
        let (mut events, to) = self
            .read_filtered_with(after, scan, filter, stored_event)
            .instrument(read_span(after, scan))
            .await?;
        self.open(&mut events).await?;
        Ok((events, to))
    }

    async fn read_filtered_raw(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[evently_core::projection::Subscription],
    ) -> Result<(Vec<RawStoredEvent>, Checkpoint), StoreError> {
        let (mut events, to) = self
            .read_filtered_with(after, scan, filter, rows::raw_stored_event)
            .instrument(read_span(after, scan))
            .await?;
        self.open(&mut events).await?;
        Ok((events, to))
    }

    async fn find_key(&self, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.refuse_all_tenants()?;
        let row = sqlx::query(AssertSqlSafe(self.sql.find_key.clone()))
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| {
            let aggregate_type: String = row.try_get("aggregate_type").map_err(backend)?;
            let aggregate_id: String = row.try_get("aggregate_id").map_err(backend)?;
            Ok(KeyRecord {
                key: key.to_owned(),
                stream: StreamId::new(aggregate_type, AggregateId::new(aggregate_id)),
                first_version: to_u64(row.try_get("first_version").map_err(backend)?)?,
                last_version: to_u64(row.try_get("last_version").map_err(backend)?)?,
            })
        })
        .transpose()
    }

    async fn lag(
        &self,
        after: Checkpoint,
    ) -> Result<Option<evently_core::projection::Lag>, StoreError> {
        self.lag_after(after).await.map(Some)
    }

    async fn head(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.same_server().await?;
        let row = sqlx::query(AssertSqlSafe(self.sql.head.clone()))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| rows::checkpoint(&row)).transpose()
    }

    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let query = self.read_all_query(after, limit)?;
        let mut events = self
            .collect_in_global_order(query, after, limit, stored_event)
            .instrument(read_span(after, limit))
            .await?;
        self.open(&mut events).await?;
        Ok(events)
    }

    /// Each payload left as the stored JSON text: what a publisher that forwards events (the
    /// relays) and the projection engine read, as parsing a payload into a `Value` is most of the
    /// cost of reading it. Same order, same gap safety.
    async fn read_all_raw(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RawStoredEvent>, StoreError> {
        let query = self.read_all_query(after, limit)?;
        let mut events = self
            .collect_in_global_order(query, after, limit, rows::raw_stored_event)
            .instrument(read_span(after, limit))
            .await?;
        self.open(&mut events).await?;
        Ok(events)
    }

    fn scope(&self) -> evently_core::store::StoreScope {
        self.scope.clone()
    }

    /// Changes after commits of this schema's events, in this process and others (`LISTEN`
    /// on one connection per store, outside its pool); `None` outside a tokio runtime.
    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.listener
            .subscribe(&self.pool, &self.channel)
            .map(|(signal, _)| signal)
    }
}
