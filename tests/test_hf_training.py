"""SLIM models in training code: HF Trainer (loss goes down; gradient accumulation counts
the aux loss once), gradient checkpointing (both modes), torch.compile, TRL's SFTTrainer."""
import os
import warnings

import pytest
import torch

import slim_kernels as sk
from hf_models import V, batch, tiny_model
from slim_kernels.integrations.save_load import adapter_tensor_file
from test_hf import randomise_B, slim

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_dataset(n=32, S=12, seed=0):
    """Arithmetic sequences mod V: learnable next-token structure."""
    from torch.utils.data import Dataset

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, V, (n,), generator=g)
    steps = torch.randint(1, 3, (n,), generator=g)
    rows = [{"input_ids": (3 + (s + k * torch.arange(S)) % (V - 3)).tolist()}
            for s, k in zip(starts.tolist(), steps.tolist())]

    class DS(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            ids = torch.tensor(rows[i]["input_ids"])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return DS(), rows


def trainer_args(d, **kw):
    base = dict(output_dir=d, per_device_train_batch_size=8, learning_rate=2e-2, max_steps=12,
                report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, dataloader_num_workers=0, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def eval_loss(model, ds):
    model.eval()
    with torch.no_grad():
        b = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("input_ids", "attention_mask", "labels")}
        return model(**b).loss.item()


def test_trainer_lowers_loss(tmp_path):
    ds, _ = synthetic_dataset()
    model = slim(tiny_model("llama"), l1_coef=1e-3, balance_coef=1e-3)
    before = eval_loss(model, ds)
    tr = transformers.Trainer(model=model, args=trainer_args(str(tmp_path)), train_dataset=ds)
    tr.train()
    after = eval_loss(model, ds)
    assert after < before - 0.05, (before, after)
    # the base stayed frozen; adapters save and load
    sk.save_slim(model, str(tmp_path / "adapter"))
    assert os.path.exists(adapter_tensor_file(tmp_path / "adapter"))


class _GradGrab(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}


def test_trainer_gradient_accumulation_counts_aux_once(tmp_path):
    """One optimizer step over 8 samples: batch 8 vs 2 x 4 accumulated give the same
    gradients, aux (L1) included (clusters off so the routing does not depend on the split)."""
    ds, _ = synthetic_dataset(n=8)
    grads = []
    for bs, ga in ((8, 1), (4, 2)):
        model = slim(tiny_model("llama"), l1_coef=0.5, num_clusters=0)
        randomise_B(model)
        grab = _GradGrab(model)
        tr = transformers.Trainer(model=model, args=trainer_args(
            str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
            max_steps=1, max_grad_norm=0.0, learning_rate=0.0), train_dataset=ds, callbacks=[grab])
        tr.train()
        grads.append(grab.grads)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def _ckpt_run(mode, **kw):
    model = slim(tiny_model("llama"), **kw)
    randomise_B(model)
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
    model.train()
    ids, am, labels = batch()
    res = []
    for _ in range(2):  # cluster init, then one EMA move
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=am, labels=labels)
        out.loss.backward()
        sk.step_clusters(model)
        res.append((out.loss.detach(),
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                    {n: b.clone() for n, b in model.named_buffers() if "cluster" in n}))
    return res


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_exact_and_clusters_move_once(reentrant, monkeypatch):
    calls = []
    from slim_kernels.clusters import SlidingClusters

    orig = SlidingClusters.collect
    monkeypatch.setattr(SlidingClusters, "collect",
                        lambda self, *a: (calls.append(1), orig(self, *a))[1])
    kw = dict(l1_coef=0.05, balance_coef=0.0 if reentrant else 0.02)
    ref = _ckpt_run(None, **kw)
    n_ref = len(calls)
    got = _ckpt_run(reentrant, **kw)
    assert len(calls) - n_ref == n_ref == 2 * 14  # once per layer per training forward (not
    # again in a checkpointed re-run)
    for (l0, g0, b0), (l1, g1, b1) in zip(ref, got):
        assert torch.equal(l0, l1)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)
        for n in b0:
            assert torch.equal(b0[n], b1[n]), n


def test_reentrant_checkpointing_balance_term_warns():
    """Reentrant checkpointing runs the first forward under no_grad: the load-balance term
    (from the gates) is a constant then. Documented; warned once; everything else is exact."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ref = _ckpt_run(None, balance_coef=0.05)
        got = _ckpt_run(True, balance_coef=0.05)
    assert any("no gradient" in str(x.message) for x in w)
    for (l0, _, b0), (l1, _, b1) in zip(ref, got):
        assert torch.equal(l0, l1)  # the value is still in the loss
        assert all(torch.equal(b0[n], b1[n]) for n in b0)


def _train_steps(run, model, steps=2):
    ids, am, labels = batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = run(input_ids=ids, attention_mask=am, labels=labels)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def _compile_case(backend):
    def make():
        m = sk.apply_slim(tiny_model("llama", num_hidden_layers=1),
                          sk.SlimConfig(num_lora_experts=2, rank=4, backend="torch", l1_coef=0.01,
                                        target_modules=("q_proj", "o_proj")), verbose=False)
        randomise_B(m)
        return m.train()

    eager = _train_steps(lambda **k: m0(**k), m0 := make())
    m1 = make()
    torch._dynamo.reset()
    compiled = _train_steps(torch.compile(m1, backend=backend), m1)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_torch_compile_trains_aot_eager():
    """Dynamo + AOTAutograd + the ops' fake impls (graph breaks allowed), fast."""
    _compile_case("aot_eager")


@pytest.mark.skipif(not os.environ.get("SLIM_SLOW_TESTS"), reason="inductor compile takes ~1-2 min "
                    "on this CPU; set SLIM_SLOW_TESTS=1")
def test_torch_compile_trains_inductor():
    _compile_case("inductor")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<bos>", eos_token="<eos>")


def test_trl_sft_trainer_with_slim_aux(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    _, rows = synthetic_dataset(n=16)
    model = slim(tiny_model("llama"), l1_coef=0.01)
    SlimSFT = sk.with_slim_aux(trl.SFTTrainer)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                         learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                         save_strategy="no", max_length=16, disable_tqdm=True)
    tr = SlimSFT(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                 processing_class=tiny_tokenizer())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr.train()
    assert not any("fused LM head" in str(x.message) for x in w)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["slim_aux_loss"] > 0 for h in logs)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_with_slim_aux_on_plain_trainer_counts_aux_once(tmp_path):
    """The mixin suppresses the hook and adds the aux loss itself: same gradients as the plain
    Trainer (hook path), with gradient accumulation, never doubled."""
    ds, _ = synthetic_dataset(n=8)
    grads = []
    for cls in (transformers.Trainer, sk.with_slim_aux(transformers.Trainer)):
        model = slim(tiny_model("llama"), l1_coef=0.5, num_clusters=0)
        randomise_B(model)
        grab = _GradGrab(model)
        tr = cls(model=model, args=trainer_args(
            str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=1, max_grad_norm=0.0, learning_rate=0.0), train_dataset=ds, callbacks=[grab])
        tr.train()
        grads.append(grab.grads)
    assert any(h.get("slim_aux_loss", 0) > 0 for h in tr.state.log_history)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_trl_sft_trainer_without_mixin_warns(tmp_path):
    """SFTTrainer's fused LM head never reads outputs.loss: not silent, a warning says what to do."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    _, rows = synthetic_dataset(n=8)
    model = slim(tiny_model("llama"), l1_coef=0.01)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                         report_to=[], use_cpu=True, save_strategy="no", max_length=16,
                         disable_tqdm=True)
    tr = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=tiny_tokenizer())
    with pytest.warns(RuntimeWarning, match="with_slim_aux"):
        tr.train()


def test_trainer_checkpoint_and_resume(tmp_path):
    """Trainer's own checkpoints hold the SLIM tensors (state dict); resuming on a fresh
    apply_slim model reaches the same parameters and clusters as the uninterrupted run."""
    ds, _ = synthetic_dataset()
    m = slim(tiny_model("llama"), l1_coef=1e-3)
    transformers.Trainer(model=m, args=trainer_args(str(tmp_path), max_steps=4, save_strategy="steps",
                                                    save_steps=2), train_dataset=ds).train()
    m2 = slim(tiny_model("llama"), l1_coef=1e-3)
    transformers.Trainer(model=m2, args=trainer_args(str(tmp_path), max_steps=4), train_dataset=ds).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(m.named_buffers(), m2.named_buffers()):
        assert torch.equal(a, b), n


def test_trainer_resumes_a_slim_peft_model_from_its_checkpoint(tmp_path):
    """The Trainer's own checkpoints of a SLIM PeftModel (save_pretrained's folder, the
    optimizer, the RNG) resume through PEFT's load_adapter: the resumed run ends where the
    uninterrupted one does, clusters included."""
    from peft import get_peft_model
    from slim_kernels.peft import SlimPeftConfig

    ds, _ = synthetic_dataset()

    def run(out, resume=None):
        model = get_peft_model(tiny_model("llama"), SlimPeftConfig(
            target_modules=["q_proj", "v_proj"], num_lora_experts=2, num_identity_experts=1,
            rank=2, num_clusters=2, backend="torch", task_type="CAUSAL_LM", l1_coef=1e-3))
        tr = transformers.Trainer(model=model, args=trainer_args(
            str(out), max_steps=4, save_strategy="steps", save_steps=2), train_dataset=ds)
        tr.train(resume_from_checkpoint=resume)
        return {f"{n}.{t}": v.detach().clone() for n, m in sk.slim_modules(model)
                for t, v in m.slim_tensors().items()}

    full = run(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_config.json").is_file()
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(k.endswith("cluster_initialized") and bool(v) for k, v in resumed.items())
