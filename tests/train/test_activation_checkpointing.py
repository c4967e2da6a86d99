"""Activation checkpointing: tidal.checkpointing.checkpoint gives the gradients of the plain call
(several inputs, non-tensor arguments, tuple outputs, inputs without grad, dropout through the
restored generators); tidal's Llama-family models checkpointed per layer ("full", "attention", "mlp")
train to the same weights as without checkpointing, also at ZeRO stage 3 and for a MoE model; the
fused LM-head loss (``labels``) trains at stage 3 like the logits path; the
config section takes DeepSpeed's keys; on a GPU, cpu_checkpointing offloads the kept inputs to
pinned memory and prefetches them back in the backward pass."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import tidal
from tidal import checkpointing
from tidal.models import load_model

VOCAB, SEQ, BATCH, STEPS = 64, 10, 4, 3
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_settings():
    checkpointing.reset()
    yield
    checkpointing.reset()


def _block(x, w, scale: float, bias):
    h = F.dropout(torch.tanh(x @ w) * scale, p=0.3, training=True)
    return h + bias, (h * h).sum(-1)


def _grads(fn, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g).to(device).requires_grad_()
    w = torch.randn(8, 8, generator=g).to(device).requires_grad_()
    bias = torch.randn(8, generator=g).to(device)  # no grad
    torch.manual_seed(7)
    if device == "cuda":
        torch.cuda.manual_seed(7)
    a, b = fn(_block, x, w, 0.5, bias)
    (a.square().sum() + b.sum()).backward()
    return a.detach(), x.grad, w.grad


def test_checkpoint_matches_the_plain_call():
    want = _grads(lambda f, *args: f(*args))
    got = _grads(checkpointing.checkpoint)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_checkpoint_without_grad_is_a_plain_call():
    x = torch.randn(3, 8)
    with torch.no_grad():
        a, _ = checkpointing.checkpoint(_block, x.requires_grad_(), torch.eye(8), 1.0, torch.zeros(8))
    assert a.grad_fn is None


def test_profile_counts_forwards_and_recomputes():
    checkpointing.configure(profile=True)
    _grads(checkpointing.checkpoint)
    stats = checkpointing.profile_stats()
    assert stats["forward_calls"] == 1 and stats["recompute_calls"] == 1
    assert stats["offloaded_bytes"] == 0  # CPU tensors are never offloaded


def _save_tiny(path, family="llama"):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64)
    if family == "moe":
        config = transformers.Qwen3MoeConfig(head_dim=8, moe_intermediate_size=24, num_experts=4,
                                             num_experts_per_tok=2, norm_topk_prob=True, **common)
    else:
        config = transformers.LlamaConfig(**common)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(path)


def _train(path, section: dict | None, stage: int = 0) -> dict:
    model, _ = load_model(str(path))
    config = {"train_batch_size": BATCH, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
              "moe": {"aux_loss_coef": 0.1}}
    if section is not None:
        config["activation_checkpointing"] = section
    engine = tidal.initialize(model, config)
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
        logits = engine(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    return engine.full_state_dict()


@pytest.mark.parametrize("policy", ["full", "attention", "mlp"])
def test_llama_policies_train_to_the_same_weights(policy, tmp_path):
    _save_tiny(tmp_path)
    want = _train(tmp_path, None)
    got = _train(tmp_path, {"policy": policy, "partition_activations": True, "contiguous_memory_optimization": True,
                            "number_checkpoints": 3, "synchronize_checkpoint_boundary": True, "profile": True})
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert checkpointing.profile_stats()["recompute_calls"] == 3 * STEPS  # one per layer per step


def test_full_checkpointing_at_stage_3(tmp_path):
    """Stage 3 gathers a module's parameters again for its recompute."""
    _save_tiny(tmp_path)
    want = _train(tmp_path, None, stage=3)
    got = _train(tmp_path, {"policy": "full", "profile": True}, stage=3)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    stats = checkpointing.profile_stats()
    assert stats["recompute_calls"] == stats["forward_calls"] == 3 * STEPS  # one per layer per step


def test_moe_model_keeps_its_auxiliary_loss_under_checkpointing(tmp_path):
    """MoE blocks are never recomputed: their auxiliary losses keep their graph, and the weights match."""
    _save_tiny(tmp_path, "moe")
    want = _train(tmp_path, None)
    got = _train(tmp_path, {"policy": "full", "profile": True})
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert checkpointing.profile_stats()["recompute_calls"] == 3 * STEPS  # the attention halves


@pytest.mark.parametrize("section,match", [
    ({"policy": "selective"}, "activation_checkpointing.policy='selective' must be one of"),
    ({"cpu_checkpoint": True}, "activation_checkpointing.cpu_checkpoint is not a known key; did you mean "
                               "activation_checkpointing.cpu_checkpointing"),
    ({"profile": 1}, "activation_checkpointing.profile"),
    ({"number_checkpoints": 0}, "activation_checkpointing.number_checkpoints=0"),
])
def test_config_errors(section, match):
    with pytest.raises(ValueError, match=match):
        tidal.initialize(torch.nn.Linear(2, 2), {"train_batch_size": 1, "activation_checkpointing": section})


def test_set_activation_checkpointing_rejects_unknown_policies(tmp_path):
    _save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path))
    with pytest.raises(ValueError, match="policy='layers' must be one of"):
        model.set_activation_checkpointing("layers")


@needs_gpu
def test_cpu_checkpointing_offloads_and_prefetches_on_gpu():
    def chain(run):  # four calls in a row: the backward prefetches each earlier checkpoint's inputs
        def go(f, x, w, scale, bias):
            for _ in range(3):
                x, _ = run(f, x, w, scale, bias)
            return run(f, x, w, scale, bias)
        return go

    plain = _grads(chain(lambda f, *args: f(*args)), "cuda")
    kept = _grads(chain(checkpointing.checkpoint), "cuda")  # inputs kept on the GPU
    checkpointing.configure(checkpoint_in_cpu=True, profile=True)
    offloaded = _grads(chain(checkpointing.checkpoint), "cuda")
    stats = checkpointing.profile_stats()
    assert stats["offloaded_bytes"] > 0 and stats["prefetched"] >= 3
    for p, k, o in zip(plain, kept, offloaded):
        torch.testing.assert_close(k, p, rtol=0, atol=0)
        torch.testing.assert_close(o, p, rtol=0, atol=0)


def test_policies_keep_fewer_activations(tmp_path):
    """Bytes autograd saves for the backward pass during one training forward: whole-layer
    checkpointing keeps the least, either half-layer policy less than none."""
    _save_tiny(tmp_path)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    saved = {}
    for policy in (None, "attention", "mlp", "full"):
        model, _ = load_model(str(tmp_path))
        model.set_activation_checkpointing(policy)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids)
        saved[policy] = total
    assert saved["full"] < saved["attention"] < saved[None]
    assert saved["full"] < saved["mlp"] < saved[None]


def test_labels_loss_at_stage_3(tmp_path):
    """The fused LM-head loss goes through the head module, so stage 3 gathers the tied weight for it:
    the same weights as the logits path."""
    _save_tiny(tmp_path)
    weights = []
    for use_labels in (False, True):
        model, _ = load_model(str(tmp_path))
        engine = tidal.initialize(model, {"train_batch_size": BATCH, "zero_optimization": {"stage": 3},
                                          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
            if use_labels:
                loss = engine(ids, labels=ids)
            else:
                logits = engine(ids)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
        weights.append(engine.full_state_dict())
    for name, w in weights[0].items():  # summation order differs; Adam magnifies it on tiny gradients
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
