//! A bank account on the embedded in-memory store: deposits, a refused overdraft, an old-schema event
//! read through its upcaster, and a balance answered by the query bus.
//!
//! Run: `cargo run -p cqrs-examples --bin bank_account`

use cqrs_examples::bank::{Account, AccountCommand, Deposit, GetBalance};
use evently::prelude::*;
use evently::{EventData, EventId, QueryBus};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = InMemoryEventStore::new();
    let accounts = std::sync::Arc::new(CommandGateway::<Account, _>::new(store.clone()));

    let id = AggregateId::new("acc-1");
    accounts
        .execute(
            &id,
            AccountCommand::Open {
                owner: "Ada".into(),
            },
            CommandMetadata::new(),
        )
        .await?;
    for (amount_cents, reference) in [(10_000, "salary"), (2_500, "refund")] {
        let done = accounts
            .execute(
                &id,
                AccountCommand::Deposit(Deposit {
                    amount_cents,
                    reference: reference.into(),
                }),
                CommandMetadata::new(),
            )
            .await?;
        println!(
            "deposited {amount_cents} ({reference}) -> version {}",
            done.version
        );
    }
    match accounts
        .execute(
            &id,
            AccountCommand::Withdraw {
                amount_cents: 1_000_000,
            },
            CommandMetadata::new(),
        )
        .await
    {
        Err(CommandError::Rejected(error)) => println!("withdraw 1000000 is rejected: {error}"),
        other => println!("unexpected: {other:?}"),
    }

    // An event written by the first version of the code: `amount` in whole units.
    let stream = StreamId::new("account", id.clone());
    let version = store.stream_version(&stream).await?;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(version),
            vec![EventData {
                event_id: EventId::new(),
                event_type: "MoneyDeposited".into(),
                schema_version: 1,
                payload: serde_json::json!({ "amount": 7 }),
                metadata: Metadata::default(),
            }],
        )
        .await?;
    println!("appended a v1 MoneyDeposited {{\"amount\": 7}} (whole units)");

    let mut queries = QueryBus::new();
    let gateway = std::sync::Arc::clone(&accounts);
    queries.register_fn(move |GetBalance(id): GetBalance| {
        let gateway = std::sync::Arc::clone(&gateway);
        async move {
            let (account, version) = gateway.load(id).await?;
            Ok((version > 0).then_some(account.balance_cents))
        }
    })?;
    let balance = queries.ask(GetBalance("acc-1".into())).await?;
    println!("balance through the query bus: {balance:?} cents (10000 + 2500 + 700 upcast)");
    Ok(())
}
