#!/usr/bin/env bash
# Instructions per sample of each strategy's `put`, in Wasm and natively,
# counted by callgrind: the Wasm tax as a count that does not move with the
# load of a shared machine. One count is exact to the instruction from one
# run to the next (the workload is fixed), where the `strategies` bench's
# times move by ±30 % here, so a change to a guest, the SDK or the engine
# can be compared on it at once. It says nothing of cache misses, which
# the time benches catch (100 000 live series).
#
#   cargo build --release -p wagg-benches
#   bash benches/instructions.sh
#   STRATEGIES=hashmap LIVE="100 10000" PUTS=400 bash benches/instructions.sh
#
# For every strategy and live-series count, target/release/put-instructions
# runs the `strategies` bench's `put` workload (batches of 1024) under
# callgrind, counting only its `measured` function: `PUTS` puts, after the
# module was filled and warmed up. Columns:
#   wasm       instructions per sample through the host's runtime: the call
#              into the component, the copy of the batch's columns, the
#              guest's compiled code
#   host       of those, what ran outside the compiled guest code (wasmtime's
#              entry and exit, lowering the columns, the copy)
#   native     the same strategy compiled natively behind the SDK's Driver
#   ratio      wasm / native
# A run takes 10–60 s per row (Cranelift compiles the module under
# valgrind). Needs valgrind (`apt-get install valgrind`).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${PUT_INSTRUCTIONS:-$here/target/release/put-instructions}
[ -x "$bin" ] || { echo "instructions: build first: cargo build --release -p wagg-benches" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "instructions: needs valgrind (apt-get install valgrind)" >&2; exit 1; }

strategies=${STRATEGIES:-hashmap btree sorted leaky}
live_counts=${LIVE:-1 100 10000 100000}
puts=${PUTS:-200}
samples=$((puts * 1024))
tmp=$(mktemp -d /tmp/wagg-instructions.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# Prints "<all> <outside JIT code>" instructions counted in `measured`.
count() {
    local side=$1 strategy=$2 live=$3
    if ! valgrind --tool=callgrind --callgrind-out-file="$tmp/cg" \
        --toggle-collect='put_instructions::measured' \
        "$bin" "$strategy" "$side" "$live" "$puts" > "$tmp/log" 2>&1; then
        cat "$tmp/log" >&2
        echo "instructions: $strategy $side $live failed" >&2
        exit 1
    fi
    # JIT code has no symbol for callgrind: its functions show as `???:0x…`.
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$tmp/cg" 2>/dev/null | awk '
        /PROGRAM TOTALS/ { gsub(",", "", $1); all = $1; next }
        $2 ~ /^\(/ && $0 !~ /\?\?\?:0x/ { gsub(",", "", $1); host += $1 }
        END { printf "%d %d\n", all, host }'
}

# Prints the counts, refusing a run that counted nothing (`measured` not
# found: renamed, or inlined by a different build).
checked_count() {
    local all host
    read -r all host < <(count "$@")
    if [ "${all:-0}" -eq 0 ]; then
        echo "instructions: nothing counted for $*: is put_instructions::measured in the build?" >&2
        exit 1
    fi
    echo "$all $host"
}

printf '%-8s %7s %8s %7s %8s %6s\n' strategy live wasm host native ratio
for strategy in $strategies; do
    for live in $live_counts; do
        # Assignments, so that a failed count stops the script (set -e).
        wasm_counts=$(checked_count wasm "$strategy" "$live")
        native_counts=$(checked_count native "$strategy" "$live")
        read -r wasm host <<< "$wasm_counts"
        read -r native _ <<< "$native_counts"
        awk -v s="$strategy" -v l="$live" -v w="$wasm" -v h="$host" -v n="$native" -v k="$samples" \
            'BEGIN { printf "%-8s %7d %8.1f %7.1f %8.1f %5.2fx\n", s, l, w / k, h / k, n / k, w / n }'
    done
done
