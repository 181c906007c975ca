"""The python/ recipes run as written (tiny settings, in-process for speed)."""
import importlib.util
import math
import os

import pytest

pytest.importorskip("transformers")

from slim_kernels.integrations.save_load import adapter_tensor_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = os.path.join(os.path.dirname(__file__), "..", "python")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_hf_trainer(tmp_path):
    res = load("train_hf_trainer").main(["--tiny", "--steps", "4", "--batch-size", "4",
                                         "--output-dir", str(tmp_path)])
    assert math.isfinite(res["after"]) and res["after"] < res["before"]
    assert res["reloaded"] == res["after"]  # load_slim onto a fresh base: exact
    assert os.path.exists(os.path.join(res["path"], "adapter_config.json"))  # (PEFT's layout)


def test_recipe_plain_loop(tmp_path):
    res = load("train_plain_loop").main(["--tiny", "--steps", "4", "--batch-size", "4",
                                         "--grad-accum", "2", "--gradient-checkpointing",
                                         "--output-dir", str(tmp_path)])
    assert math.isfinite(res["after"]) and res["after"] < res["before"]
    assert os.path.exists(adapter_tensor_file(res["path"]))
