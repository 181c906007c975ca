"""Recipe: measure forgetting as the SLIM paper does, with lm-evaluation-harness.

    python python/eval_forgetting.py --model meta-llama/Meta-Llama-3-8B \\
        --train-data my_task.jsonl --steps 500 --out runs/forgetting

1. the base model is evaluated on general tasks (default ``mmlu,gsm8k,piqa``);
2. it is fine-tuned on the new task with SLIM (``SlimPeftConfig``) and with LoRA
   (``peft.LoraConfig`` of the same budget: rank ``num_lora_experts * rank``, the same target
   modules, the same ``alpha / r`` scaling), through ``peft.get_peft_model``, on the same
   rows in the same order with the same steps, learning rate and seed;
3. each adapter is saved and evaluated on the same tasks by lm-eval's own HF loader
   (``simple_evaluate(model="hf", model_args={"pretrained": MODEL, "peft": ADAPTER})``,
   SLIM known to PEFT through ``import slim_kernels.peft``), and on the new task's
   held-out rows (mean token loss; exact match of greedy completions for prompt/completion
   data);
4. ``OUT/forgetting.json`` holds, per arm (base, slim, lora), every metric of every task, the
   retention ratio after/base per metric, the new-task metrics and the provenance; a table is
   printed.

``--train-data``: a local ``.jsonl`` / ``.json`` file or a ``datasets`` name (``name`` or
``name:config``, split ``train``) whose rows have ``prompt`` and ``completion`` fields (the loss
is on the completion) or a ``text`` field. ``--heldout`` rows of it (after a seeded shuffle)
are kept out of training for the new-task metrics.

Why lm-eval loads each arm itself (``peft=``) rather than being handed the trained model: the
numbers are those of the saved adapter files (what one ships, and what ``python -m
slim_kernels.integrations.lm_eval ... peft=ADAPTER`` reproduces later), and the three arms go
through one loading path (dtype, device, tokenizer) that differs only by ``peft=``. It costs one
extra load of the base model per arm.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import matched_lora_config, train_steps  # noqa: E402

METHODS = ("slim", "lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the metric a task is summarised by in the table, first found (every metric is in the JSON)
PRIMARY = ("acc,none", "exact_match,strict-match", "exact_match,none", "acc_norm,none",
           "word_perplexity,none")


# -- arguments ---------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model folder or hub id")
    p.add_argument("--train-data", required=True,
                   help="local .jsonl/.json file or datasets name[:config]; fields prompt+"
                        "completion or text")
    p.add_argument("--tasks", default="mmlu,gsm8k,piqa", help="comma-separated lm-eval tasks")
    p.add_argument("--include-path", help="folder of custom lm-eval task yamls")
    p.add_argument("--limit", type=float,
                   help="lm-eval docs per task (an int) or share of them (< 1); default all")
    p.add_argument("--num-fewshot", type=int, help="default: each task's own")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8, help="training and new-task eval batch")
    p.add_argument("--eval-batch-size", default="8", help="lm-eval batch size: an int or 'auto'")
    p.add_argument("--max-length", type=int, default=512, help="tokens per training row")
    p.add_argument("--heldout", type=int, default=200, help="rows kept for the new-task metrics")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="cap on generated tokens for the new-task exact match")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="slim,lora", help="comma-separated: slim, lora")
    p.add_argument("--slim-config", default="{}",
                   help="JSON overrides of SlimConfig fields, e.g. '{\"rank\": 8}'")
    p.add_argument("--out", default="runs/forgetting", help="output folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="model dtype; auto: bfloat16 on cuda, float32 on cpu")
    args = p.parse_args(argv)
    bad = fail

    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list:
        bad("--tasks", "no task named")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        bad("--methods", f"{unknown or 'none'}: expected a comma-separated subset of "
                         f"{', '.join(METHODS)}")
    if len(set(args.method_list)) != len(args.method_list):
        bad("--methods", f"{args.methods!r} names a method twice")
    for flag, v in (("--steps", args.steps), ("--batch-size", args.batch_size),
                    ("--max-length", args.max_length), ("--heldout", args.heldout),
                    ("--max-new-tokens", args.max_new_tokens)):
        if v < 1:
            bad(flag, f"{v}: expected an int >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        bad("--lr", f"{args.lr}: expected a finite number > 0")
    if args.limit is not None:
        if not (math.isfinite(args.limit) and args.limit > 0):
            bad("--limit", f"{args.limit}: expected an int >= 1 or a share in (0, 1)")
        if args.limit >= 1:
            if args.limit != int(args.limit):
                bad("--limit", f"{args.limit}: a count of docs must be an int")
            args.limit = int(args.limit)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        bad("--num-fewshot", f"{args.num_fewshot}: expected an int >= 0")
    ebs = args.eval_batch_size
    if not (ebs.isdigit() and int(ebs) >= 1) and not (ebs == "auto" or ebs.startswith("auto:")):
        bad("--eval-batch-size", f"{ebs!r}: expected an int >= 1, 'auto' or 'auto:N'")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        bad("--include-path", f"{args.include_path!r} is not a folder")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        bad("--device", f"{args.device!r} but torch sees no CUDA device")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    try:
        over = json.loads(args.slim_config)
    except json.JSONDecodeError as e:
        bad("--slim-config", f"not JSON ({e})")
    if not isinstance(over, dict):
        bad("--slim-config", "expected a JSON object of SlimConfig fields")
    try:
        args.slim = slim_config(over)
    except (TypeError, ValueError) as e:
        bad("--slim-config", str(e))
    td = args.train_data
    looks_local = td.endswith((".json", ".jsonl")) or td.startswith(("/", "./", "../", "~"))
    if looks_local and not os.path.isfile(os.path.expanduser(td)):
        bad("--train-data", f"no such file: {td!r}")
    return args


def fail(flag: str, why: str):
    """Stop with an error that names the bad argument."""
    raise SystemExit(f"eval_forgetting.py: error: argument {flag}: {why}")


def slim_config(over: dict):
    """SLIM's ``SlimPeftConfig``: ``SlimConfig``'s defaults (``target_modules`` None: the
    model type's projections, which the LoRA arm gets too) and the JSON overrides ``over``."""
    import dataclasses

    from slim_kernels import SlimConfig
    from slim_kernels.peft import SlimPeftConfig

    fields = {f.name for f in dataclasses.fields(SlimConfig)} | {"exclude_modules"}
    unknown = sorted(set(over) - fields)
    if unknown:
        raise ValueError(f"unknown SlimConfig field(s) {unknown}; known: {sorted(fields)}")
    return SlimPeftConfig(task_type="CAUSAL_LM", **over)


def check_tasks(args):
    """lm-eval's task index (with ``--include-path``); an unknown task fails here, before any
    model is loaded or trained."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=args.include_path)
    missing = [t for t in args.task_list if not tm.match_tasks([t])]
    if missing:
        fail("--tasks", f"lm-eval knows no task {missing}"
             + ("" if args.include_path else " (custom tasks need --include-path)"))
    return tm


# -- the new task ------------------------------------------------------------------------------
def load_rows(spec: str) -> list:
    """Rows of a local json/jsonl file or of a ``datasets`` dataset (split ``train``)."""
    local = os.path.expanduser(spec)
    try:
        if local.endswith(".jsonl") and os.path.isfile(local):
            with open(local) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            import datasets

            if os.path.isfile(local):
                ds = datasets.load_dataset("json", data_files=local, split="train")
            else:
                name, _, cfg = spec.partition(":")
                ds = datasets.load_dataset(name, cfg or None, split="train")
            rows = list(ds)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --train-data
        fail("--train-data", f"could not load {spec!r} as a local json/jsonl file or a "
                             f"datasets name[:config] ({type(e).__name__}: {e})")
    for i, r in enumerate(rows):
        ok = isinstance(r, dict) and (
            isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)
            or isinstance(r.get("text"), str))
        if not ok:
            fields = sorted(r) if isinstance(r, dict) else type(r).__name__
            fail("--train-data", f"row {i} of {spec!r} has fields {fields}; expected string "
                                 f"fields prompt and completion, or text")
    if not rows:
        fail("--train-data", f"{spec!r} has no rows")
    return rows


def encode(tok, row: dict, max_length: int):
    """input_ids and labels of one row (labels -100 on the prompt), cut to ``max_length``."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "prompt" in row and "completion" in row:
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = p + c, [-100] * len(p) + c
    else:
        ids = tok(row["text"])["input_ids"] + eos
        labels = list(ids)
    return ids[:max_length], labels[:max_length]


class Rows(torch.utils.data.Dataset):
    def __init__(self, tok, rows, max_length: int) -> None:
        enc = [encode(tok, r, max_length) for r in rows]
        self.items = [(i, l) for i, l in enc if any(x != -100 for x in l[1:])]
        self.dropped = len(enc) - len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(pad_id: int, left: bool = False):
    def fn(items):
        n = max(len(i) for i, _ in items)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in items:
            k = n - len(ids)
            pad = (lambda x, v: [v] * k + x) if left else (lambda x, v: x + [v] * k)
            out["input_ids"].append(pad(ids, pad_id))
            out["attention_mask"].append(pad([1] * len(ids), 0))
            out["labels"].append(pad(labels, -100))
        return {k: torch.tensor(v) for k, v in out.items()}
    return fn


@torch.no_grad()
def new_task_metrics(model, tok, rows, args) -> dict:
    """Mean token loss on the held-out rows (the completion tokens, or all of ``text``) and,
    for prompt/completion rows, the exact match of greedy completions."""
    from tqdm.auto import tqdm

    model.eval()
    ds = Rows(tok, rows, args.max_length)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size,
                                         collate_fn=collate(tok.pad_token_id))
    total, count = 0.0, 0
    for b in tqdm(loader, desc="new-task loss", leave=False):
        b = {k: v.to(args.device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tgt = b["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
            ignore_index=-100, reduction="sum").item()
        count += int((tgt != -100).sum())
    out = {"heldout_rows": len(ds), "heldout_loss": total / max(count, 1),
           "heldout_exact_match": None}
    if not rows or "completion" not in rows[0]:
        return out
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    want = [" ".join(r["completion"].split()) for r in rows]
    new = min(args.max_new_tokens, 1 + max(
        len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows))
    hits = 0
    for s in tqdm(range(0, len(rows), args.batch_size), desc="new-task exact match", leave=False):
        chunk = [p[-(args.max_length - new):] if args.max_length > new else p
                 for p in prompts[s:s + args.batch_size]]
        b = collate(tok.pad_token_id, left=True)([(p, p) for p in chunk])
        ids = b["input_ids"].to(args.device)
        gen = model.generate(input_ids=ids, attention_mask=b["attention_mask"].to(args.device),
                             max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        hits += sum(" ".join(t.split()) == w for t, w in zip(texts, want[s:s + len(chunk)]))
    out["heldout_exact_match"] = hits / len(rows)
    return out


# -- models ------------------------------------------------------------------------------------
def load_base(args):
    import transformers as tf

    from packaging.version import Version

    # transformers < 4.56 reads torch_dtype (and would ignore dtype)
    key = "dtype" if Version(tf.__version__) >= Version("4.56") else "torch_dtype"
    return tf.AutoModelForCausalLM.from_pretrained(
        args.model, **{key: DTYPES[args.dtype]}, device_map=args.device).eval()


def load_tokenizer(args):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def free() -> None:
    """Return the memory of models the caller has deleted (before lm-eval loads its own)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fine_tune(method: str, args, tok, train_rows, heldout_rows) -> dict:
    """One arm: the base + a fresh adapter, trained, measured on the new task, saved."""
    from peft import get_peft_model
    import transformers as tf

    tf.set_seed(args.seed)
    base = load_base(args)
    config = args.slim if method == "slim" else matched_lora_config(args.slim, base)
    model = get_peft_model(base, config)
    trainable, _ = model.get_nb_trainable_parameters()
    ds = Rows(tok, train_rows, args.max_length)
    if not len(ds):
        fail("--train-data", f"no training row has a token to learn within --max-length "
                             f"{args.max_length}")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collate(tok.pad_token_id),
                                         generator=torch.Generator().manual_seed(args.seed))
    t0 = time.time()
    losses = train_steps(model, loader, args.steps, args.lr, device=args.device, clip=1.0,
                         progress=True)
    seconds = time.time() - t0
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{method}: the training loss went non-finite ({losses[-5:]}); "
                           f"lower --lr")
    new = new_task_metrics(model, tok, heldout_rows, args)
    path = os.path.join(args.out, "adapters", method)
    model.save_pretrained(path)
    del model
    free()
    return {"adapter": path, "trainable_params": trainable, "new_task": new,
            "train": {"loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses),
                      "rows": len(ds), "seconds": seconds},
            "config": {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                       for k, v in config.to_dict().items()}}


# -- lm-eval -----------------------------------------------------------------------------------
def lm_eval_run(args, tm, adapter=None) -> dict:
    """lm-eval's HF model class on ``--model`` (plus ``peft=adapter``): per requested task,
    every metric (``name,filter``), and the n-shot, task versions and higher_is_better."""
    import lm_eval

    import slim_kernels.peft  # noqa: F401  (PEFT knows SLIM: PeftModel.from_pretrained)

    model_args = {"pretrained": args.model, "dtype": args.dtype}
    if adapter is not None:
        model_args["peft"] = adapter
    ebs = args.eval_batch_size
    res = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=args.task_list, num_fewshot=args.num_fewshot,
        batch_size=int(ebs) if ebs.isdigit() else ebs, device=args.device, limit=args.limit,
        task_manager=tm, log_samples=False, random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed)
    results = res["results"]
    children = {c for cs in res.get("group_subtasks", {}).values() for c in cs}
    names = [t for t in args.task_list if t in results]
    names += [t for t in results if t not in children and t not in names]  # tags, globs
    tasks, hib = {}, {}
    for t in names:
        tasks[t] = {k: float(v) for k, v in results[t].items()
                    if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        hib[t] = res.get("higher_is_better", {}).get(t, {})
    return {"tasks": tasks, "higher_is_better": hib,
            "n_shot": {t: res.get("n-shot", {}).get(t) for t in names},
            "task_versions": {t: res.get("versions", {}).get(t) for t in names},
            "n_samples": {t: res.get("n-samples", {}).get(t) for t in names}}


def primary(metrics: dict):
    for k in PRIMARY:
        if k in metrics:
            return k
    return next(iter(sorted(metrics)), None)


def retention(after: dict, base: dict) -> dict:
    """after / base per task and metric (None where the base is 0 or the metric is missing)."""
    out = {}
    for t, ms in base.items():
        out[t] = {k: (after.get(t, {})[k] / v if v and k in after.get(t, {}) else None)
                  for k, v in ms.items()}
    return out


def table(summary: dict) -> str:
    arms = summary["arms"]
    names = list(arms)
    rows = [["task", "metric", *names]]
    base = arms["base"]["lm_eval"]["tasks"]

    def cell(arm, t, k):
        v = arms[arm]["lm_eval"]["tasks"].get(t, {}).get(k)
        if v is None:
            return "-"
        r = arms[arm].get("retention", {}).get(t, {}).get(k)
        return f"{v:.4f}" + (f" ({r:.3f})" if r is not None else "")

    for t, ms in base.items():
        k = primary(ms)
        if k is not None:
            rows.append([t, k, *(cell(a, t, k) for a in names)])
    for k in ("heldout_loss", "heldout_exact_match"):
        vals = [arms[a]["new_task"].get(k) for a in names]
        if any(v is not None for v in vals):
            rows.append(["new task", k, *("-" if v is None else f"{v:.4f}" for v in vals)])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines) + "\n(after/base retention in brackets)"


def provenance_record(device: str) -> dict:
    from slim_kernels.provenance import provenance

    prov = provenance(device)
    for pkg in ("lm_eval", "datasets"):
        try:
            prov["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return prov


def main(argv=None) -> dict:
    args = parse(argv)
    rows = load_rows(args.train_data)
    if args.heldout >= len(rows):
        fail("--heldout", f"{args.heldout} leaves no training rows ({args.train_data!r} has "
                          f"{len(rows)})")
    tm = check_tasks(args)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
    rows = [rows[i] for i in order.tolist()]
    heldout_rows, train_rows = rows[:args.heldout], rows[args.heldout:]
    try:
        tok = load_tokenizer(args)
    except (OSError, ValueError) as e:
        fail("--model", f"could not load a tokenizer from {args.model!r} ({type(e).__name__}: {e})")
    os.makedirs(args.out, exist_ok=True)

    arms = {}
    base = load_base(args)
    arms["base"] = {"adapter": None, "trainable_params": 0,
                    "new_task": new_task_metrics(base, tok, heldout_rows, args)}
    del base
    free()
    arms["base"]["lm_eval"] = lm_eval_run(args, tm)
    for method in args.method_list:
        print(f"== {method}: fine-tuning {args.steps} steps on {len(train_rows)} rows")
        arm = fine_tune(method, args, tok, train_rows, heldout_rows)
        arm["lm_eval"] = lm_eval_run(args, tm, adapter=arm["adapter"])
        arm["retention"] = retention(arm["lm_eval"]["tasks"], arms["base"]["lm_eval"]["tasks"])
        arms[method] = arm

    summary = {
        "recipe": "python/eval_forgetting.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "model": args.model, "train_data": args.train_data, "tasks": args.task_list,
        "limit": args.limit, "num_fewshot": args.num_fewshot,
        "training": {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                     "max_length": args.max_length, "seed": args.seed, "clip": 1.0,
                     "heldout": len(heldout_rows), "train_rows": len(train_rows)},
        "device": args.device, "dtype": args.dtype,
        "arms": arms,
        "retention": "after / base per task and metric; higher_is_better says which way is "
                     "better (for a perplexity a ratio above 1 is a loss)",
        "provenance": provenance_record(args.device),
    }
    path = os.path.join(args.out, "forgetting.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(table(summary))
    print(f"wrote {path}")
    summary["path"] = path
    return summary


if __name__ == "__main__":
    main()
