#!/usr/bin/env bash
# End to end on this machine: loadgen → RabbitMQ → wagg run → OpenTSDB
# (VictoriaMetrics), against the broker's own ceiling on the same workload.
#
#   cargo build --release -p wagg -p wagg-benches
#   bash benches/e2e.sh [MESSAGES=30000] [OUT_DIR]
#   PHASES="2-shards" bash benches/e2e.sh   # the ceiling and only these phases
#   REQUESTS_IN_FLIGHT=1 bash benches/e2e.sh # [sink] requests_in_flight
#   GZIP=false bash benches/e2e.sh           # [sink] gzip
#   SINK=file bash benches/e2e.sh            # JSON lines in a file, not
#             VictoriaMetrics: what wagg sustains when the TSDB is not on
#             these 2 cores (the file is synced at every write as before)
#
# Each phase publishes the same backlog of MESSAGES persistent messages of
# 100 metrics (`wagg loadgen --count`, confirmed), then drains it:
#   ceiling   target/release/broker-ceiling: takes and acks (multiple, every
#             100) with wagg's prefetch, nothing else: the physical limit
#   1 shard   wagg run, hashmap, 1 shard
#   2 shards  wagg run, hashmap, 2 shards
#   shadow    wagg run, 2 shards, btree shadowing hashmap on both
# and reports messages/s and metrics/s from the first message taken to the
# last one acknowledged, that rate as a share of the ceiling, the p99 of a
# shard's flush (module flush + turning rows into points), the host's peak
# RSS, and whether every (customer, pop, bucket) point of the customer rollup
# in VictoriaMetrics equals loadgen's total exactly (and the other rollups'
# grand totals), and the CPU wagg, VictoriaMetrics and the broker each used
# over the drain (cores: CPU seconds / wall seconds). A drained backlog
# measures what a consumer sustains: with the publisher competing for the
# same 2 cores, every figure would be lower.
#
# Needs RabbitMQ on 127.0.0.1:5672 (consistent-hash plugin not needed) and
# VictoriaMetrics (tests/setup.sh installs both). Uses unique names; deletes
# its queues and exchanges at the end.
set -euo pipefail

messages=${1:-30000}
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/benches/drain.sh"
out=${2:-$(mktemp -d /tmp/wagg-e2e.XXXXXX)}
new_out_dir e2e "$out"
wagg=${WAGG:-$here/target/release/wagg}
# The loadgen may come from another build than the `wagg run` measured
# (to compare an older wagg on the same workload).
loadgen=${LOADGEN:-$wagg}
ceiling=${CEILING:-$here/target/release/broker-ceiling}
for b in "$wagg" "$ceiling"; do
    [ -x "$b" ] || { echo "e2e: build first: cargo build --release -p wagg -p wagg-benches" >&2; exit 1; }
done

case ${SINK:-opentsdb} in
    opentsdb|file) ;;
    *) echo "e2e: unknown SINK $SINK (opentsdb, file)" >&2; exit 2 ;;
esac

tag=wagg-e2e-$$
vm_http=127.0.0.1:${E2E_VM_HTTP:-18628}
vm_tsdb=127.0.0.1:${E2E_VM_TSDB:-14442}
admin=127.0.0.1:${E2E_ADMIN:-19664}
# Event time starts here and advances one second every 16 messages: a
# backlog of 30 000 spans 32 one-minute buckets, which flush as it drains.
# Event time follows the message's index, not the clock, so every run and
# phase has the same buckets: derived from publishing speed, a loaded
# machine spread the backlog over more buckets and so gave wagg more points
# to write.
start_time=1764133200

pids=()
names=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "${names[@]}"; do
        rabbitmqctl -q delete_queue "$n.q" >/dev/null 2>&1 || true
        rabbitmqctl -q delete_queue "$n.dlq" >/dev/null 2>&1 || true
        for x in "$n.x" "$n.dlx"; do
            rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"e2e\">>)." >/dev/null 2>&1 || true
        done
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x /usr/bin/victoria-metrics ] ||
    { echo "e2e: /usr/bin/victoria-metrics missing: run bash tests/setup.sh" >&2; exit 1; }
/usr/bin/victoria-metrics -storageDataPath="$out/vm" -httpListenAddr="$vm_http" \
    -opentsdbHTTPListenAddr="$vm_tsdb" -retentionPeriod=100y -search.disableCache \
    > "$out/vm.log" 2>&1 &
vm_pid=$!
pids+=($vm_pid)
vm_wait_healthy "$vm_http" "$vm_pid" "$out/vm.log"

sink_config() { # phase dir → the [sink] section
    case ${SINK:-opentsdb} in
        opentsdb) printf '[sink]\nkind = "opentsdb"\nurl = "http://%s"\n%s\n%s\n' "$vm_tsdb" \
            "${REQUESTS_IN_FLIGHT:+requests_in_flight = $REQUESTS_IN_FLIGHT}" "${GZIP:+gzip = $GZIP}" ;;
        file) printf '[sink]\nkind = "file"\npath = "%s/points.jsonl"\n' "$1" ;;
    esac
}

config() { # phase shards → $out/$phase/wagg.toml
    local phase=$1 shards=$2 name=$tag-$1
    names+=("$name")
    mkdir -p "$out/$phase"
    cat > "$out/$phase/wagg.toml" <<EOF
[module]
strategy = "hashmap"
[pipeline]
idle_flush_secs = 3
data_dir = "$out/$phase/data"
[router]
shards = $shards
metric = "e2e.$phase"
[source.amqp]
exchange = "$name.x"
queue = "$name.q"
dead_letter_exchange = "$name.dlx"
dead_letter_queue = "$name.dlq"
$(sink_config "$out/$phase")
[admin]
listen = "$admin"
token = "e2e"
EOF
}

backlog() { # phase: declare the topology and publish the backlog
    local dir=$out/$1
    "$ceiling" "$dir/wagg.toml" declare
    "$loadgen" loadgen -c "$dir/wagg.toml" --count "$messages" --metrics-per-message 100 \
        --start-time "$start_time" --messages-per-event-second 16 --progress none \
        --totals-json "$dir/totals.json" --log warn > "$dir/loadgen.txt" 2>&1
}

p99() { # histogram name: the upper bound of the bucket holding the 99th percentile
    python3 -c '
import re, sys
name, counts = sys.argv[1] + "_bucket{", {}
for line in sys.stdin:
    if line.startswith(name):
        le = re.search(r"le=\"([^\"]+)\"", line).group(1)
        counts[float(le)] = counts.get(float(le), 0) + float(line.split()[-1])
total = counts.get(float("inf"), 0)
print(next((f"{le:g}" for le in sorted(counts) if counts[le] >= 0.99 * total), "none"))
' "$1" <<< "$scrape"
}

ceiling_rate=
phase_ceiling() {
    config ceiling 1
    backlog ceiling
    "$ceiling" "$out/ceiling/wagg.toml" drain "$messages" | tee "$out/ceiling/result.txt"
    ceiling_rate=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "messages/s") print $(i - 1) }' "$out/ceiling/result.txt")
}

phase_wagg() { # phase shards shadow(yes/no)
    local phase=$1 shards=$2 shadow=$3 dir=$out/$1
    config "$phase" "$shards"
    backlog "$phase"
    local q=$tag-$phase.q
    "$wagg" run -c "$dir/wagg.toml" --log warn > "$dir/wagg.log" 2>&1 &
    local pid=$!
    pids+=($pid)
    until curl -sf "http://$admin/readyz" >/dev/null; do sleep 0.05; done
    if [ "$shadow" = yes ]; then
        "$wagg" shadow btree@builtin --admin "http://$admin" --token e2e > "$dir/shadow.txt" 2>&1
    fi
    measure_cpu_of "$pid" "$vm_pid"
    wagg_drain "$admin" "$q" "$messages"
    local first=$drain_first last=$drain_last
    # Let the idle flush write the last buckets, then read everything back.
    wagg_settle "$admin"
    local flush_p99 write_p99 checkpoint_p99
    flush_p99=$(p99 wagg_shard_flush_duration_seconds)
    write_p99=$(p99 wagg_sink_write_duration_seconds)
    checkpoint_p99=$(p99 wagg_checkpoint_duration_seconds)
    if [ "$shadow" = yes ]; then
        "$wagg" ab --admin "http://$admin" > "$dir/ab.txt" 2>&1 || true
    fi
    local rss
    rss=$(peak_rss_mib "$pid")
    kill -TERM "$pid"; wait "$pid" || true
    local points=$dir/points.jsonl
    if [ "${SINK:-opentsdb}" = opentsdb ]; then
        curl -s "http://$vm_http/internal/force_flush" >/dev/null
        points=$dir/export.jsonl
        curl -s "http://$vm_http/api/v1/export" -d "match[]={__name__=\"e2e.$phase\"}" > "$points"
    fi
    local exact
    exact=$(python3 "$here/benches/exact.py" "$dir/totals.json" "$points")
    local secs rate
    secs=$(echo "$last - $first" | bc -l)
    rate=$(echo "$messages / $secs" | bc -l)
    printf '%-9s %8.0f msg/s %10.0f metrics/s %6.1f %% of ceiling  p99 (s): flush <= %s, sink write <= %s, checkpoint <= %s  peak RSS %.0f MiB  %s  cores: %s\n' \
        "$phase" "$rate" "$(echo "$rate * 100" | bc -l)" "$(echo "100 * $rate / $ceiling_rate" | bc -l)" \
        "$flush_p99" "$write_p99" "$checkpoint_p99" "$rss" "$exact" "$drain_cpu" | tee -a "$out/results.txt"
}

echo "e2e: $messages messages of 100 metrics per phase; output in $out"
phase_ceiling
printf '%-9s %8.0f msg/s %10.0f metrics/s  100.0 %% of ceiling\n' ceiling "$ceiling_rate" \
    "$(echo "$ceiling_rate * 100" | bc -l)" | tee "$out/results.txt"
for phase in ${PHASES:-1-shard 2-shards shadow}; do
    case $phase in
        1-shard) phase_wagg 1-shard 1 no ;;
        2-shards) phase_wagg 2-shards 2 no ;;
        shadow) phase_wagg shadow 2 yes ;;
        *) echo "e2e: unknown phase $phase (1-shard, 2-shards, shadow)" >&2; exit 2 ;;
    esac
done
