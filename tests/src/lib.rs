#![doc = include_str!("../../README.md")]
//!
//! This crate holds the cross-crate integration tests and the trybuild suite (see `tests/`); the
//! workspace README is its doc so that the README's quick start is compiled and run as a doctest.

/// The guide to the store, projections, sagas and idempotency (`docs/guide.md`), its examples
/// compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/guide.md")]
pub struct Guide;

/// The guide's reference of the derive attributes (`docs/derives.md`), compiled and run as
/// doctests so that the guide cannot drift from the macros.
#[cfg(doctest)]
#[doc = include_str!("../../docs/derives.md")]
pub struct DerivesGuide;

/// Traces, metrics and logs (`docs/observability.md`), its examples compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/observability.md")]
pub struct ObservabilityGuide;
