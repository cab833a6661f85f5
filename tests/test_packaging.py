"""The project's import names never shadow another distribution's.

The registry holds a `kernels` distribution (a dependency of transformers) and a `minimind` one, so the project's
packages are imported as `minimind_kernels` and `minimind_fast`, one level down in the kernels/ and minimind/ folders
(which have no __init__.py). Checked the two ways a user meets it:
- a process started in the checkout (its folder first on sys.path, as for `python -c` or `python train/x.py`) imports
  the project's ops, then transformers' hub-kernels integration, and builds and runs a LlamaForCausalLM;
- a non-editable install into a fresh virtual environment that already holds transformers, `kernels` and `minimind`
  writes only the project's own files and changes none of theirs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import minimind_kernels as mk
    from minimind_fast.config import from_preset
    from minimind_fast.model import MiniMind
    ops = mk.resolve("torch")
    ours = MiniMind(from_preset("tiny"), ops=ops)
    ids = torch.tensor([[1, 5, 9, 2]])
    ours_ok = bool(torch.isfinite(ours(ids).logits).all())
    import transformers.integrations.hub_kernels  # imports the registry's `kernels` when it is installed
    import kernels
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    logits = LlamaForCausalLM(cfg)(input_ids=ids).logits
    print(json.dumps({"hf_kernels": kernels.__file__, "mk": mk.__file__, "ours_ok": ours_ok,
                      "llama": list(logits.shape), "llama_ok": bool(torch.isfinite(logits).all()),
                      "resolve": hasattr(kernels, "resolve")}))
    """
)


@pytest.mark.parametrize("cwd", ["checkout", "elsewhere"])
def test_project_ops_then_transformers_in_one_process(cwd, tmp_path):
    import json

    pytest.importorskip("transformers")
    where = ROOT if cwd == "checkout" else tmp_path
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=where, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ours_ok"] and got["llama_ok"] and got["llama"] == [1, 4, 64]
    # transformers got the registry's package, not a folder of this checkout, and ours came from the checkout.
    assert not Path(got["hf_kernels"]).resolve().is_relative_to(ROOT), got
    assert not got["resolve"], got
    assert Path(got["mk"]).resolve() == ROOT / "kernels" / "minimind_kernels" / "__init__.py"


def test_pytest_path_does_not_shadow_kernels():
    """This very process has the checkout on sys.path (pyproject's pythonpath): `kernels` is still the registry's."""
    pytest.importorskip("transformers")
    import kernels

    assert str(ROOT) in [str(Path(p).resolve()) for p in sys.path if p]
    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT)


def _files_of(site: Path) -> dict[str, dict[str, str]]:
    """{distribution folder name: {file relative to site-packages: sha256}} from each *.dist-info/RECORD."""
    out = {}
    for info in site.glob("*.dist-info"):
        record = info / "RECORD"
        files = {}
        for line in record.read_text().splitlines():
            rel = line.split(",")[0]
            path = (site / rel).resolve()
            if path.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[info.name] = files
    return out


@pytest.mark.slow
def test_non_editable_install_overwrites_no_other_distribution(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps"]
    # The neighbours: transformers and the registry's `kernels` and `minimind` (same top-level names as ours were).
    subprocess.run([*pip, "transformers", "kernels", "minimind"], check=True, timeout=600)
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    before = _files_of(site)
    assert any(name.startswith("kernels-") for name in before) and any(n.startswith("minimind-") for n in before)

    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), "."],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("minimind_fast-*.whl")
    done = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "already exists" not in done.stderr

    after = _files_of(site)
    (ours,) = [name for name in after if name.startswith("minimind_fast-")]
    assert {name: files for name, files in after.items() if name != ours} == before  # nothing of theirs changed
    top = {rel.split("/")[0] for rel in after[ours]}
    assert top == {"minimind_fast", "minimind_kernels", ours}, top
    theirs_top = {rel.split("/")[0] for files in before.values() for rel in files}
    assert not (top & theirs_top)
    # The shipped tokenizer travels with the package.
    assert "minimind_fast/assets/tokenizer.json" in after[ours]
