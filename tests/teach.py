"""A tiny model taught one answer, for the tests that need a model whose greedy output is known in advance:

    model = teach(MiniMind(cfg), prompt_ids, answer_ids)   # greedy decoding of prompt_ids now gives answer_ids

Adam at lr 1e-2 on the one prompt -> answer pair (the loss on the answer only), checked every 10 steps; the model comes
back in eval mode, and a model that never learns it fails the test that asked.
"""

from __future__ import annotations

import torch

from minimind_fast.generate import generate


def teach(model: torch.nn.Module, prompt: list[int], answer: list[int], steps: int = 400, lr: float = 1e-2):
    ids = torch.tensor([prompt + answer])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            model.eval()
            if generate(model, [prompt], len(answer) + 2, greedy=True)[0] == answer:
                return model
            model.train()
    raise AssertionError(f"the model did not learn its answer in {steps} steps")
