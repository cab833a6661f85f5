"""minimind_fast.backend end to end: the in-process EngineBackend and the HTTPBackend over tools/serve.py on a
loopback port (real HTTP: create_app under uvicorn in a thread), on the same tiny model and prompts.

The model is trained here for a moment to answer one prompt with a fixed text and eos, so a "stop" answer's ids are
known in advance; the other prompts are random ids, answered until max_tokens. Expected tokens come from
minimind_fast.generate.generate, the plain generation loop, run here on the same weights.
"""

import copy
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from minimind_fast.backend import BackendError, Completion, EngineBackend, HTTPBackend, make_backend
from minimind_fast.checkpoint import load_model, save_checkpoint
from minimind_fast.config import MiniMindConfig
from minimind_fast.engine import Engine, SamplingParams
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tests.serve_cli import cli_server
from tests.teach import teach
from tools import serve

pytestmark = pytest.mark.usefixtures("one_thread_module")

ROOT = Path(__file__).resolve().parents[2]

KEY = "rollout-secret"
CONTEXT = 256
QUESTION, ANSWER = "Say hi to me.", "Hi there, friend."
MAX_NEW = 12


def tiny_config(**kw) -> MiniMindConfig:
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    fields["max_position_embeddings"] = CONTEXT
    return MiniMindConfig(**{**fields, **kw})


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """(model, checkpoint folder, prompt, answer ids): greedy decoding of prompt gives exactly answer ids, eos last."""
    torch.manual_seed(0)
    cfg = tiny_config()
    prompt = [tokenizer.bos_id] + tokenizer.encode(QUESTION)
    answer = tokenizer.encode(ANSWER) + [tokenizer.eos_id]
    model = teach(MiniMind(cfg), prompt, answer, steps=300)
    folder = save_checkpoint(tmp_path_factory.mktemp("backend") / "policy-0", model, cfg, tokenizer=tokenizer)
    return model, folder, prompt, answer


@pytest.fixture(scope="module")
def prompts(trained):
    g = torch.Generator().manual_seed(7)
    rand = [torch.randint(3, 6400, (n,), generator=g).tolist() for n in (5, 17, 9)]
    return [trained[2], *rand]


def served_app(folder, tokenizer, **kw):
    """create_app over a model of its own, loaded from the folder (so changing the trainer's model changes nothing
    on the server until a weight sync)."""
    model, _, _ = load_model(folder)
    return serve.create_app(serve.Engine(model.eval(), tokenizer), "policy", **kw)


@pytest.fixture(scope="module")
def plain_server(trained, tokenizer, server_thread):
    """No API key, no weight reload."""
    with server_thread(served_app(trained[1], tokenizer)) as srv:
        yield srv.base


@pytest.fixture
def reload_server(trained, tokenizer, server_thread):
    """API key and --allow_weight_reload, fresh for each test (weights are loaded into it)."""
    with server_thread(served_app(trained[1], tokenizer, api_key=KEY, allow_weight_reload=True)) as srv:
        yield srv.base


def greedy(n: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.9, top_p=0.9, top_k=40, seed=1000 + i)


def reference(model, prompts, params) -> list[list[int]]:
    """generate() on each prompt alone with the same settings."""
    out = []
    for p, sp in zip(prompts, params):
        eos = None if sp.ignore_eos else 2
        if sp.greedy:
            out += generate(model, [p], sp.max_tokens, greedy=True, eos_id=eos)
        else:
            kw = dict(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, seed=sp.seed)
            out += generate(model, [p], sp.max_tokens, eos_id=eos, **kw)
    return out


def ids_of(done: list[Completion]) -> list[list[int]]:
    return [c.output_ids for c in done]


def perturb(model, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


# ----------------------------------------------------------------------------------------------------------------
# Same tokens on both backends


def test_greedy_and_seeded_tokens_are_the_same_on_both_backends(trained, prompts, plain_server, tokenizer):
    model, _, _, answer = trained
    local = EngineBackend(model, tokenizer)
    remote = HTTPBackend(plain_server, eos_id=tokenizer.eos_id)
    assert local.eos_id == remote.eos_id == 2
    assert local.context == remote.context == CONTEXT  # the remote one read off the model card

    params = [greedy()] * len(prompts)
    mine, theirs = local.generate(prompts, params), remote.generate(prompts, params)
    want = reference(model, prompts, params)
    assert ids_of(mine) == ids_of(theirs) == want
    # The trained prompt ends by itself, eos included; a random one either ends with eos too or runs to max_tokens.
    assert mine[0].output_ids == answer and mine[0].content == theirs[0].content == ANSWER
    for m, t in zip(mine, theirs):
        ended = m.output_ids[-1] == tokenizer.eos_id
        assert m.finish_reason == t.finish_reason == ("stop" if ended else "length")
        assert ended or len(m.output_ids) == MAX_NEW
        assert m.content == t.content == tokenizer.decode(m.output_ids, skip_special_tokens=True)
    assert {c.finish_reason for c in mine} == {"stop", "length"}
    # EngineBackend is Engine.generate, request for request.
    direct = Engine(model, tokenizer, max_batch=len(prompts)).generate(prompts, params)
    assert [(r.output_ids, r.finish_reason) for r in direct] == [(c.output_ids, c.finish_reason) for c in mine]

    sampled = [seeded(i) for i in range(len(prompts))]
    mine, theirs = local.generate(prompts, sampled), remote.generate(prompts, sampled)
    assert ids_of(mine) == ids_of(theirs) == reference(model, prompts, sampled)
    assert ids_of(mine) != want  # the sampling settings reached both
    assert ids_of(remote.generate(prompts, sampled)) == ids_of(theirs)  # and the seeds make it repeatable


def test_token_id_prompts_on_the_completions_route(trained, prompts, plain_server, tokenizer):
    model = trained[0]
    ids = prompts[1]
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    r = httpx.post(plain_server + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    want = generate(model, [ids], 6, greedy=True)[0]
    assert choice["token_ids"] == want and choice["prompt_token_ids"] == ids  # no bos added
    assert choice["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    # A list holding one list is the same prompt; without return_token_ids there are no ids.
    r = httpx.post(plain_server + "/v1/completions", json={**body, "prompt": [ids], "return_token_ids": False})
    assert r.status_code == 200 and "token_ids" not in r.json()["choices"][0]
    assert r.json()["choices"][0]["text"] == choice["text"]
    # Streamed: the chunk with finish_reason carries the ids, and the text pieces add up to the same text.
    chunks = []
    with httpx.stream("POST", plain_server + "/v1/completions", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["token_ids"] for c in chunks if "token_ids" in c["choices"][0]] == [want]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "prompt,fragment",
    [
        ([5, 6400, 7], "'prompt'[1] = 6400 is not a token id of this model"),
        ([5, -1], "'prompt'[1] = -1"),
        ([5, 3.0], "'prompt'[1] must be an integer"),
        ([True, 5], "'prompt'[0] must be an integer"),
        ([], "empty list of token ids"),
        ([[5, 6], [7]], "holds 2 token-id lists"),
    ],
    ids=["beyond-vocab", "negative", "float", "bool", "empty", "two-prompts"],
)
def test_bad_token_id_prompt_is_a_400(plain_server, prompt, fragment):
    r = httpx.post(plain_server + "/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and fragment in err["message"]
    assert "\n" not in err["message"]


# ----------------------------------------------------------------------------------------------------------------
# Weight sync


def test_sync_weights_makes_the_server_generate_with_the_new_weights(trained, prompts, reload_server, tmp_path):
    policy = copy.deepcopy(trained[0])  # the trainer's copy; the server holds its own
    remote = HTTPBackend(reload_server, api_key=KEY, eos_id=2, sync_dir=tmp_path)
    params = [greedy()] * 2 + [seeded(2), seeded(3)]
    before = ids_of(remote.generate(prompts, params))
    assert before == reference(policy, prompts, params)

    perturb(policy, seed=1)
    changed = ids_of(EngineBackend(policy, eos_id=2).generate(prompts, params))
    assert changed == reference(policy, prompts, params) and changed != before
    assert ids_of(remote.generate(prompts, params)) == before  # nothing reaches the server until a sync

    answer = remote.sync_weights(policy)
    written = tmp_path / "policy" / "model.safetensors"
    assert answer == {
        "loaded": str((tmp_path / "policy").resolve()),
        "version": 1,
        "sha256": hashlib.sha256(written.read_bytes()).hexdigest(),
    }
    assert ids_of(remote.generate(prompts, params)) == changed

    perturb(policy, seed=2)
    again = remote.sync_weights(policy)
    assert again["version"] == 2 and remote.weights_version == 2
    assert ids_of(remote.generate(prompts, params)) == reference(policy, prompts, params) != changed


def test_load_weights_is_404_without_the_flag_and_401_without_the_key(trained, plain_server, reload_server):
    body = {"path": str(trained[1])}
    r = httpx.post(plain_server + "/v1/load_weights", json=body)
    assert r.status_code == 404 and "--allow_weight_reload" in r.json()["error"]["message"]
    assert httpx.post(reload_server + "/v1/load_weights", json=body).status_code == 401
    assert httpx.post(reload_server + "/v1/load_weights", json=body, headers=auth("wrong")).status_code == 401
    r = httpx.post(reload_server + "/v1/load_weights", json=body, headers=auth())
    assert r.status_code == 200 and r.json()["version"] == 1

    with pytest.raises(BackendError) as info:
        HTTPBackend(plain_server, eos_id=2).sync_weights(trained[0])
    msg = str(info.value)
    assert msg.startswith(f"POST {plain_server}/v1/load_weights: HTTP 404") and "--allow_weight_reload" in msg
    with pytest.raises(BackendError, match=r"HTTP 401 \(a missing or wrong API key\)"):
        HTTPBackend(reload_server, api_key="wrong", eos_id=2).sync_weights(trained[0])


def test_a_folder_that_does_not_load_is_a_400_and_the_old_weights_stay(
    trained, prompts, reload_server, tmp_path, tokenizer
):
    model, folder, _, _ = trained
    remote = HTTPBackend(reload_server, api_key=KEY, eos_id=2)
    params = [greedy()] * len(prompts)
    before = ids_of(remote.generate(prompts, params))

    other = tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    wrong_shape = save_checkpoint(tmp_path / "other", MiniMind(other), other)
    corrupt = save_checkpoint(tmp_path / "corrupt", model, model.config)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    cases = [
        (tmp_path / "missing", "does not exist"),
        (wrong_shape, "is not the served architecture: hidden_size 32 (served: 64)"),
        (corrupt, "model.safetensors does not match its sha256"),
        (folder / "model.safetensors", "does not exist"),  # a file, not a folder
    ]
    for path, fragment in cases:
        r = httpx.post(reload_server + "/v1/load_weights", json={"path": str(path)}, headers=auth())
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "path" and fragment in err["message"] and "\n" not in err["message"]
    r = httpx.post(reload_server + "/v1/load_weights", json={"folder": "x"}, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"

    assert ids_of(remote.generate(prompts, params)) == before == reference(model, prompts, params)


def test_requests_in_flight_finish_on_the_old_weights(trained, prompts, reload_server, tmp_path):
    model = trained[0]
    policy = copy.deepcopy(model)
    perturb(policy, seed=3)
    new_folder = save_checkpoint(tmp_path / "new", policy, policy.config)
    long = SamplingParams(max_tokens=230, temperature=0, ignore_eos=True)
    body = {"prompt": prompts[2], "max_tokens": 230, "temperature": 0, "ignore_eos": True, "stream": True}
    started, ended, ids = threading.Event(), {}, []

    def long_request():  # streamed, so that the test knows when it is running
        with httpx.stream("POST", reload_server + "/v1/completions", json={**body, "return_token_ids": True},
                          headers=auth(), timeout=60) as s:  # fmt: skip
            for line in s.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    ids.extend(json.loads(line[6:])["choices"][0].get("token_ids", []))
        ended["long"] = time.monotonic()

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(20), "the long request never started"
    ended["posted"] = time.monotonic()
    r = httpx.post(reload_server + "/v1/load_weights", json={"path": str(new_folder)}, headers=auth(), timeout=60)
    ended["load"] = time.monotonic()
    t.join(60)
    assert r.status_code == 200 and r.json()["version"] == 1
    assert ended["posted"] < ended["long"] <= ended["load"]  # the load came while it ran, and waited for it
    assert ids == reference(model, [prompts[2]], [long])[0]  # wholly on the old weights
    remote = HTTPBackend(reload_server, api_key=KEY, eos_id=2)
    assert ids_of(remote.generate([prompts[2]], [long])) == reference(policy, [prompts[2]], [long])


def test_the_command_line_server_syncs_weights(trained, prompts, tmp_path):
    """`python tools/serve.py --allow_weight_reload` as users start it, driven through make_backend's spec."""
    with cli_server(trained[1], "--allow_weight_reload") as base:
        remote = make_backend(f"{base},sync_dir={tmp_path}", eos_id=2)
        policy = copy.deepcopy(trained[0])
        perturb(policy, seed=4)
        params = [greedy()] * len(prompts)
        assert ids_of(remote.generate(prompts, params)) == reference(trained[0], prompts, params)
        assert remote.sync_weights(policy)["version"] == 1
        assert ids_of(remote.generate(prompts, params)) == reference(policy, prompts, params)


# ----------------------------------------------------------------------------------------------------------------
# Errors and the spec string


def test_errors_are_one_line_and_name_the_url(trained, prompts, plain_server, tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError) as info:
        HTTPBackend(f"http://127.0.0.1:{port}/v1", eos_id=2).generate([[1, 2]], [greedy()])
    assert str(info.value) == f"POST http://127.0.0.1:{port}/v1/completions: connection refused (is the server " + (
        "running, on that port?)"
    )
    with pytest.raises(BackendError) as info:
        HTTPBackend(plain_server, eos_id=2).generate([prompts[0], [1, 99999]], [greedy(), greedy()])
    msg = str(info.value)
    assert msg.startswith(f"POST {plain_server}/v1/completions: HTTP 400: 'prompt'[1] = 99999 is not a token id")
    assert info.value.status == 400 and "\n" not in msg
    with pytest.raises(BackendError) as info:
        EngineBackend(trained[0], tokenizer).generate([prompts[0], [1, 99999]], [greedy(), greedy()])
    assert str(info.value).startswith("engine: prompt 1: the prompt has token ids outside [0, 6400)")
    with pytest.raises(BackendError, match=r"HTTP 400: max_tokens 300 \+ the prompt's"):
        HTTPBackend(plain_server, eos_id=2).generate([prompts[0]], [greedy(300)])


def test_make_backend_reads_the_spec(trained, tokenizer, monkeypatch, tmp_path):
    model = trained[0]
    local = make_backend("engine", model, tokenizer)
    assert isinstance(local, EngineBackend) and local.model is model and local.eos_id == tokenizer.eos_id
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    remote = make_backend(f"http://127.0.0.1:9,key=k1,model=pol,timeout=5,sync_dir={tmp_path}", model, tokenizer)
    assert isinstance(remote, HTTPBackend)
    assert (remote.base_url, remote.api_key, remote.model_name, remote.timeout, remote.eos_id) == (
        "http://127.0.0.1:9",
        "k1",
        "pol",
        5.0,
        2,
    )
    assert remote.sync_folder() == (tmp_path / "policy").resolve()
    assert remote.request_body([1, 2], seeded(0)) == {
        "prompt": [1, 2],
        "max_tokens": MAX_NEW,
        "temperature": 0.9,
        "top_p": 0.9,
        "n": 1,
        "return_token_ids": True,
        "model": "pol",
        "top_k": 40,
        "seed": 1000,
    }
    monkeypatch.setenv("MINIMIND_API_KEY", "from-env")
    assert make_backend("http://localhost:8998/", eos_id=2).api_key == "from-env"
    assert make_backend("http://localhost:8998", eos_id=2, api_key="given").api_key == "given"
    for bad, fragment in [
        ("grpc://host:1", "expected 'engine' or 'http://host:port"),
        ("http://h:1,color=red", "option 'color=red' is not one of"),
        ("http://h:1,timeout=soon", "timeout='soon' is not a number"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            make_backend(bad, model, tokenizer)


def test_weight_reload_on_a_public_host_needs_a_key(trained, monkeypatch, capsys):
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    assert serve.parse_args(["--load", "x"]).allow_weight_reload is False
    with pytest.raises(SystemExit) as info:
        serve.main(["--load", str(trained[1]), "--host", "0.0.0.0", "--allow_weight_reload"])
    assert str(info.value).startswith("error: --allow_weight_reload with --host 0.0.0.0 needs an API key")
