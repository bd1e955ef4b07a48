"""Loading weights: OpenAI checkpoints get QuickGELU, bad files and offline downloads fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from maskclip_apro.generator import build_generator
from maskclip_apro.generator.models import hub_offline, load_clip, register_tiny_configs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "refine.py"
NAMES = ["cat", "dog"]


class Holder(torch.nn.Module):
    """An empty scriptable module: a TorchScript archive holding only tensors, like OpenAI's .pt files."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def tiny():
    """A tiny ViT with open_clip's default (exact GELU) activation and its state dict."""
    register_tiny_configs()
    torch.manual_seed(11)
    clip = open_clip.create_model("tiny_vit")
    return clip, {k: v.clone() for k, v in clip.state_dict().items()}


def openai_layout(state: dict) -> dict:
    """The state dict as OpenAI's CLIP stores it: open_clip's names plus three integer entries."""
    return {**state, "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(49408)}


def save_torchscript(state: dict, path: Path) -> None:
    root = Holder()
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, Holder())
            node = node._modules[part]
        node.register_buffer(leaf, tensor.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(root), str(path))


def activations(clip) -> tuple[set, set]:
    def kinds(blocks):
        return {type(block.mlp.gelu) for block in blocks}

    return kinds(clip.visual.transformer.resblocks), kinds(clip.transformer.resblocks)


def run_command(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, f"output_dir={tmp_path / 'out'}", f"generator.cache_dir={tmp_path / 'c'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------- QuickGELU


@pytest.mark.parametrize("form", ["state_dict", "torchscript"])
def test_an_openai_checkpoint_under_a_gelu_name_is_built_with_quick_gelu(tmp_path, tiny, form):
    clip, state = tiny
    path = tmp_path / "openai.pt"
    if form == "state_dict":
        torch.save(openai_layout(state), path)
    else:
        save_torchscript(openai_layout(state), path)
    with pytest.warns(UserWarning, match="OpenAI CLIP weights.*QuickGELU"):
        loaded, identity = load_clip("tiny_vit", str(path))
    assert activations(loaded) == ({QuickGELU}, {QuickGELU})
    assert identity.endswith(":quick_gelu")
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    reference = open_clip.create_model("tiny_vit", force_quick_gelu=True)
    reference.load_state_dict(state)
    tokens = open_clip.get_tokenizer("tiny_vit")(["a photo of a cat."])
    torch.testing.assert_close(loaded.encode_text(tokens), reference.eval().encode_text(tokens))


def test_a_plain_open_clip_checkpoint_keeps_the_names_activation(tmp_path, tiny):
    _, state = tiny
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, identity = load_clip("tiny_vit", str(path))
    assert activations(loaded) == ({torch.nn.GELU}, {torch.nn.GELU})
    assert not identity.endswith(":quick_gelu")


def test_model_act_sets_the_image_tower_only(tmp_path, tiny):
    """MaskCLIP's setting: exact GELU and eps 1e-6 in the image tower, OpenAI's text tower as trained."""
    _, state = tiny
    path = tmp_path / "openai.pt"
    torch.save(openai_layout(state), path)
    with pytest.warns(UserWarning, match="QuickGELU"):
        gen = build_generator("tiny_vit", str(path), NAMES, act="gelu", ln_eps=1e-6, cache_dir=str(tmp_path))
    assert activations(gen.model) == ({torch.nn.GELU}, {QuickGELU})
    eps = {m.eps for m in gen.model.visual.modules() if isinstance(m, torch.nn.LayerNorm)}
    text_eps = {m.eps for m in gen.model.transformer.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6} and text_eps == {1e-5}


# ---------------------------------------------------------------- bad files


def test_unreadable_and_unfitting_checkpoints_are_one_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint " * 20)
    with pytest.raises(ValueError, match=r"model.pretrained file '.*garbage.pt' is not a readable checkpoint"):
        load_clip("tiny_vit", str(garbage))
    listing = tmp_path / "listing.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match=r"listing.pt' holds no state dict"):
        load_clip("tiny_vit", str(listing))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"broken.safetensors' is not a readable checkpoint"):
        load_clip("tiny_vit", str(broken))
    other = tmp_path / "resnet.pt"
    torch.save(open_clip.create_model("tiny_resnet").state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet.pt' does not fit model 'tiny_vit'"):
        load_clip("tiny_vit", str(other))


def test_the_command_names_a_corrupt_checkpoint_in_one_error_line(tmp_path):
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    done = run_command(tmp_path, "model=tiny_vit", f"model.pretrained={garbage}", "limit=1")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model.pretrained file '{garbage}' is not a readable checkpoint")
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- downloads without network


def test_a_download_without_network_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"not in the local cache.*127.0.0.1:9 is unreachable.*model.pretrained=/path"):
        load_clip("RN50", "openai")
    assert time.perf_counter() - start < 15


def test_the_command_says_how_to_pass_a_local_file_when_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = run_command(tmp_path, "model=rn50", "limit=1", env=env)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.pretrained='openai' for RN50 is not in the local cache")
    assert "HF_HUB_OFFLINE is set" in last and "model.pretrained=/path/to/" in last


def test_cached_hub_files_are_found_without_network(tmp_path, monkeypatch):
    """The offline first attempt serves a cached file with no request (here every request would fail)."""
    from huggingface_hub import constants, hf_hub_download

    commit = "0" * 40
    repo = tmp_path / "models--someone--weights"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"cached")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with hub_offline():
        path = hf_hub_download("someone/weights", "open_clip_pytorch_model.bin", cache_dir=str(tmp_path))
    assert Path(path).read_bytes() == b"cached"
    assert constants.HF_HUB_OFFLINE == (os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"))
