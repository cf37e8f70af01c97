#!/usr/bin/env bash
# The one GPU run: scripts/gpu_check.py under a hard time limit, its output logged to OUT/log.txt. If the
# process dies (a signal: a compiler crash, the OOM killer) or exits 75 (a kernel fault left the CUDA
# context unusable), it is started again with --resume, at most twice: the item it died in is recorded as
# an error and what is left of the budget goes to the items after it. Compiled programs are cached in
# /tmp so a resumed process does not compile them again.
#
#   scripts/gpu_check.sh OUT_DIR [BUDGET_S] [more gpu_check.py flags, e.g. --quick]
#
# On the lent GPU machine (one 10-minute command): `bash scripts/gpu_check.sh $OUT 420`, timeout_s 600.
# It ends by ~budget + 90 s + start-up even when resumed; $OUT then holds results.json, results.md,
# roofline.png, roofline.json and log.txt.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [BUDGET_S] [gpu_check.py flags]}
budget=${2:-420}
shift $(( $# >= 2 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ridgeline-jax-cache}
limit=$(( ${budget%.*} + 120 ))  # the script stops itself by budget + 90 s (its watchdog)

resume=()
for attempt in 1 2 3; do
  timeout -k 10 "$limit" "$python" "$here/gpu_check.py" --out "$out" --budget-s "$budget" ${resume[@]+"${resume[@]}"} "$@" \
    2>&1 | tee -a "$out/log.txt"
  status=${PIPESTATUS[0]}
  # Restart only after a death by signal (>= 128, not timeout's 124) or a device fault (75), inside the budget.
  if { [ "$status" -lt 128 ] && [ "$status" -ne 75 ]; } || [ "$status" -eq 124 ] \
     || [ "$SECONDS" -ge $(( ${budget%.*} - 30 )) ] || [ "$attempt" -eq 3 ]; then
    break
  fi
  echo "gpu_check.py ended with status $status after ${SECONDS}s; resuming (attempt $((attempt + 1)))" \
    | tee -a "$out/log.txt"
  resume=(--resume)
done
exit "$status"
