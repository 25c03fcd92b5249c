//! The event-store conformance suite against PostgreSQL, each check in a schema of its own.

mod common;

evently_core::event_store_conformance_tests!(|name: &'static str| common::fresh_store(name));
