use evently_core::prelude::*;

#[derive(Command)]
#[command(aggregate = Counter)]
struct Increment {
    by: u32,
}

fn main() {}
