"""The README's code and the quickstart example run as written."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README lost its tour"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |addnorm - torch.nn| LayerNorm" in out and "step 19" in out
