use cqrs_core::prelude::*;

struct Opaque;

#[derive(DomainEvent)]
enum CounterEvent {
    Added { by: Opaque },
}

fn main() {}
