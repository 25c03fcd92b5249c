use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(name = Added)]
    Added { by: u32 },
}

fn main() {}
