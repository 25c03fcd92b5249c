#!/usr/bin/env bash
# Builds and runs docs/setup.md as a new project would: its Cargo.toml (the `toml` block, with the
# paths pointed at this checkout) and its src/main.rs (the `rust` block), in a fresh crate outside
# the workspace, against PostgreSQL at DATABASE_URL. The workspace's Cargo.lock is copied in so the
# same dependency versions are used.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/src"
block() { # the first ```$1 block of docs/setup.md
  awk -v lang="$1" '$0 == "```" lang { on = 1; next } on && $0 == "```" { exit } on { print }' "$root/docs/setup.md"
}
block toml | sed "s#path = \"../cqrs/#path = \"$root/#" > "$dir/Cargo.toml"
block rust > "$dir/src/main.rs"
[ -s "$dir/Cargo.toml" ] && [ -s "$dir/src/main.rs" ] || { echo "error: docs/setup.md lost its toml or rust block" >&2; exit 1; }
cp "$root/Cargo.lock" "$dir/"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
(cd "$dir" && cargo run --quiet)
