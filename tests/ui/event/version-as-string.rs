use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(version = "2")]
    Added { by: u32 },
}

fn main() {}
