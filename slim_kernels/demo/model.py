"""The embedded base model: a tiny Llama-architecture causal LM and its shipped checkpoint.

``tiny_llama_config()`` is the architecture (about 1.1 M parameters, fp32);
``load_base_model()`` loads the checkpoint shipped in this package under ``base_model/``
(config.json + model.safetensors, written by ``python -m slim_kernels.demo.pretrain``).
Nothing here touches the network or a model hub.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .tasks import TOKENIZER

__all__ = ["BASE_MODEL_DIR", "tiny_llama_config", "build_model", "load_base_model", "save_model"]

BASE_MODEL_DIR = Path(__file__).resolve().parent / "base_model"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def tiny_llama_config(hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                      intermediate_size: int = 512, max_position_embeddings: int = 64):
    """A LlamaConfig sized for the synthetic tasks (vocab = the character tokenizer's)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=TOKENIZER.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=TOKENIZER.pad_id,
        bos_token_id=TOKENIZER.bos_id,
        eos_token_id=TOKENIZER.eos_id,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def build_model(config=None, seed: Optional[int] = None):
    """A freshly initialised LlamaForCausalLM (fp32, SDPA attention) from ``config``."""
    from transformers import LlamaForCausalLM

    config = config if config is not None else tiny_llama_config()
    config._attn_implementation = "sdpa"
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()


def save_model(model, out_dir: Union[str, os.PathLike]) -> None:
    """Write config.json + model.safetensors (fp32) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("_attn_implementation", None)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def load_base_model(path: Union[str, os.PathLike, None] = None):
    """Load the shipped base checkpoint (or one at ``path``) as an fp32 LlamaForCausalLM.

    Reads config.json and model.safetensors directly (no ``from_pretrained``, no hub), puts
    the model in eval mode and returns it.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    d = Path(path) if path is not None else BASE_MODEL_DIR
    wfile, cfile = d / WEIGHTS_NAME, d / CONFIG_NAME
    if not wfile.is_file() or not cfile.is_file():
        raise FileNotFoundError(
            f"no base checkpoint in {d} (need {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "rebuild it with: python -m slim_kernels.demo.pretrain --out " + str(d))
    cfg_dict = json.loads(cfile.read_text())
    cfg_dict.pop("model_type", None)
    cfg_dict.pop("architectures", None)
    config = LlamaConfig(**cfg_dict)
    model = build_model(config)
    state = load_file(str(wfile))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head may be tied in some configs; anything else missing is an error
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    model.eval()
    return model
