"""SFTTrainer: the prompt's tokens carry no loss (prompt/completion pairs, chat messages through the
tokenizer's chat template, plain text), the loss equals transformers' on the same ids and labels,
packing fills rows of max_length without losing a token or a label, training lowers the loss, the
saved model loads in tidal.LLM, and bad examples are clear errors."""

import json

import pytest
import torch

import tidal
from tidal.rlhf import SFTConfig, SFTTrainer
from tidal.rlhf.sft import IGNORE, collate, pack, tokenize_example
from tidal.tokenizer import Tokenizer
from tiny_models import EOS, build_model

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
DATA = [{"prompt": f"question {i}: what is {i} plus {i}?", "completion": f" it is {2 * i}."} for i in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft")
    hf = build_model(str(path), max_position_embeddings=128)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE,
                                                            "bos_token": "<s>", "eos_token": "</s>"}))
    return str(path), hf


def _config(**kw):
    base = dict(max_length=64, device="cpu", train={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    base.update(kw)
    return SFTConfig(**base)


def test_tokenize_masks_the_prompt(model_dir):
    path, _ = model_dir
    tok = Tokenizer(path)
    ids, labels = tokenize_example(tok, DATA[3])
    prompt = tok.encode(DATA[3]["prompt"])
    completion = tok.encode(DATA[3]["completion"], add_special_tokens=False) + [EOS]
    assert ids == prompt + completion and labels == [IGNORE] * len(prompt) + completion
    ids, labels = tokenize_example(tok, DATA[3], completion_only_loss=False)
    assert labels == ids
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids, labels = tokenize_example(tok, chat)
    rendered = tok.apply_chat_template(chat["messages"][:1])
    assert rendered == "<s><|user|>hi\n<|assistant|>"
    n = len(tok.encode(rendered, add_special_tokens=False))
    assert labels[:n] == [IGNORE] * n and labels[n:] == tok.encode("hello", add_special_tokens=False) + [EOS]
    ids, labels = tokenize_example(tok, {"text": "plain text"})
    assert labels == ids and ids[-1] == EOS
    with pytest.raises(ValueError, match="needs 'prompt' and 'completion', 'messages' or 'text'"):
        tokenize_example(tok, {"question": "?"})
    with pytest.raises(ValueError, match="ending with an assistant message"):
        tokenize_example(tok, {"messages": [{"role": "user", "content": "hi"}]})


def test_pack_and_collate():
    rows = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])]
    packed = pack(rows, 4)
    assert packed == [([1, 2, 3, 4], [IGNORE, 2, 3, IGNORE]), ([5, 6, 7, 8], [5, IGNORE, IGNORE, 8]), ([9], [9])]
    ids, labels = collate(packed, pad_id=0)
    assert ids.tolist()[2] == [9, 0, 0, 0] and labels.tolist()[2] == [9, IGNORE, IGNORE, IGNORE]


def test_loss_equals_transformers_and_training_lowers_it(model_dir, tmp_path):
    path, hf = model_dir
    trainer = SFTTrainer(path, DATA, _config(num_train_epochs=10))
    ids, labels = collate(trainer.rows[:4], trainer.pad_id)
    with torch.no_grad():
        ours = trainer.engine(ids, labels=labels)
        want = hf(ids, labels=labels).loss
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    history = trainer.train(max_steps=24, log=None)
    assert len(history) == 24
    assert sum(m["loss"] for m in history[-3:]) / 3 < 0.5 * history[0]["loss"], [round(m["loss"], 3) for m in history]
    trainer.save_model(str(tmp_path / "out"))
    llm = tidal.LLM(str(tmp_path / "out"), device="cpu", num_kv_blocks=64, max_model_len=64)
    out = llm.generate([DATA[5]["prompt"]], tidal.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].token_ids


def test_packing_trains_on_full_rows(model_dir):
    path, _ = model_dir
    trainer = SFTTrainer(path, DATA, _config(packing=True, max_length=32))
    assert all(len(ids) == 32 for ids, _ in trainer.rows[:-1])
    assert len(trainer.train(max_steps=2, log=None)) == 2


def test_errors(model_dir):
    path, _ = model_dir
    with pytest.raises(ValueError, match="max_length=1 must be at least 2"):
        SFTConfig(max_length=1)
    with pytest.raises(ValueError, match="no example has a completion token within max_length"):
        SFTTrainer(path, [{"prompt": "a long prompt " * 20, "completion": "x"}], _config(max_length=8))
