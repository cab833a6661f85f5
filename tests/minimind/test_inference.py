"""minimind_fast.inference: the one loader of the chat, serve and eval tools. Each mistake a user can make gives one
LoadError line naming the flag; a good load gives the saved model in eval mode with its adapter merged."""

import pytest
import torch

from minimind_fast import lora
from minimind_fast.checkpoint import save_checkpoint
from minimind_fast.config import from_preset
from minimind_fast.inference import LoadError, load_for_inference, pick_device
from minimind_fast.model import MiniMind


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = from_preset("tiny", num_hidden_layers=1)
    model = MiniMind(cfg)
    root = tmp_path_factory.mktemp("inference")
    ckpt = save_checkpoint(root / "m", model, cfg, tokenizer=tokenizer)
    lora.apply_lora(model, rank=2)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    lora.save_adapter(root / "adapter", model)
    return root, ckpt, model.eval()


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(device="gpu0"), "--device 'gpu0' is not a device"),
        (dict(device="meta"), "only cpu and cuda"),
        (dict(kernels_spec="bogus"), "bogus"),
        (dict(lora="missing-adapter"), "--lora: adapter"),
    ],
)
def test_bad_settings_are_one_line_errors(saved, kwargs, words):
    root, ckpt, _ = saved
    if "lora" in kwargs:
        kwargs = {**kwargs, "lora": str(root / kwargs["lora"])}
    with pytest.raises(LoadError) as e:
        load_for_inference(ckpt, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_paths(saved, tmp_path):
    _, ckpt, _ = saved
    with pytest.raises(LoadError, match="does not exist"):
        load_for_inference(tmp_path / "nowhere")
    with pytest.raises(LoadError, match="is a file"):
        load_for_inference(ckpt / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError):
        load_for_inference(tmp_path / "empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(LoadError, match="CUDA is not available"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


def test_adapter_is_merged_and_the_model_is_ready(saved):
    root, ckpt, adapted = saved
    model, tok = load_for_inference(ckpt, lora=root / "adapter", device="cpu", kernels_spec="torch")
    assert not model.training and not lora.lora_layers(model) and tok.eos_id == 2
    ids = torch.randint(0, 6400, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    plain, _ = load_for_inference(ckpt, device="cpu", kernels_spec="torch", yarn=True)
    assert plain.config.inference_rope_scaling
