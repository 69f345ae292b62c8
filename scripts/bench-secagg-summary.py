#!/usr/bin/env python3
"""Tables of scripts/bench-secagg.sh's runs: per-round medians (rounds 2
on) of time and bytes with and without secure aggregation, and accuracy."""
import json
import pathlib
import statistics
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-secagg")


def load(name):
    path = out / name / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def med(rounds, f):
    vals = [f(r) for r in rounds[1:] or rounds]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


print("| nodes | aggregation | round s | outside evaluation s | key setup s | unmasking wait s | unmasking compute s | bytes up / round | bytes down / round | up ÷ plain | time ÷ plain |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for n in sorted({int(p.name.split("-")[1]) for p in out.glob("plain-*")} | {int(p.name.split("-")[1]) for p in out.glob("secure-*")}):
    base = load(f"plain-{n}")
    for kind in ("plain", "secure"):
        run = load(f"{kind}-{n}")
        if run is None:
            continue
        rs = run["rounds"]
        sa = lambda k: med(rs, lambda r: (r.get("secure_aggregation") or {}).get(k))
        t = med(rs, lambda r: r["round_seconds"])
        inside = med(rs, lambda r: r["train_phase_seconds"])
        up = med(rs, lambda r: r["bytes_up"])
        down = med(rs, lambda r: r["bytes_down"])
        agg = med(rs, lambda r: r["aggregation_seconds"])
        ratio_up = ratio_t = "–"
        if kind == "secure" and base:
            ratio_up = f"{up / med(base['rounds'], lambda r: r['bytes_up']):.3f}×"
            ratio_t = f"{t / med(base['rounds'], lambda r: r['round_seconds']):.2f}×"
        fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"
        print(
            f"| {n} | {kind} | {fmt(t)} | {fmt(inside)} | {fmt(sa('setup_seconds'))} | {fmt(sa('unmask_seconds'))} "
            f"| {fmt(agg, 3)} | {up:,.0f} | {down:,.0f} | {ratio_up} | {ratio_t} |"
        )
print()
print("| CIFAR-10, 10 nodes | acc. round 1 | acc. round 5 | acc. round 10 | median round s | bytes up / round | coordinator peak RSS |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for kind in ("plain", "secure"):
    run = load(f"cifar-{kind}")
    if run is None:
        continue
    rs = run["rounds"]
    acc = [r.get("test_accuracy") for r in rs]
    pick = lambda i: f"{acc[i] * 100:.2f}%" if len(acc) > i and acc[i] is not None else "–"
    rss = run.get("peak_rss_bytes")
    print(
        f"| {kind} | {pick(0)} | {pick(4)} | {pick(9)} | {med(rs, lambda r: r['round_seconds']):.1f} "
        f"| {med(rs, lambda r: r['bytes_up']):,.0f} | {rss / 2**20 if rss else 0:.0f} MiB |"
    )
