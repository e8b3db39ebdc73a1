#!/usr/bin/env python3
"""Generate the PyTorch interop fixtures in tests/fixtures/.

What it makes
-------------
Trains a small MLP and a small conv net with *real* PyTorch and writes two
safetensors files for each, which let the Rust side prove it can import a
PyTorch-trained ``nn.Sequential`` and reproduce its logits.

MLP (``mlp:784-32-16-10``)
~~~~~~~~~~~~~~~~~~~~~~~~~~

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

Conv net (``conv:4-8-16-10``)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* ``tests/fixtures/torch_conv.safetensors`` -- exactly
  ``save_file(model.state_dict(), path)`` for

      nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(4, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(),
                    nn.Linear(16, 10))

  which is distill's ``conv:4-8-16-10`` (1x28x28 input; conv 5x5 pad 2 ->
  ReLU -> max-pool 2 per conv layer; flatten in (C, H, W) order; a ReLU
  hidden layer of 16; 10 classes). Keys: ``0.weight`` [4, 1, 5, 5],
  ``0.bias`` [4], ``3.weight`` [8, 4, 5, 5], ``3.bias`` [8], ``7.weight``
  [16, 392], ``7.bias`` [16], ``9.weight`` [10, 16], ``9.bias`` [10].

* ``tests/fixtures/torch_conv_io.safetensors`` -- ``x`` [8, 1, 28, 28]
  float32 in [0, 1], ``logits`` [8, 10], ``logits_t4`` [8, 10] = logits / 4,
  metadata ``{"arch": "conv:4-8-16-10", "torch_version": ...}``.

Trained the same way as the MLP (400 SGD steps, lr 0.01, momentum 0.9, batch
64, cross-entropy) on the same kind of synthetic data with 1x28x28 prototypes,
but with its own seed (1) and its own generator, after the MLP part, so the
MLP files are unchanged by it. The numpy float64 check does the convolutions
by im2col, the max-pool by reshaping, and flattens NCHW row-major; it asserts
the max abs diff is < 1e-4, and also that flattening in (H, W, C) order
instead would be far off (so the fixture catches a wrong flatten order).

Pass ``mlp`` or ``conv`` as the only argument to regenerate just that part
(default: both).

How to rerun
------------
One-time environment (outside the repo; the PyPI torch wheel is CUDA-enabled
but works on CPU):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy safetensors

Then, from the repository root:

    /tmp/torchenv/bin/python scripts/torch-fixture.py          # both
    /tmp/torchenv/bin/python scripts/torch-fixture.py conv     # conv only

Note: bit-exact reproduction of the weights is only expected with the same
torch version on the same kind of CPU; the numpy self-check holds regardless.
"""

import json
import os
import struct
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


def save_io_file(tensors, path, metadata):
    """``save_file(tensors, path, metadata=metadata)`` with a reproducible header.

    safetensors keeps ``__metadata__`` in a Rust HashMap, so the order of its
    keys in the JSON header (and so the file's bytes and SHA-256) changes from
    run to run. The header is rewritten with the keys in ``metadata``'s own
    order; it is the same entries permuted, so its length, the padding and the
    tensor data are unchanged."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "rb") as fh:
        buf = fh.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    header["__metadata__"] = {k: header["__metadata__"][k] for k in metadata}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, (len(text), n)
    text += b" " * (n - len(text))
    with open(path, "wb") as fh:
        fh.write(buf[:8] + text + buf[8 + n :])


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


def make_fixture(seed, build, make, sample, model_path, io_path, arch, check):
    """Trains `build()` on `make(gen)`'s data with its own seed and generator, writes its state
    dict to `model_path` and the reference inputs/outputs to `io_path`, then runs `check()`."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    gen = torch.Generator().manual_seed(seed)
    model = build()
    x_train, y_train, protos = make(gen)
    train(model, x_train, y_train, gen)

    model.eval()
    state = model.state_dict()
    for k, v in state.items():
        assert v.dtype == torch.float32 and v.is_contiguous(), k
        print(f"  {k:10s} {list(v.shape)}")

    os.makedirs(FIXTURE_DIR, exist_ok=True)
    save_file(state, model_path)

    # Fresh held-out inputs: one sample each of classes 0..7.
    labels = torch.arange(N_IO)
    x = sample(protos, labels, gen).contiguous()
    with torch.no_grad():
        logits = model(x)
    logits_t4 = logits / TEMPERATURE
    print(f"io argmax   : {logits.argmax(dim=1).tolist()}")
    print(f"true labels : {labels.tolist()}")
    print(f"max |logit| = {logits.abs().max().item():.4f}")

    save_io_file(
        {
            "x": x.contiguous(),
            "logits": logits.contiguous(),
            "logits_t4": logits_t4.contiguous(),
        },
        io_path,
        {"arch": arch, "torch_version": torch.__version__},
    )
    print(f"wrote {model_path} ({os.path.getsize(model_path)} bytes)")
    print(f"wrote {io_path} ({os.path.getsize(io_path)} bytes)")

    check()


def main_mlp():
    make_fixture(0, build_model, make_data, sample_inputs, MODEL_PATH, IO_PATH, ARCH, numpy_check)


# ---------------------------------------------------------------------------
# Conv net: conv:4-8-16-10. Independent of the MLP part (own seed, own
# generator), so adding it left the MLP files byte-identical.
# ---------------------------------------------------------------------------

CONV_MODEL_PATH = os.path.join(FIXTURE_DIR, "torch_conv.safetensors")
CONV_IO_PATH = os.path.join(FIXTURE_DIR, "torch_conv_io.safetensors")
CONV_ARCH = "conv:4-8-16-10"
CONV_SEED = 1
CONV_TOL = 1e-4
IMG = (1, 28, 28)


def build_conv_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, padding=2),  # 0
        nn.ReLU(),  # 1
        nn.MaxPool2d(2),  # 2
        nn.Conv2d(4, 8, 5, padding=2),  # 3
        nn.ReLU(),  # 4
        nn.MaxPool2d(2),  # 5
        nn.Flatten(),  # 6: [N, 8, 7, 7] -> [N, 392], (C, H, W) row-major
        nn.Linear(8 * 7 * 7, 16),  # 7
        nn.ReLU(),  # 8
        nn.Linear(16, 10),  # 9
    )


def make_conv_data(gen: torch.Generator):
    """As make_data, with 1x28x28 prototypes and samples."""
    protos = torch.rand(10, *IMG, generator=gen, dtype=torch.float32)
    y = torch.randint(0, 10, (N_TRAIN,), generator=gen)
    x = sample_conv_inputs(protos, y, gen)
    return x, y, protos


def sample_conv_inputs(protos: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    noise = torch.rand(y.shape[0], *IMG, generator=gen, dtype=torch.float32)
    return 0.5 * protos[y] + 0.5 * noise


def np_conv2d(x, w, b, pad):
    """Cross-correlation like nn.Conv2d (stride 1, zero padding), by im2col.
    x [N, C, H, W], w [O, C, k, k], b [O] -> [N, O, H, W] (float64)."""
    n, c, h, wd = x.shape
    o, c2, k, _ = w.shape
    assert c == c2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # cols[n, c, i, j, y, x] = xp[n, c, y + i, x + j]
    cols = np.empty((n, c, k, k, h, wd), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i : i + h, j : j + wd]
    cols = cols.reshape(n, c * k * k, h * wd)
    out = np.einsum("of,nfp->nop", w.reshape(o, c * k * k), cols)
    return out.reshape(n, o, h, wd) + b[None, :, None, None]


def np_conv2d_loops(x, w, b, pad):
    """The same convolution by explicit loops over output positions (slow; used
    on one sample to cross-check np_conv2d)."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((n, o, h, wd), dtype=np.float64)
    for s in range(n):
        for oc in range(o):
            for yy in range(h):
                for xx in range(wd):
                    out[s, oc, yy, xx] = (xp[s, :, yy : yy + k, xx : xx + k] * w[oc]).sum() + b[oc]
    return out


def np_maxpool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def numpy_check_conv():
    """Independent float64 numpy forward pass over the saved conv files."""
    w = np_load_file(CONV_MODEL_PATH)
    io = np_load_file(CONV_IO_PATH)

    expected = {
        "0.weight": (4, 1, 5, 5),
        "0.bias": (4,),
        "3.weight": (8, 4, 5, 5),
        "3.bias": (8,),
        "7.weight": (16, 392),
        "7.bias": (16,),
        "9.weight": (10, 16),
        "9.bias": (10,),
    }
    assert set(w) == set(expected), f"unexpected keys {sorted(w)}"
    for k, v in w.items():
        assert v.dtype == np.float32 and v.shape == expected[k], (k, v.dtype, v.shape)
    assert set(io) == {"x", "logits", "logits_t4"}, sorted(io)
    assert io["x"].shape == (N_IO, *IMG) and io["x"].dtype == np.float32
    assert io["logits"].shape == (N_IO, 10) and io["logits"].dtype == np.float32
    assert io["logits_t4"].shape == (N_IO, 10) and io["logits_t4"].dtype == np.float32
    assert io["x"].min() >= 0.0 and io["x"].max() <= 1.0

    f = {k: v.astype(np.float64) for k, v in w.items()}
    x = io["x"].astype(np.float64)

    z1 = np_conv2d(x, f["0.weight"], f["0.bias"], 2)  # [8, 4, 28, 28]
    loop = np_conv2d_loops(x[:1], f["0.weight"], f["0.bias"], 2)
    assert np.abs(loop - z1[:1]).max() < 1e-12, "im2col and loop convolutions differ"
    h1 = np_maxpool2(np.maximum(z1, 0.0))  # [8, 4, 14, 14]
    z2 = np_conv2d(h1, f["3.weight"], f["3.bias"], 2)  # [8, 8, 14, 14]
    h2 = np_maxpool2(np.maximum(z2, 0.0))  # [8, 8, 7, 7]
    flat = h2.reshape(N_IO, -1)  # (C, H, W) row-major, as nn.Flatten
    z3 = flat @ f["7.weight"].T + f["7.bias"]
    logits = np.maximum(z3, 0.0) @ f["9.weight"].T + f["9.bias"]

    diff = np.abs(logits - io["logits"].astype(np.float64)).max()
    diff_t4 = np.abs(logits / TEMPERATURE - io["logits_t4"].astype(np.float64)).max()
    print(f"numpy float64 check: max|diff| logits = {diff:.3e}, logits_t4 = {diff_t4:.3e}")
    assert diff < CONV_TOL, f"logits mismatch {diff}"
    assert diff_t4 < CONV_TOL, f"logits_t4 mismatch {diff_t4}"

    # The fixture must tell flatten orders apart: (H, W, C) order gives other logits.
    flat_hwc = h2.transpose(0, 2, 3, 1).reshape(N_IO, -1)
    wrong = np.maximum(flat_hwc @ f["7.weight"].T + f["7.bias"], 0.0) @ f["9.weight"].T + f["9.bias"]
    wrong_diff = np.abs(wrong - io["logits"].astype(np.float64)).max()
    print(f"(H, W, C) flatten instead: max|diff| logits = {wrong_diff:.3f}")
    assert wrong_diff > 0.1, f"a wrong flatten order is not detectable ({wrong_diff})"

    for name, z in [("conv0", z1), ("conv1", z2), ("fc0", z3)]:
        print(f"{name} pre-activations negative: {100.0 * (z < 0).mean():.0f}%")

    with safe_open(CONV_IO_PATH, framework="numpy") as fh:
        meta = fh.metadata()
    assert meta["arch"] == CONV_ARCH, meta
    assert meta["torch_version"] == torch.__version__, meta
    print(f"metadata: {meta}")
    print("numpy check: OK")


def main_conv():
    make_fixture(
        CONV_SEED,
        build_conv_model,
        make_conv_data,
        sample_conv_inputs,
        CONV_MODEL_PATH,
        CONV_IO_PATH,
        CONV_ARCH,
        numpy_check_conv,
    )


def main():
    parts = sys.argv[1:] or ["mlp", "conv"]
    unknown = [p for p in parts if p not in ("mlp", "conv")]
    if unknown:
        sys.exit(f"usage: {sys.argv[0]} [mlp|conv]... (unknown: {unknown})")
    # The MLP part runs first, exactly as before the conv part existed.
    if "mlp" in parts:
        print("== mlp:784-32-16-10 ==")
        main_mlp()
    if "conv" in parts:
        print("== conv:4-8-16-10 ==")
        main_conv()


if __name__ == "__main__":
    sys.exit(main())
