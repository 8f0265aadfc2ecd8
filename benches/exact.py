"""Checks a wagg run against loadgen's totals: every (customer, pop, bucket)
point of the `customer` rollup must equal loadgen's total exactly, and each
of the 3 rollups' grand totals the sum of all counts. Prints one verdict
line. Used by e2e.sh and collectd.sh.

    python3 benches/exact.py TOTALS_JSON POINTS_JSONL

POINTS_JSONL is either VictoriaMetrics' export (`/api/v1/export`: a series
per line with its timestamps and values) or wagg's file sink (a point per
line in OpenTSDB put format); either way the last write of a point counts.
"""
import json, sys
totals = json.load(open(sys.argv[1]))
want = {(str(t["customer"]), t["pop"], t["bucket"]): t["count"] for t in totals["per_customer"]}
last = {}  # (sorted tags, seconds) -> value
for line in open(sys.argv[2]):
    s = json.loads(line)
    if "timestamps" in s:  # VictoriaMetrics export, milliseconds
        tags = tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__"))
        for ts, v in zip(s["timestamps"], s["values"]):
            last[(tags, ts // 1000)] = v
    else:  # file sink, seconds
        last[(tuple(sorted(s["tags"].items())), s["timestamp"])] = s["value"]
got, sums = {}, {}
for (tags, ts), v in last.items():
    m = dict(tags)
    sums[m["rollup"]] = sums.get(m["rollup"], 0.0) + v
    if m["rollup"] == "customer":
        got[(m["customer"], m["pop"], ts)] = v
bad = sum(1 for k, v in want.items() if got.get(k) != v) + sum(1 for k in got if k not in want)
grand = all(abs(v - totals["count_sum"]) <= 1e-6 * totals["count_sum"] for v in sums.values()) and len(sums) == 3
print(f"exact ({len(want)} customer points, 3 rollups' grand totals equal)" if bad == 0 and grand
      else f"NOT EXACT: {bad} of {len(want)} customer points differ; rollup totals {sums} vs {totals['count_sum']}")
