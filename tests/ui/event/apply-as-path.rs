use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(apply = Counter::apply_added)]
    Added { by: u32 },
}

fn main() {}
