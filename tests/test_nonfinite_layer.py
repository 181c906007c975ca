"""The non-finite probes that crashed or disagreed across backends, as tests, through the public
layer (``docs/method.md`` §1.5). Each backend runs all of them in one subprocess: a segfault
(the cpp backend wrote at an uninitialised top-k index) fails that backend's test, and the
last "ok" line says which probe it reached.

The op-level contract is in tests/ops/test_nonfinite.py and tests/ops/test_fuzz.py; how a
non-finite batch acts on the cluster statistics in training is a matter of §2.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import slim_kernels as sk
from slim_kernels.reference import slim_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")
BACKENDS = ("torch", "cpp", "triton")


def layer(backend, **kw):
    torch.manual_seed(0)
    cfg = sk.SlimConfig(backend=backend, **kw)
    lay = sk.SlimLinear(32, 16, config=cfg)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        lay.lora_B.normal_(0, 0.5)
        lay.router.normal_(0, 0.5)
    return lay


def bad_rows(y):
    return (~torch.isfinite(y)).any(1)


def reference_rows(lay, x):
    """The rows the reference makes non-finite for this layer in eval mode."""
    c = lay.config
    ready = bool(lay.clusters.cluster_initialized)
    y, _, _, _ = slim_reference(
        x.double(), lay.weight.double(), lay.bias.double(), lay.lora_A.double(),
        lay.lora_B.double(), lay.router.double(), top_k=c.top_k, scaling=c.scaling,
        yield_strength=c.yield_strength, distance_reduce=c.distance_reduce,
        centers=lay.clusters.cluster_centers if ready else None,
        cluster_vars=lay.clusters.cluster_vars if ready else None, cluster_eps=c.cluster_eps)
    return bad_rows(y)


def probe_eval_nan_token(backend):
    """The first reproduction line: one NaN token in eval (it exited 139 on cpp)."""
    lay = layer(backend).eval()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    clean = lay(x[1:])
    x[0] = NAN
    y = lay(x)
    assert bad_rows(y).tolist() == [True] + [False] * 63
    torch.testing.assert_close(y[1:], clean, rtol=1e-5, atol=1e-6)


def probe_train_backward(backend):
    """One NaN element, a -inf row and a NaN first batch in training, forward and backward:
    no crash, the bad rows non-finite, the LoRA gradients non-finite (the step is skipped)."""
    for bad in ("elem", "row", "first"):
        lay = layer(backend, num_clusters=2).train()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(40, 32, generator=g)
        if bad == "first":  # a NaN token in the batch that initialises the clusters
            x[3] = NAN
        else:
            lay(torch.randn(40, 32, generator=g))  # a healthy first batch
            sk.step_clusters(lay)
            if bad == "elem":
                x[3, 7] = NAN
            else:
                x[3] = -INF
        x.requires_grad_(True)
        y = lay(x)
        assert bad_rows(y)[3]
        y.sum().backward()
        assert bad_rows(x.grad)[3]
        assert not torch.isfinite(lay.lora_A.grad).all()


def probe_bad_weights(backend):
    """router[0, 0] = NaN, a NaN in an expert few tokens select, NaN centres and negative
    variances: the reference's non-finite rows on every backend (they once gave 64/64 on
    torch and 0/64 on cpp)."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    for what in ("router", "expert", "centers", "vars"):
        lay = layer(backend, num_clusters=3).train()
        lay(x)
        sk.step_clusters(lay)  # initialises the clusters
        lay.eval()
        with torch.no_grad():
            if what == "router":
                lay.router[0, 0] = NAN
            elif what == "expert":
                lay.lora_A[-1, 0, 5] = NAN
            elif what == "centers":
                lay.clusters.cluster_centers[1, 4] = NAN
            else:
                lay.clusters.cluster_vars[2] = -1.0
        with torch.no_grad():
            got, want = bad_rows(lay(x)), reference_rows(lay, x)
        assert torch.equal(got, want), (what, got.sum().item(), want.sum().item())
        if what in ("router", "expert", "centers"):
            assert want.all(), what


def probe_hf_llama_nan_embedding(backend):
    """A tiny HF Llama after one healthy training step, then one NaN in inputs_embeds (it
    exited 139 on cpp): no crash; the other sequence's logits are those it gets alone."""
    from hf_models import tiny_model

    torch.manual_seed(0)
    model = sk.apply_slim(tiny_model("llama"), sk.SlimConfig(backend=backend, rank=4),
                          verbose=False)
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # one healthy step (clusters set)
    sk.step_clusters(model)
    model.eval()
    emb = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        alone = model(inputs_embeds=emb[1:]).logits
        emb[0, 3, 5] = NAN
        logits = model(inputs_embeds=emb).logits
    assert not torch.isfinite(logits[0, 3]).any()
    torch.testing.assert_close(logits[1:], alone, rtol=1e-4, atol=1e-5)


PROBES = (probe_eval_nan_token, probe_train_backward, probe_bad_weights,
          probe_hf_llama_nan_embedding)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probes_in_a_subprocess(backend):
    if backend not in sk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    probes = [p.__name__ for p in PROBES
              if "hf" not in p.__name__ or importlib.util.find_spec("transformers")]
    code = (
        "import sys; sys.path[:0] = [%r, %r]\n"
        "import test_nonfinite_layer as t\n"
        "for name in %r:\n"
        "    getattr(t, name)(%r)\n"
        "    print('ok', name, flush=True)\n"
    ) % (ROOT, os.path.join(ROOT, "tests"), probes, backend)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{backend}: exit status {res.returncode}\n{out[-3000:]}"
    for name in probes:
        assert f"ok {name}" in res.stdout, out[-3000:]
