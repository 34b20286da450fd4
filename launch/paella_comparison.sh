#!/usr/bin/env bash
# Paella's renoise sampler against MaskGIT's mask-and-freeze at an equal training budget: two
# predictors (`paella.noise=uniform` and `mask`) on the same code cache, each evaluated at 8, 12,
# 16 and 24 sampler steps (`eval.tag=steps<N>`); the table (evals/table.py) printed at the end.
# Finished trainings and evaluations are skipped, so the script resumes where it stopped.
#
#   launch/paella_comparison.sh digits  OUT VQ_RUN      # a configs/paella_vq_digits.py run, cached
#   launch/paella_comparison.sh cifar10 OUT VQ_RUN      # a paella_vq_cifar10.py:preset=paella_tiny run
#
# Environment: STEPS (training steps: 2000), STEP_COUNTS ("8 12 16 24"), PYTHON (default:
# .venv/bin/python if present, else python3), EXTRA (more --config flags for every command).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:?digits or cifar10}; OUT=${2:?output folder}; VQ=${3:?the tokenizer run}
STEPS=${STEPS:-2000}; STEP_COUNTS=${STEP_COUNTS:-"8 12 16 24"}; EXTRA=${EXTRA:-}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case $DATASET in
  digits) CONFIG="configs/paella_digits.py:vq=$VQ,steps=$STEPS";;
  cifar10) CONFIG="configs/paella_cifar10.py:vq=$VQ,tok=paella_tiny,cpu=True,batch=64,steps=$STEPS";;
  *) echo "dataset must be digits or cifar10, got $DATASET" >&2; exit 2;;
esac
mkdir -p "$OUT"
groups=()
for noise in uniform mask; do
  w="$OUT/$noise"
  if [[ ! -f "$w/.trained" ]]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m ardiff_jax.main --config "$CONFIG,noise=$noise" --workdir "$w" --mode train $EXTRA \
      && touch "$w/.trained"
  fi
  for n in $STEP_COUNTS; do
    if [[ ! -f "$w/.evaluated-$n" ]]; then
      # shellcheck disable=SC2086
      "$PYTHON" -m ardiff_jax.main --config "$CONFIG,noise=$noise" --workdir "$w" --mode eval \
        --config.paella.steps="$n" --config.eval.tag="steps$n" $EXTRA && touch "$w/.evaluated-$n"
    fi
    groups+=("$noise, $n steps=$w@steps$n")
  done
done
"$PYTHON" -m ardiff_jax.evals.table "${groups[@]}"
