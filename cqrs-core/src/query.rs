//! The query bus: typed queries routed to the handlers registered for them.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// A typed request for data from a read model.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a query",
    note = "implement `evently_core::query::Query` for `{Self}`, naming its `Output`"
)]
pub trait Query: Send + 'static {
    /// What the query answers.
    type Output: Send + 'static;
}

/// The error a query handler returns.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Answers one type of query.
#[async_trait::async_trait]
pub trait QueryHandler<Q: Query>: Send + Sync + 'static {
    /// Answers `query`.
    ///
    /// # Errors
    /// Whatever kept the handler from answering.
    async fn handle(&self, query: Q) -> Result<Q::Output, HandlerError>;
}

/// A closure as a query handler, made by [`QueryBus::register_fn`].
struct FnHandler<F>(F);

#[async_trait::async_trait]
impl<Q, F, Fut> QueryHandler<Q> for FnHandler<F>
where
    Q: Query,
    F: Fn(Q) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Q::Output, HandlerError>> + Send + 'static,
{
    async fn handle(&self, query: Q) -> Result<Q::Output, HandlerError> {
        (self.0)(query).await
    }
}

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No handler is registered for this query type.
    #[error("no handler is registered for query `{query}`")]
    NoHandler {
        /// The query's type name.
        query: &'static str,
    },
    /// A handler is registered for this query type already.
    #[error("a handler for query `{query}` is registered already")]
    AlreadyRegistered {
        /// The query's type name.
        query: &'static str,
    },
    /// The handler failed.
    #[error("handler of query `{query}` failed: {source}")]
    Handler {
        /// The query's type name.
        query: &'static str,
        /// What it said.
        #[source]
        source: HandlerError,
    },
}

/// Routes each query to the one handler registered for its type.
#[derive(Default, Clone)]
pub struct QueryBus {
    handlers: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for QueryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryBus")
            .field("handlers", &self.handlers.len())
            .finish()
    }
}

impl QueryBus {
    /// An empty bus.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the handler of `Q`.
    ///
    /// # Errors
    /// [`QueryError::AlreadyRegistered`] when `Q` has a handler already.
    pub fn register<Q: Query>(&mut self, handler: impl QueryHandler<Q>) -> Result<(), QueryError> {
        let handler: Arc<dyn QueryHandler<Q>> = Arc::new(handler);
        match self.handlers.entry(TypeId::of::<Q>()) {
            std::collections::hash_map::Entry::Occupied(_) => Err(QueryError::AlreadyRegistered {
                query: std::any::type_name::<Q>(),
            }),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Arc::new(handler));
                Ok(())
            }
        }
    }

    /// Registers an async closure as the handler of `Q`.
    ///
    /// # Errors
    /// [`QueryError::AlreadyRegistered`] when `Q` has a handler already.
    pub fn register_fn<Q, F, Fut>(&mut self, handler: F) -> Result<(), QueryError>
    where
        Q: Query,
        F: Fn(Q) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Q::Output, HandlerError>> + Send + 'static,
    {
        self.register::<Q>(FnHandler(handler))
    }

    /// Asks `query` of its handler.
    ///
    /// # Errors
    /// [`QueryError::NoHandler`] when none is registered for `Q`, [`QueryError::Handler`] when it fails.
    pub async fn ask<Q: Query>(&self, query: Q) -> Result<Q::Output, QueryError> {
        let name = std::any::type_name::<Q>();
        let handler = self
            .handlers
            .get(&TypeId::of::<Q>())
            .and_then(|h| h.downcast_ref::<Arc<dyn QueryHandler<Q>>>())
            .ok_or(QueryError::NoHandler { query: name })?
            .clone();
        handler
            .handle(query)
            .await
            .map_err(|source| QueryError::Handler {
                query: name,
                source,
            })
    }
}
