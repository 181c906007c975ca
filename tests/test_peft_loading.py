"""A SLIM adapter loads wherever a LoRA adapter loads, in a fresh Python whose script imports
no slim_kernels (the install's .pth hook registers SLIM when peft is imported), and every
loader checks the folder: a flipped bit, an edited SLIM setting, a special file or a missing
tensor is refused with an error naming it, and the model is left as it was."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model  # noqa: E402

import slim_kernels as sk  # noqa: E402
from hf_models import batch, save_tiny_lm  # noqa: E402
from test_hf import _snapshot, assert_unchanged  # noqa: E402
from slim_kernels.integrations import adapter_format as fmt  # noqa: E402
from slim_kernels.peft import SlimPeftConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(num_lora_experts=2, num_identity_experts=1, rank=2, num_clusters=2, backend="torch",
           task_type="CAUSAL_LM")


def _base(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path)


def _logits(model):
    ids, am, _ = batch(seed=3)
    ids = ids % 128
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model folder and a trained SLIM adapter on it, saved by PeftModel.save_pretrained
    (``peft``) and by sk.save_slim (``slim``); the adapter's logits."""
    root = tmp_path_factory.mktemp("loading")
    save_tiny_lm(root / "base")
    model = get_peft_model(_base(root / "base"), SlimPeftConfig(**CFG))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in sk.slim_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    ids, am, _ = batch()
    model.train()(input_ids=ids % 128, attention_mask=am)
    sk.step_clusters(model)
    model.save_pretrained(root / "peft")
    sk.save_slim(model, root / "slim")
    return root, _logits(model)


_SCRIPT = """
import sys
import torch
import transformers as tf
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel

base, adapter, out = sys.argv[1:4]
ids = torch.load(out + ".in.pt")
def logits(m):
    m.eval()
    with torch.no_grad():
        return m(**ids).logits
res = {}
res["config"] = type(PeftConfig.from_pretrained(adapter)).__name__
res["PeftModel"] = logits(PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter))
res["AutoPeftModelForCausalLM"] = logits(AutoPeftModelForCausalLM.from_pretrained(adapter))
m = tf.AutoModelForCausalLM.from_pretrained(base)
m.load_adapter(adapter)
res["load_adapter"] = logits(m)
torch.save(res, out)
"""


@pytest.mark.parametrize("writer", ["peft", "slim"])
def test_fresh_process_without_slim_kernels_import_loads_everywhere(saved, tmp_path, writer):
    """PeftConfig.from_pretrained, PeftModel.from_pretrained, AutoPeftModelForCausalLM and
    transformers' load_adapter in a Python whose script never imports slim_kernels, on a
    folder written by PEFT's save_pretrained or by save_slim: bit-exact."""
    root, want = saved
    assert "slim_kernels" not in _SCRIPT
    ids, am, _ = batch(seed=3)
    out = tmp_path / "out.pt"
    torch.save({"input_ids": ids % 128, "attention_mask": am}, str(out) + ".in.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLIM_KERNELS_PEFT_HOOK")}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(root / "base"), str(root / writer),
                        str(out)], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(out)
    assert res.pop("config") == "SlimPeftConfig"
    for loader, logits in res.items():
        assert torch.equal(logits, want), loader


def test_without_the_hook_the_error_is_peft_and_the_folder_says_the_fix(saved, tmp_path):
    """Where nothing registers SLIM (the hook turned off here; a Python started with -S), PEFT's
    own KeyError is all a loader can say: the adapter's config and README say what to do, and
    doing it (import slim_kernels.peft) loads the adapter."""
    root, _ = saved
    code = textwrap.dedent("""
        import sys
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained(sys.argv[1])
        except KeyError as e:
            print("KeyError", e)
        import slim_kernels.peft
        print(type(PeftConfig.from_pretrained(sys.argv[1])).__name__)
    """)
    env = {**os.environ, "SLIM_KERNELS_PEFT_HOOK": "0", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(root / "peft")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:2] == ["KeyError 'SLIM'", "SlimPeftConfig"], r.stdout
    for writer in ("peft", "slim"):
        note = json.loads((root / writer / "adapter_config.json").read_text())["slim_kernels"]
        card = (root / writer / "README.md").read_text()
        for text in (note, card):
            assert "slim_kernels" in text and "import slim_kernels.peft" in text, writer


def test_the_hook_on_an_untested_peft_says_so_naming_slim_kernels(tmp_path):
    """With a PEFT the registration was not tested with, the hook registers nothing but a
    stand-in whose error names slim_kernels, the reason and the fix (no bare KeyError)."""
    fake = tmp_path / "fake" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.0'\nfrom . import mapping\n")
    (fake / "mapping.py").write_text(
        "PEFT_TYPE_TO_CONFIG_MAPPING = {}\nPEFT_TYPE_TO_TUNER_MAPPING = {}\n"
        "PEFT_TYPE_TO_PREFIX_MAPPING = {}\nPEFT_TYPE_TO_MIXED_MODEL_MAPPING = {}\n")
    code = textwrap.dedent("""
        import peft
        from peft import mapping
        print(sorted(k for t in (mapping.PEFT_TYPE_TO_TUNER_MAPPING,
                                 mapping.PEFT_TYPE_TO_PREFIX_MAPPING) for k in t))
        try:
            mapping.PEFT_TYPE_TO_CONFIG_MAPPING["SLIM"].from_pretrained("x")
        except ImportError as e:
            print(e)
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    env.pop("SLIM_KERNELS_PEFT_HOOK", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().split("\n")
    assert lines[0] == "[]"  # no tuner, no prefix: nothing of SLIM's is registered
    assert "SLIM adapter" in lines[1] and "slim_kernels" in lines[1]
    assert "tested with peft 0.21.x but peft 9.9.0" in lines[1]
    assert "pip install 'peft>=0.21,<0.22'" in lines[1]


def test_looking_peft_up_before_importing_it_still_registers(tmp_path):
    """transformers asks ``importlib.util.find_spec("peft")`` long before it imports peft (and
    lm-eval imports peft through transformers): the hook waits for the import itself."""
    code = textwrap.dedent("""
        import importlib.util
        assert importlib.util.find_spec("peft") is not None
        import transformers.utils
        transformers.utils.is_peft_available()
        import peft
        from peft import mapping
        print("SLIM" in mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "SLIM" in mapping.PEFT_TYPE_TO_TUNER_MAPPING)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLIM_KERNELS_PEFT_HOOK")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "True True", r.stdout + r.stderr[-2000:]


def test_peft_type_reads_like_peft_s_enum():
    cfg = SlimPeftConfig(**CFG)
    assert cfg.peft_type == "SLIM" and cfg.peft_type.value == "SLIM"
    assert json.loads(json.dumps(cfg.to_dict()))["peft_type"] == "SLIM"


# -- every loader checks the folder -------------------------------------------------------------
def _copy(src, dst, edit_config=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if edit_config is not None:
        meta = json.loads((dst / fmt.CONFIG_NAME).read_text())
        edit_config(meta)
        (dst / fmt.CONFIG_NAME).write_text(json.dumps(meta))
    if edit_tensors is not None:
        with safe_open(dst / fmt.WEIGHTS_NAME, "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        edit_tensors(t)
        save_file(t, dst / fmt.WEIGHTS_NAME, metadata=meta)
    return dst


def _flip_a_bit(d):
    data = bytearray((d / fmt.WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x10
    (d / fmt.WEIGHTS_NAME).write_bytes(bytes(data))


def _unchanged(model, snap):
    assert_unchanged(model, snap)  # modules, parameters, requires_grad, hooks
    assert not hasattr(model, "peft_config")


def _refused(root, folder, match, exc=sk.SlimLoadError):
    """Every loader refuses ``folder`` with ``match``; the user's model is left as it was."""
    with pytest.raises(exc, match=match):
        PeftConfig.from_pretrained(str(folder))
    for load in (lambda m: PeftModel.from_pretrained(m, str(folder)),
                 lambda m: m.load_adapter(str(folder)),
                 lambda m: sk.load_slim(m, str(folder))):
        model = _base(root / "base")
        snap = _snapshot(model)
        with pytest.raises(exc, match=match):
            load(model)
        _unchanged(model, snap)
    with pytest.raises(exc, match=match):
        AutoPeftModelForCausalLM.from_pretrained(str(folder))


@pytest.mark.parametrize("writer", ["peft", "slim"])
def test_a_flipped_bit_is_refused_by_every_loader(saved, tmp_path, writer):
    root, _ = saved
    d = _copy(root / writer, tmp_path / "a")
    meta = json.loads((d / fmt.CONFIG_NAME).read_text())
    meta["base_model_name_or_path"] = str(root / "base")  # (AutoPeftModel loads the base)
    (d / fmt.CONFIG_NAME).write_text(json.dumps(meta))
    _flip_a_bit(d)
    _refused(root, d, r"module 'model\.layers\.0\.[\w.]+': tensor '\w+' fails its sha256 check")


@pytest.mark.parametrize("field, value", [("alpha", 99.0), ("top_k", 1),
                                          ("distance_scale", "spread"),
                                          ("target_modules", ["q_proj"]), ("bogus", 1)])
def test_an_edited_slim_setting_is_refused_by_every_loader(saved, tmp_path, field, value):
    root, _ = saved
    d = _copy(root / "peft", tmp_path / "a", edit_config=lambda m: m.update(
        {field: value, "base_model_name_or_path": str(root / "base")}))
    _refused(root, d, r"adapter_config\.json fails its integrity check")


def test_special_files_missing_tensors_and_bad_values_are_refused(saved, tmp_path):
    root, _ = saved
    d = _copy(root / "peft", tmp_path / "fifo")
    os.remove(d / fmt.WEIGHTS_NAME)
    os.mkfifo(d / fmt.WEIGHTS_NAME)  # would block a reader for ever
    _refused(root, d, r"adapter_model\.safetensors is a FIFO, not a regular file")
    key = "base_model.model.model.layers.0.self_attn.q_proj.slim_experts.router"
    d = _copy(root / "peft", tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    _refused(root, d, r"module 'model\.layers\.0\.self_attn\.q_proj': tensor 'router' is missing")

    def nan(t):
        t[key].view(-1)[0] = float("nan")

    def redo(m):  # a tool that rewrote the record on purpose: the value check still stands
        from safetensors.torch import load_file

        m["slim_integrity"] = fmt.integrity_record(m, load_file(d / fmt.WEIGHTS_NAME))
    d = _copy(root / "peft", tmp_path / "nan", edit_tensors=nan)
    _copy(d, d.with_name("nan2"), edit_config=redo)
    _refused(root, d.with_name("nan2"),
             r"module 'model\.layers\.0\.self_attn\.q_proj': tensor 'router' holds non-finite")


def test_an_adapter_from_another_model_leaves_the_peft_base_unchanged(saved, tmp_path):
    """Checks that need the model (every wrapped module gets its tensors, shapes) run in the
    load PEFT makes after injecting: a refusal there puts the base model back."""
    import transformers as tf

    root, _ = saved
    for over, match in ((dict(num_hidden_layers=2), r"model\.layers\.1\.[\w.]+' of the model "
                                                    r"matches target_modules but has no tensors"),
                        (dict(hidden_size=48), r"tensor 'lora_A' has shape")):
        cfg = tf.AutoConfig.from_pretrained(root / "base")
        for k, v in over.items():
            setattr(cfg, k, v)
        for load in (lambda m: PeftModel.from_pretrained(m, str(root / "peft")),
                     lambda m: m.load_adapter(str(root / "peft"))):
            model = tf.LlamaForCausalLM(cfg)
            snap = _snapshot(model)
            with pytest.raises(sk.SlimLoadError, match=match):
                load(model)
            _unchanged(model, snap)


def test_an_adapter_of_a_bigger_model_is_refused_by_peft_naming_the_module(saved, tmp_path):
    """The adapter's folder is sound, but it holds a layer the model lacks (saved from a model
    with more layers): refused, not half-loaded with a warning; the model is put back."""
    import transformers as tf

    root, _ = saved
    cfg = tf.AutoConfig.from_pretrained(root / "base")
    cfg.num_hidden_layers = 2
    big = get_peft_model(tf.LlamaForCausalLM(cfg), SlimPeftConfig(**CFG))
    big.save_pretrained(tmp_path / "big")
    for load in (lambda m: PeftModel.from_pretrained(m, str(tmp_path / "big")),
                 lambda m: m.load_adapter(str(tmp_path / "big"))):
        model = _base(root / "base")  # one layer
        snap = _snapshot(model)
        with pytest.raises(sk.SlimLoadError, match=r"module 'model\.layers\.1\.[\w.]+' of the "
                                                   r"adapter does not exist in the model"):
            load(model)
        _unchanged(model, snap)
