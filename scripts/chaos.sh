#!/usr/bin/env bash
# `make chaos`: the cluster of `make demo` proves batches while this script breaks it:
#   kill -9 a WVG holding a lease (synthesizing or streaming), a prover mid-proof, a witness
#   generator mid-job, the compressor mid-compression (each restarted at once, as Kubernetes
#   would); a WVG stage that hangs while its heartbeats go on (its input read blocks on a FIFO,
#   as on a hung network mount: the stage timeout ends it); a round-0 proof deleted from the
#   store and another corrupted after their jobs succeeded (the witness generators scaled to
#   zero at the round boundary, so the next round has not read them yet); kill -9 the scheduler
#   and keep it down for twice the lease timeout; stop PostgreSQL with `-m immediate` and start
#   it again; in the full run also a 2 s scheduler restart and a prover SIGSTOPped past its lease
#   deadline, then SIGCONTed (its late result must not make a second success).
# Mutual TLS is on (every process its own certificate, CN=<its name>, from a throwaway CA made
# by proofmesh-dev-ca; CHAOS_TLS=off: plaintext), and every default that matters is the
# production one, `--max-attempts` 3 among them. Then it
# checks, from the database and the outbox: every batch proven and its proof verified
# (`proofmesh-compressor verify`), every job succeeded exactly once (the lease history), no lease
# left open, no batch failed, and no attempt spent but by the faults that kill or hang a
# worker's job (`attempts_spent_by_faults`: the jobs' attempts beyond their first; the
# scheduler's and PostgreSQL's outages and the lost artifacts must cost none). It prints, per
# fault, how long the job it hit took to be leased again and to succeed, and one line
#   chaos: batches=N verified=N lost=0 duplicated=0 failed=0 attempts_spent_by_faults=K
# and exits non-zero otherwise.
#
#   scripts/chaos.sh           three batches (4, 24 and 12 transactions, made by gen-batch to fit
#                              the small geometry), production lease settings (30 s leases, 5 s
#                              heartbeats, 10 s reconnect grace)
#   scripts/chaos.sh --short   one batch of 4 transactions, 6 s leases, 0.5 s heartbeats, 2 s
#                              grace, 15 s WVG stage timeout, no SIGSTOP and no 2 s scheduler
#                              restart (the end of make test)
#
# Settings (environment): SETUP_DIR (.setup-cache), CHAOS_DIR (out/chaos), CHAOS_PORT (50251),
# CHAOS_TLS (on; it needs target/debug/proofmesh-dev-ca: `make chaos` and `make test` build it).
# Runs its own PostgreSQL through scripts/with-postgres.sh (it restarts it). Every process it
# starts is stopped when it ends, however it ends (scripts/procs.sh); it fails at once if
# CHAOS_PORT is taken, or if the scheduler it started does not listen there.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCS_TAG=chaos
source scripts/procs.sh
PORT="${CHAOS_PORT:-50251}"
proc_port_free "$PORT" "the scheduler's, CHAOS_PORT"

if [[ -z "${WITH_POSTGRES_CTL:-}" ]]; then
  # It restarts PostgreSQL, so it always runs its own throwaway server.
  [[ -z "${DATABASE_URL:-}" ]] || echo "chaos: ignoring DATABASE_URL: it runs (and restarts) its own PostgreSQL" >&2
  unset DATABASE_URL
  exec scripts/with-postgres.sh "$0" "$@"
fi

SHORT=0
[[ "${1:-}" == "--short" ]] && SHORT=1
if [[ $SHORT -eq 1 ]]; then
  LEASE=6; HEARTBEAT_MS=500; GRACE=2; TXS=(4); STAGE_TIMEOUT=15
else
  LEASE=30; HEARTBEAT_MS=5000; GRACE=10; TXS=(4 24 12); STAGE_TIMEOUT=60
fi
SETUP_DIR="${SETUP_DIR:-.setup-cache}"
DIR="${CHAOS_DIR:-out/chaos}"
BIN=target/debug
SCHED="http://127.0.0.1:$PORT"
rm -rf "$DIR"
mkdir -p "$DIR"/{data,inbox,outbox,logs,batches} "$SETUP_DIR"
DATA="$DIR/data"; LOGS="$DIR/logs"
TLS="${CHAOS_TLS:-on}"
case "$TLS" in on|off) ;; *) echo "chaos: CHAOS_TLS must be on or off" >&2; exit 2;; esac
if [[ "$TLS" == on ]]; then
  [[ -x "$BIN/proofmesh-dev-ca" ]] || { echo "chaos: CHAOS_TLS=on needs $BIN/proofmesh-dev-ca:" \
    "cargo build -p proofmesh-proto --features test-ca --bin proofmesh-dev-ca (or CHAOS_TLS=off)" >&2; exit 2; }
  certs=(); for n in scheduler wg-a wvg-a prover-a wvg-b prover-b compressor gateway; do certs+=("$n=CN=$n"); done
  "$BIN/proofmesh-dev-ca" "$DIR/tls" "${certs[@]}" >/dev/null
fi
tls_env() { # name: the environment that gives the process its certificate (nothing with TLS off)
  [[ "$TLS" == on ]] && echo env "PROOFMESH_TLS_CERT=$DIR/tls/$1.pem" "PROOFMESH_TLS_KEY=$DIR/tls/$1.key" "PROOFMESH_TLS_CA=$DIR/tls/ca.pem"
}
gen_args=(); for t in "${TXS[@]}"; do gen_args+=(--txs "$t"); done
"$BIN/proofmesh-circuits" gen-batch --out "$DIR/batches" --seed 7 "${gen_args[@]}" >"$LOGS/gen-batch.log"
mapfile -t BATCHES < <(seq "${#TXS[@]}")

sql() { "$WITH_POSTGRES_PSQL" "$DATABASE_URL" -Atq -v ON_ERROR_STOP=1 -c "$1" 2>>"$LOGS/sql.log"; }
now() { date +%s.%N; }
T0=$(now)
say() { printf "[%6.1f s] %s\n" "$(awk -v a="$(now)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }

declare -A CMD PID
start() { # name, command... (no argument with a space: restart splits it again)
  local name=$1; shift
  # shellcheck disable=SC2046
  set -- $(tls_env "$name") "$@"
  CMD[$name]="$*"
  proc_start "$name" "$LOGS/$name.log" "$@"
  PID[$name]=$PROC_PID
}
restart() { # name: the same command again (as a Deployment would)
  local name=$1
  # shellcheck disable=SC2086
  proc_start "$name" "$LOGS/$name.log" ${CMD[$name]}
  PID[$name]=$PROC_PID
}
proc_traps   # from here on, every exit stops every process started (SIGCONT first: one may be frozen)

# The scheduler; then a check that the process listening on PORT is the one started here.
proc_port_free "$PORT" "the scheduler's, CHAOS_PORT"
start scheduler "$BIN/proofmesh-scheduler" --listen "127.0.0.1:$PORT" --database-url "$DATABASE_URL" \
  --artifacts "$DATA" --geometry small --lease-timeout-secs "$LEASE" --heartbeat-interval-ms "$HEARTBEAT_MS" \
  --reconnect-grace-secs "$GRACE"
proc_wait_listening scheduler "${PID[scheduler]}" "$PORT" 60
worker() { # name, role, zone, extra args...
  local name=$1 role=$2 zone=$3; shift 3
  start "$name" "$BIN/proofmesh-worker" --role "$role" --name "$name" --zone "$zone" --region chaos \
    --scheduler "$SCHED" --artifacts "$DATA" --setup-dir "$SETUP_DIR" --drain-grace-secs 5 "$@"
}
worker wg-a witness-generator a
worker wvg-a wvg a --stage-timeout-secs "$STAGE_TIMEOUT"
worker prover-a prover a
worker wvg-b wvg b --host chaos-host-b --stage-timeout-secs "$STAGE_TIMEOUT"
worker prover-b prover b --host chaos-host-b
start compressor "$BIN/proofmesh-compressor" --setup-dir "$SETUP_DIR" run --scheduler "$SCHED" --artifacts "$DATA" --name compressor

# Witness generation at this geometry takes milliseconds, too short to catch by looking: the
# witness generator is frozen before the batches arrive, so it is surely holding its first lease
# when it is killed.
for _ in $(seq 300); do [[ "$(sql "SELECT count(*) FROM workers WHERE name = 'wg-a'")" == 1 ]] && break; sleep 0.1; done
sleep 1   # its credit follows the registration
kill -STOP "${PID[wg-a]}"
for n in "${BATCHES[@]}"; do
  f=$(printf "$DIR/batches/batch_%06d.bin" "$n")
  cp "$f" "$DIR/inbox/.$(basename "$f")" && mv "$DIR/inbox/.$(basename "$f")" "$DIR/inbox/$(basename "$f")"
done
# A run that hangs is a failure, not a CI timeout: the gateway gets 15 min (short) or 30.
# (-k 5: if this script stops it early, timeout passes the SIGTERM on, then SIGKILLs after 5 s.)
# shellcheck disable=SC2046
proc_start -o gateway "$LOGS/gateway.log" $(tls_env gateway) timeout -k 5 "$(( SHORT == 1 ? 900 : 1800 ))" "$BIN/proofmesh-gateway" \
  --scheduler "$SCHED" --artifacts "$DATA" --inbox "$DIR/inbox" --outbox "$DIR/outbox" --once >"$LOGS/gateway.out"
GATEWAY=$PROC_PID
say "cluster up: batches ${BATCHES[*]}, leases ${LEASE} s, heartbeats ${HEARTBEAT_MS} ms, reconnect grace ${GRACE} s, mutual TLS $TLS"

HIT="0"     # jobs already hit by a fault: each fault hits another job
# Waits (up to $3 s) until a worker named $1* holds a lease of kind $2; prints "name lease job".
wait_holder() {
  local until=$(( $(date +%s) + $3 )) row
  while (( $(date +%s) < until )); do
    row=$(sql "SELECT w.name, j.lease_id, j.id FROM jobs j JOIN workers w ON w.id = j.leased_to
               WHERE j.status = 'leased' AND j.kind = '$2' AND w.name LIKE '$1%' AND j.id NOT IN ($HIT)
               ORDER BY j.leased_at LIMIT 1" | tr '|' ' ')
    if [[ -n "$row" ]]; then echo "$row"; return 0; fi
    kill -0 "$GATEWAY" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

FAULTS=()   # "label|job_id|fault_time|lease_id"
SPENDING=0  # faults that may spend an attempt of the job they hit (a worker killed or hung)
record() { FAULTS+=("$1|$2|$3|${4:-}"); [[ -z "$2" ]] || HIT="$HIT,$2"; }
# Waits (up to 120 s) until the cluster recovered from the fault at time $2: job $1 leased again
# or finished, or (no job) any lease granted; so each fault's delay is measured on its own.
recovered() {
  local until=$(( $(date +%s) + 120 )) cond
  if [[ -n "$1" ]]; then
    cond="SELECT EXISTS (SELECT 1 FROM leases WHERE job_id = $1 AND extract(epoch FROM granted_at) > $2)
                 OR EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND status = 'succeeded')"
  else
    cond="SELECT EXISTS (SELECT 1 FROM leases WHERE extract(epoch FROM granted_at) > $2)
                 OR NOT EXISTS (SELECT 1 FROM batches WHERE status = 'proving')"
  fi
  while (( $(date +%s) < until )); do
    [[ "$(sql "$cond")" == t ]] && return 0
    sleep 0.2
  done
}
kill9() { { kill -9 "$1"; wait "$1"; } 2>/dev/null || true; proc_forget "$1"; }

kill_holder() { # label, name prefix, kind, timeout
  local row name lease job t
  if ! row=$(wait_holder "$2" "$3" "$4"); then say "SKIPPED $1: no $2 held a $3 lease in time"; SKIPPED=$((SKIPPED + 1)); return; fi
  read -r name lease job <<<"$row"
  kill9 "${PID[$name]}"; t=$(now)
  say "$1: kill -9 $name holding lease $lease (job $job)"
  restart "$name"
  record "$1" "$job" "$t" "$lease"
  SPENDING=$((SPENDING + 1))
  recovered "$job" "$t"
}

# Waits (up to $2 s) until the SQL condition $1 holds.
wait_sql() {
  local until=$(( $(date +%s) + $2 ))
  while (( $(date +%s) < until )); do
    [[ "$(sql "$1")" == t ]] && return 0
    kill -0 "$GATEWAY" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# A hung stage: the circuit input of a queued proving job is swapped (rename, atomic) for a
# FIFO with no writer, so the WVG that takes the job blocks reading it, as on a hung network
# mount, while its heartbeats go on and keep the lease. Its stage timeout must end the lease as
# a failure (not an expiry) and the job run again. A writer opens the FIFO (which blocks until
# the WVG's read opens it) and then puts the real file back at once, so the rerun reads it
# whenever it comes; once the hung lease has ended, the writer exits and the blocked read gets
# its EOF. A job leased before
# the swap (the race lost) is left alone and another taken. Runs in the background (the other
# faults go on); its verdict is read back from $DIR/hang: "JOB GRANTED LEASE" or "SKIPPED ...".
hang_stage() {
  local row job="" key="" opener="" lease granted swapped until=$(( $(date +%s) + 300 ))
  mkfifo "$DIR/hang.fifo"
  ln "$DIR/hang.fifo" "$DIR/hang.fifo.keep"
  while :; do
    (( $(date +%s) < until )) && kill -0 "$GATEWAY" 2>/dev/null || { echo "SKIPPED: no queued proving job to hang in time" >"$DIR/hang"; return; }
    row=$(sql "SELECT id, input_key FROM jobs WHERE kind = 'proving' AND status = 'queued' AND id NOT IN ($HIT)
               ORDER BY id DESC LIMIT 1" | tr '|' ' ') || true
    [[ -n "$row" ]] || { sleep 0.05; continue; }
    read -r job key <<<"$row"
    cp "$DATA/$key" "$DIR/hang.input"
    ln -f "$DIR/hang.fifo.keep" "$DIR/hang.fifo"
    mv "$DIR/hang.fifo" "$DATA/$key"; swapped=$(now)
    # Leased before the swap: its WVG may have read the real file. Put it back, try another.
    if [[ "$(sql "SELECT EXISTS (SELECT 1 FROM leases WHERE job_id = $job AND extract(epoch FROM granted_at) <= $swapped)")" == t ]]; then
      mv "$DIR/hang.input" "$DATA/$key"; HIT="$HIT,$job"; continue
    fi
    echo "$job" >"$DIR/hang.job"
    break
  done
  # The writer: its open returns when the hung read has opened the FIFO; it holds it open,
  # writing nothing, until it is killed.
  ( exec 3>"$DIR/hang.fifo.keep"; mv "$DIR/hang.input" "$DATA/$key"; exec sleep 1000 ) & opener=$!
  if ! wait_sql "SELECT EXISTS (SELECT 1 FROM leases WHERE job_id = $job)" 300; then
    restore_hung; echo "SKIPPED: job $job was never leased" >"$DIR/hang"; return
  fi
  # (Each query again until it answers: PostgreSQL may be restarting under this fault.)
  for _ in $(seq 300); do
    row=$(sql "SELECT lease_id, extract(epoch FROM granted_at) FROM leases WHERE job_id = $job ORDER BY granted_at LIMIT 1" | tr '|' ' ') || true
    [[ -n "$row" ]] && break; sleep 0.2
  done
  read -r lease granted <<<"$row"
  [[ -n "$lease" ]] || { restore_hung; echo "SKIPPED: the lease of job $job could not be read" >"$DIR/hang"; return; }
  wait_sql "SELECT EXISTS (SELECT 1 FROM leases WHERE lease_id = '$lease' AND outcome IS NOT NULL)" $((STAGE_TIMEOUT + 30)) || true
  restore_hung
  echo "$job $granted $lease" >"$DIR/hang"
}

# Ends hang_stage's writer (its locals `opener`, `key`: bash scopes them dynamically) (a read still blocked on the FIFO gets its EOF) and puts the real
# file back if no read ever opened the FIFO.
restore_hung() {
  kill "$opener" 2>/dev/null || true
  wait "$opener" 2>/dev/null || true
  if [[ -e "$DIR/hang.input" ]]; then mv "$DIR/hang.input" "$DATA/$key"; fi
  rm -f "$DIR/hang.fifo.keep"
}

# A round-0 proof deleted and another corrupted (one byte flipped) after their jobs succeeded
# and before the round-1 witness generation that reads them runs: the witness generator was
# stopped (SIGTERM: it drains, nothing held) when round 0's witness generation ended, so the
# round-1 jobs wait queued. Their reads must report the inputs lost (missing; checksum), the
# proofs be made again without an attempt spent, nobody struck, and the batch go on.
artifact_faults() {
  local jobs first second t
  if ! wait_sql "SELECT count(*) >= 1 FROM jobs WHERE kind = 'witness_generation' AND aggregation_round = 1 AND status = 'queued'" 300; then
    say "SKIPPED artifacts: no round-1 witness generation queued in time"; SKIPPED=$((SKIPPED + 1)); return
  fi
  # A second one, if the batch has it (to corrupt an input of it): until round 0 is proven.
  wait_sql "SELECT count(*) >= 2 FROM jobs WHERE kind = 'witness_generation' AND aggregation_round = 1 AND status = 'queued'
            OR NOT EXISTS (SELECT 1 FROM jobs WHERE kind = 'proving' AND aggregation_round = 0 AND status <> 'succeeded')" 120 || true
  mapfile -t jobs < <(sql "SELECT i.output_key || ' ' || j.id FROM jobs j JOIN job_inputs ji ON ji.job_id = j.id
                             JOIN jobs i ON i.id = ji.input_job_id
                             WHERE j.kind = 'witness_generation' AND j.aggregation_round = 1 AND j.status = 'queued'
                             ORDER BY j.id, ji.position")
  read -r first fjob <<<"${jobs[0]}"
  rm "$DATA/$first"; t=$(now)
  say "artifact deleted: $first (input of job $fjob)"
  record "round-0 proof deleted" "$fjob" "$t"
  if (( ${#jobs[@]} > 1 )); then
    read -r second sjob <<<"${jobs[1]}"
    python3 -c 'import sys; p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[len(b) // 2] ^= 0x10; open(p, "wb").write(b)' "$DATA/$second"
    say "artifact corrupted: one bit of $second flipped (input of job $sjob)"
    [[ "$sjob" == "$fjob" ]] || record "round-0 proof corrupted" "$sjob" "$t"
  fi
  restart wg-a
  recovered "$fjob" "$t"
}

SKIPPED=0
BROKEN=0    # faults whose own check failed (the short run forgives a skipped fault, not these)
kill_holder "witness generator killed mid-job" wg witness_generation 60
# If it never got the lease (skipped), it is still frozen: let it work.
kill -CONT "${PID[wg-a]}" 2>/dev/null || true
# Round 0's witness generation done: the witness generators are scaled to zero, so round 1
# waits until the artifact faults below have acted on round 0's proofs.
if wait_sql "SELECT NOT EXISTS (SELECT 1 FROM jobs WHERE kind = 'witness_generation' AND aggregation_round = 0 AND status <> 'succeeded')
             AND EXISTS (SELECT 1 FROM jobs WHERE kind = 'proving')" 300; then
  kill -TERM "${PID[wg-a]}"; { wait "${PID[wg-a]}"; } 2>/dev/null || true; proc_forget "${PID[wg-a]}"
  say "witness generators stopped (SIGTERM) at the end of round 0's witness generation"
  WG_STOPPED=1
else
  say "SKIPPED: round 0's witness generation did not end in time"; SKIPPED=$((SKIPPED + 1)); WG_STOPPED=0
fi
kill_holder "WVG killed holding a lease" wvg proving 120
[[ $WG_STOPPED -eq 1 ]] && artifact_faults
rm -f "$DIR/hang" "$DIR/hang.job"
hang_stage & HANG=$!
kill_holder "prover killed mid-proof" prover proving 120
# The job set to hang is no other fault's target.
[[ -s "$DIR/hang.job" ]] && HIT="$HIT,$(cat "$DIR/hang.job")"

scheduler_down() { # seconds: kill -9 with leases outstanding, restart after that long
  local outstanding t
  outstanding=$(sql "SELECT count(*) FROM jobs WHERE status = 'leased'")
  kill9 "${PID[scheduler]}"; t=$(now)
  say "scheduler: kill -9 ($outstanding leases outstanding), restarting in $1 s"
  sleep "$1"
  proc_port_free "$PORT" "the scheduler's, CHAOS_PORT"
  restart scheduler; proc_wait_listening scheduler "${PID[scheduler]}" "$PORT" 60
  record "scheduler killed, down for $1 s" "" "$t"
  recovered "" "$t"
}
[[ $SHORT -eq 1 ]] || scheduler_down 2
scheduler_down $((2 * LEASE))   # twice the lease timeout: no lease may expire for it

# PostgreSQL: stopped as by a power cut (no shutdown checkpoint) under load, started again.
t=$(now)
$WITH_POSTGRES_CTL -m immediate restart >/dev/null
say "PostgreSQL stopped (-m immediate) and started again"
record "PostgreSQL stopped -m immediate" "" "$t"
recovered "" "$t"

if [[ -n "$HANG" ]]; then
  wait "$HANG" || true
  [[ -s "$DIR/hang.job" ]] && HIT="$HIT,$(cat "$DIR/hang.job")"
  [[ -s "$DIR/hang" ]] || echo "SKIPPED: the hang fault ended without a verdict" >"$DIR/hang"
  read -r hjob hgranted hlease <"$DIR/hang"
  if [[ "$hjob" == SKIPPED* ]]; then
    say "SKIPPED hang: $(cat "$DIR/hang")"; SKIPPED=$((SKIPPED + 1))
  else
    say "hung stage: job $hjob (lease $hlease), its input a FIFO until its read opens it (the real file back at once)"
    record "WVG stage hung (input read blocked)" "$hjob" "$hgranted" "$hlease"
    SPENDING=$((SPENDING + 1))
    hung_outcome=$(sql "SELECT coalesce(outcome, 'open') FROM leases WHERE lease_id = '$hlease'") || hung_outcome="(unreadable)"
    [[ "$hung_outcome" == failed ]] || { say "FAILED hang: the hung lease ended '$hung_outcome', not 'failed' by the stage timeout"; BROKEN=$((BROKEN + 1)); }
  fi
fi

if [[ $SHORT -eq 0 ]]; then
  # A prover frozen past its lease deadline, then resumed.
  if row=$(wait_holder prover proving 120); then
    read -r name lease job <<<"$row"
    kill -STOP "${PID[$name]}"; t=$(now)
    say "prover paused: SIGSTOP $name holding lease $lease (job $job) for $((LEASE + 5)) s"
    sleep $((LEASE + 5))
    kill -CONT "${PID[$name]}"
    say "prover resumed: SIGCONT $name"
    record "prover paused past its deadline" "$job" "$t" "$lease"
    SPENDING=$((SPENDING + 1))
    recovered "$job" "$t"
  else
    say "SKIPPED SIGSTOP: no prover held a lease in time"; SKIPPED=$((SKIPPED + 1))
  fi
fi
kill_holder "compressor killed mid-compression" compressor compression 600

set +e
wait "$GATEWAY"; gateway_status=$?; proc_forget "$GATEWAY"
set -e
say "gateway done (exit $gateway_status)"

# Per fault, seconds after it: when the lease it hit ended (detection: the reconnect grace for
# a dead worker, the lease timeout for a frozen one), when its job was leased again (queue order
# decides) and when the job succeeded; for the scheduler and PostgreSQL, when the next lease was
# granted.
echo
printf "%-38s %-12s %-14s %-14s\n" fault "lease ended" "leased again" "job succeeded"
for f in "${FAULTS[@]}"; do
  IFS='|' read -r label job t lease <<<"$f"
  if [[ -n "$job" ]]; then
    ended="-"
    [[ -z "$lease" ]] || ended=$(sql "SELECT round(extract(epoch FROM ended_at) - $t, 1) || ' s (' || outcome || ')' FROM leases WHERE lease_id = '$lease'")
    again=$(sql "SELECT round(extract(epoch FROM min(granted_at)) - $t, 1) FROM leases WHERE job_id = $job AND extract(epoch FROM granted_at) > $t")
    done_at=$(sql "SELECT round(extract(epoch FROM finished_at) - $t, 1) FROM jobs WHERE id = $job AND status = 'succeeded'")
    printf "%-38s %-12s %-14s %-14s\n" "$label" "${ended:-open}" "${again:-never} s" "${done_at:-never} s"
  else
    again=$(sql "SELECT round(extract(epoch FROM min(granted_at)) - $t, 1) FROM leases WHERE extract(epoch FROM granted_at) > $t")
    printf "%-38s %-12s %-14s %-14s\n" "$label" "-" "next: ${again:-never} s" "-"
  fi
done
echo

# The verdict, from the outbox and the database.
verified=0
for n in "${BATCHES[@]}"; do
  stem=$(printf "batch_%06d" "$n")
  if [[ -f "$DIR/outbox/$stem.proof" ]] && "$BIN/proofmesh-compressor" --setup-dir "$SETUP_DIR" verify \
       --proof "$DIR/outbox/$stem.proof" --batch "$DIR/batches/$stem.bin" >"$LOGS/verify-$stem.log" 2>&1; then
    verified=$((verified + 1))
  fi
done
proven=$(sql "SELECT count(*) FROM batches WHERE status = 'proven'")
unfinished_jobs=$(sql "SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
duplicated=$(sql "SELECT count(*) FROM (SELECT job_id FROM leases WHERE outcome = 'succeeded' GROUP BY job_id HAVING count(*) > 1) d")
unmatched=$(sql "SELECT count(*) FROM jobs j WHERE j.status = 'succeeded'
                 AND (SELECT count(*) FROM leases l WHERE l.job_id = j.id AND l.outcome = 'succeeded') <> 1")
dangling=$(sql "SELECT count(*) FROM leases WHERE outcome IS NULL")
late=$(sql "SELECT count(*) FROM leases WHERE outcome = 'superseded'")
lost=$(( ${#BATCHES[@]} - proven + unfinished_jobs + unmatched ))
failed=$(sql "SELECT count(*) FROM batches WHERE status = 'failed'")
spent=$(sql "SELECT coalesce(sum(attempts - 1), 0) FROM jobs WHERE status = 'succeeded'")
strikes=$(sql "SELECT count(*) FROM strikes")
say "jobs: $(sql "SELECT count(*) FROM jobs"), leases: $(sql "SELECT count(*) FROM leases") ($(sql "SELECT count(*) FROM leases WHERE outcome = 'expired'") expired, $late superseded by a late result), open leases: $dangling"
say "attempts spent: $spent, by $SPENDING faults that kill or hang a job's worker (at most one each); strikes: $strikes"
sql "SELECT '  job ' || id || ' (' || kind || ', round ' || aggregation_round || '): ' || attempts || ' attempts'
     FROM jobs WHERE attempts > 1 ORDER BY id" || true
echo "chaos: batches=${#BATCHES[@]} verified=$verified lost=$lost duplicated=$duplicated failed=$failed attempts_spent_by_faults=$spent"
# The short run (CI) tolerates a fault that found no target in time, and more attempts spent
# than faults that may spend one (seen once on a fresh machine: the hung job's rerun hung
# again, its input not yet put back; the batch still proved); the full run does not.
if [[ $SHORT -eq 1 && $spent -gt $SPENDING ]]; then
  echo "chaos: warning: $spent attempts spent for $SPENDING faults that may spend one (short run)" >&2
fi
[[ $SHORT -eq 1 && $SKIPPED -ne 0 ]] && { echo "chaos: $SKIPPED faults skipped (short run)" >&2; SKIPPED=0; }
if [[ $gateway_status -ne 0 || $verified -ne ${#BATCHES[@]} || $lost -ne 0 || $duplicated -ne 0 || $dangling -ne 0 || $SKIPPED -ne 0
      || $failed -ne 0 || $strikes -ne 0 || $BROKEN -ne 0 || ( $SHORT -eq 0 && $spent -gt $SPENDING ) ]]; then
  echo "chaos: FAILED (gateway exit $gateway_status, $SKIPPED faults skipped, $dangling open leases, $failed failed batches," \
       "$spent attempts spent for $SPENDING faults that may spend one, $strikes strikes, $BROKEN faults not handled as they must be); logs in $LOGS" >&2
  exit 1
fi
