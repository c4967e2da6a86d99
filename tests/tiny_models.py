"""Tiny random Hugging Face checkpoints for tests: built with transformers, saved to a directory with
a small byte-level BPE tokenizer, and loaded back through tidal the way a user would."""

import json
import os

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 320
BOS, EOS = 0, 1
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "class Engine:\n    def step(self):\n        return self.scheduler.schedule()\n",
    "héllo wörld, ça va? 🙂 naïve café",
    "for i in range(10):\n    print(i * i)\n",
]

FAMILIES = {
    "llama": lambda **kw: transformers.LlamaConfig(**kw),
    "llama3_rope": lambda **kw: transformers.LlamaConfig(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, **kw),
    "mistral": lambda **kw: transformers.MistralConfig(sliding_window=12, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**kw),
    "qwen3": lambda **kw: transformers.Qwen3Config(head_dim=32, **kw),
}
# Mixture-of-experts families (build_model takes them too; not in FAMILIES, which the dense tests sweep)
MOE_FAMILIES = {
    "mixtral": lambda **kw: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw),
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeConfig(  # layer 0 dense, layer 1 sparse with a shared expert
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        decoder_sparse_step=2, mlp_only_layers=[], **kw),
}


def build_tokenizer(path: str, extra_special_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """The test tokenizer; ``extra_special_tokens`` get the ids after ``</s>`` (2, 3, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>", *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tok


def build_model(path: str, family: str = "llama", seed: int = 0, tie: bool = False, num_layers: int = 2,
                max_position_embeddings: int = 256, **overrides):
    """Saves a tiny random ``family`` model (fp32) plus tokenizer to ``path``; returns the HF model."""
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=VOCAB_SIZE, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS, rms_norm_eps=1e-6)
    kwargs.update(overrides)
    config = {**FAMILIES, **MOE_FAMILIES}[family](**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; make logits spread so greedy paths differ by prompt
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    build_tokenizer(path)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: bool = True) -> list[int]:
    """transformers' greedy generate for one prompt (no padding), new tokens only."""
    input_ids = torch.tensor([prompt_ids])
    config = model.generation_config
    config.eos_token_id = EOS if eos else None
    config.do_sample = False
    config.pad_token_id = EOS
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             generation_config=config)
    return out[0, len(prompt_ids):].tolist()


def assert_pool_whole(llm_or_engine) -> None:
    """Every KV block is back in the pool and no request is left running or waiting."""
    stats = llm_or_engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0, stats
