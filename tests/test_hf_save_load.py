"""save_slim / load_slim: bit-exact round trip; every error names module and tensor and
leaves the model unchanged."""
import json
import os

import pytest
import torch

import slim_kernels as sk
from hf_models import batch, tiny_model
from slim_kernels.integrations.save_load import adapter_tensor_file
from test_hf import CFG, LAYER, _snapshot, assert_unchanged, randomise_B, slim

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
    for _ in range(2):  # initialise the clusters, then move them
        model(input_ids=ids, attention_mask=am)
        sk.step_clusters(model)
    model.eval()
    sk.save_slim(model, str(path))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    return path, model, logits


def _config(path):
    return json.loads((path / "adapter_config.json").read_text())


def test_files_and_config(saved):
    """PEFT's layout: adapter_config.json (the SlimPeftConfig and the integrity record),
    adapter_model.safetensors, README.md (which says how to load it)."""
    from slim_kernels.integrations import adapter_format as fmt
    from slim_kernels.peft import SlimPeftConfig

    path, model, _ = saved
    meta = _config(path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json",
                                        "adapter_model.safetensors"]
    assert meta["peft_type"] == "SLIM" and "import slim_kernels.peft" in meta["slim_kernels"]
    rec = meta["slim_integrity"]
    assert rec["format"] == fmt.FORMAT and rec["format_version"] == 3 and len(rec["digest"]) == 64
    assert len(rec["tensors"]) == 6 * 14
    assert {k.split(".slim_experts.")[0][len("base_model.model."):] for k in rec["tensors"]} == \
        set(model.slim_summary.layers)
    cfg = SlimPeftConfig(**meta).slim_config()
    assert cfg == sk.SlimConfig(**CFG).replace(target_modules=None)
    assert "KeyError: 'SLIM'" in (path / "README.md").read_text()
    assert adapter_tensor_file(path) == str(path / "adapter_model.safetensors")
    # files readable as the umask allows, like any other file the user writes
    assert all(os.stat(path / f).st_mode & 0o777 == 0o666 & ~_umask() for f in os.listdir(path))


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


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
            assert torch.equal(a.slim_tensors()[t], b.slim_tensors()[t]), (n, t)
        assert b.clusters.ready
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


def _rewrite(src, dst, tensors_fn=None, meta_fn=None, consistent=False):
    """Copy the adapter folder ``src`` to ``dst`` with its tensors and/or config edited. With
    ``consistent``, the integrity record is recomputed, as a tool that rewrote the adapter on
    purpose would: then only the value checks stand between it and the model."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    from slim_kernels.integrations import adapter_format as fmt

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    meta = _config(dst)
    with safe_open(adapter_tensor_file(dst), "pt") as f:
        file_meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if tensors_fn is not None:
        tensors_fn(t)
    if meta_fn is not None:
        meta_fn(meta)
    if consistent:
        meta["slim_integrity"] = fmt.integrity_record(meta, t)
        file_meta["slim_digest"] = meta["slim_integrity"]["digest"]
    os.remove(adapter_tensor_file(dst))
    save_file(t, adapter_tensor_file(dst), metadata=file_meta)
    (dst / "adapter_config.json").write_text(json.dumps(meta))
    return dst


KEY = "base_model.model.model.layers.1.mlp.up_proj.slim_experts.lora_B"


def test_missing_extra_corrupt_truncated(saved, tmp_path):
    path, _, _ = saved
    d = tmp_path / "copy"
    _rewrite(path, d, lambda t: t.pop(KEY))
    _expect_error(d, r"module 'model\.layers\.1\.mlp\.up_proj': tensor 'lora_B' is missing")
    _rewrite(path, d, lambda t: t.__setitem__(KEY.replace("lora_B", "extra"), torch.ones(2)))
    _expect_error(d, r"module 'model\.layers\.1\.mlp\.up_proj': tensor 'extra'")
    # flipped bytes in the data: caught by the checksum
    _rewrite(path, d)
    data = bytearray(open(adapter_tensor_file(path), "rb").read())
    data[-3] ^= 0xFF
    open(adapter_tensor_file(d), "wb").write(bytes(data))
    _expect_error(d, r"module 'model\.layers\.\d\.[\w.]+': tensor '\w+' fails its sha256")
    # truncated file
    open(adapter_tensor_file(d), "wb").write(bytes(data[: len(data) // 2]))
    _expect_error(d, "corrupt or truncated")
    # the tensor file of another save under this config
    e = _rewrite(path, tmp_path / "other", lambda t: t[KEY].mul_(2), consistent=True)
    _rewrite(path, d)
    open(adapter_tensor_file(d), "wb").write(open(adapter_tensor_file(e), "rb").read())
    _expect_error(d, r"adapter_model\.safetensors does not belong to .*adapter_config\.json")
    # truncated / invalid json
    _rewrite(path, d)
    text = (path / "adapter_config.json").read_text()
    (d / "adapter_config.json").write_text(text[: len(text) // 2])
    _expect_error(d, "not valid JSON")
    meta = json.loads(text)
    meta["slim_integrity"]["format_version"] = 99
    (d / "adapter_config.json").write_text(json.dumps(meta))
    _expect_error(d, "version 99; this slim_kernels reads")
    # an invalid config: caught by the digest, and by the config check when the record was redone
    _rewrite(path, d, meta_fn=lambda m: m.__setitem__("rank", -1))
    _expect_error(d, "fails its integrity check")
    _rewrite(path, d, meta_fn=lambda m: m.__setitem__("rank", -1), consistent=True)
    _expect_error(d, r"invalid SLIM config: SlimConfig\.rank=-1")


def test_config_edit_fails_the_digest(saved, tmp_path):
    """The digest covers the config: a changed alpha (which would change the outputs), another
    SLIM setting, a subset of target_modules, an added field, a tensor checksum or the digest
    itself: none loads."""
    path, _, _ = saved
    d = tmp_path / "copy"
    for edit in (lambda m: m.__setitem__("alpha", 99.0),
                 lambda m: m.__setitem__("cluster_eps", 1e-3),
                 lambda m: m.__setitem__("top_k", 1),
                 lambda m: m.__setitem__("distance_scale", "spread"),
                 lambda m: m.__setitem__("target_modules", m["target_modules"][:3]),
                 lambda m: m.__setitem__("use_dora", True),
                 lambda m: m["slim_integrity"]["tensors"][KEY].__setitem__("sha256", "0" * 64),
                 lambda m: m["slim_integrity"].__setitem__("digest", "0" * 64)):
        _rewrite(path, d, meta_fn=edit)
        _expect_error(d, r"adapter_config\.json fails its integrity check")
    # the bookkeeping entries are outside the digest (PEFT rewrites them)
    _rewrite(path, d, meta_fn=lambda m: m.update(inference_mode=False,
                                                 base_model_name_or_path="/elsewhere/base"))
    sk.load_slim(tiny_model("llama", seed=0), str(d))


@pytest.mark.parametrize("tensor, value, why", [
    ("cluster_vars", -1.0, "holds negative variances"),
    ("lora_B", float("nan"), r"holds non-finite values \(NaN or inf\)"),
    ("cluster_centers", float("inf"), "holds non-finite values"),
    ("router", -float("inf"), "holds non-finite values"),
    ("lora_A", float("nan"), "holds non-finite values"),
    ("cluster_vars", float("nan"), "holds non-finite values"),
])
def test_invalid_values_are_rejected_naming_the_tensor(saved, tmp_path, tensor, value, why):
    """Even with checksums and digest made consistent (a tool that wrote bad values on purpose,
    or a diverged run saved by an older release), the values are checked before loading."""
    path, _, _ = saved
    module = "model.layers.1.self_attn.v_proj"

    def poke(t):
        from slim_kernels.integrations.adapter_format import peft_key

        t[peft_key(module, tensor)].view(-1)[3] = value

    d = _rewrite(path, tmp_path / "copy", poke, consistent=True)
    _expect_error(d, rf"module '{module}': tensor '{tensor}' {why}", exc=sk.SlimLoadError)


def test_values_that_overflow_the_models_dtype_are_rejected(tmp_path):
    model = slim(tiny_model("llama"))
    with torch.no_grad():
        next(iter(sk.slim_modules(model)))[1].lora_B[0, 0, 0] = 1e6  # finite in fp32
    sk.save_slim(model, str(tmp_path / "a"))
    sk.load_slim(tiny_model("llama"), str(tmp_path / "a"))  # fine in fp32
    _expect_error(tmp_path / "a", r"module 'model\.layers\.0\.self_attn\.q_proj': tensor 'lora_B' "
                  r"holds values that overflow float16", model=tiny_model("llama", dtype=torch.float16))


def test_not_a_regular_file_says_what_it_is(saved, tmp_path):
    path, _, _ = saved
    d = tmp_path / "zero"
    d.mkdir()
    os.symlink("/dev/zero", d / "adapter_config.json")
    _expect_error(d, r"adapter_config\.json is a character device \(it is a symbolic link to "
                     r"/dev/zero\), not a regular file", exc=sk.SlimLoadError)
    os.remove(d / "adapter_config.json")
    os.symlink(d / "gone", d / "adapter_config.json")
    _expect_error(d, r"adapter_config\.json is a symbolic link to .*gone', which does not exist",
                  exc=FileNotFoundError)
    os.remove(d / "adapter_config.json")
    (d / "adapter_config.json").mkdir()
    _expect_error(d, r"adapter_config\.json is a folder, not a regular file", exc=sk.SlimLoadError)
    _expect_error(path / "adapter_config.json", r"adapter_config\.json is a file, not a folder: "
                  r"pass the SLIM adapter folder", exc=sk.SlimLoadError)
    # the tensor file: a device, and a FIFO (opening it would wait for a writer forever)
    e = _rewrite(path, tmp_path / "copy")
    os.remove(adapter_tensor_file(e))
    os.symlink("/dev/zero", adapter_tensor_file(e))
    _expect_error(e, r"\.safetensors is a character device", exc=sk.SlimLoadError)
    os.remove(adapter_tensor_file(e))
    os.mkfifo(adapter_tensor_file(e))
    _expect_error(e, r"adapter_model\.safetensors is a FIFO, not a regular file",
                  exc=sk.SlimLoadError)


def test_save_refuses_what_load_would_reject(saved, tmp_path):
    """A diverged model (NaN in a factor) or a config edited into an invalid or mismatched one
    is not saved: the folder keeps the previous adapter."""
    path, _, logits = saved
    d = _rewrite(path, tmp_path / "copy")
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    model = sk.load_slim(tiny_model("llama", seed=0), str(d))
    layer = dict(sk.slim_modules(model))["model.layers.0.mlp.down_proj" + LAYER]
    with torch.no_grad():
        layer.lora_B[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.mlp\.down_proj': tensor "
                                         r"'lora_B' holds non-finite values"):
        sk.save_slim(model, str(d))
    with torch.no_grad():
        layer.lora_B[1, 2, 0] = 0.0
        layer.clusters.cluster_vars[0, 0] = -1.0
    with pytest.raises(ValueError, match="tensor 'cluster_vars' holds negative variances"):
        sk.save_slim(model, str(d))
    with torch.no_grad():
        layer.clusters.cluster_vars[0, 0] = 1.0
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before


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


def test_spread_adapter_round_trips_its_distance_statistics(tmp_path):
    """distance_scale="spread": the running mean and variance of r are saved per module
    (fp32 scalars, in the record and covered by the digest) and load back bit-exactly."""
    from safetensors.torch import load_file

    model = slim(tiny_model("llama", seed=0), distance_scale="spread", cluster_momentum=0.3)
    randomise_B(model)
    ids, am, _ = batch()
    model.train()
    model(input_ids=ids, attention_mask=am)
    sk.step_clusters(model)
    model(input_ids=ids * 2 % 61, attention_mask=am)
    sk.step_clusters(model)
    model.eval()
    layers = list(sk.slim_modules(model))
    assert all(m.clusters.distance_mean.item() != 1.0 for _, m in layers)  # initialised and moved
    sk.save_slim(model, str(tmp_path))
    meta = _config(tmp_path)
    assert meta["distance_scale"] == "spread"
    assert len(meta["slim_integrity"]["tensors"]) == 8 * 14
    file = load_file(adapter_tensor_file(tmp_path))
    for n, m in layers:
        for t in ("distance_mean", "distance_var"):
            key = f"base_model.model.{n[:-len(LAYER)]}.slim_experts.clusters.{t}"
            assert meta["slim_integrity"]["tensors"][key]["shape"] == []
            assert torch.equal(file[key], m.slim_tensors()[t]), (n, t)
    fresh = tiny_model("llama", seed=0)
    sk.load_slim(fresh, str(tmp_path))
    fresh.eval()
    for (n, a), (_, b) in zip(layers, sk.slim_modules(fresh)):
        assert b.config.distance_scale == "spread"
        for t in ("distance_mean", "distance_var", "cluster_centers"):
            assert torch.equal(a.slim_tensors()[t], b.slim_tensors()[t]), (n, t)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=am).logits,
                           model(input_ids=ids, attention_mask=am).logits)


def test_spread_adapter_with_a_negative_variance_is_refused(tmp_path):
    model = slim(tiny_model("llama", seed=0), distance_scale="spread")
    ids, am, _ = batch()
    model.train()
    model(input_ids=ids, attention_mask=am)
    name, layer = next(iter(sk.slim_modules(model)))
    with torch.no_grad():
        layer.clusters.distance_var.fill_(-1.0)
    name = name[: -len(LAYER)]  # (the wrapped module's name)
    with pytest.raises(ValueError, match=rf"module {name!r}: tensor 'distance_var' holds "
                                         r"negative variances"):
        sk.save_slim(model, str(tmp_path))
    with torch.no_grad():
        layer.clusters.distance_var.fill_(float("nan"))
    with pytest.raises(ValueError, match="'distance_var' holds non-finite"):
        sk.save_slim(model, str(tmp_path))
