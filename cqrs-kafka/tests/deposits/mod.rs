//! The deposit-effects handler the relay and subscriber tests share: each deposit applied writes a
//! row, so a second effect shows.

#![allow(dead_code, reason = "each test file uses its own subset")]

use cqrs_examples::bank::AccountEvent;
use evently_core::RecordedEvent;
use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_kafka::{KafkaConfig, KafkaSink, OutboxRelay, Transactional};
use evently_postgres::PostgresEventStore;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::common::*;
use crate::pg;
use crate::support::brokers;

/// Counts every deposit it applies, one row per application: a second effect of one event shows
/// as a second row.
#[derive(Projection)]
#[projection(name = "deposit_effects", events(AccountEvent), context = PgConnection)]
pub(crate) struct DepositEffects {
    schema: String,
    /// Fail on deposits whose amount is a multiple of 13.
    poison: bool,
}
/// The effects handler on `store`'s schema, fed from Kafka with its inbox.
pub(crate) fn deposit_effects(
    store: &PostgresEventStore,
    poison: bool,
) -> Transactional<DepositEffects> {
    Transactional::new(
        store.clone(),
        DepositEffects {
            schema: store.schema().to_owned(),
            poison,
        },
    )
}
#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for DepositEffects {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        if let AccountEvent::Deposited(deposit) = &event.event {
            if self.poison && deposit.amount_cents % 13 == 0 {
                return Err(format!("poison deposit of {}", deposit.amount_cents).into());
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{}\".effects (event_id, amount) VALUES ($1, $2)",
                self.schema
            )))
            .bind(event.event_id.0)
            .bind(i64::try_from(deposit.amount_cents)?)
            .execute(conn)
            .await?;
        }
        Ok(())
    }
}
/// A fresh store (schema `k_<name>`) with an effects table and deposits 1..=`count` over
/// `accounts` accounts, relayed to a topic of `partitions`: the store, the config, the topic and
/// the relay (to relay more).
pub(crate) async fn relayed_deposits(
    name: &str,
    count: u64,
    accounts: u64,
    partitions: i32,
) -> (PostgresEventStore, KafkaConfig, String, OutboxRelay) {
    let store = pg::fresh_store(&format!("k_{name}")).await;
    effects_table(&store).await;
    deposit(&store, 1, count, accounts).await;
    let (map, topic) = account_topics(name, partitions);
    let config = KafkaConfig::new(brokers());
    let mut relay = KafkaSink::new(&config.clone())
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay"))
        .unwrap_or_else(|e| panic!("{e}"));
    drain(&mut relay, &store).await;
    (store, config, topic, relay)
}
pub(crate) async fn effects_table(store: &PostgresEventStore) {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".effects (event_id UUID NOT NULL, amount BIGINT NOT NULL)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}
/// (rows, distinct events, events applied more than once).
pub(crate) async fn effects(store: &PostgresEventStore) -> (i64, i64, i64) {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT event_id), \
                (SELECT count(*) FROM (SELECT event_id FROM \"{0}\".effects GROUP BY event_id HAVING count(*) > 1) d) \
         FROM \"{0}\".effects",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}
