"""bench/serve_load.py's scenarios: together32 is staggered32's work with every arrival at 0."""

from bench import serve_load


def test_together32_is_staggered32_all_at_once():
    stag = serve_load.requests_for("staggered32", 0)
    tog = serve_load.requests_for("together32", 0)
    assert len(stag) == len(tog) == 32
    assert [(r["content"], r["max_tokens"]) for r in tog] == [(r["content"], r["max_tokens"]) for r in stag]
    assert [r["at_s"] for r in tog] == [0.0] * 32
    assert stag[-1]["at_s"] == 31 * 0.05
    # another seed gives other requests (the scenario's seed is not ignored)
    assert [r["content"] for r in serve_load.requests_for("together32", 1)] != [r["content"] for r in tog]
