"""What one SlimLinear call costs around its kernels, as counts (times are benchmarked, not
tested: ``slim-kernels bench --overhead``): the ops a steady-state training forward and
backward issue, no host sync, torch.compile without graph breaks or recompiles, and the parts
of the layer keeping to their own state (``docs/method.md`` §6, "Cost of a call")."""
import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import slim_kernels as sk

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = N = 64
T = 4
# docs/method.md §6, "Cost of a call": dispatcher ops of one steady-state training forward and
# of its backward from a given dy (the layer's own, the autograd engine's accumulation into
# .grad, and on the torch backend the backend's ops too), defaults but 4 clusters, no padding
# mask, routing statistics off
OP_BUDGET = {
    "cpp": {"forward": 9, "backward": 9},
    "torch": {"forward": 68, "backward": 36},
}


class _Ops(TorchDispatchMode):
    """Every op that reaches the dispatcher (an op implemented in C++ counts once)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# host reads: each is a device sync on a GPU
_SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item",
            "aten.unique", "aten._unique2")


class _NoSync(_Ops):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(_SYNCING) or (name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            raise AssertionError(f"host sync: {name}")
        return super().__torch_dispatch__(func, types, args, kwargs)


def _layer(backend, **kw):
    if backend not in sk.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    torch.manual_seed(0)
    layer = sk.SlimLinear.from_linear(nn.Linear(K, N), sk.SlimConfig(
        num_clusters=4, backend=backend, **kw)).train()
    layer(torch.randn(32, K))
    sk.step_clusters(layer)  # the clusters exist from here on
    assert layer.clusters.ready
    layer(torch.randn(T, K)).sum().backward()
    sk.step_clusters(layer)
    return layer


def _step(layer, mode):
    """The ops of one training forward, and of its backward from a given dy."""
    x, dy = torch.randn(T, K), torch.randn(T, N)
    with mode:
        y = layer(x)
    fwd = list(mode.ops)
    mode.ops.clear()
    with mode:
        y.backward(dy)
    return fwd, list(mode.ops)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_training_forward_and_backward_issue_few_ops(backend):
    fwd, bwd = _step(_layer(backend), _Ops())
    budget = OP_BUDGET[backend]
    assert len(fwd) <= budget["forward"], (len(fwd), fwd)
    assert len(bwd) <= budget["backward"], (len(bwd), bwd)
    # the kernels run as one op per direction on the extension's backend
    if backend == "cpp":
        assert fwd.count("slim_kernels_C.forward.default") == 1
        assert bwd.count("slim_kernels_C.backward.default") == 1


@pytest.mark.parametrize("kw", [{}, {"distance_scale": "spread"}, {"balance_coef": 0.1},
                                 {"lora_dropout": 0.1, "merge_drop": 0.2}])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_no_host_sync_once_the_clusters_exist(backend, kw, monkeypatch):
    """A steady-state training forward and backward read nothing back to the host (on a GPU
    each read would wait for the device): neither through a Python method nor an op."""
    layer = _layer(backend, **kw)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                 "__index__"):
        def refuse(*a, _n=name, **k):
            raise AssertionError(f"host sync: Tensor.{_n}")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    mask = torch.ones(T, dtype=torch.bool)
    with sk.token_mask(mask):
        _step(layer, _NoSync())


def test_the_parts_keep_to_their_own_private_state():
    """No module of the package reads or writes another module's private attributes (names
    starting with one underscore that a class of that module assigns on ``self``): the parts
    talk through their public methods. torch's own private members (``_buffers``, ``_version``,
    ...) are not the package's and are not checked."""
    pkg = Path(sk.__file__).parent
    owned = {}  # private name -> the module that assigns it on self
    trees = {}
    for path in pkg.rglob("*.py"):
        tree = ast.parse(path.read_text())
        trees[path] = tree
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                owned.setdefault(node.attr, set()).add(path)
    bad = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in owned and path not in owned[node.attr] \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                bad.append(f"{path.relative_to(pkg)}:{node.lineno} .{node.attr}")
    assert not bad, bad


# -- torch.compile ----------------------------------------------------------------------------
def _counts():
    """(graphs compiled, graph breaks) since the last _reset()."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _reset():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_layer_compiles_fullgraph_in_train_and_eval(backend):
    if backend not in sk.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    _reset()
    torch.manual_seed(0)
    layer = sk.SlimLinear.from_linear(nn.Linear(16, 8), sk.SlimConfig(
        num_clusters=4, backend=backend, balance_coef=0.01, l1_coef=0.01))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):  # the first step initialises the clusters: the same graph
        layer.train()
        (compiled(torch.randn(2, 9, 16)).square().mean() + sk.aux_loss(layer)).backward()
        opt.step()
        opt.zero_grad()
        layer.eval()
        with torch.no_grad():
            compiled(torch.randn(2, 9, 16))
    assert layer.clusters.ready
    assert _counts() == (2, 0)  # one graph for training, one for eval


def _hf_model(how):
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_models import tiny_model
    model = tiny_model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if how == "apply_slim":
        return sk.apply_slim(model, sk.SlimConfig(num_clusters=4), verbose=False)
    from peft import LoraConfig, get_peft_model
    if how == "peft_slim":
        from slim_kernels.peft import SlimPeftConfig
        return get_peft_model(model, SlimPeftConfig(num_clusters=4, target_modules=targets))
    return get_peft_model(model, LoraConfig(r=128, lora_alpha=256, target_modules=targets))


@pytest.mark.parametrize("how", ["apply_slim", "peft_slim", "peft_lora"])
def test_hf_model_compiles_once_and_once_more_for_a_new_length(how):
    """torch.compile of a tiny Llama with SLIM on all seven projections (both ways of applying
    it) trains with no graph break and one graph; a new sequence length compiles once more
    (dynamic shapes) and a third length not at all: as PEFT's LoRA does (the last case)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_models import batch

    _reset()
    model = _hf_model(how).train()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen = []
    for S in (9, 9, 9, 13, 13, 17):
        ids, am, labels = batch(S=S, pad_last=2)
        compiled(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append(_counts())
    assert seen == [(1, 0)] * 3 + [(2, 0)] * 3, seen
    if how != "peft_lora":
        assert all(m.clusters.ready for _, m in sk.slim_modules(model))


# -- what does not run, says so --------------------------------------------------------------
def test_torch_func_is_refused_naming_slim():
    layer = sk.SlimLinear(16, 8, config=sk.SlimConfig(num_clusters=2, backend="torch"))
    params = dict(layer.named_parameters())

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,)).sum()

    for call in (lambda: torch.func.grad(loss)(params, torch.randn(4, 16)),
                 lambda: torch.func.vmap(layer)(torch.randn(2, 4, 16)),
                 lambda: torch.func.jacrev(layer)(torch.randn(4, 16))):
        with pytest.raises(RuntimeError, match="slim_kernels: the SLIM op does not run under "
                                               "torch.func"):
            call()


def test_meta_device_layer_runs_for_shapes_under_autocast():
    with torch.device("meta"):
        layer = sk.SlimLinear(16, 8, config=sk.SlimConfig(num_clusters=2))
    x = torch.randn(3, 5, 16, device="meta")
    for mode in (layer.train, layer.eval):
        mode()
        assert layer(x).shape == (3, 5, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).shape == (3, 5, 8)
