# SPDX-License-Identifier: Apache-2.0
"""V1 of bench/serve.py: vision-language serving, Qwen2.5-VL-7B's architecture (random bf16 weights).

200 requests, each one 448x448 image (a 32x32 patch grid: 256 placeholder rows after the 2x2
merge) between ``<|vision_start|>`` and ``<|vision_end|>``, then 64 random text tokens; 128 output
tokens, greedy, EOS ignored. Two runs of tidal.LLM, each after a warm-up and with its encoder and
prefix caches emptied: every request with an image of its own ("unique"), and half the requests
sharing their image (request i shows image i mod 100, "shared": the encoder cache and the image's
prefix blocks hit). requests/s = 200 / wall time of one generate call, preprocessing included.

Peer: transformers ``generate()`` eager in static batches of 16 (its Pillow image processor's
pixels, which tidal's processor equals; left padding, ``mm_token_type_ids`` as its processor gives
them), preprocessing included; the first --peer-batches batches timed. transformers has no encoder
cache, so its rate stands for both runs. Check before timing: tidal's 16 greedy tokens for an image
prompt, teacher-forced through the transformers model with the same pixels, must be in its top 10 at
every step.

Run through serve.py: ``python bench/serve.py --out DIR --workloads V1``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
import transformers

import serve as base
import tidal

QWEN2_5_VL_7B = dict(
    text_config=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rms_norm_eps=1e-6,
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, tokens_per_second=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645)
TINY_VL = dict(
    text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=512, max_position_embeddings=2048,
                     rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=0, eos_token_id=1),
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                       fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, tokens_per_second=2),
    image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503, bos_token_id=0,
    eos_token_id=1)
FULL = dict(num=200, text=64, out=128, image=448, peer_batch=16, repeats=2, max_model_len=512)
TINY = dict(num=8, text=8, out=8, image=56, peer_batch=4, repeats=1, max_model_len=256)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def build(tiny: bool, device, dtype):
    """A random-weight Qwen2.5-VL on `device`, saved with its preprocessor_config.json."""
    spec = TINY_VL if tiny else QWEN2_5_VL_7B
    config = transformers.Qwen2_5_VLConfig(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    need = 1.3 * base.weight_bytes(model)
    shm = "/dev/shm"
    root = tempfile.mkdtemp(prefix="tidal-bench-",
                            dir=shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > need else None)
    path = os.path.join(root, "qwen2_5_vl")
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
                   "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "image_mean": CLIP_MEAN,
                   "image_std": CLIP_STD, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "do_resize": True, "do_convert_rgb": True, "resample": 3}, f)
    base.log(f"qwen2_5_vl: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params saved to {path}")
    return model, root, path


def requests(sizes, spec, shared: bool, seed: int):
    """[(prompt ids before expansion, PIL image)] of V1: unique images, or request i showing image
    i mod (num / 2)."""
    from PIL import Image

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    num, side = sizes["num"], sizes["image"]
    distinct = num // 2 if shared else num
    images = [Image.fromarray(nrng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(distinct)]
    special = min(v for v in (spec["image_token_id"], spec["vision_start_token_id"], spec["bos_token_id"]) if v > 2)
    head = [spec["vision_start_token_id"], spec["image_token_id"], spec["vision_end_token_id"]]
    return [(head + [rng.randrange(2, special) for _ in range(sizes["text"])], images[i % distinct])
            for i in range(num)]


def hf_inputs(processor, batch, spec, device):
    """transformers' inputs for a static batch: left-padded expanded ids, mask, token types, pixels."""
    processed = processor([image for _, image in batch])
    expanded = []
    for (ids, _), n in zip(batch, processed.num_tokens):
        at = ids.index(spec["image_token_id"])
        expanded.append(ids[:at] + [spec["image_token_id"]] * n + ids[at + 1:])
    width = max(len(e) for e in expanded)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(expanded):
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    types = (ids == spec["image_token_id"]).int()
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), mm_token_type_ids=types.to(device),
                pixel_values=processed.pixel_values.to(device), image_grid_thw=processed.grid_thw.to(device))


def check(llm, model, processor, spec, sizes, device, top_k: int) -> str:
    """tidal's greedy tokens for one image prompt, teacher-forced through transformers."""
    (ids, image), = requests(dict(sizes, num=1), spec, False, seed=99)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, base.greedy(16),
                       use_tqdm=False)[0]
    llm.reset_prefix_cache()
    got = list(out.outputs[0].token_ids)
    inputs = hf_inputs(processor, [(ids, image)], spec, device)
    full = torch.cat([inputs["input_ids"], torch.tensor([got[:-1]], device=device)], dim=1)
    inputs.update(input_ids=full, attention_mask=torch.ones_like(full),
                  mm_token_type_ids=(full == spec["image_token_id"]).int())
    with torch.no_grad():
        logits = model(**inputs).logits[0, len(out.prompt_token_ids) - 1:].float()
    hits = (logits.topk(top_k, dim=-1).indices == torch.tensor(got, device=device)[:, None]).any(-1)
    summary = (f"image prompt: tidal's tokens in transformers' top {top_k} at {int(hits.sum())} of {len(got)} "
               f"steps, argmax at {int((logits.argmax(-1).cpu() == torch.tensor(got)).sum())}")
    return ("FAIL greedy check: " if not hits.all() else "greedy check passed: ") + summary


def time_tidal(llm, reqs, n_out: int, device):
    """(seconds, stats delta) of one generate of `reqs` with empty encoder and prefix caches."""
    llm.engine.encoder_cache.clear()
    llm.reset_prefix_cache()
    before = llm.stats()
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": image}} for ids, image in reqs]
    seconds, outs = base.wall(lambda: llm.generate(prompts, base.greedy(n_out), use_tqdm=False), device)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if tokens != len(reqs) * n_out:
        raise RuntimeError(f"tidal generated {tokens} tokens, {len(reqs) * n_out} were asked for")
    after = llm.stats()
    return seconds, {k: after[k] - before.get(k, 0) for k in ("encoder_runs", "encoder_cache_hits",
                                                               "prefix_cache_hit_tokens")}


def run(args, device, dtype, res) -> None:
    sizes = TINY if args.tiny else FULL
    spec = TINY_VL if args.tiny else QWEN2_5_VL_7B
    model, root, path = build(args.tiny, device, dtype)
    from tidal.multimodal import ImageProcessor

    processor = ImageProcessor.from_pretrained(path)
    unique, shared = requests(sizes, spec, False, seed=1), requests(sizes, spec, True, seed=2)
    if not args.no_peers:
        system = f"transformers eager (batch {sizes['peer_batch']})"
        try:
            n_out = sizes["out"]

            def peer(batch):
                inputs = hf_inputs(processor, batch, spec, device)
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
                                   pad_token_id=0)

            peer(unique[:2])  # warm-up
            batches = [unique[i:i + sizes["peer_batch"]] for i in range(0, len(unique), sizes["peer_batch"])]
            if args.peer_batches > 0:
                batches = batches[:args.peer_batches]
            n_req = sum(len(b) for b in batches)
            seconds, _ = base.wall(lambda: [peer(b) for b in batches], device)
            note = f"measured on the first {n_req} of {len(unique)} requests" if n_req < len(unique) else ""
            for metric in ("requests_per_s", "requests_per_s_shared_images"):
                res.add("V1", system, metric, n_req / seconds, "req/s", note=note)
        except Exception as e:
            res.fail("V1", system, "requests_per_s", "req/s", e)
    llm = None
    try:
        llm = tidal.LLM(path, dtype="auto", device=str(device), max_model_len=sizes["max_model_len"],
                        max_num_seqs=256, max_num_batched_tokens=8192)
        verdict = check(llm, model, processor, spec, sizes, device, 10 if dtype == torch.bfloat16 else 2)
    except Exception as e:
        verdict = f"FAIL engine start or greedy check: {type(e).__name__}: {e}"
    base.log(f"qwen2_5_vl {verdict}")
    res.details.append(f"- qwen2_5_vl: {verdict}")
    del model
    base.free_memory(device)
    if verdict.startswith("FAIL"):
        res.failures.append(f"qwen2_5_vl {verdict}")
    else:
        for metric, reqs in (("requests_per_s", unique), ("requests_per_s_shared_images", shared)):
            def timed(metric=metric, reqs=reqs):
                llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
                              for ids, image in requests(dict(sizes, num=4), spec, False, seed=3)],
                             base.greedy(8), use_tqdm=False)  # warm-up with other images
                runs = [time_tidal(llm, reqs, sizes["out"], device) for _ in range(sizes["repeats"])]
                seconds = sorted(s for s, _ in runs)[len(runs) // 2]
                res.add("V1", "tidal", metric, len(reqs) / seconds, "req/s", runs=[round(len(reqs) / s, 2)
                                                                                    for s, _ in runs],
                        stats=runs[-1][1])
            base.attempt(res, "V1", metric, "req/s", timed)
    del llm
    base.free_memory(device)
    shutil.rmtree(root, ignore_errors=True)
