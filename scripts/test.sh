#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints with warnings denied, every test of the
# workspace (unit, integration, trybuild, doctests, PostgreSQL reliability tests), the examples run
# once and the benchmarks' smoke runs.
# Run from anywhere: `./scripts/test.sh`.
# Needs the Rust toolchain pinned in rust-toolchain.toml and PostgreSQL at DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/test); scripts/postgres-up.sh checks it and starts a local one,
# and scripts/postgres-second-up.sh a second server for the dump-and-restore test.
# The Kafka tests need a broker at KAFKA_BROKERS (default 127.0.0.1:9092): scripts/kafka-up.sh
# installs (once, about 10 minutes) and starts one, with the build tools librdkafka needs. The
# RabbitMQ and NATS tests need those servers: scripts/brokers-up.sh checks and starts them. The
# SQS tests need a local SQS server at SQS_ENDPOINT (default http://127.0.0.1:4566):
# scripts/sqs-up.sh installs (once, from PyPI) and starts one.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null 2>&1 || { echo "error: cargo is not installed; install Rust with rustup" >&2; exit 1; }

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
./scripts/postgres-up.sh
# A second PostgreSQL server (another transaction counter and identity) for the test that
# restores a dump into it: started from this machine's PostgreSQL binaries if not up.
export SECOND_DATABASE_URL="${SECOND_DATABASE_URL:-postgres://postgres@127.0.0.1:5433/postgres}"
./scripts/postgres-second-up.sh
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
./scripts/kafka-up.sh
# RabbitMQ, NATS JetStream and Redis for cqrs-rabbitmq, cqrs-nats and cqrs-redis (checked,
# started where possible).
./scripts/brokers-up.sh
# A local SQS server for cqrs-sqs (ministack from PyPI).
export SQS_ENDPOINT="${SQS_ENDPOINT:-http://127.0.0.1:4566}"
./scripts/sqs-up.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p order-fulfillment --features kafka,rabbitmq,nats,sqs,redis --all-targets --locked -- -D warnings
cargo clippy -p evently --all-features --all-targets --locked -- -D warnings

echo "==> cargo doc (broken intra-doc links and other rustdoc warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
RUSTDOCFLAGS="-D warnings" cargo doc -p evently --all-features --no-deps --locked

echo "==> cargo publish --dry-run (the publishable crates package, in dependency order)"
# Without the verify build: it would compile every crate again from its package (librdkafka
# included), minutes that the workspace build above already spends on the same sources.
published="$(mktemp)"
cargo publish --workspace --dry-run --no-verify --locked --allow-dirty >"$published" 2>&1 \
  || { cat "$published"; exit 1; }
# Every warning but the dry run's own "aborting upload" is a packaging mistake.
if grep -E "^warning" "$published" | grep -v "aborting upload due to dry run"; then exit 1; fi
echo "packaged: $(grep -c '^ *Packaged' "$published") crates"
rm -f "$published"

echo "==> cargo test"
cargo test --workspace --locked
# The order service's PostgreSQL + Kafka, RabbitMQ and NATS modes (features, so that its embedded
# run needs no cmake and no broker client).
cargo test -p order-fulfillment --features kafka,rabbitmq,nats,sqs,redis --locked

echo "==> examples"
cargo run --locked -q -p cqrs-examples --bin order >/dev/null
cargo run --locked -q -p cqrs-examples --bin bank_account >/dev/null
cargo run --locked -q -p cqrs-examples --bin fulfillment >/dev/null
# docs/setup.md built and run as a new crate outside the workspace (its Cargo.toml and main.rs).
./scripts/setup-check.sh
# The README's first command, as a self-check: the service on the embedded default, driven over HTTP.
env -u DATABASE_URL -u KAFKA_BROKERS -u AMQP_URL -u NATS_URL -u SQS_ENDPOINT -u SQS_QUEUE -u SQS_QUEUE_URL -u REDIS_URL cargo run --locked -q -p order-fulfillment -- --demo >/dev/null

echo "==> benchmark smoke runs"
cargo bench --locked -q -p evently-core --bench execute -- --quick >/dev/null
# The suite against the peers, the raw limits and the broker (its full run: `cargo bench -p cqrs-bench`).
cargo bench --locked -q -p cqrs-bench -- --quick >/dev/null

echo "all checks passed"
