#!/usr/bin/env python3
"""Generate the PyTorch interop fixtures in tests/fixtures/.

What it makes
-------------
Trains a small MLP with *real* PyTorch and writes two safetensors files that let
the Rust side prove it can import a PyTorch-trained ``nn.Sequential`` and
reproduce its logits:

* ``tests/fixtures/torch_mlp.safetensors`` -- exactly
  ``safetensors.torch.save_file(model.state_dict(), path)`` for

      nn.Sequential(nn.Dropout(0.2), nn.Linear(784, 32), nn.ReLU(),
                    nn.Dropout(0.5), nn.Linear(32, 16), nn.ReLU(),
                    nn.Linear(16, 10))

  so the keys are PyTorch's own: ``1.weight`` [32, 784], ``1.bias`` [32],
  ``4.weight`` [16, 32], ``4.bias`` [16], ``6.weight`` [10, 16],
  ``6.bias`` [10] (all float32, weights in PyTorch's [out, in] layout).

* ``tests/fixtures/torch_mlp_io.safetensors`` -- reference inputs/outputs:
  ``x`` [8, 784] float32 in [0, 1], ``logits`` [8, 10] float32 = model(x) in
  eval mode under ``torch.no_grad()``, ``logits_t4`` [8, 10] float32 =
  logits / 4.0 (temperature T = 4), with metadata
  ``{"arch": "mlp:784-32-16-10", "torch_version": torch.__version__}``.

The model is trained (train mode, dropout active) for 400 SGD steps
(lr 0.01, momentum 0.9, batch 64, cross-entropy) on deterministic synthetic
MNIST-like data: 10 fixed random class prototypes in [0, 1]^784, each sample
= 0.5 * prototype[label] + 0.5 * uniform noise. It reaches ~100% training
accuracy, so the weights are genuinely PyTorch-trained, not just initialised,
and the logits have a realistic scale (max |logit| ~ 10+), which makes the
T = 4 tempered logits meaningfully different from the raw ones. The 8 ``x``
rows are fresh held-out samples of classes 0..7.

After saving, the script reloads both files with ``safetensors.numpy`` and
recomputes the forward pass independently in numpy float64, asserting the max
absolute difference to the saved logits is < 1e-5.

How to rerun
------------
One-time environment (outside the repo; the PyPI torch wheel is CUDA-enabled
but works on CPU):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy safetensors

Then, from the repository root:

    /tmp/torchenv/bin/python scripts/torch-fixture.py

Note: bit-exact reproduction of the weights is only expected with the same
torch version on the same kind of CPU; the numpy self-check holds regardless.
"""

import os
import sys

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file
from safetensors.numpy import load_file as np_load_file
from safetensors import safe_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
MODEL_PATH = os.path.join(FIXTURE_DIR, "torch_mlp.safetensors")
IO_PATH = os.path.join(FIXTURE_DIR, "torch_mlp_io.safetensors")

ARCH = "mlp:784-32-16-10"
TEMPERATURE = 4.0
N_TRAIN = 2048
BATCH = 64
STEPS = 400
LR = 0.01
N_IO = 8
TOL = 1e-5


def build_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(0.2),
        nn.Linear(784, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def make_data(gen: torch.Generator):
    """MNIST-like synthetic data: 10 fixed random class prototypes in [0,1]^784;
    a sample of class c is 0.5 * prototype[c] + 0.5 * uniform noise (so it
    stays in [0, 1]). Labels are uniform over the 10 classes."""
    protos = torch.rand(10, 784, generator=gen, dtype=torch.float32)
    y = torch.randint(0, 10, (N_TRAIN,), generator=gen)
    x = sample_inputs(protos, y, gen)
    return x, y, protos


def sample_inputs(protos: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    noise = torch.rand(y.shape[0], 784, generator=gen, dtype=torch.float32)
    return 0.5 * protos[y] + 0.5 * noise


def train(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for step in range(STEPS):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"train accuracy (eval mode): {acc:.3f}")


def numpy_check():
    """Independent float64 numpy forward pass over the saved files."""
    w = np_load_file(MODEL_PATH)
    io = np_load_file(IO_PATH)

    expected_keys = {"1.weight", "1.bias", "4.weight", "4.bias", "6.weight", "6.bias"}
    assert set(w) == expected_keys, f"unexpected keys {sorted(w)}"
    for k, v in w.items():
        assert v.dtype == np.float32, (k, v.dtype)
    assert set(io) == {"x", "logits", "logits_t4"}, sorted(io)
    assert io["x"].shape == (N_IO, 784) and io["x"].dtype == np.float32
    assert io["logits"].shape == (N_IO, 10) and io["logits"].dtype == np.float32
    assert io["logits_t4"].shape == (N_IO, 10) and io["logits_t4"].dtype == np.float32
    assert io["x"].min() >= 0.0 and io["x"].max() <= 1.0

    f = {k: v.astype(np.float64) for k, v in w.items()}
    h = io["x"].astype(np.float64)
    h = np.maximum(h @ f["1.weight"].T + f["1.bias"], 0.0)
    h = np.maximum(h @ f["4.weight"].T + f["4.bias"], 0.0)
    logits = h @ f["6.weight"].T + f["6.bias"]

    diff = np.abs(logits - io["logits"].astype(np.float64)).max()
    diff_t4 = np.abs(logits / TEMPERATURE - io["logits_t4"].astype(np.float64)).max()
    print(f"numpy float64 check: max|diff| logits = {diff:.3e}, logits_t4 = {diff_t4:.3e}")
    assert diff < TOL, f"logits mismatch {diff}"
    assert diff_t4 < TOL, f"logits_t4 mismatch {diff_t4}"

    with safe_open(IO_PATH, framework="numpy") as fh:
        meta = fh.metadata()
    assert meta["arch"] == ARCH, meta
    assert meta["torch_version"] == torch.__version__, meta
    print(f"metadata: {meta}")
    print("numpy check: OK")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    gen = torch.Generator().manual_seed(0)
    model = build_model()
    x_train, y_train, protos = make_data(gen)
    train(model, x_train, y_train, gen)

    model.eval()
    state = model.state_dict()
    for k, v in state.items():
        assert v.dtype == torch.float32 and v.is_contiguous(), k
        print(f"  {k:10s} {list(v.shape)}")

    os.makedirs(FIXTURE_DIR, exist_ok=True)
    save_file(state, MODEL_PATH)

    # Fresh held-out inputs: one sample each of classes 0..7.
    labels = torch.arange(N_IO)
    x = sample_inputs(protos, labels, gen).contiguous()
    with torch.no_grad():
        logits = model(x)
    logits_t4 = logits / TEMPERATURE
    print(f"io argmax   : {logits.argmax(dim=1).tolist()}")
    print(f"true labels : {labels.tolist()}")
    print(f"max |logit| = {logits.abs().max().item():.4f}")

    save_file(
        {
            "x": x.contiguous(),
            "logits": logits.contiguous(),
            "logits_t4": logits_t4.contiguous(),
        },
        IO_PATH,
        metadata={"arch": ARCH, "torch_version": torch.__version__},
    )
    print(f"wrote {MODEL_PATH} ({os.path.getsize(MODEL_PATH)} bytes)")
    print(f"wrote {IO_PATH} ({os.path.getsize(IO_PATH)} bytes)")

    numpy_check()


if __name__ == "__main__":
    sys.exit(main())
