# Sourced by e2e.sh and collectd.sh (not run on its own): reading a running
# `wagg run` through its admin API while it drains a backlog.

scrape=

new_out_dir() { # script dir: creates dir, refusing one with an earlier run in it
    # A phase's data directory holds its checkpoint, with the hashes of the
    # messages it counted: wagg would resume from it and acknowledge the
    # same backlog as duplicates (a run measured 2.6x "faster" that way).
    if [ -n "$(ls -A "$2" 2>/dev/null)" ]; then
        echo "$1: $2 is not empty: give a new OUT_DIR (wagg would resume from the checkpoints in it)" >&2
        exit 1
    fi
    mkdir -p "$2"
}

depth() { # queue: ready + unacked messages
    rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q { print $2 }'
}

metric() { # name: sum of its samples in $scrape
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%.0f", s }' <<< "$scrape"
}

cpu_ticks() { # pid: user + system CPU time so far, in clock ticks (0 if gone)
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# Pids whose CPU wagg_drain measures over the drain, as "name=pid" words.
# wagg_drain sets drain_cpu to "name cores ..." (the CPU each used between
# the first message taken and the last acked, in cores: CPU seconds / wall
# seconds).
drain_pids=() drain_cpu=

measure_cpu_of() { # wagg_pid vm_pid: wagg, VictoriaMetrics and the broker
    drain_pids=("wagg=$1" "victoria-metrics=$2" "broker=$(pgrep -o beam.smp || echo 0)")
}

vm_wait_healthy() { # http_addr pid log: until VictoriaMetrics answers, or fail if it exited
    until curl -sf "http://$1/health" >/dev/null; do
        # One that exited (port taken, bad flag) would otherwise be waited for forever.
        kill -0 "$2" 2>/dev/null || { echo "VictoriaMetrics exited; see $3" >&2; exit 1; }
        sleep 0.2
    done
}

peak_rss_mib() { # pid: the process's peak resident set (VmHWM), MiB
    awk '$1 == "VmHWM:" { printf "%.0f", $2 / 1024 }' "/proc/$1/status"
}

# wagg_drain admin queue messages: waits until wagg has taken `messages` and
# `queue` holds none, ready or unacked (every message checkpointed and
# acknowledged). Sets drain_first (the first message taken) and drain_last,
# in seconds since the epoch.
drain_first= drain_last=
wagg_drain() {
    local admin=$1 queue=$2 messages=$3
    drain_first= drain_last= drain_cpu=
    local -A cpu0=()
    local np
    while :; do
        scrape=$(curl -s "http://$admin/metrics")
        if [ -z "$drain_first" ] && [ "$(metric wagg_messages_received_total)" -gt 0 ]; then
            drain_first=$(date +%s.%N)
            for np in "${drain_pids[@]}"; do cpu0[$np]=$(cpu_ticks "${np#*=}"); done
        fi
        if [ "$(metric wagg_messages_received_total)" -ge "$messages" ] && [ "$(depth "$queue")" = 0 ]; then
            drain_last=$(date +%s.%N)
            break
        fi
        sleep 0.1
    done
    local hz secs
    hz=$(getconf CLK_TCK)
    secs=$(echo "$drain_last - $drain_first" | bc -l)
    for np in "${drain_pids[@]}"; do
        drain_cpu+="${np%%=*} $(echo "($(cpu_ticks "${np#*=}") - ${cpu0[$np]}) / $hz / $secs" | bc -l | xargs printf '%.2f') "
    done
}

# wagg_settle admin: after wagg_drain, waits until the idle flush has written
# the buckets still open (nothing pending, nothing live, the written count
# steady), for at most 100 s. Sets settled_at: when the last point was
# written (drain_last if none was after it). Leaves the last /metrics in
# $scrape.
settled_at=
wagg_settle() {
    local admin=$1 flushed written prev
    settled_at=$drain_last
    prev=$(metric wagg_points_written_total)
    for _ in $(seq 100); do
        scrape=$(curl -s "http://$admin/metrics")
        flushed=$(metric wagg_points_written_total)
        [ "$flushed" != "$prev" ] && { settled_at=$(date +%s.%N); prev=$flushed; }
        sleep 0.5
        scrape=$(curl -s "http://$admin/metrics")
        written=$(metric wagg_points_written_total)
        [ "$written" != "$prev" ] && { settled_at=$(date +%s.%N); prev=$written; }
        [ "$(metric wagg_sink_pending_points)" = 0 ] && [ "$written" = "$flushed" ] \
            && [ "$flushed" -gt 0 ] && [ "$(metric wagg_module_live_series)" = 0 ] && break
        sleep 0.5
    done
}
