use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(name = "")]
    Added { by: u32 },
}

fn main() {}
