#!/usr/bin/env bash
# Installs (once) and starts a local SQS-compatible server for the cqrs-sqs tests: ministack from
# PyPI, in a virtualenv under ~/.cache/cqrs-sqs-venv, on 127.0.0.1:4566 (SQS_ENDPOINT).
#
# Why ministack, not moto's server: both keep FIFO deduplication by id, hold a message group back
# while one of its messages is in flight, and move a message to the dead-letter queue after the
# redrive policy's maxReceiveCount receives; but moto answers SendMessageBatch in time growing
# with the queue's length (105 ms at 200 messages, 700 ms at 800 here) and fails a whole batch
# where SQS fails only the bad entries, while ministack answers in about 2 ms whatever the
# length and fails entries one by one, as SQS does.
# Says clearly what is missing. Run from anywhere: `./scripts/sqs-up.sh`.
set -euo pipefail

VERSION=1.5.33
VENV="${HOME}/.cache/cqrs-sqs-venv"
PORT=4566
LOG="${HOME}/.cache/ministack-${PORT}.log"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if port_open "$PORT"; then
  echo "==> an SQS server is up at 127.0.0.1:${PORT}"
  exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "error: python3 is missing: it runs the local SQS server (ministack from PyPI)" >&2
  exit 1
fi
if [ ! -x "${VENV}/bin/ministack" ]; then
  echo "==> installing ministack ${VERSION} from PyPI into ${VENV}"
  python3 -m venv "$VENV"
  "${VENV}/bin/pip" install -q "ministack==${VERSION}"
fi
echo "==> starting ministack on 127.0.0.1:${PORT}"
mkdir -p "$(dirname "$LOG")"
(cd "${HOME}/.cache" && BIND_HOST=127.0.0.1 GATEWAY_PORT="$PORT" nohup "${VENV}/bin/ministack" >"$LOG" 2>&1 &)
for _ in $(seq 1 60); do port_open "$PORT" && break; sleep 0.5; done
if port_open "$PORT"; then
  echo "==> an SQS server is up at 127.0.0.1:${PORT} (log: ${LOG})"
else
  echo "error: ministack did not start on 127.0.0.1:${PORT}; see ${LOG}" >&2
  exit 1
fi
