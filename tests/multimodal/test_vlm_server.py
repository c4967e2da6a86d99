"""The OpenAI server with a vision-language model, live on a loopback port: chat messages with
``image_url`` (and ``video_url``) parts as data URLs through the official ``openai`` client give the
same tokens as tidal.LLM with the same prompt; undecodable images, too many images, http(s) URLs on
a server not started to fetch them, and images on a text-only model are 400s naming the part."""

import base64
import io

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("PIL")
import httpx  # noqa: E402
import openai  # noqa: E402

import tidal  # noqa: E402
from tidal.serve.api_server import MediaOptions, build_app  # noqa: E402
from tidal.serve.async_engine import AsyncLLMEngine  # noqa: E402
from tidal.serve.engine import EngineConfig, LLMEngine  # noqa: E402
from live_server import LiveServer  # noqa: E402
from tiny_models import assert_pool_whole, build_model  # noqa: E402
from tiny_vlm import build_llava, build_qwen2_5_vl, random_frames, random_image  # noqa: E402

MODEL = "tiny-vlm"


def _png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _serve(path: str, media: MediaOptions | None = None):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(path, block_size=4, num_kv_blocks=256, max_model_len=128)))
    app = build_app(engine, MODEL, media=media)
    return LiveServer(app), engine


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llava_server"))
    build_llava(path)
    live, engine = _serve(path, MediaOptions(max_per_prompt=2))
    with live:
        yield live.url, engine, path


def _chat(base: str, content, **kw):
    return httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0,
        "ignore_eos": True, **kw})


def test_chat_with_an_image_equals_llm(llava_server):
    base, engine, path = llava_server
    image = random_image(60, 60, seed=1)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": [
                                               {"type": "text", "text": "look: "},
                                               {"type": "image_url", "image_url": {"url": _png_url(image)}},
                                               {"type": "text", "text": " what?"}]}])
    # the chat template writes <image> for the image part
    llm = tidal.LLM(path, block_size=4, num_kv_blocks=64)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "look: <image> what?"}])
    want = llm.generate({"prompt_token_ids": llm.tokenizer.encode(prompt, add_special_tokens=False),
                         "multi_modal_data": {"image": image}},
                        tidal.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert reply.choices[0].message.content == want.outputs[0].text
    assert reply.usage.prompt_tokens == len(want.prompt_token_ids)  # 16 rows for the image
    assert_pool_whole(engine.engine)


def test_bad_images_are_400s(llava_server):
    base, engine, _ = llava_server
    image_part = {"type": "image_url", "image_url": {"url": _png_url(random_image(56, 56, seed=2))}}
    cases = [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}], "image"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "base64"),
        ([image_part, image_part, image_part], "more than 2"),
        ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}], "allow-media-urls"),
        ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "data URL or an http"),
        ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}], "does not take videos"),
        ([{"type": "audio", "audio": {}}], "only text"),
    ]
    for content, match in cases:
        r = _chat(base, content)
        assert r.status_code == 400, (match, r.text)
        error = r.json()["error"]
        assert match in error["message"] and error["param"] == "messages", error
    r = _chat(base, [{"type": "text", "text": "hi"}, image_part])
    assert r.status_code == 200, r.text
    assert_pool_whole(engine.engine)


def test_images_on_a_text_model_are_400(tmp_path):
    path = str(tmp_path / "text")
    build_model(path)
    import json
    config_file = f"{path}/tokenizer_config.json"
    with open(config_file) as f:
        config = json.load(f)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with open(config_file, "w") as f:
        json.dump(config, f)
    live, engine = _serve(path)
    base = live.url
    try:
        r = _chat(base, [{"type": "image_url", "image_url": {"url": _png_url(random_image(8, 8, seed=3))}}])
        assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
    finally:
        live.stop()


def test_qwen_chat_with_a_video_data_url(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "qwen")
    build_qwen2_5_vl(path)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for f in random_frames(4, 56, 56, seed=4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    url = "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()
    live, engine = _serve(path)
    base = live.url
    try:
        r = _chat(base, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "?"}])
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert engine.engine.stats()["encoder_runs"] == 1
        assert_pool_whole(engine.engine)
    finally:
        live.stop()
