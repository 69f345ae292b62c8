#!/usr/bin/env python3
"""Markdown table of the runs under a bench-algorithms folder."""
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-alg")
print("| split | algorithm | acc. round 1 | acc. round 5 | final acc. | best acc. | median round s | node sizes (min–max) |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
for path in sorted(out.glob("*/run.json")):
    run = json.loads(path.read_text())
    split, algo = path.parent.name.split("-", 1)
    rounds = run["rounds"]
    acc = [100 * (r["test_accuracy"] or 0) for r in rounds]
    sizes = [p["num_samples"] for p in rounds[0]["participants"]] if rounds else []
    at = lambda i: f"{acc[i]:.2f}%" if len(acc) > i else "-"
    med = statistics.median(r["round_seconds"] for r in rounds) if rounds else 0
    print(f"| {split} | {algo} | {at(0)} | {at(4)} | {at(len(acc) - 1)} | {max(acc, default=0):.2f}% | {med:.1f} "
          f"| {min(sizes, default=0)}–{max(sizes, default=0)} |")
