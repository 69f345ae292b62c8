#!/usr/bin/env python3
"""Benchmarks `coordinator simulate`: large fleets of virtual nodes in one process.

    scripts/bench-simulation.py [--runs 3] [--out runs/bench-simulation] [--only NAME]

Cases:
  cifar-1k   1,000 virtual nodes on CIFAR-10, Dirichlet(0.5) label skew,
             10 per round, E=1, 100 rounds, central evaluation every 10
  small-10k  10,000 virtual nodes on a small data set (the synthetic set,
             100,000 images, 10 per node, IID), 100 per round, 20 rounds,
             central evaluation every 5
  s2-40      S2 in simulation: 40 virtual nodes on CIFAR-10 (IID), every
             node every round, one local step of B=32, 10 rounds, central
             evaluation after the last

Each run's peak RSS (the whole process: coordinator, data, virtual nodes,
training threads), round times and accuracy come from its run.json; the
result (every run, medians, machine, versions, command) goes to
OUT/result.json and a markdown table is printed.
"""
import argparse, json, os, pathlib, platform, shutil, statistics, subprocess, sys, tempfile, time

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMON = ["--set", "train.epochs=1", "--set", "train.batch_size=32",
          "--set", "train.learning_rate=0.05", "--set", "train.momentum=0.9"]
CASES = {
    "cifar-1k": dict(cifar=True, nodes=1000, rounds=100, args=[
        "--set", 'simulation.partition="dirichlet"', "--set", "simulation.alpha=0.5",
        "--set", "simulation.min_size=10", "--set", "sampling.fraction=0.01", "--set", "eval.every=10"]),
    "small-10k": dict(cifar=False, nodes=10000, rounds=20, args=[
        "--set", "data.synthetic_train_samples=100000", "--set", "data.synthetic_test_samples=2000",
        "--set", "sampling.fraction=0.01", "--set", "eval.every=5"]),
    "s2-40": dict(cifar=True, nodes=40, rounds=10, args=[
        "--set", "train.max_steps=1", "--set", "eval.every=10"]),
}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(d):
    run = json.loads((d / "run.json").read_text())
    rounds = run["rounds"]
    # Round 1 includes the first use of each training thread's model.
    later = rounds[1:] or rounds
    evaluated = [r for r in rounds if r["test_accuracy"] is not None]
    return {
        "dir": str(d),
        "finished": run["finished"],
        "rounds": len(rounds),
        "participants_per_round": median([len(r["participants"]) for r in rounds]),
        "round_seconds": median([r["round_seconds"] + r.get("checkpoint_seconds", 0) for r in later]),
        "outside_eval_seconds": median([r["train_phase_seconds"] + r.get("checkpoint_seconds", 0) for r in later]),
        "eval_seconds": median([r["eval_seconds"] for r in evaluated]),
        "accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
        "accuracies": [(r["round"], r["test_accuracy"]) for r in evaluated],
        "peak_rss_mb": (run["peak_rss_bytes"] or 0) / 2**20,
        "wall_seconds": (json.loads((d / "timing.json").read_text())["wall_seconds"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "runs" / "bench-simulation")
    ap.add_argument("--only", choices=sorted(CASES))
    args = ap.parse_args()
    os.chdir(REPO)
    subprocess.run(["scripts/install-libtorch.sh"], check=True, stdout=subprocess.DEVNULL)
    data = subprocess.run(["scripts/get-cifar10.sh"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["cargo", "build", "--release", "--bins"], check=True)
    rel = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
    bin_dir = pathlib.Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    shutil.copy2(rel / "coordinator", bin_dir / "coordinator")
    out = args.out.resolve()
    results = {}
    for name, case in CASES.items():
        if args.only and name != args.only:
            continue
        runs = []
        for k in range(1, args.runs + 1):
            d = out / name / f"run-{k}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            cmd = [str(bin_dir / "coordinator"), "simulate", "--nodes", str(case["nodes"]),
                   "--rounds", str(case["rounds"]), "--out-dir", str(d), *COMMON, *case["args"]]
            if case["cifar"]:
                cmd += ["--data-path", data]
            print(f"bench-simulation: {name} run {k}/{args.runs}", file=sys.stderr)
            t = time.time()
            with open(out / name / f"run-{k}.log", "w") as log:
                ok = subprocess.run(cmd, stderr=log, stdout=log).returncode == 0
            (d / "timing.json").write_text(json.dumps({"wall_seconds": time.time() - t}))
            if not ok:
                print(f"bench-simulation: {name} run {k} failed, see {out}/{name}/run-{k}.log", file=sys.stderr)
                continue
            runs.append(summarize(d))
        keys = ["round_seconds", "outside_eval_seconds", "eval_seconds", "accuracy", "peak_rss_mb", "wall_seconds"]
        results[name] = {"case": case, "runs": runs,
                         "median": {k: median([r[k] for r in runs]) for k in keys}}
    shutil.rmtree(bin_dir, ignore_errors=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    result = {
        "command": " ".join(["scripts/bench-simulation.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "cases": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| case | virtual nodes | per round | rounds | runs | round s | outside eval s | evaluation s | "
          "test accuracy | peak RSS | whole run s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        m, c = r["median"], r["case"]
        per_round = median([x["participants_per_round"] for x in r["runs"]])
        fmt = lambda x, f="{:.2f}": "–" if x is None else f.format(x)
        print(f"| {name} | {c['nodes']:,} | {fmt(per_round, '{:.0f}')} | {c['rounds']} | {len(r['runs'])}/{args.runs} | "
              f"{fmt(m['round_seconds'])} | {fmt(m['outside_eval_seconds'])} | {fmt(m['eval_seconds'])} | "
              f"{fmt(m['accuracy'] and 100 * m['accuracy'], '{:.2f}%')} | {fmt(m['peak_rss_mb'], '{:.0f} MiB')} | "
              f"{fmt(m['wall_seconds'], '{:.0f}')} |")


if __name__ == "__main__":
    main()
