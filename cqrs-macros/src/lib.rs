//! The five derives of evently: `Aggregate`, `Command`, `DomainEvent`, `Projection` and `Saga`.
//! Use them through the `evently` facade (or `evently-core`), which re-exports them and holds the
//! traits they implement: `#[derive(evently::Aggregate)]`. The generated code names the framework
//! through whichever of the two the package depends on. The attribute reference is the guide's
//! `docs/derives.md`; every misuse is a compile error on the offending token (the trybuild suite).

mod ast;
mod attr;
mod ctxt;
mod expand;
mod valid;

#[cfg(test)]
mod fuzz;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Implements `evently_core::DomainEvent` for an enum of events, and `evently_core::ApplyTo<A>` when the
/// enum names its aggregate with `#[event(aggregate = A)]`.
///
/// Variant keys: `name = "..."` (stable type name, default: the variant's name), `version = N`
/// (schema version, default 1), `upcast(from = N, with = path)` (repeatable), `apply = method`
/// (default: `apply_<variant in snake_case>`).
#[proc_macro_derive(DomainEvent, attributes(event, serde, pii))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::event::derive(&input).into()
}

/// Implements `evently_core::Command` for an enum of commands: `#[command(aggregate = A)]` on the enum;
/// each variant calls `A::<variant in snake_case>(&self, fields..)`, or `#[command(handler = name)]`.
/// `#[command(create)]` marks a command that starts a new aggregate, `#[command(create_or_update)]`
/// one that works on a new or existing aggregate.
#[proc_macro_derive(Command, attributes(command))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::command::derive(&input).into()
}

/// Implements `evently_core::projection::Projection`:
/// `#[projection(name = "order_summary", events(OrderEvent, PaymentEvent))]`, optionally
/// `context = sqlx::PgConnection` (default `()`), `version = N` (blue/green versions: `name@vN`
/// from 2 on) and `tables("balances", ...)` (the tables readers read through views); one
/// `Handles<E, Context>` impl per listed enum.
#[proc_macro_derive(Projection, attributes(projection))]
pub fn derive_projection(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::projection::derive(&input).into()
}

/// Implements `evently_core::saga::Saga` for an enum of steps (unit variants, run in order):
/// `#[saga(name = "order_fulfillment", data = Order, context = Services)]` on the enum; per step
/// `#[step(execute = method, compensate = method, retry(attempts = 3, backoff_ms = 100,
/// max_delay_ms = 2000), timeout_ms = 5000, name = "...")]`, all optional: `execute` defaults to the
/// variant in snake_case, a bare `compensate` to `compensate_<variant in snake_case>`. The methods
/// are `async fn(&self, &mut Data, &StepKey) -> Result<(), E>` on the context type.
#[proc_macro_derive(Saga, attributes(saga, step))]
pub fn derive_saga(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::saga::derive(&input).into()
}

/// Implements `evently_core::Aggregate`:
/// `#[aggregate(name = "order", command = OrderCommand, event = OrderEvent, error = OrderError)]`,
/// optionally `snapshot(every = 100, version = 1)`.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::aggregate::derive(&input).into()
}
