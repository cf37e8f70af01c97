#!/usr/bin/env bash
# The one GPU run: scripts/gpu_check.py under a hard time limit, its output logged to OUT/log.txt. If the
# process dies (a signal: a compiler crash, the OOM killer), it is started once more with --resume: the
# item it died in is recorded as an error and the rest of the budget goes to the items after it.
#
#   scripts/gpu_check.sh OUT_DIR [BUDGET_S] [more gpu_check.py flags, e.g. --quick]
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [BUDGET_S] [gpu_check.py flags]}
budget=${2:-420}
shift $(( $# >= 2 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
limit=$(( ${budget%.*} + 150 ))  # the script stops itself by budget + 120 s (its watchdog)

timeout -k 10 "$limit" "$python" "$here/gpu_check.py" --out "$out" --budget-s "$budget" "$@" 2>&1 | tee -a "$out/log.txt"
status=${PIPESTATUS[0]}
# Only a death by signal (status >= 128) well inside the budget is worth a second process.
if [ "$status" -ge 128 ] && [ "$status" -ne 124 ] && [ "$SECONDS" -lt $(( ${budget%.*} - 30 )) ]; then
  echo "gpu_check.py died with status $status; resuming once" | tee -a "$out/log.txt"
  timeout -k 10 "$limit" "$python" "$here/gpu_check.py" --out "$out" --budget-s "$budget" --resume "$@" 2>&1 \
    | tee -a "$out/log.txt"
  status=${PIPESTATUS[0]}
fi
exit "$status"
