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

/// The in-memory store's all-tenants view reads every tenant's events in the one global order and
/// writes none; the store itself is the space of no tenant.
#[tokio::test]
async fn the_all_tenants_view_reads_everyone_and_writes_nothing() {
    use evently_core::conformance::{event, tenant};
    use evently_core::{Checkpoint, EventStore, ExpectedVersion, StoreError, StreamId};
    let store = evently_core::InMemoryEventStore::new();
    let stream = StreamId::new("note", "n-1");
    for n in 0..3 {
        store
            .for_tenant(tenant(n))
            .append(&stream, ExpectedVersion::NoStream, vec![event(n as u64)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event(9)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let all = store.all_tenants();
    let read = all
        .read_all(Checkpoint::START, 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let tenants: Vec<_> = read.iter().map(|e| e.metadata.tenant.clone()).collect();
    assert_eq!(
        tenants,
        [Some(tenant(0)), Some(tenant(1)), Some(tenant(2)), None],
        "every tenant's events and those of none, in the global order"
    );
    assert!(matches!(
        all.append(&stream, ExpectedVersion::Any, vec![event(1)])
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    // The store itself reads only the events of no tenant.
    let own = store
        .read_all(Checkpoint::START, 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(own.len(), 1);
    assert_eq!(store.stream_version(&stream).await.ok(), Some(1));
}
