#!/usr/bin/env python3
"""How many coordinates must a federated run change to get its accuracy?

Takes a finished run of the design's CNN (`model = "cnn"`, e.g. the f32 run
of scripts/bench-codecs.sh), its initial model (rounds/round-0000) and its
final model, and evaluates on the CIFAR-10 test split the initial model with
only the largest p% of the run's whole change applied, for several p. This is
the best any update that changes p% of the coordinates over the whole run can
do by keeping the run's own values, so it bounds what sparse updates (top-k)
can reach in the same number of rounds without other changes to training.

The forward pass is numpy's; before anything else the script checks that it
reproduces the run's recorded final accuracy exactly, so it cannot drift from
fedge's model unnoticed. Needs numpy.

    scripts/sparse-oracle.py RUN_DIR [CIFAR_DIR]
"""
import json
import pathlib
import struct
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

run = pathlib.Path(sys.argv[1])
data = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else pathlib.Path.home() / ".cache/fedge/cifar-10-batches-bin")
meta = json.loads((run / "model.json").read_text())
if meta["model"] != "cnn":
    sys.exit(f"sparse-oracle: the run's model is {meta['model']!r}; this script evaluates the design's cnn only")


def load(path):
    """A fedge model file (safetensors, f32 tensors named model/<name>) as {name: array}."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for key, t in header.items():
        if key == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{path}: {key} is {t['dtype']}"
        start, end = t["data_offsets"]
        out[key.split("/", 1)[-1]] = np.frombuffer(raw[8 + n + start : 8 + n + end], "<f4").reshape(t["shape"])
    return out


def test_split():
    records = np.fromfile(data / "test_batch.bin", np.uint8).reshape(-1, 3073)
    norm = meta["normalization"]
    x = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) * np.float32(norm["scale"])
    mean = np.array(norm["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(norm["std"], np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std, records[:, 0].astype(np.int64)


def accuracy(p, x, y, batch=500):
    correct = 0
    for i in range(0, len(x), batch):
        h = x[i : i + batch]
        for c in ("conv1", "conv2", "conv3"):
            # 3x3 convolution without padding, ReLU, 2x2 max-pool
            windows = sliding_window_view(h, (3, 3), axis=(2, 3))
            h = np.einsum("nchwij,ocij->nohw", windows, p[c + ".weight"], optimize=True)
            h = np.maximum(h + p[c + ".bias"].reshape(1, -1, 1, 1), 0)
            n, ch, hh, ww = h.shape
            h = h[:, :, : hh // 2 * 2, : ww // 2 * 2].reshape(n, ch, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
        h = np.maximum(h.reshape(len(h), -1) @ p["fc1.weight"].T + p["fc1.bias"], 0)
        logits = h @ p["fc2.weight"].T + p["fc2.bias"]
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


history = json.loads((run / "run.json").read_text())["rounds"]
last = history[-1]["round"]
init = load(run / "rounds/round-0000.safetensors")
final = load(run / f"rounds/round-{last:04d}.safetensors")
names = sorted(init)
x, y = test_split()

recorded = history[-1]["test_accuracy"]
mine = accuracy(final, x, y)
if abs(mine - recorded) > 1e-4:
    sys.exit(f"sparse-oracle: numpy's forward pass gives {mine:.4f} for round {last}, the run recorded {recorded:.4f}")

start = np.concatenate([init[k].ravel() for k in names])
change = np.concatenate([final[k].ravel() for k in names]) - start
energy = float((change.astype(np.float64) ** 2).sum())


def unflatten(flat):
    out, at = {}, 0
    for k in names:
        out[k] = flat[at : at + init[k].size].reshape(init[k].shape)
        at += init[k].size
    return out


print(f"run {run}: {change.size:,} parameters, round {last} accuracy {100 * recorded:.2f}% (reproduced)")
print()
print("| coordinates changed | share of the change's squared norm | test accuracy |")
print("| ---: | ---: | ---: |")
for percent in (1, 2, 5, 10, 20, 30, 50, 100):
    k = max(1, round(change.size * percent / 100))
    keep = np.argpartition(np.abs(change), -k)[-k:]
    flat = start.copy()
    flat[keep] += change[keep]
    share = float((change[keep].astype(np.float64) ** 2).sum()) / energy
    print(f"| {percent}% | {100 * share:.1f}% | {100 * accuracy(unflatten(flat), x, y):.2f}% |")
