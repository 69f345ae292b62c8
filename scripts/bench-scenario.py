#!/usr/bin/env python3
"""Runs one of the benchmark scenarios S1, S2, S3 with real processes, several times.

    scripts/bench-scenario.py S2 [--runs 3] [--out runs/scenario-s2] [--write]

Each run starts a coordinator and the scenario's edge-node processes on
loopback (`coordinator fleet`) on real CIFAR-10, then trains the same thing
centrally in one process (`coordinator baseline`, the floor). The result
(every run, per-round phases, medians, machine, versions and the command)
goes to OUT/result.json and a markdown row is printed; --write puts the row
into BENCHMARKS.md's scenario table, replacing the scenario's previous row.

Phases of a round, from run.json: the coordinator's own timings
(aggregation after the last update, central evaluation, checkpoint) and,
per participant, the node's (model fetch, local training, encoding) and the
coordinator's receipt of the update stream (upload). "Dispatch" is what
remains of the time from the round's start to the update's acceptance:
the task reaching the node and the node starting on it. Node phases are
medians over the round's participants, then every phase the median over
rounds and then over runs.
"""
import argparse, json, os, pathlib, platform, re, shutil, statistics, subprocess, sys, tempfile, time

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMON = ["--set", "train.epochs=1", "--set", "train.batch_size=32",
          "--set", "train.learning_rate=0.05", "--set", "train.momentum=0.9"]

# name: (description, nodes, rounds, fleet arguments, floor arguments, goal text)
SCENARIOS = {
    "S1": dict(
        title="S1, CIFAR-10: 8 nodes, IID, E=1, B=32, 10 rounds, central evaluation after each",
        nodes=8, rounds=10,
        fleet=["--node-set", "partition.scheme=iid"],
        floor=["--epochs", "1"],
        peer=dict(round=107.0, outside_eval=101.0, accuracy=0.570, node_rss_mb=0.88 * 1000**3 / 2**20),
    ),
    "S2": dict(
        title="S2, overhead: 40 nodes, every node every round, one local step of B=32, 10 rounds",
        nodes=40, rounds=10,
        # Central evaluation only after the last round (the scenario times rounds, not evaluation).
        fleet=["--node-set", "partition.scheme=iid", "--set", "train.max_steps=1", "--set", "eval.every=10"],
        floor=["--epochs", "1", "--set", "train.max_steps=40"],
        peer=dict(round=None, outside_eval=None, note="Flower did not finish round 1 with 40 processes"),
    ),
    "S3": dict(
        title="S3, big model: cnn-wide (25,286,730 parameters), 4 nodes, one local step, 5 rounds, central evaluation after each (batches of 50)",
        nodes=4, rounds=5,
        # Evaluation batches of 50: evaluation's activations are what sits
        # beside the model at the coordinator's peak (docs/communication.md, "Coordinator memory").
        fleet=["--model", "cnn-wide", "--node-set", "partition.scheme=iid", "--set", "train.max_steps=1",
               "--set", "eval.batch_size=50"],
        floor=["--model", "cnn-wide", "--epochs", "1", "--set", "train.max_steps=4"],
        peer=dict(round=51.2, outside_eval=37.4, server_rss_mb=(2.2 + 1.1) * 1000**3 / 2**20),
    ),
}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def round_phases(r):
    """One round's phases in seconds."""
    ps = r["participants"]
    node = lambda f: median([f(p) for p in ps])
    dispatch = node(lambda p: max(0.0, p.get("arrived_seconds", 0) - p.get("fetch_seconds", 0)
                                  - p["train_seconds"] - p.get("encode_seconds", 0) - p.get("upload_seconds", 0)))
    return {
        "round": r["round_seconds"] + r.get("checkpoint_seconds", 0.0),
        "outside_eval": r["train_phase_seconds"] + r.get("checkpoint_seconds", 0.0),
        "dispatch": dispatch,
        "fetch": node(lambda p: p.get("fetch_seconds", 0.0)),
        "train": node(lambda p: p["train_seconds"]),
        "encode": node(lambda p: p.get("encode_seconds", 0.0)),
        "upload": node(lambda p: p.get("upload_seconds", 0.0)),
        "last_arrival": max((p.get("arrived_seconds", 0.0) for p in ps), default=0.0),
        "aggregation": r["aggregation_seconds"],
        "evaluation": r["eval_seconds"],
        "checkpoint": r.get("checkpoint_seconds", 0.0),
    }


def node_rss_mb(out):
    rss = []
    for log in sorted((out / "logs").glob("node-*.log")):
        m = re.findall(r"peak_rss_mb=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", log.read_text()))
        if m:
            rss.append(int(m[-1]))
    return rss


def summarize_run(out):
    run = json.loads((out / "run.json").read_text())
    floor = json.loads((out / "baseline.json").read_text())
    rounds = run["rounds"]
    phases = [round_phases(r) for r in rounds]
    keys = phases[0].keys()
    med = {k: median([p[k] for p in phases]) for k in keys}
    evaluated = [r for r in rounds if r["test_accuracy"] is not None]
    rss = node_rss_mb(out)
    return {
        "dir": str(out),
        "rounds_completed": len(rounds),
        "finished": run["finished"],
        "phases": med,
        "per_round": phases,
        "accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
        "accuracy_after_round_1": rounds[0]["test_accuracy"],
        "bytes_up_per_round": median([r["bytes_up"] for r in rounds]),
        "bytes_down_per_round": median([r["bytes_down"] for r in rounds]),
        "coordinator_peak_rss_mb": (run["peak_rss_bytes"] or 0) / 2**20,
        "node_peak_rss_mb": {"median": median(rss), "max": max(rss) if rss else None, "nodes": len(rss)},
        "parameters": run["parameters"],
        "floor": {k: floor[k] for k in ("train_seconds", "test_accuracy", "threads", "train_samples", "peak_rss_bytes")},
    }


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(open("/proc/meminfo").readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1) if mem else None,
            "kernel": platform.release()}


def versions(bin_dir):
    out = {}
    for name, cmd in [("fedge", [str(bin_dir / "coordinator"), "--version"]), ("rustc", ["rustc", "--version"])]:
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            out[name] = None
    out["libtorch"] = pathlib.Path(os.environ.get("LIBTORCH", "")).name or None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=REPO).stdout.strip()
    except OSError:
        out["commit"] = None
    return out


def fmt(x, unit="", digits=2):
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def markdown_row(name, res):
    m = res["median"]
    p = m["phases"]
    ratio = p["outside_eval"] / m["floor_seconds"] if m["floor_seconds"] else None
    acc = m["accuracy"]
    return (f"| {name} | {res['runs_completed']}/{res['runs']} | {fmt(p['round'])} | {fmt(p['outside_eval'])} | "
            f"{fmt(m['floor_seconds'])} | {fmt(ratio, '×')} | {fmt(p['dispatch'])} | {fmt(p['fetch'])} | "
            f"{fmt(p['train'])} | {fmt(p['encode'])} | {fmt(p['upload'])} | {fmt(p['aggregation'])} | "
            f"{fmt(p['evaluation'])} | {fmt(p['checkpoint'])} | {fmt(acc * 100 if acc is not None else None, '%')} | "
            f"{m['bytes_up_per_round']:,.0f} | {m['bytes_down_per_round']:,.0f} | "
            f"{m['coordinator_peak_rss_mb']:.0f} | {fmt(m['node_peak_rss_mb'], '', 0)} |")


def write_row(name, row):
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- scenarios:begin -->", "<!-- scenarios:end -->"
    if begin not in text or end not in text:
        sys.exit(f"bench-scenario: {path} has no {begin} … {end} table")
    head, rest = text.split(begin, 1)
    table, tail = rest.split(end, 1)
    lines = [l for l in table.strip("\n").split("\n") if l]
    header, rows = lines[:2], [l for l in lines[2:] if not l.startswith(f"| {name} |")]
    path.write_text(head + begin + "\n" + "\n".join(header + sorted(rows + [row])) + "\n" + end + tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--write", action="store_true", help="put the row into BENCHMARKS.md")
    ap.add_argument("--reuse", action="store_true", help="keep runs that already finished in OUT")
    args = ap.parse_args()
    sc = SCENARIOS[args.scenario]
    out = (args.out or REPO / "runs" / f"scenario-{args.scenario.lower()}").resolve()
    os.chdir(REPO)
    sh(["scripts/install-libtorch.sh"], stdout=subprocess.DEVNULL)
    data = sh(["scripts/get-cifar10.sh"], capture_output=True).stdout.strip()
    sh(["cargo", "build", "--release", "--bins"])
    rel = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
    bin_dir = pathlib.Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    for b in ("coordinator", "edge-node"):
        shutil.copy2(rel / b, bin_dir / b)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for k in range(1, args.runs + 1):
        d = out / f"run-{k}"
        done = d / "run.json"
        if not (args.reuse and done.exists() and json.loads(done.read_text())["finished"]
                and (d / "baseline.json").exists()):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            fleet = [str(bin_dir / "coordinator"), "fleet", "--nodes", str(sc["nodes"]), "--rounds", str(sc["rounds"]),
                     "--data-path", data, "--out-dir", str(d), "--set", f"sampling.min_nodes={sc['nodes']}",
                     "--set", 'sampling.round_deadline="10m"', *COMMON, *sc["fleet"]]
            print(f"bench-scenario: {args.scenario} run {k}/{args.runs}", file=sys.stderr)
            t = time.time()
            with open(out / f"run-{k}.log", "w") as log:
                ok = subprocess.run(fleet, stderr=log, stdout=log).returncode == 0
            if not ok:
                print(f"bench-scenario: run {k} failed, see {out}/run-{k}.log", file=sys.stderr)
                continue
            floor = [str(bin_dir / "coordinator"), "baseline", "--data-path", data, "--out-dir", str(d),
                     "--threads", "2", *COMMON, *sc["floor"]]
            with open(out / f"run-{k}-floor.log", "w") as log:
                sh(floor, stderr=log, stdout=log)
            print(f"bench-scenario: run {k} took {time.time() - t:.0f} s", file=sys.stderr)
        runs.append(summarize_run(d))
    shutil.rmtree(bin_dir, ignore_errors=True)
    if not runs:
        sys.exit("bench-scenario: no run finished")
    keys = runs[0]["phases"].keys()
    med = {
        "phases": {k: median([r["phases"][k] for r in runs]) for k in keys},
        "floor_seconds": median([r["floor"]["train_seconds"] for r in runs]),
        "floor_accuracy": median([r["floor"]["test_accuracy"] for r in runs]),
        "accuracy": median([r["accuracy"] for r in runs]),
        "bytes_up_per_round": median([r["bytes_up_per_round"] for r in runs]),
        "bytes_down_per_round": median([r["bytes_down_per_round"] for r in runs]),
        "coordinator_peak_rss_mb": median([r["coordinator_peak_rss_mb"] for r in runs]),
        "node_peak_rss_mb": median([r["node_peak_rss_mb"]["median"] for r in runs]),
    }
    result = {
        "scenario": args.scenario,
        "title": sc["title"],
        "command": " ".join(["scripts/bench-scenario.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions(rel),
        "runs": args.runs,
        "runs_completed": sum(1 for r in runs if r["finished"]),
        "median": med,
        "peer": sc["peer"],
        "each": runs,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    row = markdown_row(args.scenario, result)
    print(row)
    print(f"result: {out / 'result.json'}", file=sys.stderr)
    if args.write:
        write_row(args.scenario, row)


if __name__ == "__main__":
    main()
