# shellcheck shell=bash
# Process handling shared by scripts/demo.sh and scripts/chaos.sh (sourced, not run).
#
# - proc_start [-o] NAME LOG PROGRAM ARGS...: starts the program in the background, its output
#   appended to LOG (-o: only its stderr); the PID kept ($PROC_PID, and in the list every stop
#   goes through) is the program's own, not a subshell's.
# - proc_stop_all: SIGTERM to everything started that still runs, the processes that do not
#   listen first (they may still hand work back), then the ones that do; SIGKILL to what is left
#   after PROCS_STOP_SECS (10) seconds each time. Put it on EXIT; turn INT, TERM and HUP into an
#   exit (proc_traps does both), so every exit path ends every process.
# - proc_port_free PORT WHAT: fails at once, naming the process, if something listens on PORT.
# - proc_wait_listening NAME PID PORT [SECS]: until that very process listens on PORT; fails at
#   once with the tail of its log if it exits first or another process has the port.
# - proc_wait_watching PID: waits for PID while every other started process still runs; fails
#   at once, with the tail of its log, if one of them exits.
#
# The caller sets PROCS_TAG (the prefix of its messages).

PROCS_TAG="${PROCS_TAG:-$(basename "$0" .sh)}"
PROC_PIDS=()              # every process started and not yet reaped, in start order
declare -A PROC_NAME=()   # pid -> name
declare -A PROC_LOG=()    # pid -> log file
declare -A PROC_SERVES=() # pid -> port it listens on

proc_die() { echo "$PROCS_TAG: $*" >&2; exit 1; }

proc_start() { # [-o] name, log, program, args...: -o leaves stdout where it is (stderr to log)
  local keep=0
  if [[ "$1" == -o ]]; then keep=1; shift; fi
  local name=$1 log=$2; shift 2
  # `exec`: the background job is the program itself, whatever "$@" is (a function, or a
  # prefix such as `env A=B`, would otherwise leave a shell between this script and it).
  if ((keep)); then
    ( exec "$@" ) 2>>"$log" &
  else
    ( exec "$@" ) >>"$log" 2>&1 &
  fi
  PROC_PID=$!
  PROC_PIDS+=("$PROC_PID")
  PROC_NAME[$PROC_PID]=$name
  PROC_LOG[$PROC_PID]=$log
}

proc_forget() { # pid: reaped by the caller (killed on purpose); not stopped again
  local p keep=()
  for p in "${PROC_PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PROC_PIDS=("${keep[@]}")
}

proc_alive() { kill -0 "$1" 2>/dev/null; }

proc_tail() { # pid: the last lines of its log, indented
  local log=${PROC_LOG[$1]:-}
  [[ -n "$log" && -s "$log" ]] || { echo "    (its log, ${log:-none}, is empty)"; return; }
  echo "    --- last lines of $log"
  tail -n 20 "$log" | sed 's/^/    /'
}

proc_exited() { # pid, when: the process ended unexpectedly; says so with its status and log, fails
  local status=0
  wait "$1" 2>/dev/null || status=$?
  proc_forget "$1"
  proc_die "${PROC_NAME[$1]} (PID $1) exited with status $status $2
$(proc_tail "$1")"
}

_proc_stop() { # pids...: TERM, wait up to PROCS_STOP_SECS, KILL what is left, reap
  local p live left=() deadline=$((SECONDS + ${PROCS_STOP_SECS:-10}))
  for p in "$@"; do
    if proc_alive "$p"; then kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; left+=("$p"); fi
  done
  while ((${#left[@]})); do
    live=()
    for p in "${left[@]}"; do if proc_alive "$p"; then live+=("$p"); fi; done
    left=("${live[@]}")
    ((${#left[@]})) || break
    if ((SECONDS >= deadline)); then
      for p in "${left[@]}"; do
        echo "$PROCS_TAG: ${PROC_NAME[$p]:-?} (PID $p) did not end within ${PROCS_STOP_SECS:-10} s of SIGTERM: SIGKILL" >&2
        kill -KILL "$p" 2>/dev/null
      done
      break
    fi
    sleep 0.1
  done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

proc_stop_all() {
  set +e                 # it runs on every exit, errors included: it must get to the end
  trap '' INT TERM HUP   # and is not interrupted
  local p clients=() servers=()
  for p in "${PROC_PIDS[@]}"; do
    if [[ -n "${PROC_SERVES[$p]:-}" ]]; then servers+=("$p"); else clients+=("$p"); fi
  done
  _proc_stop "${clients[@]}"
  _proc_stop "${servers[@]}"
  PROC_PIDS=()
}

proc_traps() {
  trap proc_stop_all EXIT
  trap 'exit 129' HUP
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# What listens on a port, any address: "PID 123 (name)" per process, or a plain fact where
# `ss` is missing or cannot name it; nothing if the port is free.
proc_port_holder() {
  local port=$1 lines
  if command -v ss >/dev/null 2>&1; then
    lines=$(ss -Hltnp "sport = :$port" 2>/dev/null) || lines=
    [[ -n "$lines" ]] || return 0
    if grep -q 'pid=' <<<"$lines"; then
      grep -o '"[^"]*",pid=[0-9]*' <<<"$lines" | sed 's/^"\(.*\)",pid=\([0-9]*\)$/PID \2 (\1)/' | sort -u | paste -sd, - | sed 's/,/, /g'
    else
      echo "a process this user cannot see"
    fi
  elif (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "some process (install iproute2's ss to name it)"
  fi
}

proc_port_free() { # port, what it is for
  local who
  who=$(proc_port_holder "$1")
  [[ -z "$who" ]] || proc_die "port $1 ($2) is already in use by $who; stop it, or choose other ports"
}

_proc_listens() { # pid, port: that process listens on the port
  if command -v ss >/dev/null 2>&1; then
    ss -Hltnp "sport = :$2" 2>/dev/null | grep -q "pid=$1,"
  else
    (echo >"/dev/tcp/127.0.0.1/$2") 2>/dev/null && proc_alive "$1"
  fi
}

proc_wait_listening() { # name, pid, port, seconds (30)
  local name=$1 pid=$2 port=$3 deadline=$((SECONDS + ${4:-30}))
  while ! _proc_listens "$pid" "$port"; do
    proc_alive "$pid" || proc_exited "$pid" "before listening on port $port"
    if ((SECONDS >= deadline)); then
      local who; who=$(proc_port_holder "$port")
      proc_die "$name (PID $pid) does not listen on port $port after ${4:-30} s${who:+; the port is held by $who}
$(proc_tail "$pid")"
    fi
    sleep 0.1
  done
  PROC_SERVES[$pid]=$port
}

proc_wait_watching() { # pid: its exit status; fails if another started process exits meanwhile
  local p status=0
  while proc_alive "$1"; do
    for p in "${PROC_PIDS[@]}"; do
      [[ "$p" == "$1" ]] || proc_alive "$p" || proc_exited "$p" "while ${PROC_NAME[$1]} was running"
    done
    sleep 0.2
  done
  wait "$1" || status=$?
  proc_forget "$1"
  return "$status"
}
