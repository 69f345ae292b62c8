#!/usr/bin/env python3
"""Runs scenario S4 (asynchronous against synchronous training on a fleet of mixed speeds) with real processes.

    scripts/bench-async.py [--runs 3] [--rounds 20] [--out runs/scenario-s4] [--write]

Each run trains the same fleet twice with `coordinator fleet` on real
CIFAR-10: 16 edge-node processes, Dirichlet(0.5) label skew, device speeds
spread log-normally from 1x to 8x (`--node-slowdowns lognormal:8`, seed 42).
Once in synchronous FedAvg rounds (every node every round; a round waits for
its slowest node), once asynchronously (FedBuff, `async.buffer_size` K):
the asynchronous run gets as many client updates as the synchronous one
(rounds x 16 / K server steps). The two alternate which goes first.

Time to accuracy is measured from run.json: from the run's start
(`started_unix_ms`) to the close of the first round or step whose model
reaches the target (`closed_unix_ms`). A synchronous round's central
evaluation holds the next round back, so the evaluation time of the rounds
before it is taken out; an asynchronous run evaluates beside its steps
(taking CPU from the nodes), and a step skipped while an evaluation ran is
not counted, which can only delay the time found. Accuracy at equal client
updates is each mode's accuracy after the same number of accepted updates.

The result (every run, medians, machine, versions and the command) goes to
OUT/result.json and a markdown table is printed; --write puts the table into
BENCHMARKS.md between its s4 markers.
"""
import argparse, json, os, pathlib, platform, shutil, statistics, subprocess, sys, tempfile, time

REPO = pathlib.Path(__file__).resolve().parent.parent
NODES = 16
TARGETS = (0.50, 0.55)
COMMON = ["--set", "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.learning_rate=0.05",
          "--set", "train.momentum=0.9", "--node-set", "partition.scheme=dirichlet",
          "--node-set", "partition.alpha=0.5", "--node-slowdowns", "lognormal:8",
          "--set", f"sampling.min_nodes={NODES}", "--set", f"sampling.min_available={NODES}",
          "--set", 'sampling.round_deadline="30m"', "--set", "sampling.straggler_factor=0",
          "--set", "strategy.max_loss_ratio=0", "--set", "eval.threads=1"]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def timeline(run):
    """(seconds since the start, accepted updates so far, accuracy) per evaluated round or step."""
    start = run["started_unix_ms"]
    points, updates, evaluation = [], 0, 0.0
    synchronous = not any(r.get("staleness") for r in run["rounds"])
    for r in run["rounds"]:
        updates += len(r["participants"])
        t = (r["closed_unix_ms"] - start) / 1000.0
        if synchronous:
            t -= evaluation
            evaluation += r["eval_seconds"]
        if r["test_accuracy"] is not None:
            points.append((t, updates, r["test_accuracy"]))
    return points


def time_to(points, target):
    return next((t for t, _, a in points if a >= target), None)


def accuracy_at(points, updates):
    """The accuracy of the last evaluated model made with at most `updates` updates."""
    best = None
    for _, u, a in points:
        if u <= updates:
            best = a
    return best


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = int(open("/proc/meminfo").readline().split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "kernel": platform.release()}


def commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()


def fmt(x, digits=1, unit=""):
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def table(result):
    m = result["median"]
    rows = ["| mode | runs | time to 50% (s) | time to 55% (s) | final accuracy | accuracy at equal updates | updates |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("sync", "async"):
        s = m[mode]
        rows.append(f"| {result['labels'][mode]} | {s['runs']} | {fmt(s['t50'])} | {fmt(s['t55'])} | "
                    f"{fmt(s['final'] * 100 if s['final'] is not None else None, 2, '%')} | "
                    f"{fmt(s['at_equal'] * 100 if s['at_equal'] is not None else None, 2, '%')} | {s['updates']} |")
    ratio = lambda k: (m["sync"][k] / m["async"][k]) if m["sync"][k] and m["async"][k] else None
    rows.append("")
    rows.append(f"Async reaches 50% {fmt(ratio('t50'), 2, '×')} sooner and 55% {fmt(ratio('t55'), 2, '×')} sooner "
                f"(medians of {result['runs']} runs; goal: 2.0× to 50%, within 1 point at equal updates).")
    return "\n".join(rows)


def write_table(text):
    path = REPO / "BENCHMARKS.md"
    body = path.read_text()
    begin, end = "<!-- s4:begin -->", "<!-- s4:end -->"
    if begin not in body or end not in body:
        body += ("\n## S4: asynchronous against synchronous training on a fleet of mixed speeds\n\n"
                 "`scripts/bench-async.py` (its docstring says what it measures and how).\n\n"
                 f"{begin}\n{end}\n")
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + text + "\n" + end + tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20, help="synchronous rounds (async: as many client updates)")
    ap.add_argument("--buffer-size", type=int, default=4, help="async.buffer_size (K)")
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    ap.add_argument("--reuse", action="store_true", help="keep runs that already finished in OUT")
    args = ap.parse_args()
    out = (args.out or REPO / "runs" / "scenario-s4").resolve()
    os.chdir(REPO)
    sh(["scripts/install-libtorch.sh"], stdout=subprocess.DEVNULL)
    data = sh(["scripts/get-cifar10.sh"], capture_output=True).stdout.strip()
    sh(["cargo", "build", "--release", "--bins"])
    rel = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
    bin_dir = pathlib.Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    for b in ("coordinator", "edge-node"):
        shutil.copy2(rel / b, bin_dir / b)
    steps = args.rounds * NODES // args.buffer_size
    modes = {
        "sync": ["--rounds", str(args.rounds)],
        "async": ["--rounds", str(steps), "--set", "async.enabled=true",
                  "--set", f"async.buffer_size={args.buffer_size}"],
    }
    labels = {"sync": f"sync FedAvg, all {NODES} nodes per round, {args.rounds} rounds",
              "async": f"async FedBuff, K={args.buffer_size}, 1/sqrt(1+s), {steps} steps"}
    out.mkdir(parents=True, exist_ok=True)
    each = []
    for k in range(1, args.runs + 1):
        pair = {}
        order = ["sync", "async"] if k % 2 else ["async", "sync"]
        for mode in order:
            d = out / f"run-{k}-{mode}"
            done = d / "run.json"
            if not (args.reuse and done.exists() and json.loads(done.read_text())["finished"]):
                shutil.rmtree(d, ignore_errors=True)
                cmd = [str(bin_dir / "coordinator"), "fleet", "--nodes", str(NODES), "--data-path", data,
                       "--out-dir", str(d), *COMMON, *modes[mode]]
                print(f"bench-async: run {k}/{args.runs}, {mode}", file=sys.stderr)
                t = time.time()
                with open(out / f"run-{k}-{mode}.log", "w") as log:
                    if subprocess.run(cmd, stderr=log, stdout=log).returncode != 0:
                        print(f"bench-async: run {k} {mode} failed, see {out}/run-{k}-{mode}.log", file=sys.stderr)
                        continue
                print(f"bench-async: run {k} {mode} took {time.time() - t:.0f} s", file=sys.stderr)
            run = json.loads(done.read_text())
            points = timeline(run)
            pair[mode] = {"dir": str(d), "finished": run["finished"], "points": points,
                          "t50": time_to(points, TARGETS[0]), "t55": time_to(points, TARGETS[1]),
                          "final": points[-1][2] if points else None, "updates": points[-1][1] if points else 0,
                          "coordinator_peak_rss_mb": (run.get("peak_rss_bytes") or 0) / 2**20}
        if len(pair) == 2:
            equal = min(pair["sync"]["updates"], pair["async"]["updates"])
            for mode in pair:
                pair[mode]["at_equal"] = accuracy_at(pair[mode]["points"], equal)
            each.append(pair)
    shutil.rmtree(bin_dir, ignore_errors=True)
    if not each:
        sys.exit("bench-async: no run pair finished")
    med = {mode: {"runs": len(each), "t50": median([p[mode]["t50"] for p in each]),
                  "t55": median([p[mode]["t55"] for p in each]), "final": median([p[mode]["final"] for p in each]),
                  "at_equal": median([p[mode]["at_equal"] for p in each]),
                  "updates": median([p[mode]["updates"] for p in each])}
           for mode in ("sync", "async")}
    result = {"scenario": "S4", "command": " ".join(["scripts/bench-async.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(), "commit": commit(),
              "runs": len(each), "labels": labels, "median": med, "each": each}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result) + (f"\n\n`{result['command']}`, {result['date']}, commit {result['commit']}, "
                             f"{result['machine']['cpu']}, {result['machine']['cores']} cores.")
    print(text)
    print(f"result: {out / 'result.json'}", file=sys.stderr)
    if args.write:
        write_table(text)


if __name__ == "__main__":
    main()
