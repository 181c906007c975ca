"""Where a result came from: the commit, the package versions and the machine.

Every results file the project writes (benchmark CSVs, demo JSON) records :func:`provenance`,
so a number can be traced to the code and the machine that produced it.
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import subprocess
from typing import Dict, Optional

PACKAGES = ("torch", "triton", "transformers", "peft", "numpy")


def git_rev() -> str:
    """Short commit of the checkout the package runs from, ``+dirty`` when tracked files
    changed ('' when not a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> Dict[str, str]:
    from ._version import __version__

    v = {"slim_kernels": __version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def machine(device: Optional[str] = None) -> str:
    """``gpu=<name>`` for a CUDA device, else ``cpu=<arch>x<cores>``, plus torch's threads."""
    import torch

    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        m = f"gpu={torch.cuda.get_device_name()}"
    else:
        m = f"cpu={platform.machine()}x{os.cpu_count()}"
    return f"{m};threads={torch.get_num_threads()}"


def provenance(device: Optional[str] = None) -> Dict[str, object]:
    """{"commit", "versions", "machine", "date"} of this run."""
    return {
        "commit": git_rev() or "unknown",
        "versions": versions(),
        "machine": machine(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def provenance_string(device: Optional[str] = None) -> str:
    """One line (``key=value;...``) for a CSV column."""
    p = provenance(device)
    parts = [f"{k}={v}" for k, v in p["versions"].items()]
    parts += [p["machine"], f"git={p['commit']}"]
    return ";".join(parts)
