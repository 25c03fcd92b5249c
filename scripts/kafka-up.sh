#!/usr/bin/env bash
# Makes a Kafka-protocol broker available at KAFKA_BROKERS (default 127.0.0.1:9092) for the tests:
#  - the C toolchain pieces rdkafka's bundled librdkafka build needs (cmake, libcurl headers) and
#    the benchmark's peers need (OpenSSL headers, pkg-config), installed with apt-get when missing;
#  - the broker, tansu 0.6.0 (an Apache-Kafka-compatible broker from crates.io) with its in-memory
#    and SQLite engines, installed with `cargo install` when missing (about 12 minutes the first
#    time; cached in ~/.cargo/bin);
#  - started on loopback with in-memory storage unless something already listens there.
# Idempotent: a second run finds everything in place and returns at once.
set -euo pipefail

BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
FIRST="${BROKERS%%,*}"
HOST="${FIRST%:*}"
PORT="${FIRST##*:}"
TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# rdkafka's build (feature cmake-build) needs cmake and curl's headers; the benchmark suite's peers
# (sqlx 0.8 with native-tls) need OpenSSL's headers and pkg-config.
need_deps=0
command -v cmake >/dev/null 2>&1 || need_deps=1
command -v pkg-config >/dev/null 2>&1 || need_deps=1
{ [ -e /usr/include/curl/curl.h ] || compgen -G "/usr/include/*/curl/curl.h" >/dev/null; } || need_deps=1
[ -e /usr/include/openssl/ssl.h ] || need_deps=1
DEPS="cmake libcurl4-openssl-dev libssl-dev pkg-config"
if [ "$need_deps" = 1 ]; then
    echo "==> installing $DEPS (needed to build librdkafka and the benchmark's peers)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    # shellcheck disable=SC2086 # the list is meant to split
    $SUDO apt-get install -y -q $DEPS >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $DEPS >/dev/null; } \
        || { echo "error: could not install $DEPS with apt-get" >&2; exit 1; }
fi

# Installed even when a broker already listens: the broker-restart test runs one of its own.
# dynostore: the in-memory engine this script starts it with; libsql: the SQLite engine the
# broker-restart test starts a broker of its own with (its topics must survive the restart).
TANSU_FEATURES=dynostore,libsql
MARKER="$HOME/.cargo/bin/.tansu-$TANSU_VERSION-features"
if ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION" \
    || [ "$(cat "$MARKER" 2>/dev/null)" != "$TANSU_FEATURES" ]; then
    echo "==> installing the tansu $TANSU_VERSION broker with $TANSU_FEATURES (cargo install; about 12 minutes the first time)"
    # Its own target dir (kept for a rebuild) and a quicker release profile: a test broker does not
    # need LTO or full optimisation.
    CARGO_TARGET_DIR="$HOME/.cache/tansu-target" \
    CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    CARGO_PROFILE_RELEASE_DEBUG=false \
        cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES" --force --quiet
    echo "$TANSU_FEATURES" >"$MARKER"
fi

if listening "$HOST" "$PORT"; then
    echo "==> a Kafka broker is listening at $HOST:$PORT"
    exit 0
fi

case "$HOST" in
    127.0.0.1|localhost) ;;
    *) echo "error: no Kafka broker at $FIRST (KAFKA_BROKERS), and this script only starts one on loopback" >&2; exit 1 ;;
esac

echo "==> starting tansu on $HOST:$PORT"
mkdir -p "$HOME/.cache"
LOG="$HOME/.cache/tansu-$PORT.log"
setsid nohup tansu broker \
    --listener-url "tcp://$HOST:$PORT" \
    --advertised-listener-url "tcp://$HOST:$PORT" \
    --storage-engine memory://tansu/ \
    >"$LOG" 2>&1 < /dev/null &

for _ in $(seq 1 150); do
    if listening "$HOST" "$PORT"; then
        echo "==> tansu is up at $HOST:$PORT (log: $LOG)"
        exit 0
    fi
    sleep 0.2
done
echo "error: tansu did not start listening on $HOST:$PORT within 30 s; its log ($LOG) ends with:" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
