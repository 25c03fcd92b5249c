#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints with warnings denied, every test of the
# workspace (unit, integration, trybuild, doctests), and the examples run once.
# Run from anywhere: `./scripts/test.sh`. Needs only the Rust toolchain pinned in rust-toolchain.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is not installed; $2" >&2; exit 1; }
}
need cargo "install Rust with rustup (https://rustup.rs)"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked

echo "==> examples"
cargo run --locked -q -p cqrs-examples --bin order >/dev/null
cargo run --locked -q -p cqrs-examples --bin bank_account >/dev/null

echo "==> benchmark smoke run"
cargo bench --locked -q -p cqrs-core --bench execute -- --quick >/dev/null

echo "all checks passed"
