use cqrs_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {}

fn main() {}
