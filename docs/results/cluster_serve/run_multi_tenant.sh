#!/bin/bash
# Issue 18's must-show through `kvengine cluster` itself, three tenants (API keys), one system at a time:
# 1 replica; 2 replicas --router round_robin; 2 replicas --router prefix. Each system gets a fresh
# redis-server (the shared tier, emptied between systems), then `kvengine bench serve` runs the
# shared-prefix and the multi-turn workload for 30 s each; the cluster's /metrics is read after each.
# Usage: docs/results/cluster_serve/run_multi_tenant.sh MODEL_DIR OUT_DIR   (from the repository root)
# TIERS=none runs the same without the Redis tier (pool only); SYSTEMS picks systems ("2:round_robin 2:prefix").
set -u
set -m  # job control: background jobs keep SIGINT, so `kill -INT` is the cluster's Ctrl-C
MODEL=${1:-/tmp/h18/tiny}
OUT=${2:-/tmp/h18b/out}
PORT=${PORT:-18410}
REDIS_PORT=${REDIS_PORT:-18479}
TIERS=${TIERS:-redis}
SYSTEMS=${SYSTEMS:-"1:prefix 2:round_robin 2:prefix"}
KEYS=(sk-tenant-a sk-tenant-b sk-tenant-c)
mkdir -p "$OUT"
SECRET=$OUT/tier-secret
[ -f "$SECRET" ] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET")
KEY_FLAGS=(); for k in "${KEYS[@]}"; do KEY_FLAGS+=(--api-key "$k"); done
TIER_FLAGS=()
[ "$TIERS" = redis ] && TIER_FLAGS=(--tiers redis --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --tier-secret-file "$SECRET")
log() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) | $*" | tee -a "$OUT/progress.txt"; }

start_cluster() {  # $1 replicas, $2 router, $3 log file; sets CPID; returns 0 once /v1/models answers
  nice -n 15 .venv/bin/kvengine cluster "$MODEL" --dtype float32 --served-model-name tiny \
    --replicas "$1" --router "$2" --port "$PORT" --num-cpus-per-replica 1 --local-num-cpus 3 \
    --prefix-cache "${TIER_FLAGS[@]}" "${KEY_FLAGS[@]}" > "$3" 2>&1 &
  CPID=$!
  for _ in $(seq 1 300); do
    kill -0 $CPID 2>/dev/null || return 1
    code=$(curl -s -o /dev/null -w "%{http_code}" -H "Authorization: Bearer ${KEYS[0]}" \
      "http://127.0.0.1:$PORT/v1/models" 2>/dev/null)
    [ "$code" = 200 ] && return 0
    sleep 2
  done
  return 1
}

stop_cluster() {
  kill -INT $CPID 2>/dev/null
  for _ in $(seq 1 60); do kill -0 $CPID 2>/dev/null || break; sleep 1; done
  kill -0 $CPID 2>/dev/null && kill -TERM $CPID
  wait $CPID 2>/dev/null
}

for system in $SYSTEMS; do
  set -- ${system/:/ }
  tag="r$1_$2"
  RPID=
  if [ "$TIERS" = redis ]; then  # a fresh, empty Redis per system
    redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
      > "$OUT/redis_$tag.log" 2>&1 &
    RPID=$!
    sleep 1
  fi
  t0=$(date +%s)
  up=no
  for attempt in 1 2 3; do
    log "$tag: starting kvengine cluster (attempt $attempt)"
    if start_cluster "$1" "$2" "$OUT/cluster_${tag}_$attempt.log"; then up=yes; break; fi
    log "$tag: cluster did not come up: $(grep -m1 -o 'timed out during startup' "$OUT/cluster_${tag}_$attempt.log")"
    stop_cluster
  done
  [ $up = yes ] || { log "$tag: giving up"; [ -n "$RPID" ] && kill $RPID; continue; }
  log "$tag: up after $(( $(date +%s) - t0 )) s"
  for wl in shared-prefix multi-turn; do
    log "$tag $wl: start"
    nice -n 15 .venv/bin/kvengine bench serve --url "http://127.0.0.1:$PORT" "${KEY_FLAGS[@]}" \
      --workload $wl --clients 4 --duration-s 30 --prompt-len-range 8,16 --max-tokens-range 4,8 \
      --shared-prefix-len 50 --num-groups 8 --turns 4 --seed 0 --out "$OUT/$tag/$wl" \
      > "$OUT/bench_${tag}_$wl.log" 2>&1
    log "$tag $wl: rc=$?"
    curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics_${tag}_after_$wl.txt"
  done
  stop_cluster
  [ -n "$RPID" ] && { kill $RPID; wait $RPID 2>/dev/null; }
  log "$tag: stopped"
done
log "all done"
