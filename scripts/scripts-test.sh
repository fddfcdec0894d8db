#!/usr/bin/env bash
# The scripts that start processes (demo.sh, chaos.sh, with-postgres.sh, through procs.sh) end
# every one of them however they end, and fail fast when a port they need is taken:
#   procs   a program that exits before it listens fails at once with its log; one that ignores
#           SIGTERM is SIGKILLed; the PID kept is the program's, even behind `env A=B`
#   demo    `scripts/demo.sh` proves and verifies one small batch, twice in a row (TLS off,
#           then on), leaving no process behind (its PostgreSQL included) and its port free
#   busy    with the scheduler's port held by another listener, demo.sh and chaos.sh fail within
#           seconds, naming the port and the holder, having started nothing
#   signal  SIGTERM to a demo whose cluster is up, and SIGINT to the process group of one (the
#           terminal's Ctrl-C), and SIGTERM to a chaos run with a frozen process: each ends
#           within seconds and leaves nothing
# "Left behind" is any process whose command line names this test's directory (every process
# of the cluster names it in its flags, and the throwaway PostgreSQL's data directory is in it:
# TMPDIR points there), so processes of other runs on the machine do not count.
#
# Needs the workspace's binaries (`cargo build --workspace --bins`), and, to be quick, the small
# geometry's setup data in SETUP_DIR (default target/tmp/setup-cache, which `cargo test` builds;
# `make test` runs this after it). SCRIPTS_TEST_PARTS picks parts (default "procs demo busy signal").
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_DIR="${SETUP_DIR:-target/tmp/setup-cache}"
BIN=target/debug
for b in proofmesh-scheduler proofmesh-worker proofmesh-compressor proofmesh-gateway proofmesh-circuits; do
  [[ -x "$BIN/$b" ]] || { echo "scripts-test: $BIN/$b is missing: cargo build --workspace --bins" >&2; exit 1; }
done

WORK=$(mktemp -d -t proofmesh-scripts-test.XXXXXX)
chmod 755 "$WORK"         # PostgreSQL's user makes its cluster in here
export TMPDIR="$WORK"     # with-postgres.sh's cluster directory: its server's command line names WORK
unset DATABASE_URL WITH_POSTGRES_CTL WITH_POSTGRES_PSQL   # each run gets a throwaway server of its own
T0=$SECONDS
PARTS=" ${SCRIPTS_TEST_PARTS:-procs demo busy signal} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
say() { echo "[$((SECONDS - T0)) s] scripts-test: $*"; }
MINE=()                   # what this test started itself: stopped at its end whatever happens
leftovers() { pgrep -fa -- "$WORK" || true; }
finish() {
  local status=$? p left
  set +e
  for p in "${MINE[@]}"; do kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
  for p in "${MINE[@]}"; do wait "$p" 2>/dev/null; done
  left=$(leftovers)
  if [[ -n "$left" ]]; then   # only after a failure: end them (by PID) so CI stays clean
    echo "scripts-test: still running at the end:" >&2; echo "$left" >&2
    mapfile -t left < <(awk '{ print $1 }' <<<"$left")
    kill -KILL "${left[@]}" 2>/dev/null
    status=1
  fi
  if [[ $status -eq 0 ]]; then rm -rf "$WORK"; else echo "scripts-test: FAILED; files in $WORK" >&2; fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fail() { echo "scripts-test: FAILED: $*" >&2; exit 1; }

# Nothing of this test's runs is left, and (when given) the port is free again.
nothing_left() { # what, [port]
  local left; left=$(leftovers)
  [[ -z "$left" ]] || fail "$1 left processes behind:
$left"
  if [[ -n "${2:-}" ]] && (echo >"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then fail "$1: port $2 still answers"; fi
  return 0
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
shows() { # log, text: the log has the text
  grep -qF -- "$2" "$1" || fail "expected \"$2\" in $1:
$(tail -n 30 "$1")"
}
listen_on() { # port: a stranger listening there (python's http.server); its PID in $STRANGER
  ( exec python3 -m http.server --bind 127.0.0.1 "$1" ) >"$WORK/stranger-$1.log" 2>&1 &
  STRANGER=$!; MINE+=("$STRANGER")
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  fail "http.server did not listen on $1"
}
stop_mine() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }
# Waits (up to $2 s) until file $1 has line $3; fails if process $4 ends first.
wait_line() {
  local until=$((SECONDS + $2))
  while ! grep -qF -- "$3" "$1" 2>/dev/null; do
    kill -0 "$4" 2>/dev/null || fail "it ended before \"$3\":
$(tail -n 30 "$1")"
    ((SECONDS < until)) || fail "no \"$3\" in $1 after $2 s"
    sleep 0.2
  done
}
# Waits (up to $2 s) for process $1 to end; its status in $STATUS, seconds taken in $TOOK.
wait_end() {
  local started=$SECONDS until=$((SECONDS + $2))
  while kill -0 "$1" 2>/dev/null; do
    ((SECONDS < until)) || fail "PID $1 still runs $2 s after the signal"
    sleep 0.1
  done
  STATUS=0; wait "$1" || STATUS=$?
  TOOK=$((SECONDS - started))
}

# --- procs: the helpers themselves, on stand-in programs (a second or two).
cat >"$WORK/procs-check.sh" <<'EOF'
set -euo pipefail
PROCS_TAG=procs-check PROCS_STOP_SECS=1
source scripts/procs.sh
proc_traps
case "$1" in
  exits-first)
    proc_start stranger "$WORK/a.log" python3 -m http.server --bind 127.0.0.1 "$2"
    proc_wait_listening stranger "$PROC_PID" "$2" 10
    proc_start second "$WORK/b.log" python3 -m http.server --bind 127.0.0.1 "$2"
    proc_wait_listening second "$PROC_PID" "$2" 10
    echo "not reached" ;;
  stubborn)
    proc_start stubborn "$WORK/c.log" env A=B bash -c 'trap "" TERM; echo up; while :; do sleep 0.1; done'
    for _ in $(seq 50); do grep -q up "$WORK/c.log" 2>/dev/null && break; sleep 0.1; done
    [[ "$(cat "/proc/$PROC_PID/comm")" == bash ]] || { echo "PID $PROC_PID is $(cat "/proc/$PROC_PID/comm"), not the program"; exit 3; }
    echo "started $PROC_PID" ;;
esac
EOF
if part procs; then
say "procs: a program that exits before it listens, one that ignores SIGTERM"
P=$(free_port)
export WORK
set +e; bash "$WORK/procs-check.sh" exits-first "$P" >"$WORK/procs-1.log" 2>&1; status=$?; set -e
[[ $status -eq 1 ]] || fail "procs-check exits-first: exit $status, not 1: $(cat "$WORK/procs-1.log")"
shows "$WORK/procs-1.log" "second (PID"
shows "$WORK/procs-1.log" "before listening on port $P"
shows "$WORK/procs-1.log" "Address already in use"
set +e; bash "$WORK/procs-check.sh" stubborn >"$WORK/procs-2.log" 2>&1; status=$?; set -e
[[ $status -eq 0 ]] || fail "procs-check stubborn: exit $status: $(cat "$WORK/procs-2.log")"
shows "$WORK/procs-2.log" "did not end within 1 s of SIGTERM: SIGKILL"
pid=$(sed -n 's/^started //p' "$WORK/procs-2.log")
if [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null; then fail "the stubborn program (PID ${pid:-?}) still runs"; fi
nothing_left "procs" "$P"
fi

mkdir -p "$WORK/samples"
"$BIN/proofmesh-circuits" gen-batch --out "$WORK/samples" --seed 7 --txs 4 >"$WORK/gen-batch.log"
PORT=$(free_port)
demo_env=(env GEOMETRY=small SETUP_DIR="$SETUP_DIR" SAMPLES="$WORK/samples" DEMO_PORT="$PORT")

# --- demo: one small batch, twice in a row.
if part demo; then
# TLS on where the dev CA is built (`make demo` builds it), so `env`-prefixed starts are covered.
second_tls=off; [[ -x "$BIN/proofmesh-dev-ca" ]] && second_tls=on
run=0
for tls in off "$second_tls"; do
  run=$((run + 1))
  say "demo run $run (TLS $tls) on port $PORT"
  started=$SECONDS
  set +e
  timeout -k 10 600 "${demo_env[@]}" TLS="$tls" DEMO_DIR="$WORK/demo-$run" scripts/demo.sh >"$WORK/demo-$run.log" 2>&1
  status=$?
  set -e
  [[ $status -eq 0 ]] || fail "demo run $run exited $status:
$(tail -n 40 "$WORK/demo-$run.log")"
  shows "$WORK/demo-$run.log" "demo: every batch proven and verified"
  nothing_left "demo run $run" "$PORT"
  say "demo run $run: proven and verified in $((SECONDS - started)) s, nothing left running"
done
fi

# --- busy: the scheduler's port taken by another listener.
if part busy; then
listen_on "$PORT"
holder="already in use by PID $STRANGER"   # named by `ss` (iproute2); without it, only the fact
command -v ss >/dev/null || holder="already in use by"
say "busy: demo.sh with port $PORT held by PID $STRANGER (python3 http.server)"
started=$SECONDS
set +e; timeout -k 5 60 "${demo_env[@]}" TLS=off DEMO_DIR="$WORK/demo-busy" scripts/demo.sh >"$WORK/demo-busy.log" 2>&1; status=$?; set -e
took=$((SECONDS - started))
[[ $status -ne 0 && $status -ne 124 ]] || fail "demo.sh with its port taken exited $status"
((took <= 10)) || fail "demo.sh with its port taken took $took s to fail"
shows "$WORK/demo-busy.log" "port $PORT"
shows "$WORK/demo-busy.log" "$holder"
nothing_left "demo.sh with its port taken"
say "busy: chaos.sh with port $PORT held"
set +e; timeout -k 5 60 env SETUP_DIR="$SETUP_DIR" CHAOS_DIR="$WORK/chaos-busy" CHAOS_PORT="$PORT" scripts/chaos.sh --short >"$WORK/chaos-busy.log" 2>&1; status=$?; set -e
[[ $status -ne 0 && $status -ne 124 ]] || fail "chaos.sh with its port taken exited $status"
shows "$WORK/chaos-busy.log" "port $PORT"
shows "$WORK/chaos-busy.log" "$holder"
nothing_left "chaos.sh with its port taken"
stop_mine "$STRANGER"
say "busy: both failed at once ($took s for demo.sh), naming port and holder, nothing left"
fi

# --- signal: stopped with the cluster up.
if part signal; then
say "signal: SIGTERM to a demo whose cluster is up"
"${demo_env[@]}" TLS=off DEMO_DIR="$WORK/demo-term" scripts/demo.sh >"$WORK/demo-term.log" 2>&1 &
pid=$!; MINE+=("$pid")
wait_line "$WORK/demo-term.log" 120 "== gateway" "$pid"
sleep 2   # the workers connect, and take the batch
kill -TERM "$pid"
wait_end "$pid" 30
[[ $STATUS -ne 0 ]] || fail "the demo stopped by SIGTERM exited 0"
nothing_left "the demo stopped by SIGTERM" "$PORT"
say "signal: the demo ended ${TOOK} s after SIGTERM (exit $STATUS), nothing left"

say "signal: SIGINT to the process group of a demo (Ctrl-C)"
# A new process group with SIGINT at its default, as a terminal's foreground job has it (a
# background job of this script would start with SIGINT ignored).
python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' \
  "${demo_env[@]}" TLS=off DEMO_DIR="$WORK/demo-int" scripts/demo.sh >"$WORK/demo-int.log" 2>&1 &
pid=$!; MINE+=("$pid")
wait_line "$WORK/demo-int.log" 120 "== gateway" "$pid"
sleep 2   # the workers connect, and take the batch
kill -INT -- "-$pid"
wait_end "$pid" 30
[[ $STATUS -ne 0 ]] || fail "the demo stopped by SIGINT exited 0"
nothing_left "the demo stopped by SIGINT" "$PORT"
say "signal: the demo ended ${TOOK} s after SIGINT (exit $STATUS), nothing left"

say "signal: SIGTERM to a chaos run (its witness generator frozen)"
env SETUP_DIR="$SETUP_DIR" CHAOS_DIR="$WORK/chaos-term" CHAOS_PORT="$PORT" scripts/chaos.sh --short >"$WORK/chaos-term.log" 2>&1 &
pid=$!; MINE+=("$pid")
wait_line "$WORK/chaos-term.log" 120 "cluster up" "$pid"
kill -TERM "$pid"
wait_end "$pid" 30
[[ $STATUS -ne 0 ]] || fail "the chaos run stopped by SIGTERM exited 0"
nothing_left "the chaos run stopped by SIGTERM" "$PORT"
say "signal: the chaos run ended ${TOOK} s after SIGTERM (exit $STATUS), nothing left"
fi

say "passed"
