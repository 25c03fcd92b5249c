use evently_core::prelude::*;

struct Counter;

#[derive(Command)]
#[command(aggregate = Counter)]
enum CounterCommand {
    Increment { by: u32 },
}

fn main() {}
