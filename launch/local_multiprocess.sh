#!/usr/bin/env bash
# Runs ardiff_jax as several JAX processes on this machine, each with its own CPU devices, joined
# by jax.distributed on localhost: the multi-controller set-up of a TPU pod or a GPU cluster,
# rehearsed on one CPU machine.
#
#   launch/local_multiprocess.sh --config configs/kl_digits.py:tiny --workdir W --mode train
#
# Environment: PROCESSES (default 2), DEVICES_PER_PROCESS (default 4), PORT (default: a free
# one), PYTHON (default: .venv/bin/python if present, else python3). Every line of output is
# prefixed with its process; the script fails if any process fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCESSES=${PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < PROCESSES; i++)); do
  (
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
    export JAX_COORDINATOR_ADDRESS="localhost:${PORT}" JAX_NUM_PROCESSES="${PROCESSES}" JAX_PROCESS_ID="$i"
    set -o pipefail
    "$PYTHON" -m ardiff_jax.main "$@" 2>&1 | sed -u "s/^/[process $i] /"
  ) &
  pids+=($!)
done

# The first failure stops the others: they would wait for it at their next collective, where a
# SIGTERM (handled between steps) never arrives, so SIGKILL follows after a short grace period.
stop_all() {
  for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; done
  sleep 10
  for pid in "${pids[@]}"; do pkill -KILL -P "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
status=0
for ((k = 0; k < PROCESSES; k++)); do
  if ! wait -n; then
    status=1
    stop_all
    break
  fi
done
wait
exit "$status"
