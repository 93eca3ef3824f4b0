#!/usr/bin/env bash
# Take down the Ray node(s) started on this machine with ray_head.sh / ray_worker.sh.
#
# Usage:
#   recipes/launch/ray_down.sh                              # `ray stop`: every Ray process of this user here
#   RAY_TEMP_DIR=/tmp/ray-a recipes/launch/ray_down.sh      # only the node(s) started with that RAY_TEMP_DIR
#   RAY_TEMP_DIR="/tmp/ray-head /tmp/ray-worker" recipes/launch/ray_down.sh
#
# With RAY_TEMP_DIR, other Ray instances on the machine are left alone (a shared box, a test next to a running job):
# the processes whose command line names one of the temp dirs (GCS, raylet, dashboard, log monitor, ...) and all
# their descendants (agents, workers, whose titles no longer name it) get SIGTERM, then SIGKILL after GRACE_S
# seconds (default 10). Exits non-zero if any of them is still alive at the end.
#
# Environment: RAY_TEMP_DIR, GRACE_S, RAY (the ray CLI; default: ray), DRY_RUN=1 (list the processes only).
set -euo pipefail

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }

if [[ -z ${RAY_TEMP_DIR:-} ]]; then
    [[ -n ${DRY_RUN:-} ]] && { echo "${RAY:-ray} stop"; exit 0; }
    exec "${RAY:-ray}" stop
fi

# pid ppid args of every process, once; the tree is walked in awk.
ours() {
    # The dirs reach awk through its environment: on its command line, awk itself would match.
    # -ww: full command lines whatever COLUMNS says (ps cuts them to its width otherwise, and the dir may be past it).
    ps -ww -eo pid=,ppid=,args= | awk -v self=$$ '
        BEGIN { n = split(ENVIRON["RAY_TEMP_DIR"], d, " ") }
        { pid = $1; ppid[pid] = $2; line = $0; sub(/^ *[0-9]+ +[0-9]+ /, "", line); args[pid] = line }
        END {
            for (p in args) if (p != self) for (i = 1; i <= n; i++) if (index(args[p], d[i])) mark[p] = 1
            do { grew = 0; for (p in args) if (!(p in mark) && (ppid[p] in mark)) { mark[p] = 1; grew = 1 } } while (grew)
            for (p in mark) print p
        }'
}

mapfile -t pids < <(ours)
if [[ ${#pids[@]} -eq 0 ]]; then
    echo "no Ray processes under $RAY_TEMP_DIR" >&2
    exit 0
fi
if [[ -n ${DRY_RUN:-} ]]; then
    ps -ww -o pid=,args= -p "$(IFS=,; echo "${pids[*]}")" | cut -c1-160 || true
    exit 0
fi
kill -TERM "${pids[@]}" 2>/dev/null || true
for _ in $(seq $((${GRACE_S:-10} * 5))); do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [[ ${#alive[@]} -eq 0 ]] && break
    sleep 0.2
done
[[ ${#alive[@]} -eq 0 ]] || kill -KILL "${alive[@]}" 2>/dev/null || true
sleep 0.5
left=()
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
# A process killed just now can linger as a zombie of its (also killed) parent for a moment; only live ones count.
still=()
for pid in "${left[@]}"; do [[ $(ps -o stat= -p "$pid" 2>/dev/null) == Z* ]] || still+=("$pid"); done
if [[ ${#still[@]} -gt 0 ]]; then
    echo "error: still running: ${still[*]}" >&2
    exit 1
fi
echo "stopped ${#pids[@]} Ray processes under $RAY_TEMP_DIR" >&2
