"""Shared by the server tests: an app served by uvicorn on a free loopback port, in a thread of the test process,
and a tiny model trained to call the calculator tool (the tool-use tests of serve, chat and the web page)."""

import socket
import threading
import time
from types import SimpleNamespace

import pytest


class ServerThread:
    """`with ServerThread(app) as srv:` serves app at srv.base (http://127.0.0.1:srv.port) until the block ends."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="session")
def server_thread():
    return ServerThread


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory, tokenizer):
    """A one-layer model trained here (a few seconds) on one tool-use conversation rendered with the real template
    and the calculator's spec, until greedy decoding gives exactly both of its assistant turns, eos included:
      user "What is 37 + 48?" -> a calculator call {"expression": "37 + 48"} -> the tool's {"result": 85}
      -> "37 + 48 = 85."
    Returns a namespace: model (eval mode), folder (the same weights saved as a checkpoint, for the CLIs), specs,
    question, call_name, call_arguments, call_text (the first turn as the model writes it), result, answer."""
    import torch

    from minimind_fast.checkpoint import save_checkpoint
    from minimind_fast.config import MiniMindConfig
    from minimind_fast.generate import generate
    from minimind_fast.model import MiniMind
    from minimind_fast.toolcall import CALCULATOR_SPEC

    question, arguments = "What is 37 + 48?", {"expression": "37 + 48"}
    result, answer = '{"result": 85}', "37 + 48 = 85."
    call_text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 + 48"}}\n</tool_call>'
    specs = [CALCULATOR_SPEC]
    call = {"type": "function", "function": {"name": "calculator", "arguments": arguments}}
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": answer},
    ]
    # The whole conversation is one sequence; the two assistant turns are what the loss covers. Each turn's prompt is
    # what a server renders for that point of the conversation, tokenized as a whole: check that it is a prefix.
    ids = tokenizer.apply_chat_template(messages, tools=specs, tokenize=True)
    turns = []
    for upto, text in ((1, call_text), (3, answer)):
        prompt = tokenizer.apply_chat_template(messages[:upto], True, True, tools=specs)
        reply = tokenizer.encode(text + "<|im_end|>")
        assert ids[: len(prompt) + len(reply)] == prompt + reply
        turns.append((prompt, reply))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = MiniMindConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024,
        )  # fmt: skip
        model = MiniMind(cfg)
        ids_BT = torch.tensor([ids])
        labels_BT = torch.full_like(ids_BT, -100)
        for prompt, reply in turns:
            labels_BT[0, len(prompt) : len(prompt) + len(reply)] = torch.tensor(reply)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        learned = False
        for step in range(400):
            loss = model(ids_BT, labels=labels_BT).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 9:
                model.eval()
                learned = all(generate(model, [p], len(r) + 2, greedy=True)[0] == r for p, r in turns)
                if learned:
                    break
                model.train()
        assert learned, "the tool-calling model did not learn its conversation"
    finally:
        torch.set_num_threads(threads)
    folder = save_checkpoint(tmp_path_factory.mktemp("tools") / "tool-caller", model, cfg, tokenizer=tokenizer)
    return SimpleNamespace(
        model=model, folder=folder, specs=specs, question=question, call_name="calculator", call_arguments=arguments,
        call_text=call_text, result=result, answer=answer,
    )  # fmt: skip
