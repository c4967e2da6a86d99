"""Mixture-of-experts parity with transformers: tiny random Mixtral, Qwen2-MoE (shared expert, dense
layers between sparse ones) and Qwen3-MoE models are built and saved with transformers, loaded by tidal
and compared: the parsed config, training-mode logits and gradients, the per-layer load-balancing loss,
greedy generation through tidal.LLM (fused MoE op, paged KV cache, chunked prefill), and the weights
written back in Hugging Face's per-expert layout. Greedy generation runs on the CPU and, where there is
one, on the GPU (CUDA graphs on and off); a bf16 Mixtral on the GPU (the fused op's tensor-core path)
gives transformers' bf16 next-token log-probabilities within bf16 tolerance."""

import random

import pytest
import torch
import transformers

import tidal
from tidal.models import load_model
from tidal.models.loader import save_model
from tidal.models.moe import SparseMoeBlock
from conftest import gpu_only
from tiny_models import EOS, assert_pool_whole, build_tokenizer, hf_greedy

BASE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
            intermediate_size=96, max_position_embeddings=256, bos_token_id=0, eos_token_id=EOS, rms_norm_eps=1e-6)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **BASE),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        decoder_sparse_step=2, mlp_only_layers=[], **BASE),  # layer 1 sparse, layers 0 and 2 dense
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=True, head_dim=32,
        mlp_only_layers=[2], **BASE),
}


def build(family: str, path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    build_tokenizer(str(path))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, build(request.param, path)


def test_config(family_model):
    family, path, hf = family_model
    model, config = load_model(path)
    cfg = hf.config
    experts = cfg.num_local_experts if family == "mixtral" else cfg.num_experts
    assert config.num_experts == experts and config.num_experts_per_tok == cfg.num_experts_per_tok
    assert config.norm_topk_prob == (family != "qwen2_moe")
    assert config.routing_weights_fp32 == (family == "mixtral")
    expected_layers = {"mixtral": (True, True, True), "qwen2_moe": (False, True, False),
                       "qwen3_moe": (True, True, False)}[family]
    assert config.moe_layers == expected_layers
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers] == list(expected_layers)
    assert config.shared_expert_intermediate_size == (48 if family == "qwen2_moe" else 0)


def test_training_logits_and_gradients(family_model):
    _, path, hf = family_model
    model, _ = load_model(path)
    model.train()
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = model(ids)
    want = hf(ids).logits
    torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-5)
    ours.square().mean().backward()
    want.square().mean().backward()
    hf_grads = dict(hf.named_parameters())
    for name, (param, lo, hi) in model._hf_targets().items():
        if ".experts." in name or "gate.weight" in name or "norm" in name:
            if name not in hf_grads:  # HF keeps experts stacked in memory; compare the router and norms
                continue
            grad = param.grad if lo is None else param.grad[lo:hi]
            torch.testing.assert_close(grad, hf_grads[name].grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the stacked expert weights' gradients against HF's stacked ones
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, SparseMoeBlock):
            experts = (hf.model.layers[i].block_sparse_moe if hasattr(hf.model.layers[i], "block_sparse_moe")
                       else hf.model.layers[i].mlp).experts
            torch.testing.assert_close(layer.mlp.w13.grad, experts.gate_up_proj.grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(layer.mlp.w2.grad, experts.down_proj.grad, atol=1e-6, rtol=1e-4)
    hf.zero_grad()


def test_load_balancing_loss_is_transformers_per_layer(family_model):
    family, path, hf = family_model
    model, _ = load_model(path)
    ids = torch.randint(0, 320, (3, 9), generator=torch.Generator().manual_seed(2))
    model(ids)
    out = hf(ids, output_router_logits=True)
    module = {"mixtral": transformers.models.mixtral.modeling_mixtral,
              "qwen2_moe": transformers.models.qwen2_moe.modeling_qwen2_moe,
              "qwen3_moe": transformers.models.qwen3_moe.modeling_qwen3_moe}[family]
    sparse = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    assert len(out.router_logits) == len(sparse)
    for block, logits in zip(sparse, out.router_logits):
        want = module.load_balancing_loss_func((logits,), block.num_experts, block.top_k)
        torch.testing.assert_close(block.aux_loss, want, atol=1e-6, rtol=1e-5)
        assert block.z_loss > 0


def test_greedy_generation_matches_transformers(family_model):
    _, path, hf = family_model
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (1, 4, 9, 17, 30)]
    expected = [hf_greedy(hf, p, 10) for p in prompts]
    llm = tidal.LLM(str(path), device="cpu", block_size=4, num_kv_blocks=96, max_num_seqs=3, max_num_batched_tokens=16)
    outputs = llm.generate(prompts, tidal.SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert_pool_whole(llm)


@gpu_only
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_greedy_generation_matches_transformers_on_gpu(family_model, enforce_eager):
    _, path, hf = family_model
    rng = random.Random(4)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (1, 4, 9, 17, 30, 3, 6)]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    llm = tidal.LLM(str(path), device="cuda", block_size=4, num_kv_blocks=128, max_num_seqs=5,
                    max_num_batched_tokens=16, enforce_eager=enforce_eager)
    outputs = llm.generate(prompts, tidal.SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert_pool_whole(llm)


@gpu_only
def test_bf16_mixtral_log_probs_on_gpu(tmp_path):
    """hidden 256 and inter 512: the fused op's tensor-core kernels in the model, against transformers'
    own bf16 forward on the GPU."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**{**BASE, "hidden_size": 256, "intermediate_size": 512,
                                           "num_attention_heads": 4, "num_key_value_heads": 2},
                                        num_local_experts=8, num_experts_per_tok=2)
    hf = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # a sharp router: a near-tie that bf16 noise flips is between low-weight experts
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(30)
    hf.save_pretrained(tmp_path)
    build_tokenizer(str(tmp_path))
    hf = hf.to("cuda", torch.bfloat16).eval()
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (30, 17, 64)]
    llm = tidal.LLM(str(tmp_path), dtype=torch.bfloat16, device="cuda", block_size=16, num_kv_blocks=64)
    outs = llm.generate(prompts, tidal.SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float().log_softmax(-1).cpu()
        first = out.outputs[0].token_ids[0]
        assert first == int(want.argmax()) or want.max() - want[first] < 0.1
        for token, value in out.outputs[0].logprobs[0].items():
            assert abs(value - float(want[token])) < 0.1, (token, value, float(want[token]))
    assert_pool_whole(llm)


def test_weights_written_back_per_expert(family_model, tmp_path):
    _, path, hf = family_model
    model, _ = load_model(path)
    save_model(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    for (name, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(reloaded.state_dict().items())):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
