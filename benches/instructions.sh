#!/usr/bin/env bash
# Instructions per sample of each strategy's `put`, and per row of its
# `flush`, in Wasm and natively, counted by callgrind: the Wasm tax as a
# count that does not move with the load of a shared machine. One count is
# exact to the instruction from one run to the next (the workloads are
# fixed; flush counts can differ by a fraction of an instruction a row,
# because the host's duplicate-row check hashes with a per-process seed),
# where the `strategies` bench's times move by ±30 % here, so a
# change to a guest, the SDK or the engine can be compared on it at once.
# It says nothing of cache misses, which the time benches catch (100 000
# live series).
#
#   cargo build --release -p wagg-benches
#   bash benches/instructions.sh
#   OPS=put STRATEGIES=hashmap LIVE="100 10000" bash benches/instructions.sh
#
# For every operation, strategy and live-series count, target/release/
# instructions runs the `strategies` bench's workload under callgrind,
# counting only its `measured_*` functions:
#   put    PUTS (200) puts of 1024 samples, after the module was filled and
#          warmed up; per sample
#   flush  flushes of one row per live series (as many as keep the rows
#          flushed at 1 000 000 or fewer, at most 20; FLUSHES sets it), the
#          refill before each not counted; per row
# Columns:
#   wasm       instructions through the host's runtime: the call into the
#              component, the copy of the columns in or out, the guest's
#              compiled code, and for flush the host's check of the rows
#   host       of those, what ran outside the compiled guest code
#   native     the same strategy compiled natively behind the SDK's Driver
#   ratio      wasm / native
# A row takes 10–60 s (Cranelift compiles the module under valgrind); all of
# them ~30 min. Needs valgrind (`apt-get install valgrind`).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${INSTRUCTIONS:-$here/target/release/instructions}
[ -x "$bin" ] || { echo "instructions: build first: cargo build --release -p wagg-benches" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "instructions: needs valgrind (apt-get install valgrind)" >&2; exit 1; }

ops=${OPS:-put flush}
strategies=${STRATEGIES:-hashmap btree sorted leaky}
live_counts=${LIVE:-1 100 10000 100000}
puts=${PUTS:-200}
tmp=$(mktemp -d /tmp/wagg-instructions.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# Prints "<all> <outside JIT code>" instructions counted in `measured_*`.
count() {
    local op=$1 side=$2 strategy=$3 live=$4 reps=$5
    if ! valgrind --tool=callgrind --callgrind-out-file="$tmp/cg" \
        --toggle-collect='instructions::measured_*' \
        "$bin" "$op" "$strategy" "$side" "$live" "$reps" > "$tmp/log" 2>&1; then
        cat "$tmp/log" >&2
        echo "instructions: $op $strategy $side $live failed" >&2
        exit 1
    fi
    # JIT code has no symbol for callgrind: its functions show as `???:0x…`.
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$tmp/cg" 2>/dev/null | awk '
        /PROGRAM TOTALS/ { gsub(",", "", $1); all = $1; next }
        $2 ~ /^\(/ && $0 !~ /\?\?\?:0x/ { gsub(",", "", $1); host += $1 }
        END { printf "%d %d\n", all, host }'
}

# Prints the counts, refusing a run that counted nothing (`measured_*` not
# found: renamed, or inlined by a different build).
checked_count() {
    local all host
    read -r all host < <(count "$@")
    if [ "${all:-0}" -eq 0 ]; then
        echo "instructions: nothing counted for $*: are instructions::measured_* in the build?" >&2
        exit 1
    fi
    echo "$all $host"
}

printf '%-6s %-8s %7s %8s %7s %8s %6s\n' op strategy live wasm host native ratio
for op in $ops; do
    for strategy in $strategies; do
        for live in $live_counts; do
            case $op in
                put) reps=$puts; units=$((puts * 1024)) ;;
                flush)
                    if [ -n "${FLUSHES:-}" ]; then
                        reps=$FLUSHES
                    else
                        reps=$((1000000 / live))
                        if [ "$reps" -gt 20 ]; then reps=20; fi
                        if [ "$reps" -lt 1 ]; then reps=1; fi
                    fi
                    units=$((reps * live)) ;;
                *) echo "instructions: unknown operation $op (put, flush)" >&2; exit 2 ;;
            esac
            # Assignments, so that a failed count stops the script (set -e).
            wasm_counts=$(checked_count "$op" wasm "$strategy" "$live" "$reps")
            native_counts=$(checked_count "$op" native "$strategy" "$live" "$reps")
            read -r wasm host <<< "$wasm_counts"
            read -r native _ <<< "$native_counts"
            awk -v o="$op" -v s="$strategy" -v l="$live" -v w="$wasm" -v h="$host" -v n="$native" -v k="$units" \
                'BEGIN { printf "%-6s %-8s %7d %8.1f %7.1f %8.1f %5.2fx\n", o, s, l, w / k, h / k, n / k, w / n }'
        done
    done
done
