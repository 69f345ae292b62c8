#!/usr/bin/env python3
"""Markdown table of the runs under a bench-privacy folder: accuracy and epsilon."""
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-privacy")
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))}


def acc(r):
    return 100 * (r["test_accuracy"] or 0)


print("| run | noise multiplier z | final clip norm | ε (δ 1e-5) after 1 / 5 / 10 rounds | acc. after 1 / 5 / 10 rounds "
      "| median round s |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name in sorted(runs, key=lambda n: (n != "plain", n)):
    rounds = runs[name]["rounds"]
    pick = [rounds[i] for i in (0, 4, 9) if i < len(rounds)]
    p = rounds[-1].get("privacy")
    eps = " / ".join(f"{r['privacy']['epsilon']:.4g}" for r in pick) if p else "-"
    z = f"{p['noise_multiplier']:g}" if p else "-"
    clip = f"{p['next_clip_norm']:.3g}" if p else "-"
    accs = " / ".join(f"{acc(r):.2f}%" for r in pick)
    med = statistics.median(r["round_seconds"] for r in rounds)
    print(f"| {name} | {z} | {clip} | {eps} | {accs} | {med:.1f} |")
