#!/usr/bin/env bash
# wagg side by side with collectd, the only peer installable here that reads
# AMQP and writes OpenTSDB, on the same logical workload, into the same
# VictoriaMetrics (issue 8 item 4).
#
#   cargo build --release -p wagg -p wagg-benches
#   bash benches/collectd.sh [MESSAGES=10000] [OUT_DIR]
#
# MESSAGES generated messages of 100 metrics (seed 1), event time starting at
# 1764133200 and advancing one second every 16 messages whatever the
# publishing speed (`--messages-per-event-second`), so that both formats
# carry the same metrics, counts and timestamps: the script checks that the
# two loadgen runs' totals are identical. Phases, each draining a backlog
# published before it starts:
#   wagg                   `wagg run`, hashmap, 2 shards, JSON (as
#                          benches/e2e.sh's 2-shard phase): rollups in
#                          event-time buckets, written to /api/put
#   collectd pass-through  `amqp` subscribe → `write_tsdb`: every metric
#                          written as it is; an upper bound of collectd's
#                          throughput, it computes nothing
#   collectd aggregation   `amqp` → `aggregation` (sum, GroupBy Host and
#                          PluginInstance: wagg's `customer` rollup) →
#                          `write_tsdb`, the raw values kept from write_tsdb
#                          by a PostCache chain
# collectd is fed `wagg loadgen --format putval`: one `PUTVAL` per message
# (its `amqp` plugin reads nothing else), host = pop, plugin instance =
# c<customer> (see host/src/traffic/putval.rs). One backlog is published to
# an exchange with both collectd queues bound, so both phases drain the same
# messages.
#
# Each phase reports metrics/s, its peak RSS (VmHWM) and correctness read
# back from VictoriaMetrics against loadgen's totals:
#   wagg          every (customer, pop, bucket) point of the customer rollup
#                 equals loadgen's total, and each rollup's grand total the
#                 sum of all counts (as e2e.sh);
#   pass-through  the raw samples summed per (customer, pop, bucket) equal
#                 loadgen's totals, and there are as many as metrics;
#   aggregation   reported, not asserted: collectd sums per wall-clock
#                 interval of arrival, not per event-time bucket, and reads
#                 each value back from its cache, where a value whose
#                 identifier already has one as recent is refused; the line
#                 says how far its totals are from loadgen's.
# wagg's rate runs from the first message taken to the queue empty (as
# e2e.sh: every message acknowledged, so checkpointed); its line also says
# how much later the last open buckets were written (after the idle flush,
# 3 s here). collectd consumes with no_ack into an unbounded write queue, so
# its queue empties before it is done: its rate runs from when it starts
# using CPU to the last full buffer write_tsdb sent (`ss`), and the phase
# ends once it is idle, the queue empty and nothing was sent for 3 s.
#
# Needs RabbitMQ on 127.0.0.1:5672 (tests/setup.sh); installs collectd-core,
# librabbitmq4, libyajl2 (which collectd-core does not pull in) and
# victoria-metrics with apt-get if missing. Uses unique names and its own
# VictoriaMetrics; deletes its queues and exchanges and SIGKILLs collectd
# (which ignores SIGTERM) on exit.
set -euo pipefail

messages=${1:-10000}
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/benches/drain.sh"
out=${2:-$(mktemp -d /tmp/wagg-collectd.XXXXXX)}
new_out_dir collectd.sh "$out"
wagg=${WAGG:-$here/target/release/wagg}
ceiling=${CEILING:-$here/target/release/broker-ceiling}
for b in "$wagg" "$ceiling"; do
    [ -x "$b" ] || { echo "collectd.sh: build first: cargo build --release -p wagg -p wagg-benches" >&2; exit 1; }
done
# The target dir may be shared: a build of an older commit has no PUTVAL.
"$wagg" loadgen --help | grep -q -- '--format' \
    || { echo "collectd.sh: $wagg has no \`loadgen --format\`; rebuild (or set WAGG)" >&2; exit 1; }

missing=()
for p in collectd-core librabbitmq4 libyajl2 victoria-metrics; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "collectd.sh: installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

tag=wagg-cd-$$
amqp_uri=amqp://guest:guest@127.0.0.1:5672
vm_http=127.0.0.1:${CD_VM_HTTP:-18631}
vm_tsdb_http=127.0.0.1:${CD_VM_TSDB_HTTP:-14445}   # wagg: OpenTSDB /api/put
vm_telnet_port=${CD_VM_TELNET:-14246}              # collectd: OpenTSDB telnet `put`
admin=127.0.0.1:${CD_ADMIN:-19667}
start_time=1764133200
per_event_second=16
metrics_per_message=100
metrics=$((messages * metrics_per_message))

pids=()         # stopped with SIGTERM
collectd_pid=   # SIGKILL: it ignores SIGTERM
wagg_names=()
cd_exchange=$tag.x
cd_queues=("$tag.pass.q" "$tag.agg.q")
cleanup() {
    [ -n "$collectd_pid" ] && kill -KILL "$collectd_pid" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    del_exchange() {
        rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$1\">>), false, <<\"collectd-bench\">>)." >/dev/null 2>&1 || true
    }
    for n in "${wagg_names[@]}"; do
        rabbitmqctl -q delete_queue "$n.q" >/dev/null 2>&1 || true
        rabbitmqctl -q delete_queue "$n.dlq" >/dev/null 2>&1 || true
        del_exchange "$n.x"; del_exchange "$n.dlx"
    done
    for q in "${cd_queues[@]}"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
    del_exchange "$cd_exchange"
    rm -rf "$out/vm"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

/usr/bin/victoria-metrics -storageDataPath="$out/vm" -httpListenAddr="$vm_http" \
    -opentsdbHTTPListenAddr="$vm_tsdb_http" -opentsdbListenAddr="127.0.0.1:$vm_telnet_port" \
    -retentionPeriod=100y -search.disableCache > "$out/vm.log" 2>&1 &
vm_pid=$!
pids+=($vm_pid)
vm_wait_healthy "$vm_http" "$vm_pid" "$out/vm.log"

telnet_rows() { # samples VictoriaMetrics took over the telnet protocol (collectd's)
    curl -s "http://$vm_http/metrics" | awk '$1 == "vm_rows_inserted_total{type=\"opentsdb\"}" { print $2 }'
}

tsdb_bytes_sent() { # bytes collectd's write_tsdb sent on its open connections
    ss -tinH state established "( dport = :$vm_telnet_port )" \
        | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^bytes_sent:/) s += substr($i, 12) } END { print s + 0 }'
}

loadgen() { # dir format [flags...]: publish the backlog, totals to $dir/totals.json
    local dir=$1 format=$2
    shift 2
    "$wagg" loadgen "$@" --format "$format" --count "$messages" \
        --metrics-per-message "$metrics_per_message" --start-time "$start_time" \
        --messages-per-event-second "$per_event_second" --progress none \
        --totals-json "$dir/totals.json" --log warn > "$dir/loadgen.txt" 2>&1
}

results=()
report() { # line: print it and keep it for the summary
    printf '%s\n' "$1" | tee -a "$out/results.txt"
    results+=("$1")
}

# --- wagg: as e2e.sh's 2-shard phase --------------------------------------
wagg_rate= wagg_rss=
phase_wagg() {
    local dir=$out/wagg name=$tag-wagg
    wagg_names+=("$name")
    mkdir -p "$dir"
    cat > "$dir/wagg.toml" <<EOF
[module]
strategy = "hashmap"
[pipeline]
idle_flush_secs = 3
data_dir = "$dir/data"
[router]
shards = 2
metric = "cdbench.wagg"
[source.amqp]
exchange = "$name.x"
queue = "$name.q"
dead_letter_exchange = "$name.dlx"
dead_letter_queue = "$name.dlq"
[sink]
kind = "opentsdb"
url = "http://$vm_tsdb_http"
[admin]
listen = "$admin"
token = "collectd-bench"
EOF
    "$ceiling" "$dir/wagg.toml" declare
    loadgen "$dir" json -c "$dir/wagg.toml"
    "$wagg" run -c "$dir/wagg.toml" --log warn > "$dir/wagg.log" 2>&1 &
    local pid=$!
    pids+=($pid)
    until curl -sf "http://$admin/readyz" >/dev/null; do sleep 0.05; done
    measure_cpu_of "$pid" "$vm_pid"
    wagg_drain "$admin" "$name.q" "$messages"
    local first=$drain_first last=$drain_last
    # Let the idle flush write the last buckets, noting when the last point
    # went out: the rate above ends when every message is acknowledged
    # (checkpointed), as e2e.sh's; the buckets still open then are written
    # after idle_flush_secs.
    wagg_settle "$admin"
    local written_at=$settled_at
    wagg_rss=$(peak_rss_mib "$pid")
    kill -TERM "$pid"; wait "$pid" || true
    curl -s "http://$vm_http/internal/force_flush" >/dev/null
    curl -s "http://$vm_http/api/v1/export" --data-urlencode 'match[]={__name__="cdbench.wagg"}' > "$dir/export.jsonl"
    local exact
    exact=$(python3 "$here/benches/exact.py" "$dir/totals.json" "$dir/export.jsonl")
    wagg_rate=$(echo "$metrics / ($last - $first)" | bc -l)
    report "$(printf '%-22s %9.0f metrics/s  %6.2f s  peak RSS %5s MiB  %s; last point written %.1f s after the last ack (idle flush: 3 s); cores: %s' \
        "wagg (2 shards)" "$wagg_rate" "$(echo "$last - $first" | bc -l)" "$wagg_rss" "$exact" \
        "$(echo "$written_at - $last" | bc -l)" "$drain_cpu")"
}

# --- collectd ----------------------------------------------------------------
collectd_conf() { # dir queue... : a collectd.conf subscribing to each queue
    local dir=$1
    shift
    cat > "$dir/collectd.conf" <<EOF
Hostname "wagg-collectd-bench"
FQDNLookup false
BaseDir "$dir"
PIDFile "$dir/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
Interval 1
LoadPlugin logfile
<Plugin logfile>
  LogLevel "warning"
  File "$dir/collectd.log"
  Timestamp true
</Plugin>
# Without a plugin registering a read or init callback collectd writes
# nothing; unixsock registers one.
LoadPlugin unixsock
<Plugin unixsock>
  SocketFile "$dir/collectd.sock"
  SocketGroup "$(id -gn)"
</Plugin>
LoadPlugin amqp
<Plugin amqp>
EOF
    local q
    for q in "$@"; do
        cat >> "$dir/collectd.conf" <<EOF
  <Subscribe "$q">
    Host "127.0.0.1"
    Port "5672"
    VHost "/"
    User "guest"
    Password "guest"
    Exchange "$cd_exchange"
    ExchangeType "direct"
    Queue "$q"
    QueueDurable true
    QueueAutoDelete false
    RoutingKey "putval"
  </Subscribe>
EOF
    done
    cat >> "$dir/collectd.conf" <<EOF
</Plugin>
# FlushInterval: write_tsdb holds up to 1428 bytes until flushed.
<LoadPlugin write_tsdb>
  FlushInterval 1
</LoadPlugin>
<Plugin write_tsdb>
  <Node "vm">
    Host "127.0.0.1"
    Port "$vm_telnet_port"
  </Node>
</Plugin>
EOF
}

start_collectd() { # dir
    # The amqp plugin answers every PUTVAL on stderr ("0 Success: 1 value
    # has been dispatched."): a line per metric, not kept.
    /usr/sbin/collectd -f -C "$1/collectd.conf" > /dev/null 2>&1 &
    collectd_pid=$!
}

kill_collectd() { # it ignores SIGTERM
    kill -KILL "$collectd_pid" 2>/dev/null || true
    wait "$collectd_pid" 2>/dev/null || true
    collectd_pid=
}

# collectd declares its queues itself (as durable, not auto-deleted, with no
# arguments; a queue declared otherwise would be refused), so it is started
# once to declare and bind both, then killed; the backlog is published after.
prepare_collectd() {
    local dir=$out/collectd-declare
    mkdir -p "$dir"
    collectd_conf "$dir" "${cd_queues[@]}"
    start_collectd "$dir"
    local tries=0
    until [ -n "$(depth "${cd_queues[0]}")" ] && [ -n "$(depth "${cd_queues[1]}")" ]; do
        tries=$((tries + 1))
        [ "$tries" -lt 60 ] || { echo "collectd.sh: collectd did not declare its queues; see $dir" >&2; exit 1; }
        sleep 0.5
    done
    kill_collectd
    loadgen "$dir" putval --uri "$amqp_uri" --exchange "$cd_exchange" --routing-key putval
    cp "$dir/totals.json" "$out/putval-totals.json"
    python3 - "$out/wagg/totals.json" "$out/putval-totals.json" <<'EOF' | tee -a "$out/results.txt"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
keys = ("messages", "metrics", "count_sum", "per_customer")
if any(a[k] != b[k] for k in keys):
    sys.exit("collectd.sh: the JSON and PUTVAL workloads differ: " + ", ".join(k for k in keys if a[k] != b[k]))
print(f"same workload in both formats: {a['messages']} messages, {a['metrics']} metrics, "
      f"sum of counts {a['count_sum']:.0f}, {len(a['per_customer'])} (customer, pop, bucket) totals; "
      f"{b['published']} PUTVAL messages")
EOF
}

# Runs collectd on one queue until it has taken every message and gone idle;
# sets cd_rate (metrics/s), cd_rss (MiB), cd_secs. The rate runs from the
# first 0.1 s in which collectd had used 50 ms of CPU (its start takes ~20)
# to the last in which it sent VictoriaMetrics at least a full write_tsdb
# buffer (1428 bytes; the tail waits for the next flush). Neither the queue
# nor VictoriaMetrics tells: collectd consumes with no_ack into an unbounded
# write queue, so the broker's queue empties before it is done (the
# aggregation's sums wait in that queue behind the values), and
# VictoriaMetrics' telnet listener counts rows once a second.
cd_rate= cd_rss= cd_secs=
drain_collectd() { # dir queue
    local dir=$1 q=$2
    local pid started now first= last= busy changed cpu sent rows prev_cpu=0 prev_sent=0 prev_rows
    prev_rows=$(telnet_rows)
    start_collectd "$dir"
    pid=$collectd_pid
    started=$(date +%s%3N)
    busy=$started changed=$started
    while :; do
        sleep 0.1
        now=$(date +%s%3N)
        cpu=$(awk '{ print $14 + $15 }' "/proc/$pid/stat") # clock ticks of 10 ms
        sent=$(tsdb_bytes_sent)
        rows=$(telnet_rows)
        echo "$now $cpu $sent $rows" >> "$dir/samples.tsv"
        [ -z "$first" ] && [ "$cpu" -ge 5 ] && first=$now
        # 30 ms in 0.1 s: once done, the aggregation still wakes each
        # interval to visit its groups, ~1 tick.
        [ $((cpu - prev_cpu)) -ge 3 ] && busy=$now
        [ $((sent - prev_sent)) -ge 1428 ] && last=$now
        [ "$sent" != "$prev_sent" ] || [ "$rows" != "$prev_rows" ] && changed=$now
        prev_cpu=$cpu prev_sent=$sent prev_rows=$rows
        # Done: idle, nothing sent or received for 3 s (longer than the
        # interval and the flush), nothing left in the queue.
        if [ -n "$last" ] && [ $((now - busy)) -gt 3000 ] && [ $((now - changed)) -gt 3000 ]; then
            [ "$(depth "$q")" = 0 ] && break
            if [ $((now - busy)) -gt 60000 ]; then
                echo "collectd.sh: collectd idle for 60 s with messages left in $q; see $dir" >&2
                exit 1
            fi
        fi
        if [ -z "$last" ] && [ $((now - started)) -gt 60000 ]; then
            echo "collectd.sh: collectd sent nothing in 60 s; see $dir" >&2
            exit 1
        fi
    done
    cd_rss=$(peak_rss_mib "$pid")
    kill_collectd
    cd_secs=$(echo "($last - $first) / 1000" | bc -l)
    cd_rate=$(echo "$metrics / $cd_secs" | bc -l)
    curl -s "http://$vm_http/internal/force_flush" >/dev/null
}

pass_rate= pass_rss=
phase_pass_through() {
    local dir=$out/collectd-pass
    mkdir -p "$dir"
    collectd_conf "$dir" "${cd_queues[0]}"
    drain_collectd "$dir" "${cd_queues[0]}"
    pass_rate=$cd_rate pass_rss=$cd_rss
    curl -s "http://$vm_http/api/v1/export" --data-urlencode 'match[]={__name__=~"dns[.]c[0-9]+[.]count[.].+"}' > "$dir/export.jsonl"
    local exact
    exact=$(python3 - "$out/putval-totals.json" "$dir/export.jsonl" <<'EOF'
import json, re, sys
totals = json.load(open(sys.argv[1]))
width = totals["bucket_seconds"]
want = {(t["customer"], t["pop"], t["bucket"]): t["count"] for t in totals["per_customer"]}
got, samples = {}, 0
name = re.compile(r"dns\.c(\d+)\.count\.")
for line in open(sys.argv[2]):
    s = json.loads(line)
    customer = int(name.match(s["metric"]["__name__"]).group(1))
    pop = s["metric"]["fqdn"]
    for ts, v in zip(s["timestamps"], s["values"]):  # every sample: each is one metric
        t = ts // 1000
        key = (customer, pop, t - t % width)
        got[key] = got.get(key, 0.0) + v
        samples += 1
bad = sum(1 for k, v in want.items() if got.get(k) != v) + sum(1 for k in got if k not in want)
total = sum(got.values())
if bad == 0 and samples == totals["metrics"]:
    print(f"exact ({samples} samples = metrics; summed per (customer, pop, bucket): {len(want)} points equal)")
else:
    print(f"NOT EXACT: {samples} samples for {totals['metrics']} metrics; {bad} of {len(want)} "
          f"(customer, pop, bucket) sums differ; total {total:.0f} vs {totals['count_sum']:.0f}")
EOF
)
    report "$(printf '%-22s %9.0f metrics/s  %6.2f s  peak RSS %5s MiB  %s' \
        "collectd pass-through" "$pass_rate" "$cd_secs" "$pass_rss" "$exact")"
}

agg_rate= agg_rss=
phase_aggregation() {
    local dir=$out/collectd-agg
    mkdir -p "$dir"
    collectd_conf "$dir" "${cd_queues[1]}"
    # Plugin left blank ("/.*/"): with a fixed Plugin the aggregation names
    # every group "<plugin>-sum" whatever the PluginInstance, and all
    # customers would land in one series.
    cat >> "$dir/collectd.conf" <<EOF
LoadPlugin aggregation
<Plugin aggregation>
  <Aggregation>
    Type "count"
    GroupBy "Host"
    GroupBy "PluginInstance"
    CalculateSum true
  </Aggregation>
</Plugin>
# Raw values go to the aggregation only; its sums (plugin "aggregation")
# go to every writer: write_tsdb.
LoadPlugin match_regex
<Chain "PostCache">
  <Rule "raw_values_to_aggregation_only">
    <Match "regex">
      Plugin "^dns\$"
    </Match>
    <Target "write">
      Plugin "aggregation"
    </Target>
    Target "stop"
  </Rule>
  Target "write"
</Chain>
EOF
    drain_collectd "$dir" "${cd_queues[1]}"
    agg_rate=$cd_rate agg_rss=$cd_rss
    curl -s "http://$vm_http/api/v1/export" --data-urlencode 'match[]={__name__=~"aggregation[.]c[0-9]+-sum[.]count"}' > "$dir/export.jsonl"
    local verdict
    verdict=$(python3 - "$out/putval-totals.json" "$dir/export.jsonl" <<'EOF'
import json, re, sys
totals = json.load(open(sys.argv[1]))
want, buckets = {}, set()
for t in totals["per_customer"]:
    want[(t["customer"], t["pop"])] = want.get((t["customer"], t["pop"]), 0.0) + t["count"]
    buckets.add(t["bucket"])
got, seconds, points = {}, set(), 0
name = re.compile(r"aggregation\.c(\d+)-sum\.count")
for line in open(sys.argv[2]):
    s = json.loads(line)
    key = (int(name.match(s["metric"]["__name__"]).group(1)), s["metric"]["fqdn"])
    got[key] = got.get(key, 0.0) + sum(s["values"])
    seconds.update(ts // 1000 for ts in s["timestamps"])
    points += len(s["values"])
total, expected = sum(got.values()), totals["count_sum"]
off = sum(1 for k in set(want) | set(got) if abs(got.get(k, 0.0) - want.get(k, 0.0)) > 1e-9 * max(1.0, want.get(k, 0.0)))
print(f"not comparable per bucket: {points} sums stamped with {len(seconds)} wall-clock seconds of arrival, "
      f"not {len(buckets)} event-time buckets; grand total {total:.0f} vs {expected:.0f} "
      f"({100 * (total - expected) / expected:+.2f} %); {off} of {len(want)} (customer, pop) totals differ")
EOF
)
    report "$(printf '%-22s %9.0f metrics/s  %6.2f s  peak RSS %5s MiB  %s' \
        "collectd aggregation" "$agg_rate" "$cd_secs" "$agg_rss" "$verdict")"
}

echo "collectd.sh: $messages messages of $metrics_per_message metrics ($metrics metrics) per phase; output in $out"
collectd_version=$(/usr/sbin/collectd -h 2>&1 | awk '/^collectd [0-9]/ { sub(/,$/, "", $2); print $2; exit }')
echo "collectd ${collectd_version:-?}, victoria-metrics $(dpkg-query -W -f '${Version}' victoria-metrics), wagg $("$wagg" --version 2>&1 | awk '{ print $2 }')" \
    | tee "$out/results.txt"
phase_wagg
prepare_collectd
phase_pass_through
phase_aggregation
report "$(printf 'ratios: wagg / collectd pass-through %.1fx metrics/s (target >= 10x), %.1fx peak RSS; wagg / collectd aggregation %.1fx metrics/s, %.1fx peak RSS' \
    "$(echo "$wagg_rate / $pass_rate" | bc -l)" "$(echo "$wagg_rss / $pass_rss" | bc -l)" \
    "$(echo "$wagg_rate / $agg_rate" | bc -l)" "$(echo "$wagg_rss / $agg_rss" | bc -l)")"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/results.txt"
