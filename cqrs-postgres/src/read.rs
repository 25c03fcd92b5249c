//! Reads in the global order (gap-safe: only settled transactions) and of one stream.

use std::ops::ControlFlow;

use evently_core::{Checkpoint, RawStoredEvent, StoreError, StoredEvent, StreamId, telemetry};
use futures::stream::{BoxStream, StreamExt};
use sqlx::{AssertSqlSafe, Row};

use crate::errors::backend;
use crate::notify::{LISTEN_WAIT, Wakeups};
use crate::rows;
use crate::rows::{to_i64, to_u64};
use crate::sql;
use crate::store::PostgresEventStore;
use crate::tx::Transaction;

impl PostgresEventStore {
    /// How far a reader at `checkpoint` is behind: the committed events after it (counted, so
    /// it costs a walk of the global-order index over them) and the age of the oldest.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn lag_after(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<evently_core::projection::Lag, StoreError> {
        self.same_server().await?;
        let row = sqlx::query(AssertSqlSafe(self.sql.lag.clone()))
            .bind(checkpoint.transaction.to_string())
            .bind(to_i64(checkpoint.position)?)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        let events: i64 = row.try_get("events").map_err(backend)?;
        Ok(evently_core::projection::Lag {
            events: to_u64(events)?,
            seconds: row.try_get::<f64, _>("seconds").map_err(backend)?.max(0.0),
        })
    }

    /// The checkpoint of the `n`-th readable event after `after` (`None` when fewer are readable),
    /// without reading the events: readers split a long read at it and read both parts at once
    /// (every event up to it is settled, so a read up to it returns exactly `n` events).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn checkpoint_after(
        &self,
        after: Checkpoint,
        n: usize,
    ) -> Result<Option<Checkpoint>, StoreError> {
        if n == 0 {
            return Ok(Some(after));
        }
        let query = sqlx::query(AssertSqlSafe(self.sql.nth_after.clone()))
            .bind(after.transaction.to_string())
            .bind(to_i64(after.position)?)
            .bind(i64::try_from(n).unwrap_or(i64::MAX));
        let mut nth = None;
        self.in_global_order(query, after, n, rows::checkpoint, |checkpoint| {
            nth = Some(checkpoint);
            ControlFlow::Continue(())
        })
        .await?;
        Ok(nth)
    }

    /// The checkpoint after which the last `n` readable events of the global order come
    /// ([`Checkpoint::START`] when there are `n` or fewer), found by reading the order's index
    /// backwards: `n` rows, whatever the log's length (`cqrs events tail`).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn checkpoint_before_last(&self, n: usize) -> Result<Checkpoint, StoreError> {
        self.same_server().await?;
        let row = sqlx::query(AssertSqlSafe(self.sql.nth_from_end.clone()))
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map_or(Ok(Checkpoint::START), |row| rows::checkpoint(&row))
    }

    /// [`EventStore::read_all_raw`](evently_core::EventStore::read_all_raw) handing each event to `each` as its row arrives, so
    /// the caller's work on it overlaps the database sending the rest of the page. `each` stops
    /// the page with [`ControlFlow::Break`] (the rows left are read and dropped).
    ///
    /// # Errors
    /// As [`EventStore::read_all`](evently_core::EventStore::read_all); events handed over before the error stay handed over.
    pub async fn read_all_raw_each(
        &self,
        after: Checkpoint,
        limit: usize,
        each: impl FnMut(RawStoredEvent) -> ControlFlow<()> + Send,
    ) -> Result<(), StoreError> {
        let query = self.read_all_query(after, limit)?;
        self.in_global_order(query, after, limit, rows::raw_stored_event, each)
            .await
    }

    /// The query of the readable events after `after`, at most `limit`.
    pub(crate) fn read_all_query(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>, StoreError>
    {
        Ok(sqlx::query(AssertSqlSafe(self.sql.read_all.clone()))
            .bind(after.transaction.to_string())
            .bind(to_i64(after.position)?)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX)))
    }

    /// [`in_global_order`](Self::in_global_order) into a vector.
    pub(crate) async fn collect_in_global_order<'q, E: Send>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        after: Checkpoint,
        rows: usize,
        read: fn(&sqlx::postgres::PgRow) -> Result<E, StoreError>,
    ) -> Result<Vec<E>, StoreError> {
        let mut events = Vec::with_capacity(rows.min(10_000));
        self.in_global_order(query, after, rows, read, |e| {
            events.push(e);
            ControlFlow::Continue(())
        })
        .await?;
        Ok(events)
    }

    /// Runs `query`, which walks up to `rows` events of the global order after `after`, handing
    /// each row read by `read` to `each`. On a store moved to another server it refuses (see
    /// [`PostgresEventStore::rebase`]); when nothing is read, it checks that `after` is not past
    /// every transaction of the server (a position from before a move).
    ///
    /// Above [`SORT_SAFE_PAGE`] rows it runs with sorts disabled, so the planner walks the
    /// global-order index whatever its statistics say: on an events table not analyzed yet (after
    /// a bulk load, before autovacuum's first ANALYZE) it would read and sort the whole table for
    /// every page. JIT compilation is off too: disabling sorts inflates the cost of any plan that
    /// still sorts (the projection window's final ORDER BY), past `jit_above_cost`. Figures in
    /// docs/benchmarks.md ("Why the store reads as it does"). The transaction holds nothing but
    /// this one statement, so it reads the same snapshot as the statement alone would.
    pub(crate) async fn in_global_order<'q, E>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        after: Checkpoint,
        rows: usize,
        read: fn(&sqlx::postgres::PgRow) -> Result<E, StoreError>,
        mut each: impl FnMut(E) -> ControlFlow<()> + Send,
    ) -> Result<(), StoreError> {
        if rows == 0 {
            return Ok(());
        }
        self.same_server().await?;
        let mut found = false;
        let each = |event| {
            found = true;
            each(event)
        };
        if rows <= SORT_SAFE_PAGE {
            rows::each_event(query, &self.pool, read, each).await?;
        } else {
            let mut tx = Transaction::begin_with(&self.pool, sql::BEGIN_ORDERED_READ)
                .await
                .map_err(backend)?;
            let read = rows::each_event(query, &mut *tx, read, each).await;
            tx.end(read, backend).await?;
        }
        if !found {
            self.nothing_after(after).await?;
        }
        Ok(())
    }

    /// The rows of `stream` after `after_version` by `sql` (which binds type, id and version),
    /// streamed from the server and read with `read`.
    pub(crate) fn stream_rows<'a, T: Send + 'a>(
        &'a self,
        sql: &str,
        stream: &'a StreamId,
        after_version: u64,
        read: fn(&sqlx::postgres::PgRow) -> Result<T, StoreError>,
    ) -> BoxStream<'a, Result<T, StoreError>> {
        let after = match to_i64(after_version) {
            Ok(after) => after,
            Err(error) => return futures::stream::once(async { Err(error) }).boxed(),
        };
        let rows = sqlx::query(AssertSqlSafe(sql.to_owned()))
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .bind(after)
            .fetch(&self.pool)
            .map(move |row| row.map_err(backend).and_then(|row| read(&row)));
        let span = tracing::debug_span!("cqrs.load", stream = %stream, after_version);
        telemetry::InSpan::new(rows, span).boxed()
    }

    /// [`EventStore::read_filtered`](evently_core::EventStore::read_filtered) reading each row with `read`.
    pub(crate) async fn read_filtered_with<P: Send>(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[evently_core::projection::Subscription],
        read: fn(&sqlx::postgres::PgRow) -> Result<StoredEvent<P>, StoreError>,
    ) -> Result<(Vec<StoredEvent<P>>, Checkpoint), StoreError> {
        if scan == 0 {
            return Ok((Vec::new(), after));
        }
        // Any aggregate type when one subscription is not tied to one; else the subscribed ones.
        let aggregate_types: Vec<&str> = if filter.iter().all(|s| s.aggregate_type.is_some()) {
            filter.iter().filter_map(|s| s.aggregate_type).collect()
        } else {
            Vec::new()
        };
        let event_types: Vec<&str> = filter
            .iter()
            .flat_map(|s| s.event_types.iter().copied())
            .collect();
        let query = sqlx::query(AssertSqlSafe(self.sql.read_window_filtered.clone()))
            .bind(after.transaction.to_string())
            .bind(to_i64(after.position)?)
            .bind(i64::try_from(scan).unwrap_or(i64::MAX))
            .bind(&aggregate_types)
            .bind(&event_types);
        let rows = self
            .collect_in_global_order(query, after, scan, read)
            .await?;
        // The last row is the window's end, subscribed or not; the query matched each event type
        // with each aggregate type: keep the exact pairs.
        let scanned_to = rows.last().map_or(after, |e| e.checkpoint);
        let events = rows
            .into_iter()
            .filter(|e| filter.iter().any(|s| s.matches(e)))
            .collect();
        Ok((events, scanned_to))
    }
}

/// The span of a read in the global order.
pub(crate) fn read_span(after: Checkpoint, limit: usize) -> tracing::Span {
    tracing::debug_span!(
        "cqrs.read",
        after.transaction = after.transaction,
        after.position = after.position,
        limit
    )
}
/// The largest page read without disabling sorts (see `in_global_order`): below it the planner
/// prefers the ordered index scan even without statistics (where it switches: docs/benchmarks.md).
const SORT_SAFE_PAGE: usize = 1_000;

impl PostgresEventStore {
    /// Subscribes to commit notifications of this schema's events: the store's
    /// [`EventStore::commit_signal`](evently_core::EventStore::commit_signal) as a waitable handle. Every subscriber of a store (and of its
    /// clones) shares one listening connection, opened outside the pool.
    ///
    /// # Errors
    /// [`StoreError::Backend`] outside a tokio runtime.
    pub async fn listen(&self) -> Result<Wakeups, StoreError> {
        let (signal, mut listening) = self
            .listener
            .subscribe(&self.pool, &self.channel)
            .ok_or_else(|| StoreError::backend("listening needs a tokio runtime"))?;
        // Commits from here on wake it, once the shared connection listens (a server that cannot
        // be reached now leaves it to reconnect by itself; readers poll meanwhile).
        let _ = tokio::time::timeout(LISTEN_WAIT, listening.wait_for(|l| *l)).await;
        Ok(Wakeups { signal })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{append_thousand, empty_schema};

    /// The plans of the ordered reads with the settings `in_global_order` applies, on an events
    /// table that was never analyzed: the global-order index, no JIT compilation.
    #[tokio::test]
    async fn ordered_reads_walk_the_index_without_jit_on_an_unanalyzed_table() {
        let store = empty_schema("unit_ordered_plans").await;
        store.migrate().await.unwrap();
        for n in 0..3u32 {
            append_thousand(&store, n).await;
        }
        let types = vec!["Happened"];
        let no_types: Vec<&str> = Vec::new();
        for (name, statement, binds_filter) in [
            ("read_all", store.sql.read_all.clone(), false),
            (
                "read_window_filtered",
                store.sql.read_window_filtered.clone(),
                true,
            ),
        ] {
            let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {statement}");
            let mut query = sqlx::query(AssertSqlSafe(explain))
                .bind("0")
                .bind(0i64)
                .bind(2_000i64);
            if binds_filter {
                query = query.bind(&no_types).bind(&types);
            }
            let mut tx = Transaction::begin_with(store.pool(), sql::BEGIN_ORDERED_READ)
                .await
                .unwrap();
            let plan: serde_json::Value = query.fetch_one(&mut *tx).await.unwrap().get(0);
            tx.rollback().await;
            let plan = plan.to_string();
            assert!(!plan.contains("\"JIT\""), "{name} was JIT-compiled: {plan}");
            assert!(
                plan.contains("events_global_order"),
                "{name} did not use the index: {plan}"
            );
        }
    }
}
