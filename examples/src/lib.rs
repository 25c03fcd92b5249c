//! Domains used by the runnable examples (`src/bin/`) and the integration tests: copy one to start
//! your own aggregate.

pub mod bank;
pub mod fulfillment;
pub mod order;
pub mod order_summary;
pub mod ticket;
