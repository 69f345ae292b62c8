#!/usr/bin/env python3
"""Markdown table of the runs under a bench-codecs folder, each beside f32."""
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-codecs")
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))}


def uplink(run):
    """Mean per round of the encoded update payloads and of the update streams, in bytes."""
    rounds = run["rounds"]
    payload = statistics.mean(sum(p["payload_bytes"] for p in r["participants"]) for r in rounds)
    wire = statistics.mean(r["bytes_up"] for r in rounds)
    return payload, wire


def final(run):
    return 100 * (run["rounds"][-1]["test_accuracy"] or 0)


base = runs.get("f32")
print("| codec | uplink payload / round | uplink stream / round | fewer bytes than f32 | downlink / round "
      "| final acc. | vs f32 | median round s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
order = ["f32", "f16", "bf16", "int8", "topk1", "topk10", "sign"]
for name in sorted(runs, key=lambda n: order.index(n) if n in order else len(order)):
    run = runs[name]
    payload, wire = uplink(run)
    down = statistics.mean(r["bytes_down"] for r in run["rounds"])
    codec = run["config"]["codec"]
    label = codec["update"]
    if label == "topk":
        label += f" {100 * codec['topk_fraction']:g}%"
    elif label in ("int8", "sign"):
        label += f" (block {codec['block']})"
    ratio = f"{base and uplink(base)[1] / wire:.2f}x" if base else "-"
    delta = f"{final(run) - final(base):+.2f}" if base else "-"
    med = statistics.median(r["round_seconds"] for r in run["rounds"])
    print(f"| {label} | {payload / 2**20:.2f} MiB | {wire / 2**20:.2f} MiB | {ratio} | {down / 2**20:.2f} MiB "
          f"| {final(run):.2f}% | {delta} | {med:.1f} |")
