"""The LoRA plumbing both trainers share: settings, the wrap-and-restore session, the output folder."""

from __future__ import annotations

import json

import pytest
import torch

from personalign.adapter_training import (
    LoraSettings,
    check_out_dir,
    lora_session,
    optimize,
    planned_steps,
    top_layers,
    write_metadata,
)
from personalign.models import ADAPTER_METADATA
from tests.conftest import make_tiny_llm


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"alpha": -1}, {"dropout": 1.0}, {"layers": ()}, {"layers": (-1,)},
                                    {"modules": ()}, {"modules": ["q_proj"]}, {"modules": ("q_proj", "q_proj")},
                                    {"modules": ("q_proj", "model.k_proj")}])
def test_bad_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        LoraSettings(**kwargs)


def test_top_layers_counts_from_the_last() -> None:
    model = make_tiny_llm().model  # 2 decoder layers
    assert top_layers(model, 1) == (1,)
    assert top_layers(model, 5) == (0, 1)
    with pytest.raises(ValueError):
        top_layers(model, 0)


def test_session_adapts_only_the_chosen_layers_and_restores_even_on_error() -> None:
    loaded = make_tiny_llm()
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), lora_session(loaded, LoraSettings(rank=2, layers=(1,)), 0) as m:
        adapted = {n.split(".lora_A")[0] for n, _ in m.named_parameters() if "lora_A" in n}
        assert adapted and all(".layers.1." in n for n in adapted)
        assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "v_proj"}
        assert all(not p.requires_grad for n, p in m.named_parameters() if "lora" not in n)
        raise RuntimeError("boom")
    model = loaded.model
    assert not any("lora" in n for n, _ in model.named_modules()) and not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_session_adapts_the_chosen_modules_and_names_the_ones_a_model_has() -> None:
    loaded = make_tiny_llm()
    with lora_session(loaded, LoraSettings(rank=2, modules=("q_proj", "k_proj", "v_proj")), 0) as m:
        adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in m.named_parameters() if "lora_A" in n}
        assert adapted == {"q_proj", "k_proj", "v_proj"}
    unknown = LoraSettings(rank=2, modules=("q_proj", "qkv"))
    with (pytest.raises(ValueError, match=r"no qkv layers to adapt; its linear layers are .*k_proj.*q_proj"),
          lora_session(loaded, unknown, 0)):
        pass
    assert not any("lora" in n for n, _ in loaded.model.named_modules())


def test_session_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with lora_session(make_tiny_llm(), LoraSettings(rank=2), seed=1):
        pass
    assert torch.equal(torch.rand(3), expected)


def test_out_dir_rules(tmp_path) -> None:
    assert check_out_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="non-empty folder"):
        check_out_dir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert check_out_dir(tmp_path / "adapter").is_dir()  # an earlier adapter may be overwritten


def test_metadata_names_purpose_base_and_run(tmp_path) -> None:
    loaded = make_tiny_llm()
    write_metadata(tmp_path, loaded, "preference", LoraSettings(layers=(0,)), {"steps": 3})
    meta = json.loads((tmp_path / ADAPTER_METADATA).read_text())
    assert (meta["purpose"], meta["base_model"], meta["steps"], meta["eou_token_id"]) == (
        "preference", "tiny-random-llama", 3, 2)
    assert meta["lora"] == {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                            "layers": [0]}
    assert meta["base_config"]["num_hidden_layers"] == 2


def test_planned_steps() -> None:
    assert planned_steps(10, 4, 1, None) == 3
    assert planned_steps(10, 4, 2, None) == 6
    assert planned_steps(10, 4, 2, 5) == 5


def test_optimize_runs_the_planned_steps_over_shuffled_batches() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    seen: list[list[int]] = []
    progress: list[tuple] = []

    def step(batch: list[int]) -> float:
        seen.append(batch)
        x = torch.tensor([[float(i)] for i in batch])
        loss = ((model(x) - 2 * x) ** 2).mean()  # learn y = 2x
        loss.backward()
        return loss.item()

    losses, seconds = optimize(model, range(5), step, lr=0.1, batch_size=2, total=7, seed=0,
                               progress=lambda *a: progress.append(a))
    assert len(losses) == len(seen) == 7 and seconds >= 0
    assert [len(b) for b in seen] == [2, 2, 1, 2, 2, 1, 2]  # epochs of 5 in batches of 2, cut at 7
    assert sorted(i for batch in seen[:3] for i in batch) == list(range(5)) and seen[:3] != seen[3:6]  # each epoch: all, reshuffled
    assert [p[:2] for p in progress] == [(i, 7) for i in range(1, 8)] and progress[-1][2] == losses[-1]
    assert losses[-1] < losses[0] and model.training
