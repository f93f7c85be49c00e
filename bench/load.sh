#!/usr/bin/env bash
# The load benchmark of issue 9: the release relay against nginx, in one go, on 127.0.0.1.
#
#     bench/load.sh [-d SECONDS] [-w SECONDS] [-n PUSHES] [-b BACKLOG] [-p PORT] [-c CASES] [-k]
#
#   -d  length of each measured run (default 10)
#   -w  warm-up before each case's runs (default 2)
#   -n  distinct pushes of each kind built before the runs (default 600000)
#   -b  deliveries pending for a down target in case 8 (default 100000)
#   -p  first of the eight 127.0.0.1 ports used (default 18490)
#   -c  the relay cases to run, e.g. "9 10" (default all; nginx's, 1 and 2, always run)
#   -k  keep the temporary folder (configs, relay logs, nginx logs) and say where it is
#
# Installs wrk and nginx from Debian when they are missing (apt-get; root or sudo), builds the
# release binary and two helpers (examples/pushfile.rs, examples/fsync.rs), builds the pushes
# once, measures the disk's fsync, then runs every case at 64 connections (wrk -t1 -c64) and
# at one (wrk -t1 -c1), and the 1,000-connection run of case 5, and prints Markdown tables:
#
#   1  nginx `return 200` (the upstream of case 2 and of the relay's targets; the ceiling)
#   2  nginx `proxy_pass` to 1, keep-alive (`upstream` + `keepalive`, HTTP/1.1, `Connection ""`)
#   3  relay, no [store]: text message (safe mode) -> `plain` reply target; the reply sealed
#   4  relay, no [store]: SCAN event -> `raw` reply target; its answer verbatim
#   5  case 3 with the durable store (SQLite in a folder on the repository's disk)
#   6  case 4 with the durable store
#   7  durable: text -> a `plain` reply target and a second, queued target
#   8  case 7 with BACKLOG deliveries pending for a target that is down (a closed port)
#   9  case 5 on PostgreSQL ([store] url: a throwaway cluster on a Unix socket, same disk)
#  10  case 7 on PostgreSQL
#  11  case 10 with two relays, A and B, on one database, behind nginx (an `upstream` of both)
#
# nginx runs as our own process (daemon off, -p/-c in a temporary folder), never as the system
# service; so does PostgreSQL (initdb into /tmp/wechat-relay-bench-pg.XXXXXX, as the postgres
# user when run as root, since PostgreSQL refuses root). Everything the run creates is under
# target/load.XXXXXX and that folder, and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10 warmup=2 pushes=600000 backlog=100000 port=18490 keep="" only=""
while getopts d:w:n:b:p:c:kh opt; do
  case $opt in
    d) duration=$OPTARG ;;
    w) warmup=$OPTARG ;;
    n) pushes=$OPTARG ;;
    b) backlog=$OPTARG ;;
    p) port=$OPTARG ;;
    c) only=" $OPTARG " ;;
    k) keep=1 ;;
    *) sed -n '2,14p' "$0"; exit 2 ;;
  esac
done
up_port=$port proxy_port=$((port + 1)) relay_port=$((port + 2)) down_port=$((port + 3))
admin_port=$((port + 4)) relay_b_port=$((port + 5)) admin_b_port=$((port + 6))
balancer_port=$((port + 7))
started_at=$(date +%s) load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)

say() { printf '%s\n' "$*" >&2; }
die() { say "load.sh: $*"; exit 1; }

# --- What it needs -------------------------------------------------------------------------
install_missing() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
  [ ${#missing[@]} -eq 0 ] && return
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  say "installing ${missing[*]} from Debian"
  # The package would start nginx as a system service on port 80: a policy-rc.d that says
  # "no" to every service start keeps it stopped (only while we install, and only if the
  # machine has none of its own).
  local policy=/usr/sbin/policy-rc.d own_policy=""
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee $policy >/dev/null
    "${sudo[@]}" chmod 0755 $policy
    own_policy=1
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || { [ -z "$own_policy" ] || "${sudo[@]}" rm -f $policy; exit 1; }
  [ -z "$own_policy" ] || "${sudo[@]}" rm -f $policy
}
install_missing
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
pg_bin=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)

say "building the release binary and the helpers"
cargo build --release --quiet --bin wechat-relay --example pushfile --example fsync
release=${CARGO_TARGET_DIR:-target}/release
relay_bin=$release/wechat-relay
pushfile=$release/examples/pushfile

for p in $up_port $proxy_port $relay_port $down_port $admin_port $relay_b_port $admin_b_port \
  $balancer_port; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "127.0.0.1:$p is in use (-p PORT)"; fi
done

# The store's folders go here too: on the repository's disk, as an operator's would be.
mkdir -p target
dir=$(mktemp -d "$PWD/target/load.XXXXXX")
relay_pids=() nginx_pid="" fill_pid="" pg_pid="" pg_dir=""
cleanup() {
  [ -z "$fill_pid" ] || kill "$fill_pid" 2>/dev/null || true
  local pid
  for pid in "${relay_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -z "$nginx_pid" ] || kill "$nginx_pid" 2>/dev/null || true
  # SIGINT to the postmaster itself (runuser, in between under root, does not pass it on):
  # PostgreSQL's fast shutdown; then its folder goes once it has exited.
  local postmaster=""
  [ -z "$pg_dir" ] || postmaster=$(head -1 "$pg_dir/data/postmaster.pid" 2>/dev/null || true)
  [ -z "$postmaster" ] || kill -INT "$postmaster" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "$postmaster" ]; then
    for _ in $(seq 100); do kill -0 "$postmaster" 2>/dev/null || break; sleep 0.1; done
  fi
  [ -z "$pg_dir" ] || rm -rf "$pg_dir"
  if [ -n "$keep" ]; then
    rm -f "$dir"/*.push
    say "kept $dir (the push files removed)"
  else
    rm -rf "$dir"
  fi
}
trap cleanup EXIT
# wrk needs a socket per connection (1,000 in the last run); the relay raises its own limit.
ulimit -n "$(ulimit -Hn)"

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listens on 127.0.0.1:$1"
}

# --- nginx: the upstream (1), the proxy (2), the relay's targets, the balancer (11) --------
plain_reply='<xml><ToUserName><![CDATA[oBench]]></ToUserName><FromUserName><![CDATA[gh_0123456789ab]]></FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[Your order ships tomorrow.]]></Content></xml>'
raw_reply='<xml><ToUserName><![CDATA[oBench]]></ToUserName><Encrypt><![CDATA[raw-reply-of-the-identity-provider]]></Encrypt></xml>'
mkdir -p "$dir/nginx/logs"
cat >"$dir/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes auto;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/nginx/body;
  proxy_temp_path $dir/nginx/proxy;
  fastcgi_temp_path $dir/nginx/fastcgi;
  uwsgi_temp_path $dir/nginx/uwsgi;
  scgi_temp_path $dir/nginx/scgi;
  default_type text/plain;
  upstream upstream_keepalive {
    server 127.0.0.1:$up_port;
    keepalive 64;
  }
  # 1: the upstream, and the relay's targets.
  server {
    listen 127.0.0.1:$up_port;
    location / { return 200 "success"; }
    # The reply target of cases 3, 5, 7, 8: a WeChat XML reply, which the relay seals.
    location = /plain { default_type text/xml; return 200 '$plain_reply'; }
    # The reply target of cases 4 and 6: its answer goes to WeChat verbatim.
    location = /raw { default_type text/xml; return 200 '$raw_reply'; }
    # The second, queued target of cases 7 and 8: each delivery it takes is one line.
    location = /queued { access_log $dir/nginx/logs/queued.log combined buffer=64k flush=1s; return 200 "success"; }
  }
  # 2: the proxy, as an operator would put it at the URL instead of the relay.
  server {
    listen 127.0.0.1:$proxy_port;
    location / {
      proxy_pass http://upstream_keepalive;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  # 11: the load balancer in front of relays A and B, as docs/operations.md puts it ("Several
  # relays on PostgreSQL"), with the keep-alive pool of case 2.
  upstream wechat_relays {
    server 127.0.0.1:$relay_port max_fails=2 fail_timeout=5s;
    server 127.0.0.1:$relay_b_port max_fails=2 fail_timeout=5s;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$balancer_port;
    location /wechat {
      proxy_pass http://wechat_relays;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_next_upstream error timeout;
      proxy_read_timeout 5s;
    }
  }
}
NGINX
"$nginx_bin" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -e "$dir/nginx/logs/error.log" &
nginx_pid=$!
wait_port "$up_port"
wait_port "$proxy_port"
wait_port "$balancer_port"

# --- PostgreSQL: the store of cases 9, 10 and 11 -------------------------------------------
# Its own cluster, on a Unix socket only, with the settings a relay's database keeps
# (synchronous_commit and fsync on: the defaults); a database per case.
pg_dir=$(mktemp -d /tmp/wechat-relay-bench-pg.XXXXXX)
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$pg_dir"
  as_pg=(runuser -u postgres --)
fi
"${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U relay --auth=trust >"$dir/initdb.log" 2>&1 ||
  { cat "$dir/initdb.log" >&2; die "initdb failed"; }
"${as_pg[@]}" "$pg_bin/postgres" -D "$pg_dir/data" -c listen_addresses= \
  -c unix_socket_directories="$pg_dir" -c max_connections=100 -c shared_buffers=128MB \
  >"$dir/postgres.log" 2>&1 &
pg_pid=$!
for _ in $(seq 100); do
  "${as_pg[@]}" "$pg_bin/pg_isready" -q -h "$pg_dir" && break
  sleep 0.1
done
"${as_pg[@]}" "$pg_bin/pg_isready" -q -h "$pg_dir" || { cat "$dir/postgres.log" >&2; die "postgres did not start"; }
for case in 9 10 11; do
  "${as_pg[@]}" "$pg_bin/psql" -q -h "$pg_dir" -U relay -d postgres -c "CREATE DATABASE bench$case" ||
    die "cannot create the database of case $case"
done

# --- The relay's configs -------------------------------------------------------------------
# The pushes are built once, before every run, and carry the time they were built as their
# `timestamp`: the bench config allows 3600 s of skew (the shipped 300 s would refuse the last
# cases' pushes with 403), and keeps dedupe records as long, which the config requires.
skew=3600
# Case 11 runs two relays, A on relay-11.toml and B on relay-11b.toml: B has ports of its own
# and both trust the balancer in front of them (nginx on this machine) for X-Forwarded-For.
relay_config() { # CASE [max_connections]
  local case=$1 routes="" listen=$relay_port admin=$admin_port proxies=""
  [ "$case" != 11b ] || listen=$relay_b_port admin=$admin_b_port
  case $case in 11 | 11b) proxies='trusted_proxies = ["127.0.0.1"]' ;; esac
  # Store off: a [store] without `path` (in memory, as with no [store] at all), which is
  # where dedupe_ttl_s is set.
  local store="[store]
dedupe_ttl_s = $skew"
  case $case in
    5 | 6 | 7 | 8 | 5c1000) store="$store
path = \"$dir/store-$case\"" ;;
    9 | 10 | 11 | 11b) store="$store
url = \"postgres:///bench${case%b}?host=$pg_dir&user=relay\"" ;;
  esac
  case $case in
    3 | 5 | 9 | 5c1000) routes='[[route]]
name = "text"
msg_type = ["text"]
to = ["shop"]
reply = "shop"' ;;
    4 | 6) routes='[[route]]
name = "scan"
msg_type = ["event"]
event = ["SCAN"]
to = ["identity"]
reply = "identity"' ;;
    7 | 8 | 10 | 11 | 11b) routes='[[route]]
name = "text"
msg_type = ["text"]
to = ["shop", "queued"]
reply = "shop"
[[route]]
name = "scan"
msg_type = ["event"]
event = ["SCAN"]
to = ["down"]' ;;
  esac
  cat <<TOML
# bench/load.sh case $case
[server]
listen = "127.0.0.1:$listen"
timestamp_skew_s = $skew
max_connections = ${2:-1024}
$proxies
[admin]
listen = "127.0.0.1:$admin"
$store
[[account]]
name = "main"
path = "/wechat"
app_id = "wx0123456789abcdef"
token = "benchToken2024"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
mode = "safe"
[[target]]
name = "shop"
url = "http://127.0.0.1:$up_port/plain"
format = "plain"
[[target]]
name = "identity"
url = "http://127.0.0.1:$up_port/raw"
format = "raw"
[[target]]
name = "queued"
url = "http://127.0.0.1:$up_port/queued"
format = "plain"
[[target]]
name = "down"
url = "http://127.0.0.1:$down_port/"
format = "raw"
$routes
TOML
}
for case in 3 4 5 6 7 8 9 10 11 11b 5c1000; do
  max=1024
  [ "$case" != 5c1000 ] || max=4096
  relay_config "$case" "$max" >"$dir/relay-$case.toml"
  chmod 0600 "$dir/relay-$case.toml"
  "$relay_bin" check --config "$dir/relay-$case.toml" >/dev/null 2>"$dir/check-$case.err" ||
    { cat "$dir/check-$case.err" >&2; die "case $case: the relay refuses its config"; }
done

# --- How busy the machine is besides us ----------------------------------------------------
# CPU seconds the whole machine spent busy, and those of this script and what it ran (waited
# children, and nginx, still running, from /proc): the rest is other people's work.
clock_tick=$(getconf CLK_TCK)
machine_cpu() { awk -v hz="$clock_tick" '/^cpu / { print ($2 + $3 + $4 + $7 + $8) / hz }' /proc/stat; }
own_cpu() { # sets own_cpu_s; not in a subshell, where `times` would see none of our children
  local nginx=0 pid
  for pid in $nginx_pid $(pgrep -P "$nginx_pid" || true); do
    nginx=$(awk -v n="$nginx" -v hz="$clock_tick" '{ print n + ($14 + $15) / hz }' "/proc/$pid/stat" 2>/dev/null || echo "$nginx")
  done
  times >"$dir/times"
  own_cpu_s=$(awk -v n="$nginx" '{ for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } } END { print t + n }' "$dir/times")
}
own_cpu
machine_cpu_at_start=$(machine_cpu) own_cpu_at_start=$own_cpu_s runs_started_at=$(date +%s)

# --- The pushes, once ----------------------------------------------------------------------
say "building $pushes text and $pushes SCAN pushes, and 8 of each to check the answers"
for kind in text scan; do
  "$pushfile" write --config "$dir/relay-3.toml" --kind "$kind" --count "$pushes" --out "$dir/$kind.push"
  # Probes from ids the runs never reach.
  "$pushfile" write --config "$dir/relay-3.toml" --kind "$kind" --count 8 \
    --first $((pushes + 1000000)) --lines --out "$dir/$kind.probe"
done
pushes_built_at=$(date +%s)

# --- The disk's fsync ----------------------------------------------------------------------
mkdir -p "$dir/fsync"
read -r fsync_line < <("$release/examples/fsync" --dir "$dir/fsync" --count 1000)
fsync_p50=${fsync_line#fsync_p50_us=}; fsync_p50=${fsync_p50%% *}
fsync_p99=${fsync_line##*fsync_p99_us=}
us_ms() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; }
say "fsync of a 4 KiB write in the store's folder: p50 $(us_ms "$fsync_p50") ms, p99 $(us_ms "$fsync_p99") ms"

# --- Runs ----------------------------------------------------------------------------------
declare -A rps p50 p99 rss note valid
rows=()
# run_wrk KEY CONNS SECONDS PORT FILE FIRST [cycle]: one wrk run; sets rps/p50/p99/valid[KEY]
# (unless KEY is "-", a warm-up) and `consumed` (pushes it used).
run_wrk() {
  local key=$1 conns=$2 secs=$3 port=$4 file=$5 first=$6 cycle=${7:-}
  local out
  out=$(wrk -t1 -c"$conns" -d"${secs}s" --timeout 5s --latency -s bench/pushes.lua \
    "http://127.0.0.1:$port/wechat" -- "$file" "$first" $cycle 2>&1) || die "wrk failed: $out"
  local line
  line=$(grep '^result ' <<<"$out") || die "wrk printed no result: $out"
  local requests duration_us p50_us p99_us non2xx sent wrapped errors
  for field in ${line#result }; do local "${field?}"; done
  consumed=$sent
  [ "$key" = - ] && return 0
  rps[$key]=$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  p50[$key]=$p50_us p99[$key]=$p99_us valid[$key]=1 note[$key]=""
  local problems=()
  [ "$non2xx" -eq 0 ] || problems+=("$non2xx answers not 2xx")
  [ "$errors" -eq 0 ] || problems+=("$errors socket errors or timeouts")
  [ "$wrapped" -eq 0 ] || problems+=("PUSHES EXCEEDED: $wrapped requests were repeats of earlier pushes (-n)")
  if [ ${#problems[@]} -gt 0 ]; then
    valid[$key]=""
    note[$key]="**not valid** ($(IFS=';'; echo "${problems[*]}"), ${rps[$key]}/s)"
    say "case $key: ${note[$key]}"
  fi
  rows+=("$key")
}

vmhwm_mib() { awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# case_relays CASE: sets `relays` (the configs of the case's relays: one, or for case 11 A and
# then B), `admins` (their admin ports) and `entry` (the port the case's pushes go to: the
# relay's, or for case 11 the balancer's).
relays=() admins=() entry=""
case_relays() {
  relays=("$1") admins=("$admin_port") entry=$relay_port
  [ "$1" != 11 ] || relays=(11 11b) admins=("$admin_port" "$admin_b_port") entry=$balancer_port
}
# start_relays: the relays set by case_relays, started together (two on an empty database run
# its migrations under an advisory lock), each logging to relay-CONFIG.log.
start_relays() {
  local config
  for config in "${relays[@]}"; do
    # With the allocator settings of the systemd unit (systemd/wechat-relay.service).
    MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=0 \
      "$relay_bin" serve --config "$dir/relay-$config.toml" 2>"$dir/relay-$config.log" &
    relay_pids+=("$!")
  done
  for config in "${relays[@]}"; do
    if [ "$config" = 11b ]; then wait_port "$relay_b_port"; else wait_port "$relay_port"; fi
  done
}
stop_relays() { # SIGTERM to every relay at once, then wait for each
  local pid
  for pid in "${relay_pids[@]}"; do kill -TERM "$pid"; done
  for pid in "${relay_pids[@]}"; do wait "$pid" || true; done
  relay_pids=()
}
peak_rss() { # the relays' peak RSS in MiB, "A/B" for two
  local pid shown=""
  for pid in "${relay_pids[@]}"; do shown="${shown:+$shown/}$(vmhwm_mib "$pid")"; done
  echo "$shown"
}

# probe CASE KIND N EXPECT: sends probe push N with curl to the case's entry and checks the
# answer: `sealed` (a reply sealed for the account, which opens to nginx's plain reply), `raw`
# (nginx's raw reply verbatim) or `success`.
probe() {
  local case=$1 kind=$2 n=$3 expect=$4 query body answer
  IFS=$'\t' read -r query body < <(sed -n "${n}p" "$dir/$kind.probe")
  answer=$(curl -sS --fail-with-body -H 'Content-Type: text/xml' --data-binary "$body" \
    "http://127.0.0.1:$entry/wechat?$query") || die "case $case: the probe push was refused: $answer"
  case $expect in
    sealed)
      local inner
      inner=$("$pushfile" open --config "$dir/relay-$case.toml" <<<"$answer") ||
        die "case $case: the answer is not a reply sealed for the account: $answer"
      [ "$inner" = "$plain_reply" ] || die "case $case: the sealed reply holds $inner" ;;
    raw) [ "$answer" = "$raw_reply" ] || die "case $case: expected the raw reply, got $answer" ;;
    success) [ "$answer" = success ] || die "case $case: expected success, got $answer" ;;
  esac
}

# store_totals: the durable store's transactions, the commits in them and their seconds, so
# far, summed over the case's relays (from /metrics; "0 0 0" without a store); store_note KEY
# BEFORE: their means over a run.
store_totals() {
  local admin
  for admin in "${admins[@]}"; do curl -s "http://127.0.0.1:$admin/metrics"; done | awk '
    $1 == "wechat_relay_store_batch_size_count" { n += $2 }
    $1 == "wechat_relay_store_batch_size_sum" { c += $2 }
    $1 == "wechat_relay_store_commit_seconds_sum" { s += $2 }
    END { printf "%d %d %f\n", n, c, s }'
}
store_note() {
  local key=$1 n0 c0 s0 n1 c1 s1 whose=""
  read -r n0 c0 s0 <<<"$2"
  read -r n1 c1 s1 < <(store_totals)
  [ "$n1" -gt "$n0" ] || return 0
  [ ${#admins[@]} -eq 1 ] || whose=" (both relays together)"
  note[$key]="${note[$key]:+${note[$key]}; }$(awk -v n=$((n1 - n0)) -v c=$((c1 - c0)) -v s0="$s0" -v s1="$s1" -v w="$whose" \
    'BEGIN { printf "%d store transactions%s of %.1f commits on average, %.2f ms each", n, w, c / n, (s1 - s0) * 1000 / n }')"
}
# answers: the pushes each of the case's relays has answered so far (from /metrics), "A B";
# share_note KEY BEFORE: with two relays, how the run's pushes fell between them.
answers() {
  local admin
  for admin in "${admins[@]}"; do
    curl -s "http://127.0.0.1:$admin/metrics" |
      awk '$1 == "wechat_relay_reply_seconds_count" { n = $2 } END { printf "%d ", n }'
  done
  echo
}
share_note() {
  [ ${#admins[@]} -gt 1 ] || return 0
  local key=$1 before after
  read -ra before <<<"$2"
  read -ra after < <(answers)
  note[$key]="${note[$key]:+${note[$key]}; }relay A answered $((after[0] - before[0])) of the run's pushes, B $((after[1] - before[1]))"
}

pending_of() { # CASE TARGET
  "$relay_bin" outbox stats --config "$dir/relay-$1.toml" |
    awk -v t="target=$2" '$1 == t { sub("pending=", "", $2); print $2 }'
}

# relay_case CASE KIND: the relay on case CASE's config (case 11: both relays), the probes, a
# warm-up at 64 connections, then the measured runs at 64 and at one connection, on pushes it
# has not seen.
relay_case() {
  local case=$1 kind=$2 next=0 nginx_errors
  case_relays "$case"
  nginx_errors=$(wc -l <"$dir/nginx/logs/error.log")
  start_relays
  case $case in
    3 | 5 | 9) probe "$case" text 1 sealed ;;
    4 | 6) probe "$case" scan 1 raw ;;
    7 | 8 | 10 | 11)
      probe "$case" text 1 sealed
      # The queued target gets the push from the outbox.
      for _ in $(seq 30); do [ -s "$dir/nginx/logs/queued.log" ] && break; sleep 0.1; done
      [ -s "$dir/nginx/logs/queued.log" ] || die "case $case: the queued target got nothing"
      : >"$dir/nginx/logs/queued.log" ;;
  esac
  if [ "$case" = 8 ]; then
    # SCAN pushes routed only to the down target: each leaves one delivery pending.
    probe 8 scan 1 success
    say "case 8: filling the outbox with $backlog deliveries for the down target"
    wrk -t1 -c64 -d600s --timeout 5s -s bench/pushes.lua "http://127.0.0.1:$relay_port/wechat" \
      -- "$dir/scan.push" 0 "stop=$backlog" >"$dir/fill.out" 2>&1 &
    fill_pid=$!
    local pending=0
    for _ in $(seq 600); do
      sleep 1
      pending=$(pending_of 8 down)
      [ "${pending:-0}" -lt "$backlog" ] || break
      kill -0 "$fill_pid" 2>/dev/null || break
    done
    kill -INT "$fill_pid" 2>/dev/null || true
    wait "$fill_pid" || true
    fill_pid=""
    grep -q '^result .* non2xx=0 .*errors=0$' "$dir/fill.out" ||
      die "case 8: the fill had errors: $(cat "$dir/fill.out")"
    [ "${pending:-0}" -ge "$backlog" ] ||
      die "case 8: $pending deliveries pending for the down target, not $backlog"
    backlog_before=$pending
  fi
  run_wrk - 64 "$warmup" "$entry" "$dir/$kind.push" "$next"
  next=$((next + consumed))
  local before shares
  before=$(store_totals) shares=$(answers)
  run_wrk "$case/64" 64 "$duration" "$entry" "$dir/$kind.push" "$next"
  next=$((next + consumed))
  rss[$case/64]=$(peak_rss)
  store_note "$case/64" "$before"
  share_note "$case/64" "$shares"
  shares=$(answers)
  run_wrk "$case/1" 1 "$duration" "$entry" "$dir/$kind.push" "$next"
  rss[$case/1]=$(peak_rss)
  share_note "$case/1" "$shares"
  stop_relays
  case $case in 7 | 8 | 10 | 11)
    local whose="the relay's"
    [ "$case" != 11 ] || whose="the relays'"
    # nginx writes its buffered log lines within a second.
    sleep 1.5
    note[$case/64]="${note[$case/64]:+${note[$case/64]}; }the queued target took $(wc -l <"$dir/nginx/logs/queued.log") deliveries by $whose exit, $(pending_of "$case" queued) left pending"
    : >"$dir/nginx/logs/queued.log" ;;
  esac
  # The balancer's own view: a relay that failed a request (refused, reset, timed out) is in
  # nginx's error log, even when the other relay then answered it.
  if [ "$case" = 11 ]; then
    nginx_errors=$(($(wc -l <"$dir/nginx/logs/error.log") - nginx_errors))
    [ "$nginx_errors" -eq 0 ] ||
      note[11/64]="${note[11/64]:+${note[11/64]}; }$nginx_errors lines in nginx's error log during the case (-k keeps it)"
  fi
  [ "$case" != 8 ] ||
    note[8/64]="${note[8/64]}; $backlog_before pending for the down target before the runs, $(pending_of 8 down) after"
}

say "case 1: nginx return 200"
run_wrk - 64 "$warmup" "$up_port" "$dir/text.push" 0 cycle
run_wrk 1/64 64 "$duration" "$up_port" "$dir/text.push" 0 cycle
run_wrk 1/1 1 "$duration" "$up_port" "$dir/text.push" 0 cycle
say "case 2: nginx proxy_pass"
run_wrk - 64 "$warmup" "$proxy_port" "$dir/text.push" 0 cycle
run_wrk 2/64 64 "$duration" "$proxy_port" "$dir/text.push" 0 cycle
run_wrk 2/1 1 "$duration" "$proxy_port" "$dir/text.push" 0 cycle
# wanted CASE: whether -c leaves CASE in.
wanted() { [ -z "$only" ] || [[ $only == *" $1 "* ]]; }
for spec in 3:text 4:scan 5:text 6:scan 7:text 8:text 9:text 10:text 11:text; do
  wanted "${spec%%:*}" || continue
  say "case ${spec%%:*}"
  relay_case "${spec%%:*}" "${spec#*:}"
done
if wanted 5c1000; then
  say "case 5 at 1,000 connections"
  case_relays 5c1000
  start_relays
  run_wrk - 1000 "$warmup" "$relay_port" "$dir/text.push" 0
  first=$consumed
  run_wrk 5/1000 1000 "$duration" "$relay_port" "$dir/text.push" "$first"
  rss[5/1000]=$(peak_rss)
  stop_relays
fi
[ $(($(date +%s) - pushes_built_at)) -lt "$skew" ] ||
  say "WARNING: the runs took longer than timestamp_skew_s after the pushes were built"

# --- The report ----------------------------------------------------------------------------
ms() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# holds VALUE OP LIMIT -> yes / no; OP "-": no goal, "-"
holds() { awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN { if (op == "-") { print "-"; exit }
  ok = (op == ">=") ? v >= l : (op == "<=") ? v <= l : v < l; print ok ? "yes" : "**no**" }'; }
declare -A what=(
  [1]='nginx `return 200` (the upstream)'
  [2]='nginx `proxy_pass` keep-alive to 1'
  [3]='relay, no `[store]`: text -> `plain` reply target, reply sealed'
  [4]='relay, no `[store]`: SCAN -> `raw` reply target'
  [5]='relay, durable store: text -> `plain` reply target'
  [6]='relay, durable store: SCAN -> `raw` reply target'
  [7]='relay, durable: text -> `plain` reply target + a queued target'
  [8]="relay, durable: case 7 with $backlog deliveries pending for a down target"
  [9]='relay, PostgreSQL store: text -> `plain` reply target (case 5)'
  [10]='relay, PostgreSQL store: text -> `plain` reply target + a queued target (case 7)'
  [11]='relays A and B behind nginx on one PostgreSQL database: case 10'
)
own_cpu
others=$(awk -v m0="$machine_cpu_at_start" -v m1="$(machine_cpu)" -v o0="$own_cpu_at_start" \
  -v o1="$own_cpu_s" -v t="$(($(date +%s) - runs_started_at))" \
  'BEGIN { x = ((m1 - m0) - (o1 - o0)) / (t > 0 ? t : 1); printf "%.2f", x < 0 ? 0 : x }')
fsync_note="fsync p50 $(ms "$fsync_p50") ms, p99 $(ms "$fsync_p99") ms"
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo
echo "### bench/load.sh, $(date -u '+%F %H:%M UTC')"
echo
echo "- machine: $(nproc) cores, $cpu, kernel $(uname -r); load average $load_at_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (the benchmark's own processes included); other processes kept $others of the $(nproc) cores busy on average during the runs"
echo "- wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }') -t1, ${duration} s a run after a ${warmup} s warm-up at 64 connections per case; nginx $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///'), worker_processes auto"
echo "- the relay: release build, the shipped log level (\`info\`, one line per push) to stderr redirected to a file; \`timestamp_skew_s\` and \`dedupe_ttl_s\` $skew (the pushes are built once, before the runs); store off is \`[store]\` without \`path\` (in memory, the same as no \`[store]\`)"
echo "- $pushes distinct text and $pushes distinct SCAN pushes, safe mode (signed and encrypted); every relay run used pushes that relay had not seen"
echo "- the disk: $fsync_note (4 KiB write + \`sync_data\`, 1,000 times, in the store's folder)"
echo
echo "| case | what | conns | pushes/s | vs nginx hop | p50 ms | p99 ms | relay peak RSS MiB | notes |"
echo "|---|---|---|---|---|---|---|---|---|"
for key in "${rows[@]}"; do
  case=${key%/*} conns=${key#*/}
  shown=${rps[$key]}
  [ -n "${valid[$key]}" ] || shown="not valid"
  notes=${note[$key]}
  case $case in 5 | 6 | 7 | 8 | 9 | 10 | 11) notes="${notes:+$notes; }$fsync_note" ;; esac
  vs=-
  [ -z "${valid[$key]}" ] || vs=$(ratio "${rps[$key]}" "${rps[2/$conns]:-0}")
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$case" "${what[$case]}" "$conns" \
    "$shown" "$vs" "$(ms "${p50[$key]}")" "$(ms "${p99[$key]}")" "${rss[$key]:--}" "$notes"
done
echo
echo "Targets (issues 9 and 10), from the rows above:"
echo
echo "| target | measured | goal | holds |"
echo "|---|---|---|---|"
target_row() { # LABEL VALUE OP LIMIT SHOWN GOAL [KEYS...]: a row; "not valid" if a run was
  local label=$1 value=$2 op=$3 limit=$4 shown=$5 goal=$6 key verdict
  shift 6
  verdict=$(holds "$value" "$op" "$limit")
  for key in "$@"; do [ -n "${valid[$key]:-}" ] || verdict="not run or not valid ($key)"; done
  printf '| %s | %s | %s | %s |\n' "$label" "$shown" "$goal" "$verdict"
}
for pair in 3:2 4:2 5:3 6:4 7:3 8:7; do
  a=${pair%:*} b=${pair#*:}
  goal=0.9
  case $a in 3 | 4) goal=1.0 ;; 7) goal=0.6 ;; esac
  r=$(ratio "${rps[$a/64]:-0}" "${rps[$b/64]:-0}")
  target_row "case $a vs case $b, pushes/s at 64" "$r" ">=" "$goal" "${r}x" ">= ${goal}x" "$a/64" "$b/64"
done
target_row "case 7, pushes/s at 64" "${rps[7/64]:-0}" ">=" 5000 "${rps[7/64]:-0}" ">= 5000" 7/64
target_row "case 10 (case 7 on PostgreSQL), pushes/s at 64" "${rps[10/64]:-0}" ">=" 3000 "${rps[10/64]:-0}" ">= 3000 (issue 10)" 10/64
r=$(ratio "${rps[11/64]:-0}" "${rps[10/64]:-0}")
[ "$r" = - ] || r=" (${r}x case 10)"
target_row "case 11 (two relays behind nginx on PostgreSQL), pushes/s at 64" "${rps[11/64]:-0}" - 0 \
  "${rps[11/64]:-0}${r#-}" "none (case 11 vs case 10, informational)" 11/64
r=$(ratio "${p99[7/64]:-0}" "${p99[3/64]:-0}")
target_row "case 7 p99 vs case 3 p99, at 64" "$r" "<=" 2 "${r}x" "<= 2x" 7/64 3/64
limit=$((fsync_p99 + 1000))
target_row "case 7 p99 at 1 vs fsync p99 + 1 ms" "${p99[7/1]:-0}" "<=" "$limit" \
  "$(ms "${p99[7/1]:-0}") ms" "<= $(ms "$limit") ms" 7/1
for case in 3 4; do
  d50=$((${p50[$case/1]:-0} - ${p50[1/1]:-0})) d99=$((${p99[$case/1]:-0} - ${p99[1/1]:-0}))
  target_row "case $case at 1 vs the upstream direct (case 1), p50" "$d50" "<=" 100 "$(printf %+d "$d50") µs" "<= +100 µs" "$case/1" 1/1
  target_row "case $case at 1 vs the upstream direct (case 1), p99" "$d99" "<=" 1000 "$(printf %+d "$d99") µs" "<= +1000 µs" "$case/1" 1/1
done
target_row "case 5 at 1,000 connections, relay peak RSS" "${rss[5/1000]:-0}" "<" 40 "${rss[5/1000]:-0} MiB" "< 40 MiB" 5/1000
echo
echo "Decrypt + verify + parse of a 1 KB push (< 5 µs): \`cargo bench --bench pieces\`."
echo
say "load.sh took $(($(date +%s) - started_at)) s"
