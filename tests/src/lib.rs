#![doc = include_str!("../../README.md")]
//!
//! This crate holds the cross-crate integration tests and the trybuild suite (see `tests/`); the
//! workspace README is its doc so that the README's quick start is compiled and run as a doctest.
