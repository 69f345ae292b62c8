#!/usr/bin/env python3
"""Summarizes a benchmark run folder (run.json, baseline.json, logs/) as markdown."""
import json, pathlib, re, statistics, sys

out = pathlib.Path(sys.argv[1])
run = json.loads((out / "run.json").read_text())
base = json.loads((out / "baseline.json").read_text()) if (out / "baseline.json").exists() else None
rows = run["rounds"]
print("| round | wall s | outside eval s | test acc | test loss | bytes up | bytes down |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    print(f"| {r['round']} | {r['round_seconds']:.1f} | {r['train_phase_seconds']:.1f} | "
          f"{100 * (r['test_accuracy'] or 0):.2f}% | {r['test_loss'] or 0:.4f} | {r['bytes_up']:,} | {r['bytes_down']:,} |")
med = statistics.median(r["round_seconds"] for r in rows)
med_train = statistics.median(r["train_phase_seconds"] for r in rows)
print()
print(f"- median round: {med:.1f} s; outside central evaluation: {med_train:.1f} s")
print(f"- coordinator peak RSS: {run['peak_rss_bytes'] / 2**20:.0f} MiB")
node_rss = []
for log in sorted((out / "logs").glob("node-*.log")):
    m = re.findall(r"peak_rss_mb=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", log.read_text()))
    if m:
        node_rss.append(int(m[-1]))
if node_rss:
    print(f"- edge-node peak RSS: median {statistics.median(node_rss):.0f} MiB, max {max(node_rss)} MiB ({len(node_rss)} nodes)")
if base:
    print(f"- floor: {base['train_seconds']:.1f} s for 1 epoch over {base['train_samples']:,} images "
          f"({base['threads']} threads), test accuracy {100 * base['test_accuracy']:.2f}%, peak RSS {base['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"- ratio median round (outside evaluation) / floor: {med_train / base['train_seconds']:.2f}")
