use evently_core::prelude::*;

#[derive(DomainEvent)]
#[event(aggregat = Counter)]
enum CounterEvent {
    Added { by: u32 },
}

fn main() {}
