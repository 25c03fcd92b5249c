//! The query bus and the given/when/then fixture.

use cqrs_examples::bank::{
    Account, AccountCommand, AccountError, AccountEvent, Deposit, GetBalance,
};
use cqrs_examples::order::{Order, OrderCommand, OrderError, OrderEvent, OrderItem, OrderStatus};
use evently_core::testing::AggregateFixture;
use evently_core::{Query, QueryBus, QueryError, QueryHandler, query::HandlerError};

struct Balances;

#[async_trait::async_trait]
impl QueryHandler<GetBalance> for Balances {
    async fn handle(&self, query: GetBalance) -> Result<Option<u64>, HandlerError> {
        match query.0.as_str() {
            "known" => Ok(Some(42)),
            "broken" => Err("read model unavailable".into()),
            _ => Ok(None),
        }
    }
}

struct CountOrders;

impl Query for CountOrders {
    type Output = usize;
}

#[tokio::test]
async fn queries_reach_their_handler() {
    let mut bus = QueryBus::new();
    bus.register(Balances).unwrap();
    bus.register_fn(|CountOrders| async { Ok::<_, HandlerError>(7) })
        .unwrap();
    assert_eq!(bus.ask(GetBalance("known".into())).await.unwrap(), Some(42));
    assert_eq!(bus.ask(GetBalance("other".into())).await.unwrap(), None);
    assert_eq!(bus.ask(CountOrders).await.unwrap(), 7);
}

#[tokio::test]
async fn an_unregistered_query_is_a_clear_error() {
    let bus = QueryBus::new();
    let error = bus.ask(CountOrders).await.unwrap_err();
    assert!(matches!(error, QueryError::NoHandler { query } if query.ends_with("CountOrders")));
    assert!(
        error
            .to_string()
            .starts_with("no handler is registered for query"),
        "{error}"
    );
}

#[tokio::test]
async fn a_second_handler_and_a_failing_handler_are_errors() {
    let mut bus = QueryBus::new();
    bus.register(Balances).unwrap();
    assert!(matches!(
        bus.register(Balances),
        Err(QueryError::AlreadyRegistered { .. })
    ));
    let error = bus.ask(GetBalance("broken".into())).await.unwrap_err();
    match error {
        QueryError::Handler { source, .. } => {
            assert_eq!(source.to_string(), "read model unavailable")
        }
        other => panic!("expected a handler error, got {other}"),
    }
}

fn item() -> OrderItem {
    OrderItem {
        sku: "a".into(),
        quantity: 1,
        unit_price_cents: 100,
    }
}

fn created() -> OrderEvent {
    OrderEvent::OrderCreated {
        customer_id: "c".into(),
        items: vec![item()],
    }
}

#[test]
fn given_when_then_events() {
    AggregateFixture::<Order>::given([created()])
        .when(OrderCommand::ConfirmOrder)
        .then_expect_events([OrderEvent::OrderConfirmed])
        .then_state(|order| assert_eq!(order.status, OrderStatus::Confirmed));
    AggregateFixture::<Order>::given_no_previous_events()
        .when(OrderCommand::CreateOrder {
            customer_id: "c".into(),
            items: vec![item()],
        })
        .then_expect_events([created()])
        .then_state(|order| assert_eq!(order.total_cents, 100));
}

#[test]
fn given_when_then_errors() {
    AggregateFixture::<Order>::given([
        created(),
        OrderEvent::OrderCancelled { reason: "r".into() },
    ])
    .when(OrderCommand::CancelOrder {
        reason: "again".into(),
    })
    .then_expect_error(OrderError::CannotCancel(OrderStatus::Cancelled));
    AggregateFixture::<Account>::given([AccountEvent::Opened { owner: "o".into() }])
        .when(AccountCommand::Withdraw { amount_cents: 5 })
        .then_expect_error_message("insufficient funds: balance 0, asked 5");
    let result = AggregateFixture::<Account>::given([AccountEvent::Opened { owner: "o".into() }])
        .when(AccountCommand::Deposit(Deposit {
            amount_cents: 0,
            reference: String::new(),
        }))
        .into_result();
    assert_eq!(result, Err(AccountError::ZeroAmount));
}

#[test]
#[should_panic(expected = "the command recorded other events than expected")]
fn the_fixture_fails_on_other_events() {
    AggregateFixture::<Order>::given([created()])
        .when(OrderCommand::ConfirmOrder)
        .then_expect_events([OrderEvent::OrderCancelled { reason: "x".into() }]);
}

#[test]
#[should_panic(expected = "the command was rejected")]
fn the_fixture_fails_when_events_were_expected_but_the_command_was_rejected() {
    AggregateFixture::<Order>::given([created(), OrderEvent::OrderConfirmed])
        .when(OrderCommand::ConfirmOrder)
        .then_expect_events([OrderEvent::OrderConfirmed]);
}

#[test]
#[should_panic(expected = "expected error")]
fn the_fixture_fails_when_an_error_was_expected_but_events_were_recorded() {
    AggregateFixture::<Order>::given([created()])
        .when(OrderCommand::ConfirmOrder)
        .then_expect_error(OrderError::NoItems);
}

mod broken_serde {
    use evently_core::prelude::*;
    use evently_core::testing::AggregateFixture;

    /// `skip_deserializing` on a field makes the stored form lossy: the fixture notices.
    #[derive(Debug, Clone, PartialEq, DomainEvent)]
    #[event(aggregate = Lossy)]
    pub enum LossyEvent {
        Noted {
            #[serde(skip_deserializing)]
            text: String,
        },
    }

    #[derive(Debug, Clone, Command)]
    #[command(aggregate = Lossy)]
    pub enum LossyCommand {
        #[command(create_or_update)]
        Note { text: String },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    pub struct Never;

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = "lossy", command = LossyCommand, event = LossyEvent, error = Never)]
    pub struct Lossy;

    impl Lossy {
        fn note(&self, text: String) -> Result<Vec<LossyEvent>, Never> {
            Ok(vec![LossyEvent::Noted { text }])
        }

        fn apply_noted(&mut self, _text: &str) {}
    }

    #[test]
    #[should_panic(expected = "event does not survive encode/decode")]
    fn the_fixture_catches_events_that_do_not_round_trip() {
        AggregateFixture::<Lossy>::given_no_previous_events()
            .when(LossyCommand::Note {
                text: "hello".into(),
            })
            .then_expect_events([LossyEvent::Noted {
                text: "hello".into(),
            }]);
    }
}

/// The fixture answers as the gateway would: a command that needs an existing aggregate, given
/// no events, is `NotFound` (it used to be decided against the empty state); a creating command
/// given events is `AlreadyExists`.
#[test]
fn the_fixture_keeps_the_commands_stream_expectation() {
    AggregateFixture::<Account>::given_no_previous_events()
        .when(AccountCommand::Deposit(Deposit {
            amount_cents: 5,
            reference: String::new(),
        }))
        .then_expect_not_found();
    AggregateFixture::<Account>::given([AccountEvent::Opened { owner: "o".into() }])
        .when(AccountCommand::Open { owner: "p".into() })
        .then_expect_already_exists();
}

#[test]
#[should_panic(expected = "the gateway answers NotFound")]
fn the_fixture_says_why_a_command_on_no_aggregate_records_nothing() {
    AggregateFixture::<Account>::given_no_previous_events()
        .when(AccountCommand::Withdraw { amount_cents: 5 })
        .then_expect_no_events();
}
