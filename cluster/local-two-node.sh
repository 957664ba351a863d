#!/usr/bin/env bash
# Two Ray nodes on this one machine, as separate processes: a head (with the TUNE_DRIVER
# resource the sweeps' trial drivers use) and a second node that joins it. For trying the
# multi-node path without a cluster (tests/test_two_nodes.py runs it):
#
#   cluster/local-two-node.sh start      # prints the address to pass as --address
#   python -m tvlars_ray.run grid --address 127.0.0.1:6390 --set ...
#   cluster/local-two-node.sh stop
#
# Each node declares its own CPUs (CPUS_PER_NODE, default 2); both see this machine's disk,
# so a local --store is shared. Ports and the temp dir are set so nothing collides with a
# Ray started by `ray.init()` on the same machine.
set -euo pipefail
RAY=${RAY:-ray}
PORT=${PORT:-6390}
CPUS_PER_NODE=${CPUS_PER_NODE:-2}
TEMP_DIR=${TEMP_DIR:-/tmp/tvlars-2node}
HEAD_METRICS=${HEAD_METRICS:-28080}
WORKER_METRICS=${WORKER_METRICS:-28081}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

case "${1:-}" in
  start)
    mkdir -p "$TEMP_DIR"
    setsid -w "$RAY" start --head --port="$PORT" --num-cpus="$CPUS_PER_NODE" --num-gpus=0 \
      --resources='{"TUNE_DRIVER": 100}' --temp-dir="$TEMP_DIR" \
      --include-dashboard=false --metrics-export-port="$HEAD_METRICS" \
      --dashboard-agent-listen-port=28090 \
      --disable-usage-stats >/dev/null
    # each node's processes in a process group of their own, so that one node can be killed
    # as a whole (the lost-node test does) without touching the other or the caller
    setsid -w "$RAY" start --address="127.0.0.1:$PORT" --num-cpus="$CPUS_PER_NODE" --num-gpus=0 \
      --metrics-export-port="$WORKER_METRICS" --dashboard-agent-listen-port=28091 \
      --disable-usage-stats >/dev/null
    # the two nodes' sessions, for `stop`: every process of a node (its raylet, agents and
    # workers included) stays in the session its `ray start` began
    pgrep -f -- "$TEMP_DIR" | xargs -r ps -o sid= -p | sort -u > "$TEMP_DIR/sessions"
    echo "127.0.0.1:$PORT"
    ;;
  stop)
    # only these two nodes: `ray stop` would end every Ray on the machine, a user's own too
    mine=$(ps -o sid= -p $$ | tr -d ' ')
    sessions=$(tr -d ' ' < "$TEMP_DIR/sessions" 2>/dev/null | grep -vx "$mine" || true)
    for sid in $sessions; do pkill -TERM -s "$sid" || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      left=0
      for sid in $sessions; do pgrep -s "$sid" >/dev/null && left=1; done
      [ "$left" = 0 ] && break
      sleep 0.5
    done
    for sid in $sessions; do pkill -KILL -s "$sid" || true; done
    rm -f "$TEMP_DIR/sessions"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
