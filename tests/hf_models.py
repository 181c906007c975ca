"""Tiny Hugging Face causal LMs built from configs (no downloads), for the HF tests."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V = 61  # vocab


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **over):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common.update(over)
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[family]
    if family in ("gemma2", "qwen3"):
        common.setdefault("head_dim", 8)
    cfg = cls[0](**common)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls[1](cfg).to(dtype)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]


def tiny_other(family: str, seed: int = 0):
    """A tiny model of a family PEFT's LoRA tests cover beyond the Llama-like ones above:
    ``(model, task_type, inputs)`` (inputs: the keyword arguments of a forward, labels
    included, a batch of 2)."""
    import transformers as tf

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 9), generator=g)
    lm = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    torch.manual_seed(seed)
    if family == "gemma":
        m = tf.GemmaForCausalLM(tf.GemmaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            pad_token_id=0))
    elif family == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                             n_positions=64, bos_token_id=1, eos_token_id=2))
    elif family == "gpt_neox":
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64))
    elif family == "falcon":
        m = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=32,
                                                 num_hidden_layers=2, num_attention_heads=4))
    elif family == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32))
    elif family == "t5":
        m = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            decoder_start_token_id=0))
        return m, "SEQ_2_SEQ_LM", dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       labels=ids.flip(1))
    elif family == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=3))
        return m, "SEQ_CLS", dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  labels=torch.tensor([0, 2]))
    elif family == "vit":
        m = tf.ViTForImageClassification(tf.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=48, num_labels=3))
        return m, None, dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g),
                             labels=torch.tensor([1, 2]))
    else:
        return tiny_model(family, seed=seed), "CAUSAL_LM", lm
    m.config._attn_implementation = "eager"
    return m, "CAUSAL_LM", lm


def batch(B=2, S=9, seed=1, pad_last=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    if pad_last:
        am[-1, S - pad_last:] = 0
        ids[-1, S - pad_last:] = 0
    labels = ids.masked_fill(am == 0, -100)
    return ids, am, labels


def recipe_common():
    """``python/_common.py``, the recipes' shared helpers (tiny tokenizer, arithmetic rows)."""
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    return _common


def save_tiny_lm(path, seed: int = 0):
    """A one-layer Llama (vocab 128) and the recipes' tiny tokenizer saved to ``path``, as a
    local model folder for lm-eval and the recipes; returns the model."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    recipe_common().tiny_tokenizer().save_pretrained(path)
    return model
