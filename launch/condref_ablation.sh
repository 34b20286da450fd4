#!/usr/bin/env bash
# The condition-refinement ablation: MAR and the causal AR, each in `probe` (the baseline with the
# instruments), `runtime` and `loss` mode over several seeds, plus K = 3 (runtime), λ > 0 (loss)
# and the causal AR in random order (probe, runtime) once; every run trained, then evaluated; the
# table of means ± std (evals/table.py) printed at the end. Finished runs are skipped, so the
# script resumes where it stopped.
#
#   launch/condref_ablation.sh digits  OUT KL_RUN          # the digits demo's tokenizer run
#   launch/condref_ablation.sh cifar10 OUT KL_RUN          # a kl_cifar10.py:preset=kl_tiny run
#
# Environment: SEEDS (default "0 1 2"), STEPS (default 1000 for digits, 2000 for CIFAR-10: the
# README's budgets), PYTHON (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:?digits or cifar10}; OUT=${2:?output folder}; KL=${3:?the tokenizer run}
SEEDS=${SEEDS:-"0 1 2"}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case $DATASET in
  digits) STEPS=${STEPS:-1000}; ARGS="kl=$KL,steps=$STEPS"; MAR=configs/mar_digits.py; AR=configs/ar_diffusion_digits.py;;
  cifar10) STEPS=${STEPS:-2000}; ARGS="kl=$KL,tok=kl_tiny,cpu=True,batch=64,steps=$STEPS"
           MAR=configs/mar_cifar10.py; AR=configs/ar_diffusion_cifar10.py;;
  *) echo "dataset must be digits or cifar10, got $DATASET" >&2; exit 2;;
esac
mkdir -p "$OUT"

one() {  # name config-with-args extra-flags...
  local name=$1 config=$2; shift 2
  local w="$OUT/$name"
  if [[ ! -f "$w/.trained" ]]; then
    "$PYTHON" -m ardiff_jax.main --config "$config" --workdir "$w" --mode train "$@" && touch "$w/.trained"
  fi
  if [[ ! -f "$w/.evaluated" ]]; then
    "$PYTHON" -m ardiff_jax.main --config "$config" --workdir "$w" --mode eval "$@" && touch "$w/.evaluated"
  fi
}

for seed in $SEEDS; do
  for mode in probe runtime loss; do
    one "mar-$mode-s$seed" "$MAR:$ARGS,condref=$mode" --config.seed="$seed"
    one "ar-$mode-s$seed" "$AR:$ARGS,condref=$mode" --config.seed="$seed"
  done
done
first=$(echo $SEEDS | cut -d' ' -f1)
one "ar-probe-random-s$first" "$AR:$ARGS,condref=probe,order=random" --config.seed="$first"
one "ar-runtime-random-s$first" "$AR:$ARGS,condref=runtime,order=random" --config.seed="$first"
one "mar-runtime-k3-s$first" "$MAR:$ARGS,condref=runtime" --config.seed="$first" --config.condref.num_steps=3
one "mar-loss-lam-s$first" "$MAR:$ARGS,condref=loss" --config.seed="$first" \
    --config.condref.lam=0.5 --config.condref.lambda_weight=0.1

groups=()
for bb in mar ar; do
  for mode in probe runtime loss; do
    dirs=$(for seed in $SEEDS; do printf '%s,' "$OUT/$bb-$mode-s$seed"; done)
    groups+=("$bb $mode=${dirs%,}")
  done
done
groups+=("ar probe, random order=$OUT/ar-probe-random-s$first" "ar runtime, random order=$OUT/ar-runtime-random-s$first"
         "mar runtime, K = 3=$OUT/mar-runtime-k3-s$first" "mar loss, λ = 0.5, w_λ = 0.1=$OUT/mar-loss-lam-s$first")
"$PYTHON" -m ardiff_jax.evals.table "${groups[@]}"
