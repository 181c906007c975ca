"""The ``slim-kernels`` command line: --version, a parser that imports no torch, help text
and a default for every option, and bad options rejected (exit 2, naming the option) before
any work starts. Run as a user does: ``python -m slim_kernels.cli`` in a subprocess."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "slim_kernels.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    from slim_kernels._version import __version__

    r = cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"slim-kernels {__version__}"


def test_help_imports_no_torch():
    """--help answers without importing torch (nor torch._dynamo, the slowest part of it)."""
    code = """
import sys
from slim_kernels.cli import build_parser
for argv in (["--help"], ["bench", "--help"], ["demo", "--help"], ["example", "--help"]):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print(sorted(m for m in ("torch", "torch._dynamo") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def _subparsers():
    from slim_kernels.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    checked = 0
    for name, sp in _subparsers().items():
        fmt = sp.formatter_class(prog=sp.prog)
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            opt = f"{name} {a.option_strings[0]}"
            assert a.help, f"{opt} has no help text"
            assert "default" in fmt._get_help_string(a) % {"default": a.default}, \
                f"{opt}: its help does not show the default"
            checked += 1
    assert checked > 30  # bench, demo and example options were all seen


@pytest.mark.parametrize("args, option", [
    (["bench", "--rank", "0"], "--rank"),
    (["bench", "--shapes", "axb"], "--shapes"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--top-k", "99"], "--top-k"),
    (["bench", "--sweep", "experts", "--experts", "1,8", "--identity-experts", "0"], "--top-k"),
    (["bench", "--providers", "eager_loop,nope"], "--providers"),
    (["bench", "--modes", "fwd"], "--modes"),
    (["bench", "--T", "64,0"], "--T"),
    (["bench", "--dtype", "int8"], "--dtype"),
    (["demo", "--base", "/nonexistent"], "--base"),
    (["demo", "--methods", "lora,nope"], "--methods"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--task", "records"], "--task"),
    (["example", "--steps", "-1"], "--steps"),
])
def test_bad_option_is_an_argparse_error(args, option, tmp_path):
    out = tmp_path / "out"
    r = cli(*args, *(["--out", str(out)] if args[0] in ("bench", "demo") else []))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"error: argument {option}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # rejected before any work started


def test_bench_that_measures_nothing_fails(tmp_path):
    """slim_cuda on CPU is skipped (not built here, or not a CPU backend): with nothing but
    the base linear left there is nothing to compare, and the run says so."""
    r = cli("bench", "--device", "cpu", "--providers", "slim_cuda", "--shapes", "16x8",
            "--T", "4", "--lora-experts", "2", "--rank", "2", "--reps", "1", "--warmup", "0",
            "--modes", "forward", "--no-progress", "--out", str(tmp_path / "out"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "nothing was measured" in r.stderr and "slim_cuda" in r.stderr
    assert not (tmp_path / "out").exists()


def test_argument_constants_agree_with_the_code():
    """demo/cli.py writes out the tasks and bench/cases.py the backend names (so --help and
    the argument checks import no torch)."""
    from slim_kernels.bench import cases
    from slim_kernels.demo import cli as demo_cli
    from slim_kernels.demo import real_tasks, tasks
    from slim_kernels.ops.backends import NAMES
    from slim_kernels.ops.backends.triton.tuning import DESIGNS_FORWARD

    assert demo_cli.NEW_TASK == tasks.NEW_TASK
    assert demo_cli.NEW_TASKS == tasks.NEW_TASKS
    assert demo_cli.REAL_TASKS == tuple(real_tasks.NEW_TASKS)
    import inspect

    from slim_kernels.demo.real_model import run_real_model
    assert demo_cli.REAL_TASK == inspect.signature(run_real_model).parameters["task"].default
    assert cases.BACKEND_NAMES == NAMES
    assert cases.TRITON_DESIGNS == DESIGNS_FORWARD


def _parsers():
    from slim_kernels.cli import build_parser

    p = build_parser()
    return {"slim-kernels": p, **_subparsers()}


def test_help_is_plain_text():
    """No reStructuredText markup (``code``, :func:`x`) from the docstrings in any help."""
    for name, parser in _parsers().items():
        text = parser.format_help()
        assert "`" not in text, f"{name} --help shows markup:\n{text}"
        assert parser.description, f"{name} --help has no description"


@pytest.mark.parametrize("args, error", [
    (["--frobnicate"], "slim-kernels: error: unknown option: --frobnicate (commands: info, "
                       "example, bench, demo;"),
    (["--frobnicate", "--x"], "slim-kernels: error: unknown options: --frobnicate --x"),
    (["bench", "--frob"], "slim-kernels bench: error: unknown option: --frob (see "
                          "slim-kernels bench --help)"),
    (["info", "extra"], "slim-kernels info: error: unknown argument: extra"),
    ([], "slim-kernels: error: expected a command: info, example, bench, demo"),
])
def test_unknown_option_or_no_command_is_said(args, error):
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert error in r.stderr, r.stderr
    assert "required" not in r.stderr


# torch and transformers made unimportable: a check that needed them would fail otherwise
WITHOUT_TORCH = """
import sys
for m in ("torch", "transformers"):
    sys.modules[m] = None
from slim_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args, option", [
    (["bench", "--top-k", "99"], "--top-k"),
    (["bench", "--sweep", "experts", "--experts", "1,8", "--identity-experts", "0"], "--top-k"),
    (["bench", "--providers", "eager_loop,nope"], "--providers"),
    (["demo", "--methods", "lora,bogus"], "--methods"),
    (["demo", "--slim", '{"rank": 0}'], "--slim"),
])
def test_bad_values_are_rejected_before_torch_is_imported(args, option):
    """Rejected at once (not after 12-15 s of imports): the checks run without torch."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"error: argument {option}: " in r.stderr, r.stderr
    if option in ("--methods", "--providers"):  # the allowed values are listed
        assert "choose from" in r.stderr and ("slim_cpp" in r.stderr or "slim-spread" in r.stderr)


def test_bench_layer_defaults_are_slim_config_defaults():
    from slim_kernels.cli import build_parser
    from slim_kernels.config import SlimConfig

    a, c = build_parser().parse_args(["bench"]), SlimConfig()
    assert (a.lora_experts, a.identity_experts, a.rank, a.top_k, a.clusters) == (
        c.num_lora_experts, c.num_identity_experts, c.rank, c.top_k, c.num_clusters)
