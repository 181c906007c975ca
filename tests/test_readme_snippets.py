"""Every Python snippet of the README runs on its own, as a reader would paste it: in a fresh
interpreter, in an empty folder. A snippet that cannot run here (it needs a model from the
Hub) says so in the line just above it: ``<!-- readme-snippet: not run (<reason>) -->``."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:^<!-- readme-snippet: not run \((?P<why>[^)]*)\) -->\n)?^```python\n"
                   r"(?P<code>.*?)^```", re.M | re.S)


def snippets():
    return [(m.start(), m.group("why"), m.group("code"))
            for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_snippets_are_found_and_exemptions_say_why():
    found = snippets()
    assert len([s for s in found if s[1] is None]) >= 2, found  # the API and the op examples
    for _, why, code in found:
        assert why is None or why.strip(), f"an exempted snippet gives no reason:\n{code}"


@pytest.mark.parametrize("code", [c for _, why, c in snippets() if why is None],
                         ids=lambda c: c.strip().splitlines()[0][:40])
def test_snippet_runs_alone(code, tmp_path):
    # the checkout's package first, whether or not it is installed
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert r.returncode == 0, f"README snippet failed:\n{code}\n{r.stderr[-3000:]}"
