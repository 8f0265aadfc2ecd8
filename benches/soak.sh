#!/usr/bin/env bash
# Soak: `wagg run` under loadgen traffic with series churn for a long time,
# sampling the host's RSS, open files and /metrics every minute.
#
#   cargo build --release -p wagg
#   bash benches/soak.sh [DURATION_SECS=3600] [RATE_MSGS_PER_SEC=500] [OUT_DIR]
#
# Needs RabbitMQ on 127.0.0.1:5672 and VictoriaMetrics installed (what
# tests/setup.sh provides). Uses its own exchange and queue names and deletes
# them at the end. Writes OUT_DIR/samples.tsv (one line a minute) and
# OUT_DIR/summary.txt, whose last lines check, at the end and once the queue
# is drained:
#   messages received = decoded + dead-lettered + duplicates
#   samples routed    = samples received × rollups
# and report RSS and open files after warm-up (first 10 minutes) against the
# end. Not part of CI: it runs for an hour by default.
set -euo pipefail

duration=${1:-3600}
rate=${2:-500}
out=${3:-$(mktemp -d /tmp/wagg-soak.XXXXXX)}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
wagg=${WAGG:-$here/target/release/wagg}
[ -x "$wagg" ] || { echo "soak: build first: cargo build --release -p wagg" >&2; exit 1; }

tag=wagg-soak-$$
vm_http=127.0.0.1:${SOAK_VM_HTTP:-18528}
vm_tsdb=127.0.0.1:${SOAK_VM_TSDB:-14342}
admin=127.0.0.1:${SOAK_ADMIN:-19564}

cat > "$out/wagg.toml" <<EOF
[module]
strategy = "hashmap"
[pipeline]
data_dir = "$out/data"
[router]
shards = 2
[source.amqp]
exchange = "$tag.x"
queue = "$tag.q"
dead_letter_exchange = "$tag.dlx"
dead_letter_queue = "$tag.dlq"
[sink]
kind = "opentsdb"
url = "http://$vm_tsdb"
[admin]
listen = "$admin"
EOF

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for q in "$tag.q" "$tag.dlq"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
    for x in "$tag.x" "$tag.dlx"; do
        rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"soak\">>)." >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

/usr/bin/victoria-metrics -storageDataPath="$out/vm" -httpListenAddr="$vm_http" \
    -opentsdbHTTPListenAddr="$vm_tsdb" -retentionPeriod=100y > "$out/vm.log" 2>&1 &
pids+=($!)
"$wagg" run -c "$out/wagg.toml" --log warn > "$out/wagg.log" 2>&1 &
wagg_pid=$!
pids+=($wagg_pid)
until curl -sf "http://$admin/readyz" >/dev/null; do sleep 1; done

"$wagg" loadgen -c "$out/wagg.toml" --duration "${duration}s" --rate "$rate" \
    --metrics-per-message 100 --churn 0.2 --churn-every 60s --progress none \
    > "$out/loadgen.log" 2>&1 &
loadgen_pid=$!
pids+=($loadgen_pid)

metric() { # name: the sum of all samples of a metric in $scrape
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%.0f", s }' <<< "$scrape"
}
sample() {
    scrape=$(curl -s "http://$admin/metrics")
    local rss fds depth
    rss=$(ps -o rss= -p "$wagg_pid" | tr -d ' ')
    fds=$(ls "/proc/$wagg_pid/fd" | wc -l)
    depth=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$tag.q" '$1 == q { print $2 }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$(( $(date +%s) - start ))" "$rss" "$fds" "${depth:-?}" \
        "$(metric wagg_module_live_series)" "$(metric wagg_module_memory_bytes)" \
        "$(metric wagg_messages_received_total)" "$(metric wagg_messages_decoded_total)" \
        "$(metric wagg_messages_dead_lettered_total)" "$(metric wagg_messages_duplicate_total)" \
        "$(metric wagg_samples_received_total)" "$(metric wagg_samples_routed_total)" \
        "$(metric wagg_late_samples_total)" >> "$out/samples.tsv"
}
printf 'secs\trss_kib\tfds\tqueue\tlive_series\tmodule_bytes\treceived\tdecoded\tdead\tdup\tsamples\trouted\tlate\n' > "$out/samples.tsv"
start=$(date +%s)
echo "soak: ${duration}s at $rate msg/s, output in $out"
while kill -0 "$loadgen_pid" 2>/dev/null; do
    sample
    sleep 60
done
# Drain what is still queued, then take the final sample.
for _ in $(seq 120); do
    depth=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$tag.q" '$1 == q { print $2 }')
    [ "${depth:-1}" = 0 ] && break
    sleep 5
done
sleep 5
sample
tail -n 3 "$out/loadgen.log" > "$out/summary.txt"
awk -F'\t' 'NR == 1 { next }
    { rows++; rss[rows] = $2; fds[rows] = $3; t[rows] = $1; last = $0 }
    END {
        split(last, f, "\t")
        warm = 0; for (i = 1; i <= rows; i++) if (t[i] >= 600 && !warm) warm = i
        if (!warm) warm = 1
        maxr = 0; for (i = warm; i <= rows; i++) if (rss[i] > maxr) maxr = rss[i]
        printf "samples: %d over %d s\n", rows, f[1]
        printf "RSS after warm-up (t=%ds): %.0f MiB; max after: %.0f MiB; at the end: %.0f MiB\n", t[warm], rss[warm] / 1024, maxr / 1024, rss[rows] / 1024
        printf "open files after warm-up: %d; at the end: %d\n", fds[warm], fds[rows]
        printf "messages: received %d = decoded %d + dead-lettered %d + duplicates %d: %s\n", f[7], f[8], f[9], f[10], (f[7] == f[8] + f[9] + f[10]) ? "holds" : "DOES NOT HOLD"
        printf "samples: routed %d = received %d x 3 rollups: %s; late %d\n", f[12], f[11], (f[12] == 3 * f[11]) ? "holds" : "DOES NOT HOLD", f[13]
    }' "$out/samples.tsv" >> "$out/summary.txt"
cat "$out/summary.txt"
