#!/usr/bin/env python3
"""Tables of scripts/bench-secagg.sh's runs: per-round medians (rounds 2
on) of time and bytes with and without secure aggregation, and accuracy.
Given several output folders (repeated runs), each figure is the median of
the runs' medians.

    python3 scripts/bench-secagg-summary.py runs/bench-secagg [runs/bench-secagg-2 ...]
"""
import json
import pathlib
import statistics
import sys

outs = [pathlib.Path(p) for p in (sys.argv[1:] or ["runs/bench-secagg"])]


def load(out, name):
    path = out / name / "run.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run if run.get("finished") else None


def med(rounds, f):
    vals = [f(r) for r in rounds[1:] or rounds]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def across(name, f):
    """The median over the runs of `name` of the per-round median of `f`."""
    vals = [med(run["rounds"], f) for run in (load(o, name) for o in outs) if run]
    vals = [v for v in vals if v is not None]
    return (statistics.median(vals), len(vals)) if vals else (None, 0)


def fmt(v, p=2):
    return "–" if v is None else f"{v:.{p}f}"


sizes = sorted(
    {int(p.name.rsplit("-", 1)[1]) for o in outs for p in o.glob("*-*") if p.is_dir() and not p.name.startswith("cifar")}
)
print("| nodes | aggregation | runs | round s | outside evaluation s | key setup s | unmasking wait s | unmasking compute s | bytes up / round | bytes down / round | up ÷ plain | time ÷ plain |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for n in sizes:
    base_t, _ = across(f"plain-{n}", lambda r: r["round_seconds"])
    base_up, _ = across(f"plain-{n}", lambda r: r["bytes_up"])
    for kind in ("plain", "secure", "secure-k8"):
        name = f"{kind}-{n}"
        t, runs = across(name, lambda r: r["round_seconds"])
        if runs == 0:
            continue
        sa = lambda k: across(name, lambda r: (r.get("secure_aggregation") or {}).get(k))[0]
        inside = across(name, lambda r: r["train_phase_seconds"])[0]
        up = across(name, lambda r: r["bytes_up"])[0]
        down = across(name, lambda r: r["bytes_down"])[0]
        agg = across(name, lambda r: r["aggregation_seconds"])[0]
        ratio_up = ratio_t = "–"
        if kind != "plain" and base_t:
            ratio_up = f"{up / base_up:.3f}×"
            ratio_t = f"{t / base_t:.2f}×"
        label = {"plain": "plain", "secure": "SecAgg (every node)", "secure-k8": "SecAgg+ (8 neighbours)"}[kind]
        print(
            f"| {n} | {label} | {runs} | {fmt(t)} | {fmt(inside)} | {fmt(sa('setup_seconds'))} | {fmt(sa('unmask_seconds'))} "
            f"| {fmt(agg, 3)} | {up:,.0f} | {down:,.0f} | {ratio_up} | {ratio_t} |"
        )
print()
print("| CIFAR-10, 10 nodes | acc. round 1 | acc. round 5 | acc. round 10 | median round s | bytes up / round | coordinator peak RSS |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for kind in ("plain", "secure"):
    run = next((r for r in (load(o, f"cifar-{kind}") for o in outs) if r), None)
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
