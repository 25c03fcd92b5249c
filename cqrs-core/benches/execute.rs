//! In-memory `CommandGateway::execute` through the derives against the same aggregate written by hand
//! (a `match` per trait), to show what the derives cost. Prints a table of medians.
//!
//! Run: `cargo bench -p evently-core --bench execute` (add `-- --quick` for a smoke run).

use std::hint::black_box;
use std::time::{Duration, Instant};

use evently_core::prelude::*;
use evently_core::{DecodeError, EncodedEvent, StreamExpectation, event::EncodeError};
use serde::{Deserialize, Serialize};

/// The account with the derives.
mod derived {
    use super::*;

    #[derive(Debug, Clone, PartialEq, DomainEvent)]
    #[event(aggregate = Account)]
    pub enum AccountEvent {
        Opened { owner: String },
        Deposited { amount: u64, reference: String },
        Withdrawn { amount: u64 },
    }

    #[derive(Debug, Clone, Command)]
    #[command(aggregate = Account)]
    pub enum AccountCommand {
        #[command(create)]
        Open {
            owner: String,
        },
        Deposit {
            amount: u64,
            reference: String,
        },
        Withdraw {
            amount: u64,
        },
    }

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = "account", command = AccountCommand, event = AccountEvent, error = Refused)]
    pub struct Account {
        balance: u64,
    }

    impl Account {
        fn open(&self, owner: String) -> Result<Vec<AccountEvent>, Refused> {
            Ok(vec![AccountEvent::Opened { owner }])
        }
        fn deposit(&self, amount: u64, reference: String) -> Result<Vec<AccountEvent>, Refused> {
            Ok(vec![AccountEvent::Deposited { amount, reference }])
        }
        fn withdraw(&self, amount: u64) -> Result<Vec<AccountEvent>, Refused> {
            if amount > self.balance {
                return Err(Refused);
            }
            Ok(vec![AccountEvent::Withdrawn { amount }])
        }
        fn apply_opened(&mut self, _owner: &str) {}
        fn apply_deposited(&mut self, amount: &u64, _reference: &str) {
            self.balance += amount;
        }
        fn apply_withdrawn(&mut self, amount: &u64) {
            self.balance -= amount;
        }
    }
}

/// The same account, every trait written by hand.
mod by_hand {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    pub enum AccountEvent {
        Opened { owner: String },
        Deposited { amount: u64, reference: String },
        Withdrawn { amount: u64 },
    }

    #[derive(Deserialize)]
    struct Opened {
        owner: String,
    }
    #[derive(Deserialize)]
    struct Deposited {
        amount: u64,
        reference: String,
    }
    #[derive(Serialize, Deserialize)]
    struct Withdrawn {
        amount: u64,
    }
    // Serialized by reference, as a careful hand-written version would.
    #[derive(Serialize)]
    struct OpenedRef<'a> {
        owner: &'a str,
    }
    #[derive(Serialize)]
    struct DepositedRef<'a> {
        amount: u64,
        reference: &'a str,
    }

    fn payload<T: Serialize>(
        event_type: &'static str,
        fields: &T,
    ) -> Result<EncodedEvent, EncodeError> {
        Ok(EncodedEvent {
            event_type,
            schema_version: 1,
            payload: serde_json::to_value(fields)
                .map_err(|source| EncodeError { event_type, source })?,
        })
    }

    fn fields<T: serde::de::DeserializeOwned>(
        event_type: &'static str,
        payload: &serde_json::Value,
    ) -> Result<T, DecodeError> {
        T::deserialize(payload).map_err(|e| DecodeError::Payload {
            event_type,
            schema_version: 1,
            message: e.to_string(),
        })
    }

    impl DomainEvent for AccountEvent {
        const EVENT_TYPES: &'static [&'static str] = &["Opened", "Deposited", "Withdrawn"];
        fn event_type(&self) -> &'static str {
            match self {
                Self::Opened { .. } => "Opened",
                Self::Deposited { .. } => "Deposited",
                Self::Withdrawn { .. } => "Withdrawn",
            }
        }
        fn schema_version(&self) -> u32 {
            1
        }
        fn encode(&self) -> Result<EncodedEvent, EncodeError> {
            match self {
                Self::Opened { owner } => payload("Opened", &OpenedRef { owner }),
                Self::Deposited { amount, reference } => payload(
                    "Deposited",
                    &DepositedRef {
                        amount: *amount,
                        reference,
                    },
                ),
                Self::Withdrawn { amount } => payload("Withdrawn", &Withdrawn { amount: *amount }),
            }
        }
        fn decode(
            event_type: &str,
            version: u32,
            payload: &serde_json::Value,
        ) -> Result<Self, DecodeError> {
            if version != 1 {
                return Err(DecodeError::UnsupportedVersion {
                    event_type: "?",
                    found: version,
                    oldest: 1,
                    current: 1,
                });
            }
            match event_type {
                "Opened" => {
                    fields::<Opened>("Opened", payload).map(|f| Self::Opened { owner: f.owner })
                }
                "Deposited" => fields::<Deposited>("Deposited", payload).map(|f| Self::Deposited {
                    amount: f.amount,
                    reference: f.reference,
                }),
                "Withdrawn" => fields::<Withdrawn>("Withdrawn", payload)
                    .map(|f| Self::Withdrawn { amount: f.amount }),
                other => Err(DecodeError::UnknownType {
                    event_type: other.to_owned(),
                    known: Self::EVENT_TYPES,
                }),
            }
        }
    }

    #[derive(Debug, Clone)]
    pub enum AccountCommand {
        Open { owner: String },
        Deposit { amount: u64, reference: String },
        Withdraw { amount: u64 },
    }

    impl Command for AccountCommand {
        type Aggregate = Account;
        fn command_name(&self) -> &'static str {
            match self {
                Self::Open { .. } => "Open",
                Self::Deposit { .. } => "Deposit",
                Self::Withdraw { .. } => "Withdraw",
            }
        }
        fn expectation(&self) -> StreamExpectation {
            match self {
                Self::Open { .. } => StreamExpectation::MustNotExist,
                _ => StreamExpectation::MustExist,
            }
        }
        fn handle(self, account: &Account) -> Result<Vec<AccountEvent>, Refused> {
            match self {
                Self::Open { owner } => Ok(vec![AccountEvent::Opened { owner }]),
                Self::Deposit { amount, reference } => {
                    Ok(vec![AccountEvent::Deposited { amount, reference }])
                }
                Self::Withdraw { amount } => {
                    if amount > account.balance {
                        return Err(Refused);
                    }
                    Ok(vec![AccountEvent::Withdrawn { amount }])
                }
            }
        }
    }

    #[derive(Debug, Default)]
    pub struct Account {
        balance: u64,
    }

    impl Aggregate for Account {
        const NAME: &'static str = "account";
        type Command = AccountCommand;
        type Event = AccountEvent;
        type Error = Refused;
        fn initial() -> Self {
            Self::default()
        }
        fn apply(&mut self, event: &AccountEvent) {
            match event {
                AccountEvent::Opened { .. } => {}
                AccountEvent::Deposited { amount, .. } => self.balance += amount,
                AccountEvent::Withdrawn { amount } => self.balance -= amount,
            }
        }
    }
}

/// The refusal of both accounts.
#[derive(Debug, thiserror::Error)]
#[error("refused")]
pub struct Refused;

/// Commands that both accounts understand.
trait Commands: Aggregate {
    fn open() -> Self::Command;
    fn deposit(n: u64) -> Self::Command;
    fn withdraw(n: u64) -> Self::Command;
}

macro_rules! commands {
    ($m:ident) => {
        impl Commands for $m::Account {
            fn open() -> $m::AccountCommand {
                $m::AccountCommand::Open {
                    owner: "owner".into(),
                }
            }
            fn deposit(n: u64) -> $m::AccountCommand {
                $m::AccountCommand::Deposit {
                    amount: n,
                    reference: "ref".into(),
                }
            }
            fn withdraw(n: u64) -> $m::AccountCommand {
                $m::AccountCommand::Withdraw { amount: n }
            }
        }
    };
}
commands!(derived);
commands!(by_hand);

/// One workload: commands against `aggregates` aggregates, `per_aggregate` each, with the gateway's
/// cache on or off. Returns the elapsed time.
async fn run<A: Commands>(aggregates: u64, per_aggregate: u64, cache: bool) -> Duration
where
    A::Command: Clone,
{
    let gateway = CommandGateway::<A, _>::new(InMemoryEventStore::new())
        .with_cache_capacity(if cache { 4096 } else { 0 });
    let start = Instant::now();
    for a in 0..aggregates {
        let id = AggregateId::new(format!("acc-{a}"));
        let meta = CommandMetadata::new;
        black_box(gateway.execute(&id, A::open(), meta()).await.ok());
        for i in 1..per_aggregate {
            let command = if i % 4 == 0 {
                A::withdraw(1)
            } else {
                A::deposit(2)
            };
            black_box(gateway.execute(&id, command, meta()).await.ok());
        }
    }
    start.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 7 };
    let scale = if quick { 10 } else { 1 };
    let workloads: [(&str, u64, u64, bool); 3] = [
        ("1 hot aggregate, cached", 1, 20_000 / scale, true),
        ("2,000 aggregates x 5, cached", 2_000 / scale, 5, true),
        (
            "200 aggregates x 50, no cache (replay)",
            200 / scale,
            50,
            false,
        ),
    ];
    println!(
        "In-memory CommandGateway::execute: derives vs hand-written (median of {runs} runs)\n"
    );
    println!("| workload | commands | derive (cmd/s) | by hand (cmd/s) | derive / by hand |");
    println!("|---|---:|---:|---:|---:|");
    for (name, aggregates, per, cache) in workloads {
        let commands = aggregates * per;
        let mut derive = Vec::new();
        let mut hand = Vec::new();
        // Interleave the two so drift of the machine hits both alike.
        for _ in 0..runs {
            derive.push(run::<derived::Account>(aggregates, per, cache).await);
            hand.push(run::<by_hand::Account>(aggregates, per, cache).await);
        }
        let rate = |d: Duration| commands as f64 / d.as_secs_f64();
        let (d, h) = (rate(median(derive)), rate(median(hand)));
        println!("| {name} | {commands} | {d:.0} | {h:.0} | {:.3} |", d / h);
    }
}
