"""Vision-language serving: tidal.LLM's greedy tokens equal transformers' generate for tiny random
LLaVA and Qwen2.5-VL models (one image, several images of different sizes, a video, images split
across prefill chunks, preemption), the encoder cache (a repeated image never reaches the vision
tower again and its prefix blocks hit; a different image with the same text hits nothing), prompt
log-probs over image rows, the checkpoint round trip, and errors that name what is wrong. After every scenario the KV pool is whole."""

import io

import numpy as np
import pytest
import torch

import tidal
from tidal.models import load_model, save_model

pytest.importorskip("PIL")  # Pillow: a dependency, absent where tidal came in --no-deps
from tidal.multimodal import ImageProcessor  # noqa: E402
from tiny_models import BOS, assert_pool_whole, build_model  # noqa: E402
from tiny_vlm import (LLAVA_IMAGE, QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO,  # noqa: E402
                      build_llava, build_qwen2_5_vl, hf_generate, random_frames, random_image)

from conftest import DEVICES  # noqa: E402

BLOCK = 4


def greedy(n: int = 10, **kw) -> tidal.SamplingParams:
    return tidal.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llava"))
    return path, build_llava(path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_5_vl"))
    return path, build_qwen2_5_vl(path)


def _llava_expected(path, hf, text_ids: list[int], images, n: int) -> list[int]:
    """transformers' tokens for a prompt whose <image> tokens are already expanded."""
    pixels = ImageProcessor.from_pretrained(path)(images).pixel_values
    return hf_generate(hf, text_ids, n, pixel_values=pixels)


def _expand(ids: list[int], token: int, counts: list[int]) -> list[int]:
    out, k = [], 0
    for t in ids:
        if t == token:
            out += [token] * counts[k]
            k += 1
        else:
            out.append(t)
    return out


# ---- LLaVA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_llava_greedy_matches_transformers(llava, device):
    path, hf = llava
    red, wide = random_image(56, 56, seed=1), random_image(90, 60, seed=2)  # resized and cropped to 56x56
    prompts = [
        [BOS, LLAVA_IMAGE, 40, 41, 42],                       # image first
        [BOS, 50, 51, LLAVA_IMAGE, 52, 53, LLAVA_IMAGE, 54],  # two images between text
        [BOS, 60, 61, 62, 63, 64, LLAVA_IMAGE],               # image last, sampled right after it
    ]
    images = [[red], [red, wide], [wide]]
    expected = [_llava_expected(path, hf, _expand(p, LLAVA_IMAGE, [16] * len(i)), i, 8)
                for p, i in zip(prompts, images)]
    # a budget of 8 tokens splits each 16-row image over chunks; max_num_seqs=2 queues the third
    llm = tidal.LLM(path, device=device, block_size=BLOCK, num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=8)
    outs = llm.generate([{"prompt_token_ids": p, "multi_modal_data": {"image": i}} for p, i in zip(prompts, images)],
                        greedy(8), use_tqdm=False)
    for prompt, image_list, want, out in zip(prompts, images, expected, outs):
        assert out.prompt_token_ids == _expand(prompt, LLAVA_IMAGE, [16] * len(image_list))
        assert out.outputs[0].token_ids == want
    assert llm.stats()["encoder_runs"] == 2  # red and wide, once each
    assert_pool_whole(llm)


def test_llava_with_a_siglip_tower_and_two_feature_layers(tmp_path):
    path = str(tmp_path / "siglip")
    hf = build_llava(path, tower="siglip", strategy="full", feature_layer=[-3, -1])
    images = [random_image(70, 50, seed=5), random_image(56, 56, seed=6)]  # resized to 56x56, no crop
    prompt = [BOS, 33, LLAVA_IMAGE, 34, LLAVA_IMAGE, 35]
    want = _llava_expected(path, hf, _expand(prompt, LLAVA_IMAGE, [16, 16]), images, 8)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=12)
    out = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}, greedy(8),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert_pool_whole(llm)


def test_llava_text_prompt_and_chat_template_placeholders(llava):
    path, hf = llava
    image = random_image(64, 64, seed=3)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)
    text = "def add(a, b): <image> return"
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, greedy(6), use_tqdm=False)[0]
    ids = llm.tokenizer.encode(text)
    assert ids.count(LLAVA_IMAGE) == 1
    assert out.outputs[0].token_ids == _llava_expected(path, hf, _expand(ids, LLAVA_IMAGE, [16]), [image], 6)
    # an already expanded placeholder run is kept as it is
    again = llm.generate({"prompt_token_ids": out.prompt_token_ids, "multi_modal_data": {"image": image}}, greedy(6),
                         use_tqdm=False)[0]
    assert again.prompt_token_ids == out.prompt_token_ids and again.outputs[0].token_ids == out.outputs[0].token_ids
    assert_pool_whole(llm)


def test_n_samples_share_the_image(llava):
    """n=2: the second sample waits for the first's prompt blocks, then recomputes only the partial
    last block, which holds image rows: they come from the encoder cache, not the encoder."""
    path, hf = llava
    image = random_image(56, 56, seed=9)
    prompt = [BOS, 21, 22, LLAVA_IMAGE]  # 19 tokens expanded: the last block is partial and all image
    want = _llava_expected(path, hf, _expand(prompt, LLAVA_IMAGE, [16]), [image], 6)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)
    out = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"image": image}}, tidal.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2),
                       use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [want, want]
    stats = llm.stats()
    assert stats["encoder_runs"] == 1 and stats["encoder_cache_hits"] == 1
    assert_pool_whole(llm)


def test_preemption_recomputes_images_equal(llava):
    path, hf = llava
    images = [random_image(56, 56, seed=10 + i) for i in range(4)]
    prompts = [[BOS, 70 + i, LLAVA_IMAGE, 80, 81] for i in range(4)]
    expected = [_llava_expected(path, hf, _expand(p, LLAVA_IMAGE, [16]), [im], 12) for p, im in zip(prompts, images)]
    # 16 blocks of 4: four 21-token prompts growing to 33 tokens cannot all stay resident
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=16, max_model_len=40, encoder_cache_bytes=0)
    outs = llm.generate([{"prompt_token_ids": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)],
                        greedy(12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["preemptions"] > 0
    assert stats["encoder_runs"] > 4  # no cache: every recompute of a consumed image encodes it again
    assert_pool_whole(llm)


def test_encoder_cache_and_prefix_blocks(llava):
    path, _ = llava
    a, b = random_image(56, 56, seed=20), random_image(56, 56, seed=21)
    prompt = [BOS, LLAVA_IMAGE, 90, 91, 92, 93, 94]  # 23 tokens once expanded: the image is in block 0
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)

    def run(image):
        return llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"image": image}}, greedy(4),
                            use_tqdm=False)[0]

    first = run(a)
    assert first.num_cached_tokens == 0 and llm.stats()["encoder_runs"] == 1
    same = run(a.copy())  # equal pixels, another object: the content hash matches
    # the prefix cache held every block the image fills: its embeddings were not even looked up
    assert llm.stats()["encoder_runs"] == 1 and llm.stats()["encoder_cache_hits"] == 0
    assert same.num_cached_tokens == (len(first.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    other = run(b)
    assert other.num_cached_tokens == 0  # same text, different image: no block is shared
    assert llm.stats()["encoder_runs"] == 2
    assert_pool_whole(llm)


def test_prompt_logprobs_over_image_rows(llava):
    """Prompt log-probs of an image prompt chunked through its image rows equal transformers'; the
    request takes none of the cached blocks an identical request left."""
    path, hf = llava
    image = random_image(56, 56, seed=22)
    request = {"prompt_token_ids": [BOS, 50, 51, LLAVA_IMAGE, 52, 53], "multi_modal_data": {"image": image}}
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=8)
    first = llm.generate(request, greedy(2), use_tqdm=False)[0]
    out = llm.generate(request, greedy(2, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == first.outputs[0].token_ids
    ids = out.prompt_token_ids
    pixels = ImageProcessor.from_pretrained(path)([image]).pixel_values
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float().log_softmax(-1)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry = out.prompt_logprobs[p]
        assert set(entry) == set(torch.topk(want[p - 1], 2).indices.tolist()) | {ids[p]}
        assert all(abs(v - want[p - 1, t].item()) < 1e-4 for t, v in entry.items())
    assert_pool_whole(llm)


def test_encoder_cache_is_bounded_and_least_recently_used(llava):
    path, _ = llava
    images = [random_image(56, 56, seed=30 + i) for i in range(3)]
    one = 16 * 64 * 4  # one image's embeddings: 16 rows of 64 fp32
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, encoder_cache_bytes=2 * one, enable_prefix_caching=False)

    def run(i):
        llm.generate({"prompt_token_ids": [BOS, LLAVA_IMAGE, 7], "multi_modal_data": {"image": images[i]}}, greedy(1),
                     use_tqdm=False)
        return llm.stats()

    for i in (0, 1, 0, 2):  # 2 evicts 1 (0 was used more recently)
        stats = run(i)
    assert stats["encoder_runs"] == 3 and stats["encoder_cache_bytes"] == 2 * one
    assert run(0)["encoder_runs"] == 3
    assert run(1)["encoder_runs"] == 4
    assert_pool_whole(llm)


def _recording_encoder(llm) -> list[list[int]]:
    """Wraps the engine's model's encode_multimodal; the list returned gets each call's rows per item."""
    model, calls = llm.engine.model, []
    encode = model.encode_multimodal

    def recorded(modality, pixel_values, grid_thw=None):
        out = encode(modality, pixel_values, grid_thw)
        calls.append([e.shape[0] for e in out])
        return out

    model.encode_multimodal = recorded
    return calls


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_steps_new_images_are_encoded_together(llava, qwen, family, device):
    """The new images of one prefill step go through the vision tower in one call (Qwen2.5-VL's of
    different sizes too), an image two requests of the step share is encoded once, the step's token
    budget bounds a call's rows, and the tokens equal those of requests prefilled one at a time."""
    if family == "llava":
        path, _ = llava
        images = [random_image(56, 56, seed=70 + i) for i in range(3)]
        prompts = [[BOS, 60 + i, LLAVA_IMAGE, 61] for i in range(4)]
    else:
        path, _ = qwen
        images = [random_image(56, 56, seed=70), random_image(70, 130, seed=71), random_image(200, 90, seed=72)]
        prompts = [_qwen_prompt([60 + i, "image", 61]) for i in range(4)]
    requests = [{"prompt_token_ids": p, "multi_modal_data": {"image": images[i % 3]}} for i, p in enumerate(prompts)]

    def run(**kw):
        llm = tidal.LLM(path, device=device, block_size=BLOCK, num_kv_blocks=256, enable_prefix_caching=False, **kw)
        calls = _recording_encoder(llm)
        outs = llm.generate(requests, greedy(6), use_tqdm=False)
        assert_pool_whole(llm)
        return [o.outputs[0].token_ids for o in outs], calls, llm.stats()

    alone, calls, stats = run(max_num_seqs=1)  # one request per step: one image per call
    assert [len(c) for c in calls] == [1, 1, 1] and stats["encoder_cache_hits"] == 1  # the 4th is the 1st's
    rows = [c[0] for c in calls]
    together, calls, stats = run(max_num_batched_tokens=1024)
    assert together == alone
    assert calls == [rows]  # three images in one call; the one two requests share encoded once
    assert stats["encoder_runs"] == 3 and stats["encoder_calls"] == 1 and stats["encoder_cache_hits"] == 1
    budget = max(rows) + 1  # chunked prefill; a call never takes more rows than the step's budget
    split, calls, stats = run(max_num_batched_tokens=budget, encoder_cache_bytes=0)
    assert split == alone
    assert all(sum(c) <= budget for c in calls) and stats["encoder_calls"] == len(calls)
    assert stats["encoder_runs"] == sum(len(c) for c in calls) >= 3


def test_checkpoint_round_trip(llava, tmp_path):
    path, hf = llava
    model, _ = load_model(path)
    save_model(model, tmp_path)
    reloaded = type(hf).from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(hf.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    again, _ = load_model(tmp_path)
    pixels = torch.randn(1, 3, 56, 56)
    assert torch.equal(model.encode_multimodal("image", pixels)[0], again.encode_multimodal("image", pixels)[0])


def test_errors_name_what_is_wrong(llava, tmp_path):
    path, _ = llava
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)
    image = random_image(56, 56, seed=40)
    cases = [
        ({"prompt_token_ids": [BOS, 7], "multi_modal_data": {"image": image}}, "1 image.*0 image placeholder"),
        ({"prompt_token_ids": [BOS, LLAVA_IMAGE, LLAVA_IMAGE, 7], "multi_modal_data": {"image": image}},
         "more image placeholders"),
        ({"prompt_token_ids": [BOS, LLAVA_IMAGE], "multi_modal_data": {"video": [image]}}, "takes image"),
        ({"prompt_token_ids": [BOS, LLAVA_IMAGE], "multi_modal_data": {"image": b"not an image"}}, "image"),
        ({"prompt_token_ids": [BOS, LLAVA_IMAGE], "multi_modal_data": {"image": 3.5}}, "image"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "one of them"),
        ({"prompt_token_ids": [BOS, 7], "mm_processor_kwargs": {"fps": 1}}, "without multi_modal_data"),
    ]
    for prompt, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, greedy(2), use_tqdm=False)
    assert_pool_whole(llm)
    text_path = str(tmp_path / "text")
    build_model(text_path)
    with pytest.raises(ValueError, match="text-only model"):
        tidal.LLM(text_path, num_kv_blocks=16).generate({"prompt_token_ids": [BOS, 7], "multi_modal_data": {
            "image": image}}, use_tqdm=False)


# ---- Qwen2.5-VL -------------------------------------------------------------------------------------


def _qwen_inputs(path, images=(), videos=(), fps: float = 2.0):
    processor = ImageProcessor.from_pretrained(path)
    inputs = {}
    if images:
        p = processor(list(images))
        inputs.update(pixel_values=p.pixel_values, image_grid_thw=p.grid_thw)
    if videos:
        vs = [processor.process_video(v, fps=fps) for v in videos]
        inputs.update(pixel_values_videos=torch.cat([v.pixel_values for v in vs]),
                      video_grid_thw=torch.cat([v.grid_thw for v in vs]),
                      second_per_grid_ts=torch.tensor([v.second_per_grid_t for v in vs]))
    return inputs


def _qwen_prompt(parts) -> list[int]:
    """Token ids from parts: ints are text tokens, "image"/"video" one placeholder each."""
    ids = [BOS]
    for p in parts:
        if p == "image":
            ids += [QWEN_START, QWEN_IMAGE, QWEN_END]
        elif p == "video":
            ids += [QWEN_START, QWEN_VIDEO, QWEN_END]
        else:
            ids.append(p)
    return ids


@pytest.mark.parametrize("device", DEVICES)
def test_qwen2_5_vl_greedy_matches_transformers(qwen, device):
    path, hf = qwen
    square, tall, wide = random_image(56, 56, seed=50), random_image(70, 130, seed=51), random_image(200, 90, seed=52)
    video = random_frames(4, 84, 56, seed=53)
    cases = [
        (_qwen_prompt([40, "image", 41, 42]), {"image": [square]}),
        (_qwen_prompt([43, "image", 44, "image", 45]), {"image": [tall, wide]}),
        (_qwen_prompt([46, "video", 47]), {"video": [video]}),
        (_qwen_prompt(["image", 48, "video", 49]), {"image": [wide], "video": [video]}),
    ]
    expected = []
    for ids, data in cases:
        inputs = _qwen_inputs(path, data.get("image", ()), data.get("video", ()))
        counts_i = [int(g.prod()) // 4 for g in inputs.get("image_grid_thw", [])]
        counts_v = [int(g.prod()) // 4 for g in inputs.get("video_grid_thw", [])]
        full = _expand(_expand(ids, QWEN_IMAGE, counts_i), QWEN_VIDEO, counts_v)
        expected.append((full, hf_generate(hf, full, 8, **inputs)))
    # on a GPU, decode steps replay CUDA graphs with the M-RoPE offset folded into 1-D positions
    llm = tidal.LLM(path, device=device, block_size=BLOCK, num_kv_blocks=128, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": data} for ids, data in cases], greedy(8),
                        use_tqdm=False)
    for (full, want), out in zip(expected, outs):
        assert out.prompt_token_ids == full
        assert out.outputs[0].token_ids == want
    assert_pool_whole(llm)


def test_qwen2_5_vl_video_from_a_file(qwen, tmp_path):
    av = pytest.importorskip("av")
    path, hf = qwen
    frames = random_frames(8, 56, 56, seed=60)
    file = tmp_path / "clip.mp4"
    with av.open(str(file), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    from tidal.multimodal import load_video

    decoded = load_video(str(file), fps=2.0)
    ids = _qwen_prompt([30, "video", 31])
    inputs = _qwen_inputs(path, videos=[decoded])
    count = int(inputs["video_grid_thw"][0].prod()) // 4
    want = hf_generate(hf, _expand(ids, QWEN_VIDEO, [count]), 6, **inputs)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)
    for video in (str(file), file.read_bytes()):
        out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"video": video},
                            "mm_processor_kwargs": {"fps": 2.0}}, greedy(6), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want
    assert llm.stats()["encoder_runs"] == 1  # the path and the bytes decode to the same frames
    assert_pool_whole(llm)


def test_qwen2_5_vl_text_only_requests_beside_images(qwen):
    path, hf = qwen
    image = random_image(84, 84, seed=70)
    text_ids = [BOS, 20, 21, 22, 23, 24]
    ids = _qwen_prompt([25, "image", 26])
    inputs = _qwen_inputs(path, [image])
    full = _expand(ids, QWEN_IMAGE, [int(inputs["image_grid_thw"][0].prod()) // 4])
    want_image = hf_generate(hf, full, 10, **inputs)
    want_text = hf_generate(hf, text_ids, 10)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=12)
    outs = llm.generate([text_ids, {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, text_ids],
                        greedy(10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [want_text, want_image, want_text]
    assert_pool_whole(llm)


def test_image_bytes_decode_like_the_image(llava):
    path, _ = llava
    image = random_image(56, 56, seed=80)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)
    outs = llm.generate([{"prompt_token_ids": [BOS, LLAVA_IMAGE, 5], "multi_modal_data": {"image": x}}
                         for x in (image, buffer.getvalue(), np.asarray(image))], greedy(5), use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert llm.stats()["encoder_runs"] == 1
    assert_pool_whole(llm)


def test_encoded_images_are_decoded_once(llava, qwen, monkeypatch):
    """Bytes are decoded once per item, for both the processor and the content hash."""
    from PIL import Image

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))

    def png(seed):
        buffer = io.BytesIO()
        random_image(56, 56, seed=seed).save(buffer, format="PNG")
        return buffer.getvalue()

    llm = tidal.LLM(llava[0], block_size=BLOCK, num_kv_blocks=64)
    llm.generate({"prompt_token_ids": [BOS, LLAVA_IMAGE, 5], "multi_modal_data": {"image": png(81)}}, greedy(2),
                 use_tqdm=False)
    assert len(opened) == 1
    llm = tidal.LLM(qwen[0], block_size=BLOCK, num_kv_blocks=64)
    opened.clear()
    frames = [png(i) for i in range(4)]
    llm.generate({"prompt_token_ids": _qwen_prompt(["video", 40]), "multi_modal_data": {"video": [frames]}}, greedy(2),
                 use_tqdm=False)
    assert len(opened) == 4  # one per frame
    assert_pool_whole(llm)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("num_tokens", [1, 40, 333])
def test_the_memory_profiles_dummy_images(llava, qwen, family, num_tokens):
    """What the GPU runner's memory profile encodes: images the encoder takes, at most num_tokens
    embedding rows (one item's worth where num_tokens is less), no fewer than one item below it."""
    path = (llava if family == "llava" else qwen)[0]
    model, _ = load_model(path)
    modality, pixels, grid = model.dummy_multimodal_input(num_tokens)
    rows = sum(e.shape[0] for e in model.encode_multimodal(modality, pixels, grid))
    if family == "llava":
        per = model.num_placeholder_tokens("image")
        assert rows == max(per, num_tokens // per * per)
    else:
        assert grid.shape == (1, 3) and num_tokens - int(num_tokens ** 0.5) <= rows <= num_tokens
