//! Inline projections: run inside each append's transaction (see
//! [`PostgresEventStore::with_inline`](crate::PostgresEventStore::with_inline)).

use evently_core::StoreError;
use evently_core::projection::Projection;
use futures::future::BoxFuture;
use sqlx::PgConnection;

/// A projection run inside the append transaction; see [`PostgresEventStore::with_inline`](crate::PostgresEventStore::with_inline).
pub(crate) trait InlineProjection: Send + Sync {
    /// Applies the subscribed ones of `events` through `conn`.
    fn apply_all<'a>(
        &'a self,
        events: &'a [evently_core::StoredEvent],
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The inline form of a projection: a clone applies each append's events.
pub(crate) struct Inline<P>(pub(crate) P);

impl<P> InlineProjection for Inline<P>
where
    P: Projection<Context = PgConnection> + Clone + Sync,
{
    fn apply_all<'a>(
        &'a self,
        events: &'a [evently_core::StoredEvent],
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut projection = self.0.clone();
            for event in events.iter().filter(|e| P::subscribes_to(e)) {
                projection.apply(event, conn).await.map_err(|error| {
                    StoreError::InlineProjection {
                        projection: P::NAME,
                        source: Box::new(error),
                    }
                })?;
            }
            Ok(())
        })
    }
}
