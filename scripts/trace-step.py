#!/usr/bin/env python3
"""Where a replayed decode step's time goes, from a kernel timeline (scripts/cupti-trace.c).

    python3 scripts/trace-step.py trace.csv [STEPS]

Takes the last STEPS (default 8) graph launches of the trace (the replayed decode steps of
`v4rt bench`). In a step the kernels run as one chain, so each kernel's cost to the step is the
time from its predecessor's end to its own end ("adds"); "runs" is its own start-to-end, which
under programmatic dependent launch includes the time its blocks waited for the predecessor;
"lead" is how long before the predecessor's end its blocks started. Prints the step spans, then
per kernel name: calls per step and the medians of those three, sorted by the total it adds."""
import csv
import statistics
import sys
from collections import defaultdict


def main():
    path = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    launches = defaultdict(list)
    order = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 8 or row[1] == "0":
                continue
            corr = int(row[0])
            if corr not in launches:
                order.append(corr)
            start, end = int(row[3]), int(row[4])
            launches[corr].append((start, end, ",".join(row[7:])))
    if not order:
        sys.exit(f"{path}: no graph launches in the trace")
    chosen = order[-steps:]
    spans, per_name = [], defaultdict(lambda: {"adds": [], "runs": [], "lead": [], "calls": 0})
    for corr in chosen:
        kernels = sorted(launches[corr], key=lambda k: k[1])
        first_start = min(k[0] for k in kernels)
        spans.append((kernels[-1][1] - first_start) / 1e3)
        prev_end = first_start
        for start, end, name in kernels:
            d = per_name[name]
            d["adds"].append((end - prev_end) / 1e3)
            d["runs"].append((end - start) / 1e3)
            d["lead"].append((prev_end - start) / 1e3)
            d["calls"] += 1
            prev_end = end
    n = len(chosen)
    kernels_per_step = sum(d["calls"] for d in per_name.values()) / n
    print(f"{n} replayed steps, {kernels_per_step:.0f} kernels each; span median {statistics.median(spans):.1f} us "
          f"(min {min(spans):.1f}, max {max(spans):.1f})")
    print(f"{'kernel':<34} {'calls':>5} {'adds us':>8} {'total us':>9} {'runs us':>8} {'lead us':>8}")
    rows = []
    for name, d in per_name.items():
        calls = d["calls"] / n
        adds = statistics.median(d["adds"])
        rows.append((sum(d["adds"]) / n, name, calls, adds, statistics.median(d["runs"]), statistics.median(d["lead"])))
    rows.sort(reverse=True)
    for total, name, calls, adds, runs, lead in rows:
        print(f"{name[:34]:<34} {calls:>5.0f} {adds:>8.2f} {total:>9.1f} {runs:>8.2f} {lead:>8.2f}")
    print(f"{'sum':<34} {kernels_per_step:>5.0f} {'':>8} {sum(r[0] for r in rows):>9.1f}")


if __name__ == "__main__":
    main()
