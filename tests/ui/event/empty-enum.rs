use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {}

fn main() {}
