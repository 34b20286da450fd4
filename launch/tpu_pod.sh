#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, installs ardiff_jax on every worker and runs one command on all
# of them (one JAX process per worker; jax.distributed finds its peers from the TPU metadata).
#
#   launch/tpu_pod.sh create                 # gcloud compute tpus tpu-vm create
#   launch/tpu_pod.sh install                # copy this checkout, pip install -e ".[tpu]" everywhere
#   launch/tpu_pod.sh run --config configs/mar_imagenet256.py:model=large \
#       --workdir gs://BUCKET/runs/mar_l --mode train
#   launch/tpu_pod.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5litepod-256), VERSION (the TPU VM
# runtime, e.g. v2-alpha-tpuv5-lite), PROJECT (default: gcloud's configured project).
# The workdir should be a GCS path (gs://...) so every worker writes the same checkpoints; data
# for data.source=cached/tfds should be on GCS or on each worker's disk at the same path.
# Rerunning `run` after a preemption resumes from the newest checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
VERSION=${VERSION:-v2-alpha-tpuv5-lite}
PROJECT_ARGS=()
[[ -n "${PROJECT:-}" ]] && PROJECT_ARGS=(--project "$PROJECT")
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
    --command "$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$VERSION"
    ;;
  install)
    cd "$(dirname "$0")/.."
    git archive --format=tar.gz -o /tmp/ardiff_jax.tar.gz HEAD
    gcloud compute tpus tpu-vm scp /tmp/ardiff_jax.tar.gz "$TPU_NAME":~/ --zone "$ZONE" \
      "${PROJECT_ARGS[@]}" --worker=all
    ssh_all "mkdir -p ~/ardiff_jax && tar xzf ~/ardiff_jax.tar.gz -C ~/ardiff_jax && \
      cd ~/ardiff_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    shift
    args=$(printf '%q ' "$@")
    ssh_all "set -o pipefail; cd ~/ardiff_jax && ARDIFF_JAX_DISTRIBUTED=auto \
      .venv/bin/python -m ardiff_jax.main $args 2>&1 | tee -a ~/ardiff_jax_run.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --quiet
    ;;
  *)
    sed -n 2,16p "$0"
    exit 2
    ;;
esac
