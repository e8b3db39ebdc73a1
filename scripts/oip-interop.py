#!/usr/bin/env python3
"""The Python half of scripts/oip-interop.sh (run in its virtual environment, which has
mlserver, mlserver-sklearn, scikit-learn, numpy and tritonclient[grpc]).

Subcommands (each prints what it found and exits non-zero on a failed check):
  sklearn-model DATA_DIR ROOT       train a logistic regression on MNIST, write an MLServer
                                    repository in ROOT (settings.json with free ports,
                                    sk-teacher/model-settings.json, model.joblib) and
                                    ROOT/sklearn.json (ports, local test errors)
  wait-ready ADDR MODEL SECS PID    poll ServerReady/ModelReady until both say true
  probe-mlserver ADDR MODEL ROOT OUT.json
                                    ModelMetadata, and ModelInfer with raw and typed contents
  check-report REPORT SKLEARN_JSON OUT.json
                                    the distillation's report.json
  triton-check ADDR MEMBER DATA_DIR Z.npy DIGEST OUT.json
                                    tritonclient against our teacher server
Every check is written to OUT.json as {"checks": [[name, ok, detail], …], …}.
"""

import gzip
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np


def idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def mnist(data_dir, split):
    d = Path(data_dir)
    x = idx(d / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 784)
    y = idx(d / f"{split}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return x, y


def scale(x_u8):
    # Exactly as distill scales pixels: `v as f32 / 255.0` (a correctly rounded f32 division).
    return x_u8.astype(np.float32) / np.float32(255.0)


class Checks:
    def __init__(self):
        self.items = []
        self.extra = {}

    def add(self, name, ok, detail=""):
        ok = bool(ok)
        self.items.append([name, ok, str(detail)])
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return ok

    def write(self, out):
        Path(out).write_text(json.dumps({"checks": self.items, **self.extra}, indent=1))
        return 0 if all(ok for _, ok, _ in self.items) else 1


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ---------------------------------------------------------------------------------------------
def sklearn_model(data_dir, root):
    import warnings

    import joblib
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    rows = int(os.environ.get("SK_ROWS", "12000"))
    iters = int(os.environ.get("SK_ITERS", "100"))
    root = Path(root)
    model_dir = root / "sk-teacher"
    model_dir.mkdir(parents=True, exist_ok=True)
    x, y = mnist(data_dir, "train")
    xt, yt = mnist(data_dir, "t10k")
    t0 = time.time()
    clf = LogisticRegression(max_iter=iters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # f64 weights, so that predict_proba answers FP64 for FP32 inputs.
        clf.fit(scale(x[:rows]).astype(np.float64), y[:rows])
    secs = time.time() - t0
    p = clf.predict_proba(scale(xt))
    errors = int((p.argmax(1) != yt).sum())
    joblib.dump(clf, model_dir / "model.joblib")
    np.save(root / "sklearn-test-proba.npy", p[:1024])
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "sk-teacher",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "platform": "sklearn",
                "versions": [f"sklearn/{sklearn.__version__}"],
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
                "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 10]}],
                "parameters": {"uri": "./model.joblib"},
            },
            indent=1,
        )
    )
    grpc_port, http_port, metrics_port = free_ports(3)
    (root / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "host": "127.0.0.1",
                "grpc_port": grpc_port,
                "http_port": http_port,
                "metrics_port": metrics_port,
                "metrics_endpoint": None,
                "parallel_workers": 0,
                "load_models_at_startup": True,
            },
            indent=1,
        )
    )
    info = {
        "grpc_port": grpc_port,
        "http_port": http_port,
        "rows": rows,
        "iters": int(clf.n_iter_[0]),
        "train_secs": round(secs, 1),
        "test_errors": errors,
        "proba_dtype": str(p.dtype),
        "sklearn": sklearn.__version__,
    }
    (root / "sklearn.json").write_text(json.dumps(info, indent=1))
    print(
        f"  logistic regression on {rows} training rows ({info['iters']} iterations, {secs:.1f}s): "
        f"{errors}/10000 test errors locally, predict_proba {p.dtype}"
    )
    print(f"GRPC_PORT={grpc_port}")
    return 0


# ---------------------------------------------------------------------------------------------
def wait_ready(addr, model, secs, pid):
    import tritonclient.grpc as grpcclient

    deadline = time.time() + float(secs)
    last = "no answer yet"
    client = grpcclient.InferenceServerClient(url=addr)
    while time.time() < deadline:
        if pid and not Path(f"/proc/{pid}").exists():
            print(f"  the server (pid {pid}) exited: {last}", file=sys.stderr)
            return 1
        try:
            if client.is_server_ready() and client.is_model_ready(model):
                return 0
            last = "ServerReady/ModelReady false"
        except Exception as e:  # not listening yet
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
        time.sleep(0.5)
    print(f"  not ready after {secs}s: {last}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------
def probe_mlserver(addr, model, root, out):
    import grpc
    import tritonclient.grpc as grpcclient
    from google.protobuf.json_format import MessageToDict
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    c = Checks()
    root = Path(root)
    client = grpcclient.InferenceServerClient(url=addr)
    sm = client.get_server_metadata(as_json=True)
    md = client.get_model_metadata(model, as_json=True)
    c.extra["server_metadata"] = sm
    c.extra["model_metadata"] = md
    print(f"  ServerMetadata: {json.dumps(sm)}")
    print(f"  ModelMetadata:  {json.dumps(md)}")
    outs = [o["name"] for o in md.get("outputs", [])]
    c.extra["lists_outputs"] = "predict_proba" in outs
    c.add("MLServer ModelMetadata lists the input", [i["name"] for i in md.get("inputs", [])] == ["input"],
          md.get("inputs"))

    xt, _ = mnist_dir_cached(root)
    want = np.load(root / "sklearn-test-proba.npy")
    n = 256
    x = scale(xt[:n])

    # Raw contents (what tritonclient and our coordinator send).
    inp = grpcclient.InferInput("input", [n, 784], "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("predict_proba")])
    resp = r.get_response()
    o = resp.outputs[0]
    got = r.as_numpy("predict_proba")
    raw = len(resp.raw_output_contents) > 0
    c.extra["raw_reply"] = {"datatype": o.datatype, "shape": list(o.shape), "raw_output_contents": raw}
    print(f"  raw request:   reply {o.name} {o.datatype} {list(o.shape)}, "
          f"{'raw_output_contents' if raw else 'typed contents'}")
    d = float(np.abs(got.astype(np.float64) - want[:n]).max()) if got is not None else float("inf")
    c.add("MLServer predict_proba (raw request) == local predict_proba", d <= 1e-12,
          f"max abs diff {d:.3g}")

    # Typed contents, through the bare protobuf stub.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(addr))
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="input", datatype="FP32", shape=[n, 784])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add(name="predict_proba")
    resp2 = stub.ModelInfer(req, timeout=30)
    o2 = resp2.outputs[0]
    kinds = [k for k, v in MessageToDict(o2.contents).items() if v]
    c.extra["typed_reply"] = {"datatype": o2.datatype, "shape": list(o2.shape),
                              "raw_output_contents": len(resp2.raw_output_contents) > 0,
                              "contents": kinds}
    print(f"  typed request: reply {o2.name} {o2.datatype} {list(o2.shape)}, contents {kinds}, "
          f"{len(resp2.raw_output_contents)} raw_output_contents")
    if o2.datatype == "FP64" and o2.contents.fp64_contents:
        got2 = np.array(o2.contents.fp64_contents).reshape(n, 10)
        d2 = float(np.abs(got2 - want[:n]).max())
        c.add("MLServer predict_proba (typed request) == local predict_proba", d2 <= 1e-12,
              f"max abs diff {d2:.3g}")
    # What a request naming no output gets.
    r3 = client.infer(model, [inp])
    c.extra["no_output_named"] = [(o.name, o.datatype, list(o.shape)) for o in r3.get_response().outputs]
    print(f"  request naming no output gets: {c.extra['no_output_named']}")
    return c.write(out)


_XT = None


def mnist_dir_cached(root):
    global _XT
    if _XT is None:
        _XT = mnist(os.environ["OIP_DATA_DIR"], "t10k")
    return _XT


# ---------------------------------------------------------------------------------------------
def check_report(report, sk_json, out):
    c = Checks()
    r = json.loads(Path(report).read_text())
    sk = json.loads(Path(sk_json).read_text())
    c.extra["report"] = {k: r.get(k) for k in (
        "student_test_errors", "ensemble_test_errors", "teachers", "test_size", "epochs",
        "batches_trained", "batches_expected", "samples_per_sec", "run_seconds", "retries",
        "degraded_batches", "members")}
    c.add("distillation ran every batch",
          r["batches_trained"] == r["batches_expected"] and r["batches_trained"] > 0,
          f"{r['batches_trained']}/{r['batches_expected']} batches, {r['samples_per_sec']:.0f} samples/s, "
          f"{r['run_seconds']:.1f}s")
    c.add("distilled student's test errors are sane",
          r["test_size"] == 10000 and r["student_test_errors"] < 1500,
          f"{r['student_test_errors']}/{r['test_size']} (ensemble {r.get('ensemble_test_errors')})")
    teachers = {t["member"]: t["test_errors"] for t in r.get("teachers", [])}
    ours = teachers.get("sklearn")
    c.add("sklearn member's test errors through OIP == sklearn's own",
          ours is not None and abs(ours - sk["test_errors"]) <= 2,
          f"coordinator {ours}, local {sk['test_errors']} (native member {teachers.get('native')})")
    members = {m["member"]: m for m in r.get("members", [])}
    for name in ("native", "sklearn"):
        m = members.get(name)
        if m is None:
            c.add(f"member {name} served requests", False, "not in report.json members")
            continue
        mean = m["total_latency_secs"] / m["requests"] if m["requests"] else 0.0
        c.add(f"member {name} served requests without failures",
              m["requests"] > 0 and m["failures"] == 0,
              f"{m['requests']} requests, {m['failures']} failures, mean latency {1000 * mean:.1f} ms, "
              f"max {1000 * m['max_latency_secs']:.0f} ms, answered_by {m['answered_by']}")
    c.add("no retries and no degraded batches", r["retries"] == 0 and r["degraded_batches"] == 0,
          f"retries {r['retries']}, degraded {r['degraded_batches']}")
    return c.write(out)


# ---------------------------------------------------------------------------------------------
def triton_check(addr, member, data_dir, z_npy, digest, out):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = Checks()
    client = grpcclient.InferenceServerClient(url=addr)
    c.add("is_server_live", client.is_server_live() is True)
    c.add("is_server_ready", client.is_server_ready() is True)
    c.add(f"is_model_ready({member!r})", client.is_model_ready(member) is True)
    version = digest[:16]
    c.add(f"is_model_ready({member!r}, version {version})",
          client.is_model_ready(member, model_version=version) is True)
    c.add("is_model_ready('nonexistent') is false", client.is_model_ready("nonexistent") is False)
    sm = client.get_server_metadata(as_json=True)
    md = client.get_model_metadata(member, as_json=True)
    c.extra["server_metadata"] = sm
    c.extra["model_metadata"] = md
    print(f"  ServerMetadata: {json.dumps(sm)}")
    print(f"  ModelMetadata:  {json.dumps(md)}")
    ins = [(i["name"], i["datatype"]) for i in md.get("inputs", [])]
    outs = sorted(o["name"] for o in md.get("outputs", []))
    c.add("ModelMetadata: name, version, input `input`, outputs",
          md.get("name") == member and md.get("versions") == [version] and ins == [("input", "FP32")]
          and outs == ["log_probabilities", "logits", "probabilities"],
          f"name {md.get('name')}, versions {md.get('versions')}, inputs {ins}, outputs {outs}")
    c.add("ModelMetadata: output shape [-1, 10]",
          all([int(s) for s in o["shape"]] == [-1, 10] for o in md.get("outputs", [])),
          [o["shape"] for o in md.get("outputs", [])])

    n = int(os.environ.get("TRITON_ROWS", "1024"))
    xt, _ = mnist(data_dir, "t10k")
    z = np.load(z_npy)
    c.add("eval --logits-out wrote f32 [10000, 10]", z.dtype == np.float32 and z.shape == (10000, 10),
          f"{z.dtype} {z.shape}")
    T = 2.0
    zt = z[:n].astype(np.float64) / T
    p = np.exp(zt - zt.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    wanted = [grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("probabilities")]
    figures = {}
    for dtype, x in (("FP32", scale(xt[:n])), ("UINT8", np.ascontiguousarray(xt[:n]))):
        inp = grpcclient.InferInput("input", [n, 784], dtype)
        inp.set_data_from_numpy(x)
        r = client.infer(member, [inp], outputs=wanted, parameters={"temperature": T},
                         request_id=f"interop-{dtype}")
        resp = r.get_response()
        lg, pr = r.as_numpy("logits"), r.as_numpy("probabilities")
        ok_shape = (lg is not None and pr is not None and lg.dtype == np.float32
                    and pr.dtype == np.float32 and lg.shape == (n, 10) and pr.shape == (n, 10))
        c.add(f"{dtype} [{n}, 784]: reply outputs logits, probabilities FP32 [{n}, 10]", ok_shape,
              f"{[(o.name, o.datatype, list(o.shape)) for o in resp.outputs]}, model_version "
              f"{resp.model_version!r}, id {resp.id!r}")
        if not ok_shape:
            continue
        dl = float(np.abs(lg.astype(np.float64) - z[:n].astype(np.float64) / T).max())
        dp = float(np.abs(pr.astype(np.float64) - p).max())
        figures[dtype] = {"logits_max_abs_diff": dl, "probabilities_max_abs_diff": dp}
        c.add(f"{dtype}: logits == z/{T:g}", dl <= 1e-5, f"max abs diff {dl:.3g}")
        c.add(f"{dtype}: probabilities == softmax(z/{T:g})", dp <= 1e-6, f"max abs diff {dp:.3g}")
    c.extra["figures"] = figures

    # Typed contents (fp32_contents) through the bare protobuf stub, T as a string parameter.
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(addr))
    req = service_pb2.ModelInferRequest(model_name=member)
    req.parameters["temperature"].string_param = "2"
    t = req.inputs.add(name="input", datatype="FP32", shape=[8, 784])
    t.contents.fp32_contents.extend(scale(xt[:8]).ravel().tolist())
    req.outputs.add(name="log_probabilities")
    resp = stub.ModelInfer(req, timeout=30)
    o = resp.outputs[0]
    lp = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(8, 10)
    dlp = float(np.abs(lp - np.log(p[:8])).max())
    c.add("typed fp32_contents, temperature \"2\" (string): log_probabilities == log softmax(z/2)",
          o.name == "log_probabilities" and o.datatype == "FP32" and list(o.shape) == [8, 10] and dlp <= 1e-5,
          f"{o.name} {o.datatype} {list(o.shape)}, max abs diff {dlp:.3g}")

    def refused(what, code, f):
        try:
            f()
        except InferenceServerException as e:
            ok = e.status() == f"StatusCode.{code}"
            return c.add(f"{what} -> {code}", ok, f"{e.status()}: {e.message()}")
        except Exception as e:  # noqa: BLE001
            return c.add(f"{what} -> {code}", False, f"{type(e).__name__}: {e}")
        return c.add(f"{what} -> {code}", False, "no error raised")

    small = scale(xt[:4])

    def infer(model=member, shape=(4, 784), name="input", dtype="FP32", data=None, **kw):
        i = grpcclient.InferInput(name, list(shape), dtype)
        i.set_data_from_numpy(small.reshape(shape) if data is None else data)
        return client.infer(model, [i], **kw)

    refused("infer on a wrong model name", "NOT_FOUND", lambda: infer(model="nonexistent"))
    refused("infer on a wrong version", "NOT_FOUND", lambda: infer(model_version="0000000000000000"))
    refused("get_model_metadata on a wrong model name", "NOT_FOUND",
            lambda: client.get_model_metadata("nonexistent"))
    refused("infer with a wrong shape [4, 783]", "INVALID_ARGUMENT",
            lambda: infer(shape=(4, 783), data=small[:, :783].copy()))
    refused("infer with a wrong input name", "INVALID_ARGUMENT", lambda: infer(name="x"))
    refused("infer asking an unknown output", "INVALID_ARGUMENT",
            lambda: infer(outputs=[grpcclient.InferRequestedOutput("predict_proba")]))
    refused("infer with temperature 0", "INVALID_ARGUMENT", lambda: infer(parameters={"temperature": 0.0}))
    # Still answering, and a request naming no output gets all three at T = 1.
    r = infer()
    names = sorted(o.name for o in r.get_response().outputs)
    dl = float(np.abs(r.as_numpy("logits").astype(np.float64) - z[:4]).max())
    c.add("server still answers after the refusals (no outputs named: all three, T = 1)",
          client.is_server_ready() and names == ["log_probabilities", "logits", "probabilities"]
          and dl <= 1e-5, f"outputs {names}, logits max abs diff {dl:.3g}")
    return c.write(out)


def main(argv):
    cmds = {
        "sklearn-model": (sklearn_model, 2),
        "wait-ready": (wait_ready, 4),
        "probe-mlserver": (probe_mlserver, 4),
        "check-report": (check_report, 3),
        "triton-check": (triton_check, 6),
    }
    if len(argv) < 2 or argv[1] not in cmds or len(argv) - 2 != cmds[argv[1]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    f, _ = cmds[argv[1]]
    return f(*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
