#!/usr/bin/env bash
# `make demo`: the whole cluster on 127.0.0.1, every process separate, two zones.
#
# Starts a throwaway PostgreSQL unless DATABASE_URL is set (scripts/with-postgres.sh), then the
# scheduler, a witness generator, a WVG and a prover in zone "a", a WVG and a prover in zone "b",
# and the compressor; drops the sample batches in the gateway's inbox, runs the gateway until
# every batch has ended (live progress per round), verifies every final proof with
# `proofmesh-compressor verify`, prints a table, stops everything and exits non-zero if any batch
# failed or any proof did not verify.
#
# Settings (environment): GEOMETRY (default|small, default "default"), SETUP_DIR (.setup-cache),
# DEMO_DIR (out/demo), DEMO_PORT (scheduler port, 50151; the ports above it are used too),
# SAMPLES (samples), and:
#   ARTIFACTS     the artifact store: unset, a directory under DEMO_DIR; `s3://BUCKET/PREFIX?...`
#                 a bucket of yours (credentials from the AWS variables); `moto`, a throwaway
#                 S3-protocol server (moto_server from .venv, scripts/test-tools.sh) and bucket.
#   GATEWAY_MODE  how batches come in: `inbox` (files, the default); `client` (the gateway polls a
#                 simulated L2 node, scripts/l2-node-sim.py serve, and posts proofs back);
#                 `server` (the simulated node pushes batches to the gateway and polls for proofs).
#   TLS           `on` (the default): mutual TLS on every gRPC connection, each process with its
#                 own certificate (CN=<its name>) from a throwaway CA (proofmesh-dev-ca, in
#                 DEMO_DIR/tls); `off`: plaintext.
#
# Every process it starts is stopped when it ends, however it ends (SIGTERM, then SIGKILL after
# 10 s; scripts/procs.sh). It fails at once, naming the port and its holder, if a port it needs
# is taken (DEMO_PORT; + 1, + 2, + 3 in the modes that use them), and, with the last lines of its
# log, if a process it started exits before the end or does not listen where it should.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCS_TAG=demo
source scripts/procs.sh

GEOMETRY="${GEOMETRY:-default}"
SETUP_DIR="${SETUP_DIR:-.setup-cache}"
DEMO_DIR="${DEMO_DIR:-out/demo}"
PORT="${DEMO_PORT:-50151}"
SAMPLES="${SAMPLES:-samples}"
BIN=target/debug
SCHED="http://127.0.0.1:$PORT"
MOTO_PORT=$((PORT + 3)) NODE_PORT=$((PORT + 1)) GATEWAY_PORT=$((PORT + 2))

TLS="${TLS:-on}"
case "$TLS" in on|off) ;; *) echo "TLS must be on or off" >&2; exit 2;; esac
GATEWAY_MODE="${GATEWAY_MODE:-inbox}"
case "$GATEWAY_MODE" in inbox|client|server) ;; *) echo "GATEWAY_MODE must be inbox, client or server" >&2; exit 2;; esac

# Before anything starts (PostgreSQL included): every port this run will listen on is free.
# (A scheduler left over from an earlier run would otherwise answer in place of this one's.)
proc_port_free "$PORT" "the scheduler's, DEMO_PORT"
if [[ "${ARTIFACTS:-}" == moto ]]; then proc_port_free "$MOTO_PORT" "moto_server's, DEMO_PORT + 3"; fi
if [[ "$GATEWAY_MODE" == client ]]; then proc_port_free "$NODE_PORT" "the simulated L2 node's, DEMO_PORT + 1"; fi
if [[ "$GATEWAY_MODE" == server ]]; then proc_port_free "$GATEWAY_PORT" "the gateway's, DEMO_PORT + 2"; fi

if [[ -z "${DATABASE_URL:-}" ]]; then
  exec scripts/with-postgres.sh "$0" "$@"
fi

rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"/{data,inbox,outbox,logs} "$SETUP_DIR"
LOGS="$DEMO_DIR/logs"
proc_traps   # from here on, every exit stops every process started

DATA="${ARTIFACTS:-$DEMO_DIR/data}"
if [[ "$DATA" == moto ]]; then
  [[ -x .venv/bin/moto_server ]] || scripts/test-tools.sh
  proc_start moto "$LOGS/moto.log" .venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT"
  proc_wait_listening moto "$PROC_PID" "$MOTO_PORT"
  export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_EC2_METADATA_DISABLED=true
  .venv/bin/python -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$MOTO_PORT', region_name='us-east-1').create_bucket(Bucket='proofmesh-demo')"
  DATA="s3://proofmesh-demo/demo?endpoint=http://127.0.0.1:$MOTO_PORT&region=us-east-1"
fi
echo "== artifacts: $DATA; gateway mode: $GATEWAY_MODE"

NAMES=(scheduler wg-a wvg-a prover-a wvg-b prover-b compressor gateway)
if [[ "$TLS" == on ]]; then
  certs=(); for n in "${NAMES[@]}"; do certs+=("$n=CN=$n"); done
  "$BIN/proofmesh-dev-ca" "$DEMO_DIR/tls" "${certs[@]}" operator=CN=operator >/dev/null
  echo "== TLS: on, a certificate per process (CN=<name>) in $DEMO_DIR/tls; $DEMO_DIR/tls/operator.pem is an admin's"
else
  echo "== TLS: off"
fi

start() { # [-o] name, program, args...: in the background, with its own certificate when TLS
  # is on, its output in $LOGS/<name>.log (-o: only its stderr); $PROC_PID is the program's PID.
  local o=()
  if [[ "$1" == -o ]]; then o=(-o); shift; fi
  local name=$1; shift
  local tls=()
  if [[ "$TLS" == on ]]; then
    tls=(env PROOFMESH_TLS_CERT="$DEMO_DIR/tls/$name.pem" PROOFMESH_TLS_KEY="$DEMO_DIR/tls/$name.key"
      PROOFMESH_TLS_CA="$DEMO_DIR/tls/ca.pem")
  fi
  proc_start "${o[@]}" "$name" "$LOGS/$name.log" "${tls[@]}" "$@"
}

echo "== scheduler on $SCHED (geometry $GEOMETRY), logs in $LOGS"
proc_port_free "$PORT" "the scheduler's, DEMO_PORT"
start scheduler "$BIN/proofmesh-scheduler" --listen "127.0.0.1:$PORT" --database-url "$DATABASE_URL" \
  --artifacts "$DATA" --geometry "$GEOMETRY" --admin-subject "CN=operator"
proc_wait_listening scheduler "$PROC_PID" "$PORT" 60

worker() { # name, role, zone, extra args...
  local name=$1 role=$2 zone=$3; shift 3
  start "$name" "$BIN/proofmesh-worker" --role "$role" --name "$name" --zone "$zone" --region demo \
    --scheduler "$SCHED" --artifacts "$DATA" --setup-dir "$SETUP_DIR" "$@"
}
echo "== workers: zone a: witness-generator, wvg, prover; zone b: wvg, prover; compressor"
worker wg-a witness-generator a
worker wvg-a wvg a
# Capacity 1: two provers already keep both cores of a small machine busy; more concurrent
# proofs would only share the cores (plonky2 parallelizes each proof).
worker prover-a prover a
worker wvg-b wvg b --host demo-host-b
worker prover-b prover b --host demo-host-b
start compressor "$BIN/proofmesh-compressor" --setup-dir "$SETUP_DIR" run --scheduler "$SCHED" --artifacts "$DATA" --name compressor

# Results land in $DEMO_DIR/outbox in every mode: the gateway's outbox, or the simulated
# node's --out (the same file names: batch_N.proof, batch_N.json, batch_N.error).
echo "== gateway: proving $(ls "$SAMPLES"/batch_*.bin | wc -l) batches (the first run also builds setup data into $SETUP_DIR)"
# Whatever is waited for here runs in the background (a signal to this script stops it at once),
# and if any other process of the cluster exits meanwhile the demo fails there, with its log.
gateway_status=0
case "$GATEWAY_MODE" in
  inbox)
    for f in "$SAMPLES"/batch_*.bin; do
      cp "$f" "$DEMO_DIR/inbox/.$(basename "$f")"
      mv "$DEMO_DIR/inbox/.$(basename "$f")" "$DEMO_DIR/inbox/$(basename "$f")"
    done
    start -o gateway "$BIN/proofmesh-gateway" --scheduler "$SCHED" --artifacts "$DATA" --inbox "$DEMO_DIR/inbox" \
      --outbox "$DEMO_DIR/outbox" --once --progress
    proc_wait_watching "$PROC_PID" || gateway_status=$?
    ;;
  client)
    proc_port_free "$NODE_PORT" "the simulated L2 node's, DEMO_PORT + 1"
    proc_start l2-node "$LOGS/l2-node.log" python3 scripts/l2-node-sim.py serve --listen "127.0.0.1:$NODE_PORT" \
      --batches "$SAMPLES" --out "$DEMO_DIR/outbox" --exit-when-done
    node=$PROC_PID
    proc_wait_listening l2-node "$node" "$NODE_PORT"
    start gateway "$BIN/proofmesh-gateway" --mode client --scheduler "$SCHED" --artifacts "$DATA" \
      --l2-node-url "http://127.0.0.1:$NODE_PORT"
    proc_wait_watching "$node" || gateway_status=$?
    ;;
  server)
    proc_port_free "$GATEWAY_PORT" "the gateway's, DEMO_PORT + 2"
    start gateway "$BIN/proofmesh-gateway" --mode server --scheduler "$SCHED" --artifacts "$DATA" \
      --listen "127.0.0.1:$GATEWAY_PORT"
    proc_wait_listening gateway "$PROC_PID" "$GATEWAY_PORT"
    proc_start l2-node "$LOGS/l2-node.log" python3 scripts/l2-node-sim.py push --gateway "http://127.0.0.1:$GATEWAY_PORT" \
      --batches "$SAMPLES" --out "$DEMO_DIR/outbox"
    proc_wait_watching "$PROC_PID" || gateway_status=$?
    ;;
esac

# One row per batch: circuits per round, proof size and wall time from the gateway's JSON
# summary, and the verdict of an independent `verify` of the proof against the batch file.
json_field() { sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$1" | head -n 1; }
failed=0
echo
echo "circuits per round: basic/leaf/node/recursion tip/scheduler/compression"
printf "%-8s %-22s %-12s %-10s %-9s\n" batch "circuits per round" "proof bytes" "wall s" verified
for f in "$SAMPLES"/batch_*.bin; do
  stem=$(basename "$f" .bin)
  json="$DEMO_DIR/outbox/$stem.json"; proof="$DEMO_DIR/outbox/$stem.proof"
  if [[ -f "$proof" && -f "$json" ]]; then
    circuits=$(sed -n 's/^ *"circuits": *\([0-9]*\).*/\1/p' "$json" | paste -sd/ -)
    if "$BIN/proofmesh-compressor" --setup-dir "$SETUP_DIR" verify --proof "$proof" --batch "$f" >"$LOGS/verify-$stem.log" 2>&1; then
      verified=yes
    else
      verified=NO; failed=1
    fi
    printf "%-8s %-22s %-12s %-10s %-9s\n" "$(json_field "$json" batch_number)" "$circuits" \
      "$(json_field "$json" proof_bytes)" "$(json_field "$json" wall_secs | cut -c1-7)" "$verified"
  else
    printf "%-8s %-22s %-12s %-10s %-9s\n" "$stem" "-" "-" "-" "FAILED: $(head -c 120 "$DEMO_DIR/outbox/$stem.error" 2>/dev/null)"
    failed=1
  fi
done
if [[ $gateway_status -ne 0 || $failed -ne 0 ]]; then
  echo "demo: some batch failed (gateway exit $gateway_status); logs in $LOGS" >&2
  exit 1
fi
echo "demo: every batch proven and verified"
