"""Loads a fedge model (model.json + model.safetensors) into the same
architecture written in PyTorch and checks that it gives the predictions
`edge-node predict` gave.

    python3 check_export.py MODEL_DIR IMAGES_BIN PREDICTIONS_JSONL

IMAGES_BIN holds N images as uint8, channel-major ([N, C, H, W] of the
card's input shape); PREDICTIONS_JSONL has one `edge-node predict --json
--top K` line per image (K = all classes). Exits 0 when every image gets the
same class and probabilities agree within 1e-4; prints what differs
otherwise. Needs only torch (no safetensors or Pillow package).
"""

import json
import struct
import sys

import torch
from torch import nn


def load_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", f"{name}: {meta['dtype']}"
        start, end = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=torch.float32)
        tensors[name] = t.reshape(meta["shape"])
    return tensors


class ConvThenDense(nn.Module):
    """fedge's cnn family and the FedAvg MNIST CNN: conv blocks (ReLU, 2x2
    max-pool) then dense layers (ReLU between), attribute names as in fedge."""

    def __init__(self, state, padding):
        super().__init__()
        self.convs = sorted(k[:-7] for k in state if k.startswith("conv") and k.endswith(".weight"))
        self.fcs = sorted(
            (k[:-7] for k in state if k.startswith("fc") and k.endswith(".weight")), key=lambda s: int(s[2:])
        )
        for name in self.convs:
            out_c, in_c, k, _ = state[name + ".weight"].shape
            setattr(self, name, nn.Conv2d(in_c, out_c, k, padding=padding))
        for name in self.fcs:
            out_f, in_f = state[name + ".weight"].shape
            setattr(self, name, nn.Linear(in_f, out_f))

    def forward(self, x):
        for name in self.convs:
            x = nn.functional.max_pool2d(torch.relu(getattr(self, name)(x)), 2)
        x = torch.flatten(x, 1)
        for i, name in enumerate(self.fcs):
            x = getattr(self, name)(x)
            if i + 1 < len(self.fcs):
                x = torch.relu(x)
        return x


def build(card, state):
    model = card["model"]
    if model in ("cnn", "cnn-wide", "cnn-xl", "2nn"):
        net = ConvThenDense(state, padding=0)
    elif model == "mnist-cnn":
        net = ConvThenDense(state, padding=2)
    else:
        raise SystemExit(f"check_export.py has no PyTorch definition of `{model}`")
    net.load_state_dict(state, strict=True)
    return net.eval()


def main():
    model_dir, images_bin, predictions = sys.argv[1:4]
    card = json.load(open(f"{model_dir}/model.json"))
    assert card["format"] == "fedge-model/1", card["format"]
    state = load_safetensors(f"{model_dir}/{card['weights']}")
    assert [[t["name"], t["shape"]] for t in card["tensors"]] == sorted(
        [[k, list(v.shape)] for k, v in state.items()]
    ), "the card's tensors differ from the weights file"
    net = build(card, state)
    c, h, w = card["input_shape"]
    raw = open(images_bin, "rb").read()
    x = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, c, h, w).float()
    norm = card["normalization"]
    mean = torch.tensor(norm["mean"]).view(1, c, 1, 1)
    std = torch.tensor(norm["std"]).view(1, c, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(net((x * norm["scale"] - mean) / std), dim=-1)
    lines = [json.loads(l) for l in open(predictions) if l.strip()]
    assert len(lines) == len(probs), f"{len(lines)} predictions for {len(probs)} images"
    worst, mismatches = 0.0, 0
    for i, (p, line) in enumerate(zip(probs, lines)):
        ours = dict((name, prob) for name, prob in line["top"])
        theirs = {card["classes"][k]: float(v) for k, v in enumerate(p)}
        if card["classes"][int(p.argmax())] != line["class"]:
            mismatches += 1
            print(f"image {i}: PyTorch says {card['classes'][int(p.argmax())]}, fedge {line['class']}")
        worst = max(worst, max(abs(ours[k] - theirs[k]) for k in ours))
    print(f"{len(lines)} images: {mismatches} class mismatches, largest probability difference {worst:.2e}")
    sys.exit(0 if mismatches == 0 and worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
