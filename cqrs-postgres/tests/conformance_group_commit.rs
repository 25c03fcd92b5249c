//! The event-store conformance suite against PostgreSQL with group commit on: every guarantee of
//! the store holds when concurrent appends are written together.

mod common;

evently_core::event_store_conformance_tests!(|name: &'static str| async move {
    common::fresh_store(&format!("gc_{name}"))
        .await
        .with_group_commit(evently_postgres::GroupCommit::default())
});
