#!/usr/bin/env bash
# Starts the processes of one multi-process (multi-host) ridgeline job.
#
# Each process gets RIDGELINE_COORDINATOR / RIDGELINE_NUM_PROCESSES / RIDGELINE_PROCESS_ID, which
# sharding.multihost.initialize_from_env_or_flags() turns into jax.distributed.initialize(...). Every
# process runs the same command; process 0 hosts the coordinator at the given host:port.
#
# Usage: scripts/launch_multihost.sh [options] -- COMMAND [ARGS...]
#   -n, --num-processes N  total processes in the job, over all hosts (required)
#   -c, --coordinator H:P  process 0's host:port, reachable from every host
#                          (default: localhost:<free port>; only valid when all processes run here)
#   -f, --first-id I       id of the first process started on this host (default 0)
#   -l, --local N          processes to start on this host (default: num-processes - first-id)
#   -d, --cpu-devices K    give each process K virtual CPU devices (CPU testing; sets XLA_FLAGS and
#                          JAX_PLATFORMS=cpu)
#   -t, --timeout S        kill the processes after S seconds (default 0: no limit)
#
# Output lines are prefixed with "[p<id>]". The script exits with the first non-zero exit code of its
# processes (and then stops the others it started), else 0.
#
# Examples:
#   # one machine, 2 processes x 2 CPU devices each, 5 minute limit:
#   scripts/launch_multihost.sh -n 2 -d 2 -t 300 -- python my_job.py
#   # two GPU hosts, one process per host owning all local GPUs (run one line on each host):
#   host0$ scripts/launch_multihost.sh -n 2 -c host0:12355 -f 0 -l 1 -- python my_job.py
#   host1$ scripts/launch_multihost.sh -n 2 -c host0:12355 -f 1 -l 1 -- python my_job.py
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

num_processes="" coordinator="" first_id=0 local_count="" cpu_devices="" timeout_s=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num_processes="$2"; shift 2 ;;
    -c|--coordinator) coordinator="$2"; shift 2 ;;
    -f|--first-id) first_id="$2"; shift 2 ;;
    -l|--local) local_count="$2"; shift 2 ;;
    -d|--cpu-devices) cpu_devices="$2"; shift 2 ;;
    -t|--timeout) timeout_s="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_multihost: unknown option $1 (commands go after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "launch_multihost: no command given after --" >&2; usage; }
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || { echo "launch_multihost: --num-processes=$num_processes must be a positive int" >&2; exit 2; }
local_count="${local_count:-$((num_processes - first_id))}"
if (( first_id < 0 || local_count < 1 || first_id + local_count > num_processes )); then
  echo "launch_multihost: processes $first_id..$((first_id + local_count - 1)) are not within 0..$((num_processes - 1))" >&2
  exit 2
fi
if [[ -z "$coordinator" ]]; then
  if (( local_count != num_processes )); then
    echo "launch_multihost: with processes on several hosts, pass --coordinator host0:port" >&2; exit 2
  fi
  # A free port, chosen by the OS; the coordinator binds it a moment later.
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
  coordinator="localhost:$port"
fi

export RIDGELINE_COORDINATOR="$coordinator" RIDGELINE_NUM_PROCESSES="$num_processes"
if [[ -n "$cpu_devices" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$cpu_devices" JAX_PLATFORMS=cpu
fi
runner=()
(( timeout_s > 0 )) && runner=(timeout --kill-after=10 "$timeout_s")

# Job control: each process starts in its own process group, so stopping it also stops its children.
set -m
pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM

for ((id = first_id; id < first_id + local_count; id++)); do
  RIDGELINE_PROCESS_ID="$id" "${runner[@]}" "$@" > >(sed -u "s/^/[p$id] /") 2>&1 &
  pids+=("$!")
done
echo "launch_multihost: started processes $first_id..$((first_id + local_count - 1)) of $num_processes (coordinator $coordinator)" >&2

# Wait for all; on the first failure stop the rest (a peer stuck in a collective would never return).
status=0 remaining=${#pids[@]}
declare -A done_pids=()
while (( remaining > 0 )); do
  for p in "${pids[@]}"; do
    [[ -n "${done_pids[$p]:-}" ]] && continue
    kill -0 "$p" 2>/dev/null && continue
    rc=0; wait "$p" || rc=$?
    done_pids[$p]=1; remaining=$((remaining - 1))
    if (( rc != 0 && status == 0 )); then
      status=$rc
      echo "launch_multihost: a process exited with code $rc; stopping the others" >&2
      stop_all
    fi
  done
  (( remaining > 0 )) && sleep 0.2
done
wait  # the output prefixers
exit "$status"
