//! The event-store conformance suite against the in-memory store.

evently_core::event_store_conformance_tests!(|_test_name: &'static str| async {
    evently_core::InMemoryEventStore::new()
});

/// Tenant isolation through the in-memory store's tenant views.
mod tenants {
    evently_core::tenant_conformance_tests!(|_test_name| async {
        evently_core::InMemoryEventStore::new()
    });
}
