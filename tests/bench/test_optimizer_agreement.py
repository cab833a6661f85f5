"""bench/optimizer_agreement.py: the fused AdamW and a foreach AdamW stepped from the same state on the same gradients
of a real (short) pretrain run agree to fp32 rounding, and the result files say so."""

import json

import pytest

from bench import optimizer_agreement

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_fused_and_foreach_adamw_agree_step_by_step(tmp_path):
    res = optimizer_agreement.main(["--pretrain_args", "--max_steps 3 --max_seq_len 64", "--out_dir", str(tmp_path)])
    rows = res["steps"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 < r["update_rel_l2"] < 1e-5  # rounding (an lr off by 0.1% alone would give 1e-3)
        assert r["moments_rel_max"] < 1e-5
    (json_path,) = tmp_path.glob("optimizer-agreement_*.json")
    assert json.loads(json_path.read_text())["summary"]["steps"] == 3
    assert "Fused vs foreach AdamW" in json_path.with_suffix(".md").read_text()
