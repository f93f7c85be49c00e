#!/usr/bin/env bash
# Holds every connection slot of the release relay with pingers and silent sockets, then sends
# genuine pushes and prints their latency (examples/hold.rs). Runs on 127.0.0.1 only.
#
#     bench/hold.sh [PINGERS] [SILENT] [PUSHES]      (defaults: 1024 1024 20)
#
# The relay runs on a config of its own in a temporary folder: the shipped defaults
# (max_connections = 1024, keep-alive 15 s, no allow-list), a safe-mode account, the durable
# store, one target on a closed port (its deliveries are retried in the background).
set -euo pipefail
cd "$(dirname "$0")/.."
pingers=${1:-1024}
silent=${2:-1024}
pushes=${3:-20}
port=${HOLD_PORT:-18480}

cargo build --release --quiet --bin wechat-relay --example hold
dir=$(mktemp -d)
trap 'kill "${relay:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat >"$dir/relay.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[store]
path = "data"
[[account]]
name = "main"
path = "/wechat"
app_id = "wx0123456789abcdef"
token = "holdBenchToken2024"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
mode = "safe"
[[target]]
name = "down"
url = "http://127.0.0.1:9/"
format = "plain"
[[route]]
to = ["down"]
TOML
chmod 0600 "$dir/relay.toml"
# The load generator needs a socket per connection it holds.
ulimit -n "$(ulimit -Hn)"
RUST_LOG=error target/release/wechat-relay serve --config "$dir/relay.toml" &
relay=$!
for _ in $(seq 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done
echo "relay pid $relay on 127.0.0.1:$port; $(nproc) cores; $(date -u +%F)"
target/release/examples/hold --config "$dir/relay.toml" --url "http://127.0.0.1:$port/wechat" \
  --pingers "$pingers" --silent "$silent" --pushes "$pushes"
