//! The event-store conformance suite against the in-memory store.

cqrs_core::event_store_conformance_tests!(|_test_name: &'static str| async {
    cqrs_core::InMemoryEventStore::new()
});
