//! The event-store conformance suite against the in-memory store.

cqrs_core::event_store_conformance_tests!(|| async { cqrs_core::InMemoryEventStore::new() });
