#!/usr/bin/env python3
"""Markdown table of the runs under a bench-codecs folder, each beside f32.

    scripts/bench-codecs-summary.py [OUT_DIR] [F32_RUN_DIR]

F32_RUN_DIR names the f32 run to compare with when OUT_DIR holds none (e.g.
longer runs of one codec). A second table then says, for each run, the first
round whose accuracy came within 2 points of f32's final one, and the uplink
bytes it took to get there against f32's whole run.
"""
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-codecs")
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))}
if len(sys.argv) > 2:
    runs.setdefault("f32", json.loads((pathlib.Path(sys.argv[2]) / "run.json").read_text()))


def uplink(run):
    """Mean per round of the encoded update payloads and of the update streams, in bytes."""
    rounds = run["rounds"]
    payload = statistics.mean(sum(p["payload_bytes"] for p in r["participants"]) for r in rounds)
    wire = statistics.mean(r["bytes_up"] for r in rounds)
    return payload, wire


def accuracy(round_):
    """A round's central test accuracy, in percent (0 when it had none)."""
    return 100 * (round_["test_accuracy"] or 0)


def final(run):
    return accuracy(run["rounds"][-1])


base = runs.get("f32")
print("| codec | uplink payload / round | uplink stream / round | fewer bytes than f32 | downlink / round "
      "| rounds | final acc. | vs f32 | median round s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
order = ["f32", "f16", "bf16", "int8", "topk1", "topk10", "sign"]
names = sorted(runs, key=lambda n: order.index(n) if n in order else len(order))
for name in names:
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
          f"| {len(run['rounds'])} | {final(run):.2f}% | {delta} | {med:.1f} |")

if base:
    target = final(base) - 2
    f32_up = sum(r["bytes_up"] for r in base["rounds"])
    print()
    print(f"Rounds to within 2 points of f32's {final(base):.2f}% after {len(base['rounds'])} rounds "
          f"(at least {target:.2f}%):")
    print()
    print("| codec | first round at or above | accuracy then | uplink to then | fewer bytes than f32's run |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        if name == "f32":
            continue
        rounds = runs[name]["rounds"]
        hit = next((i for i, r in enumerate(rounds) if accuracy(r) >= target), None)
        if hit is None:
            best = max(accuracy(r) for r in rounds)
            print(f"| {name} | not in {len(rounds)} rounds (best {best:.2f}%) | - | - | - |")
            continue
        up = sum(r["bytes_up"] for r in rounds[: hit + 1])
        print(f"| {name} | {rounds[hit]['round']} | {accuracy(rounds[hit]):.2f}% "
              f"| {up / 2**20:.2f} MiB | {f32_up / up:.1f}x |")
