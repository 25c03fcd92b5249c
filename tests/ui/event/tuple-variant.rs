use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    Moved(u32, u32),
}

fn main() {}
