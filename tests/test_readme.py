"""Every ```python block of the README runs, in order, in one fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

from xla_flags import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python examples"
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
