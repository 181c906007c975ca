"""save_slim / load_slim: bit-exact round trip; every error names module and tensor and
leaves the model unchanged."""
import json
import os

import pytest
import torch

import slim_kernels as sk
from hf_models import batch, tiny_model
from test_hf import CFG, _snapshot, assert_unchanged, randomise_B, slim

pytest.importorskip("safetensors")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-ish SLIM Llama (random B, clusters moved) saved to a folder."""
    path = tmp_path_factory.mktemp("slim") / "adapter"
    model = slim(tiny_model("llama", seed=0))
    randomise_B(model)
    ids, am, _ = batch()
    model.train()
    model(input_ids=ids, attention_mask=am)
    model(input_ids=ids, attention_mask=am)
    model.eval()
    sk.save_slim(model, str(path))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    return path, model, logits


def test_files_and_config(saved):
    path, model, _ = saved
    assert sorted(os.listdir(path)) == ["slim_adapter.safetensors", "slim_config.json"]
    meta = json.loads((path / "slim_config.json").read_text())
    assert meta["format_version"] == 1 and meta["modules"] == model.slim_summary.layers
    assert sk.SlimConfig.from_dict(meta["config"]) == sk.SlimConfig(**CFG)
    assert len(meta["tensors"]) == 6 * 14


def test_round_trip_bit_exact(saved):
    path, model, logits = saved
    fresh = tiny_model("llama", seed=0)  # same base weights, no SLIM
    out = sk.load_slim(fresh, str(path))
    assert out is fresh and fresh.slim_summary.layers == model.slim_summary.layers
    fresh.eval()
    ids, am, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=am).logits, logits)
    for (n, a), (_, b) in zip(sk.slim_modules(model), sk.slim_modules(fresh)):
        for t in ("lora_A", "lora_B", "router", "cluster_centers", "cluster_vars", "cluster_initialized"):
            assert torch.equal(getattr(a, t), getattr(b, t)), (n, t)
        assert b._clusters_ready()
    # trains after loading: only SLIM parameters
    assert {n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters() if p.requires_grad} == \
        {"lora_A", "lora_B", "router"}
    fresh.train()
    fresh(input_ids=ids, attention_mask=am, labels=ids).loss.backward()


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _expect_error(path, match, model=None, exc=ValueError):
    model = tiny_model("llama", seed=0) if model is None else model
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        sk.load_slim(model, str(path))
    assert_unchanged(model, snap)


def test_load_errors_leave_model_unchanged(saved, tmp_path):
    path, _, _ = saved
    # another shape
    _expect_error(path, r"module 'model\.layers\.0\.self_attn\.q_proj': tensor 'lora_A' has shape",
                  model=tiny_model("llama", hidden_size=48))
    # fewer layers: adapter module missing in model
    _expect_error(path, r"module 'model\.layers\.1\..*does not exist",
                  model=tiny_model("llama", num_hidden_layers=1))
    # more layers: a model module has no tensors
    _expect_error(path, r"module 'model\.layers\.2\..*has no tensors",
                  model=tiny_model("llama", num_hidden_layers=3))
    # SLIM already applied
    _expect_error(path, "already", model=slim(tiny_model("llama")), exc=RuntimeError)
    # missing folder
    _expect_error(tmp_path / "nope", "does not exist", exc=FileNotFoundError)


def _rewrite_tensors(src, dst, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(str(src / "slim_adapter.safetensors"))
    fn(t)
    save_file(t, str(dst / "slim_adapter.safetensors"))


def test_missing_extra_corrupt_truncated(saved, tmp_path):
    path, _, _ = saved
    key = "model.layers.1.mlp.up_proj.lora_B"
    d = _copy(path, tmp_path)
    _rewrite_tensors(path, d, lambda t: t.pop(key))
    _expect_error(d, r"module 'model\.layers\.1\.mlp\.up_proj': tensor 'lora_B' is missing")
    _rewrite_tensors(path, d, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.extra", torch.ones(2)))
    _expect_error(d, r"module 'model\.layers\.1\.mlp\.up_proj': tensor 'extra'")
    # flipped bytes in the data: caught by the checksum
    data = bytearray((path / "slim_adapter.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d / "slim_adapter.safetensors").write_bytes(bytes(data))
    _expect_error(d, r"module 'model\.layers\.\d\.[\w.]+': tensor '\w+' fails its sha256")
    # truncated file
    (d / "slim_adapter.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    _expect_error(d, "corrupt or truncated")
    # truncated / invalid json
    (d / "slim_adapter.safetensors").write_bytes((path / "slim_adapter.safetensors").read_bytes())
    text = (path / "slim_config.json").read_text()
    (d / "slim_config.json").write_text(text[: len(text) // 2])
    _expect_error(d, "not valid JSON")
    meta = json.loads(text)
    meta["format_version"] = 99
    (d / "slim_config.json").write_text(json.dumps(meta))
    _expect_error(d, "format_version")
    meta = json.loads(text)
    meta["config"]["rank"] = -1
    (d / "slim_config.json").write_text(json.dumps(meta))
    _expect_error(d, "invalid SlimConfig")


def test_failure_during_load_rolls_back(saved, monkeypatch):
    """Even an error after validation (while copying tensors) puts the model back."""
    path, _, _ = saved
    model = tiny_model("llama", seed=0)
    snap = _snapshot(model)
    calls = []

    def boom(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return orig(self, *a, **k)

    orig = sk.SlimLinear.load_state_dict
    monkeypatch.setattr(sk.SlimLinear, "load_state_dict", boom)
    with pytest.raises(RuntimeError, match="boom"):
        sk.load_slim(model, str(path))
    assert_unchanged(model, snap)


def test_save_without_slim_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no SlimLinear"):
        sk.save_slim(tiny_model("llama"), str(tmp_path / "x"))


def test_save_from_compiled_wrapper_uses_plain_names(saved, tmp_path):
    path, model, logits = saved
    wrapped = torch.compile(model, backend="eager")  # an OptimizedModule: names gain "_orig_mod."
    sk.save_slim(wrapped, str(tmp_path / "a"))
    fresh = sk.load_slim(tiny_model("llama", seed=0), str(tmp_path / "a")).eval()
    ids, am, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=am).logits, logits)
