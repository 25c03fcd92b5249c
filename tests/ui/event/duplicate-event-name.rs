use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    Added { by: u32 },
    #[event(name = "Added")]
    AddedTwice { by: u32 },
}

fn main() {}
