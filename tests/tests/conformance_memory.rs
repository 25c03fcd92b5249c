//! The event-store conformance suite against the in-memory store.

evently_core::event_store_conformance_tests!(|_test_name: &'static str| async {
    evently_core::InMemoryEventStore::new()
});
