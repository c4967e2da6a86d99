"""`tidal rlhf sft|rm|ppo|grpo --config FILE` end to end on a tiny model: each role trains, writes a
sharded checkpoint and a Hugging Face export that loads (tidal.LLM for the policies, transformers'
sequence classifier for the reward model); config errors name the problem."""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

import tidal
from tidal.cli import main
from tiny_models import build_model

REWARD_MODULE = '''
def short(prompts, completions, completion_ids):
    return [1.0 if len(ids) < 4 else 0.0 for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf_cli")
    build_model(str(root / "base"))
    (root / "sft.jsonl").write_text("\n".join(json.dumps({"prompt": f"q {i}", "completion": f" a {i}"})
                                              for i in range(8)))
    (root / "rm.jsonl").write_text("\n".join(json.dumps({"chosen": f"yes {i}", "rejected": f"no {i}"})
                                             for i in range(8)))
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"item {i}"}) for i in range(4)))
    (root / "rlhf_rewards_test.py").write_text(REWARD_MODULE)
    return root


def _write(root, name, **config) -> str:
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


TRAIN = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
LLM = {"device": "cpu", "num_kv_blocks": 64, "block_size": 4, "max_model_len": 64}


@pytest.mark.parametrize("role", ["sft", "rm", "grpo", "ppo"])
def test_each_role(workdir, role, monkeypatch):
    monkeypatch.chdir(workdir)  # the reward module is importable from the working directory
    out = workdir / f"out_{role}"
    data = {"sft": "sft.jsonl", "rm": "rm.jsonl"}.get(role, "prompts.jsonl")
    args = {"train": TRAIN}
    if role == "grpo":
        args.update(num_generations=4, max_completion_length=6, llm=LLM)
    if role == "ppo":
        args.update(num_generations=2, max_completion_length=6, num_ppo_epochs=1, llm=LLM, critic_train=TRAIN)
    config = _write(workdir, role, model=str(workdir / "base"), out=str(out), data=str(workdir / data), steps=2,
                    save_interval=1, reward="rlhf_rewards_test:short", args=args)
    assert main(["rlhf", role, "--config", config]) == 0
    assert os.path.isfile(out / "checkpoints" / "latest")
    if role == "rm":
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "model"), dtype=torch.float32)
        assert hf(torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
    else:
        llm = tidal.LLM(str(out / "model"), device="cpu", num_kv_blocks=32, max_model_len=64)
        assert llm.generate([[5, 6]], tidal.SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("role", ["grpo", "ppo", "sft", "rm"])
def test_a_stopped_run_resumes_where_it_was(workdir, role, monkeypatch, capsys):
    """Steps 1-2, then a second run to step 4 from the checkpoint, give the weights of one run of 4
    steps: the rollouts' seeds follow the step, the actor (and critic, KL coefficient) come back;
    SFT and the reward model skip the batches of the steps already taken (4 steps span 2 epochs)."""
    monkeypatch.chdir(workdir)
    if role in ("sft", "rm"):
        args = {"train": {**TRAIN, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
                "num_train_epochs": 3}
        data = {"sft": "sft.jsonl", "rm": "rm.jsonl"}[role]
    else:
        args = {"train": TRAIN, "max_completion_length": 5, "llm": LLM, "num_generations": 4}
        data = "prompts.jsonl"
    if role == "ppo":
        args.update(num_ppo_epochs=1, critic_train=TRAIN, target_kl=0.01)
    common = dict(model=str(workdir / "base"), data=str(workdir / data), reward="rlhf_rewards_test:short",
                  save_interval=1, args=args)
    stopped, whole = workdir / f"stopped_{role}", workdir / f"whole_{role}"
    assert main(["rlhf", role, "--config", _write(workdir, "a", out=str(stopped), steps=2, **common)]) == 0
    assert main(["rlhf", role, "--config", _write(workdir, "b", out=str(stopped), steps=4, **common)]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert main(["rlhf", role, "--config", _write(workdir, "c", out=str(whole), steps=4, **common)]) == 0
    a = load_file(str(stopped / "model" / "model.safetensors"))
    b = load_file(str(whole / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_config_errors(workdir, capsys):
    bad = _write(workdir, "bad", model="m", out="o")
    assert main(["rlhf", "sft", "--config", bad]) == 1
    assert "needs 'data' (a path)" in capsys.readouterr().err
    extra = _write(workdir, "extra", model="m", out="o", data="d", epochs=3)
    assert main(["rlhf", "grpo", "--config", extra]) == 1
    assert "unknown keys ['epochs']" in capsys.readouterr().err
    no_reward = _write(workdir, "noreward", model=str(workdir / "base"), out=str(workdir / "x"),
                       data=str(workdir / "prompts.jsonl"), steps=1)
    assert main(["rlhf", "grpo", "--config", no_reward]) == 1
    assert "grpo needs 'reward'" in capsys.readouterr().err
