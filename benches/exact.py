"""Checks a wagg run against loadgen's totals: every (customer, pop, bucket)
point of the `customer` rollup exported from VictoriaMetrics must equal
loadgen's total exactly, and each of the 3 rollups' grand totals the sum of
all counts. Prints one verdict line. Used by e2e.sh and collectd.sh.

    python3 benches/exact.py TOTALS_JSON EXPORT_JSONL
"""
import json, sys
totals = json.load(open(sys.argv[1]))
want = {(str(t["customer"]), t["pop"], t["bucket"]): t["count"] for t in totals["per_customer"]}
got, sums = {}, {}
for line in open(sys.argv[2]):
    s = json.loads(line)
    m = s["metric"]
    last = dict(zip(s["timestamps"], s["values"]))  # the last write of each point
    sums[m["rollup"]] = sums.get(m["rollup"], 0.0) + sum(last.values())
    if m["rollup"] == "customer":
        for ts, v in last.items():
            got[(m["customer"], m["pop"], ts // 1000)] = v
bad = sum(1 for k, v in want.items() if got.get(k) != v) + sum(1 for k in got if k not in want)
grand = all(abs(v - totals["count_sum"]) <= 1e-6 * totals["count_sum"] for v in sums.values()) and len(sums) == 3
print(f"exact ({len(want)} customer points, 3 rollups' grand totals equal)" if bad == 0 and grand
      else f"NOT EXACT: {bad} of {len(want)} customer points differ; rollup totals {sums} vs {totals['count_sum']}")
