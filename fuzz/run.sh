#!/usr/bin/env bash
# Builds the fuzz targets (cargo fuzz: libFuzzer with AddressSanitizer) and runs each one for
# SECONDS (default 30) on its kept corpus, one after another:
#
#     fuzz/run.sh [SECONDS]
#
# Fails if any target finds a crash, a hang or a leak: libFuzzer writes the input to
# fuzz/artifacts/<target>/, and tests/fuzz_regressions.rs replays everything there (commit it
# with the fix). What a run finds beyond the kept corpus goes to a scratch folder, so the
# working tree stays as it is; to keep it, run `cargo fuzz run <target>`, then
# `cargo fuzz cmin <target> -- -set_cover_merge=1` and `python3 fuzz/seed.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || ((seconds == 0)); then
  echo "usage: fuzz/run.sh [SECONDS]  (seconds per target, default 30)" >&2
  exit 2
fi
# cargo fuzz passes nightly flags (-Zsanitizer=address); the stable toolchain takes them with
# this.
export RUSTC_BOOTSTRAP=1

mapfile -t targets < <(cargo fuzz list)
cargo fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  echo "fuzz/run.sh: $target for ${seconds} s" >&2
  # The scratch folder comes first: libFuzzer adds what it finds to the first folder only.
  # -timeout: an input that takes more than 10 s is a hang, reported like a crash.
  if ! cargo fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
    failed+=("$target")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz/run.sh: crashes in ${failed[*]}: see fuzz/artifacts/" >&2
  exit 1
fi
echo "fuzz/run.sh: ${targets[*]}: no crash in ${seconds} s each" >&2
