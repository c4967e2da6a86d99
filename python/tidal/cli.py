"""The ``tidal`` command (also ``python -m tidal``).

``tidal demo`` trains and serves the embedded demo model; ``tidal generate MODEL --prompt TEXT``
streams one completion to stdout; ``tidal serve [MODEL]`` runs the OpenAI-compatible server (the demo
model when MODEL is left out); ``tidal eval-ppl MODEL --file FILE`` prints the model's perplexity on
a text; ``tidal quantize MODEL --method awq|gptq|int8|fp8 --out DIR`` writes a quantized checkpoint;
``tidal --version``.

Argument errors exit 2 with argparse's message; an error in what was asked (a model directory that is
missing or unreadable, a bad option value) prints one line ``tidal: error: ...`` and exits 1.
"""

import argparse
import os
import sys


class CLIError(Exception):
    """An error reported to the user as one line, exit status 1."""


def _version() -> str:
    from tidal import __version__

    return __version__


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 keeps all (default)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample")


def _add_async_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan each step while the previous one computes (its tokens taken on the device); "
                        "default: on for a GPU, off on the CPU")


def _add_engine_args(p: argparse.ArgumentParser, serve: bool) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype; auto takes the checkpoint's (default)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda[:N] (default auto)")
    p.add_argument("--enforce-eager", action="store_true", help="run every step eagerly (no CUDA graphs)")
    p.add_argument("--quantization", default=None,
                   choices=["int8", "int4", "fp8", "gptq", "awq", "compressed-tensors"],
                   help="serve the decoder's linear layers quantized: int8, int4 or fp8 rounded as they load; a "
                        "gptq, awq or compressed-tensors checkpoint is read in its own layout without it")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="the KV cache's element type: auto (the model's) or fp8 (E4M3 codes)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks that split the model, this process and workers it starts (CPU, Gloo; default 1)")
    if not serve:
        p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
        return
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget of one step (default 8192)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--kv-cache-memory-fraction", "--gpu-memory-utilization", dest="kv_cache_memory_fraction",
                   type=float, default=0.9,
                   help="share of GPU memory that weights, activations and the KV cache may take together; on "
                        "the CPU, the share of host memory for the KV cache (default 0.9)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn off prefix caching")
    p.add_argument("--seed", type=int, default=0, help="seed of requests that carry none (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="tidal: one runtime for training and serving LLMs.")
    parser.add_argument("--version", action="version", version=f"tidal {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,rlhf,generate,eval-ppl,quantize,serve}")
    sub.required = True

    demo = sub.add_parser("demo", help="train the embedded demo model on Python's own source, then generate",
                          description="Train a small Llama-architecture model with tidal.initialize on the Python "
                                      "standard library's source, save it in Hugging Face format, and generate "
                                      "completions from it with tidal.LLM. Nothing is downloaded.")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: by size)")
    demo.add_argument("--size", choices=["small", "medium"], default=None,
                      help="model size (default: medium on a GPU, small on the CPU)")
    demo.add_argument("--cache-dir", default=None, help="where the model is kept (default $TIDAL_CACHE/demo "
                                                        "or ~/.cache/tidal/demo)")
    demo.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    demo.add_argument("--prompts", nargs="+", default=None, metavar="TEXT", help="prompts to complete")
    demo.add_argument("--max-tokens", type=int, default=96, help="tokens per completion (default 96)")
    demo.add_argument("--device", default="auto", help="training device: auto, cpu or cuda[:N] (default auto)")

    train = sub.add_parser("train", help="train the demo model with a DeepSpeed config (resumable, elastic)",
                           description="Train the embedded demo model on its corpus with tidal.initialize and the "
                                       "DeepSpeed config in CONFIG, as one process or one worker of a torchrun job "
                                       "(`torchrun --nnodes MIN:MAX ... -m tidal train ...`). Resumes from the latest "
                                       "checkpoint in OUT at any world size; writes the model to OUT/model.")
    train.add_argument("--config", required=True, help="a DeepSpeed config (JSON)")
    train.add_argument("--out", required=True, help="checkpoints go to OUT/checkpoints, the model to OUT/model")
    train.add_argument("--steps", type=int, required=True, help="train to this many optimizer steps")
    train.add_argument("--size", choices=["small", "medium"], default="small", help="model size (default small)")
    train.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: by size)")
    train.add_argument("--save-interval", type=int, default=50, help="checkpoint every N steps (default 50)")
    train.add_argument("--keep-last", type=int, default=2, help="complete checkpoints kept (default 2)")
    train.add_argument("--async-save", action="store_true", help="write checkpoints while training goes on")
    train.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda:N")

    rlhf = sub.add_parser("rlhf", help="SFT, reward-model, PPO or GRPO training from a JSON config",
                          description="Run one RLHF role (sft, rm, ppo, grpo) as the JSON config in --config says "
                                      "(model, out, data, reward, steps, args: see tidal.rlhf.command); rollouts "
                                      "are served from the weights being trained.")
    rlhf.add_argument("role", choices=["sft", "rm", "ppo", "grpo"], help="what to train")
    rlhf.add_argument("--config", required=True, help="the run's JSON config")

    gen = sub.add_parser("generate", help="stream a completion of one prompt",
                         description="Generate a completion of --prompt with the model in MODEL (a Hugging Face "
                                     "directory) and print it as it streams.")
    gen.add_argument("model", metavar="MODEL", help="a Hugging Face model directory")
    gen.add_argument("--prompt", required=True, help="the text to complete")
    _add_sampling_args(gen)
    _add_engine_args(gen, serve=False)
    _add_async_arg(gen)

    ppl = sub.add_parser("eval-ppl", help="print a model's perplexity on a text file",
                         description="Tokenize FILE with the model's tokenizer, score it in windows of at most "
                                     "--context tokens with the serving engine's prompt log-probs, and print the "
                                     "perplexity exp(mean negative log-likelihood) and the number of tokens scored.")
    ppl.add_argument("model", metavar="MODEL", help="a Hugging Face model directory")
    ppl.add_argument("--file", required=True, help="the text (UTF-8)")
    ppl.add_argument("--context", type=int, default=None,
                     help="most tokens in one window (default: max_model_len - 1)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens between the starts of windows; below --context, windows overlap and each "
                          "token is scored with more context (default: --context, disjoint windows)")
    _add_engine_args(ppl, serve=False)

    quant = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (GPTQ, AWQ, int8, FP8)",
                           description="Quantize MODEL's decoder weights and write a checkpoint in the method's "
                                       "published layout (GPTQ or AWQ int4, compressed-tensors int8 or FP8), which "
                                       "tidal serves and transformers loads. GPTQ and AWQ calibrate on --calib "
                                       "(or the demo corpus), one layer at a time.")
    quant.add_argument("model", metavar="MODEL", help="a Hugging Face model directory (float weights)")
    quant.add_argument("--method", required=True, choices=["awq", "gptq", "int8", "fp8"])
    quant.add_argument("--out", required=True, help="the directory to write")
    quant.add_argument("--calib", default=None, help="calibration text (UTF-8) for awq and gptq; default: the "
                                                     "demo corpus (the Python standard library's source)")
    quant.add_argument("--group-size", type=int, default=128, help="inputs per int4 scale and zero point")
    quant.add_argument("--act-order", action="store_true",
                       help="gptq: round inputs by decreasing activation magnitude, groups in that order (desc_act)")
    quant.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    quant.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    quant.add_argument("--device", default="auto", help="where to calibrate: auto (the GPU when there is one), "
                                                        "cpu or cuda[:N]")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server",
                           description="Serve MODEL (a Hugging Face directory; the demo model when left out, "
                                       "trained first if absent) over an OpenAI-compatible HTTP API.")
    serve.add_argument("model", metavar="MODEL", nargs="?", default=None, help="a Hugging Face model directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    serve.add_argument("--allow-media-urls", action="store_true",
                       help="fetch http(s) image and video URLs in chat requests (default: data URLs only)")
    serve.add_argument("--max-media-per-prompt", type=int, default=8,
                       help="most images and videos in one request (default 8)")
    serve.add_argument("--encoder-cache-bytes", type=int, default=1 << 30,
                       help="bound of the cache of image and video embeddings (default 1 GiB)")
    limits = serve.add_argument_group("limits of one request (a public server's protection)")
    limits.add_argument("--max-request-bytes", type=int, default=32 << 20, help="request body size (default 32 MiB)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt tokens (default max_model_len)")
    limits.add_argument("--max-n", type=int, default=16, help="samples per request (default 16)")
    limits.add_argument("--max-logprobs", type=int, default=20, help="logprobs / top_logprobs (default 20)")
    limits.add_argument("--max-stop-strings", type=int, default=16, help="stop strings (default 16)")
    limits.add_argument("--max-stop-length", type=int, default=256, help="characters of a stop string (default 256)")
    limits.add_argument("--max-concurrent-requests", type=int, default=1024,
                        help="requests in flight; past it a 429 with Retry-After (default 1024)")
    serve.add_argument("--role", choices=["prefill", "decode", "router", "disaggregated"], default=None,
                       help="disaggregated serving: a prefill or decode engine, the router in front of them, or "
                            "all of them in this one process (disaggregated: KV blocks copied on the device)")
    serve.add_argument("--num-decode", type=int, default=1,
                       help="--role disaggregated: decode engines beside the prefill engine (default 1)")
    serve.add_argument("--prefill-share", type=float, default=0.3,
                       help="--role disaggregated: the prefill engine's share of the KV memory (default 0.3)")
    serve.add_argument("--prefill-sms", type=int, default=None, metavar="N",
                       help="--role disaggregated on a GPU: run the prefill engine on N of the card's SMs (rounded "
                            "up by the driver) and the decode engines on the rest, so a long prefill cannot slow "
                            "decode steps (default: all engines share every SM, decode at a higher priority)")
    serve.add_argument("--prefill", action="append", default=[], metavar="URL",
                       help="router: a prefill engine's base URL (repeat for several)")
    serve.add_argument("--decode", action="append", default=[], metavar="URL",
                       help="router: a decode engine's base URL (repeat for several)")
    serve.add_argument("--kv-connector", choices=["torch", "nixl"], default="torch",
                       help="how KV blocks move between engines (default torch: torch.distributed; nixl: NIXL)")
    serve.add_argument("--kv-host", default=None,
                       help="prefill engine: the address decode engines reach its KV store at (default: --host)")
    serve.add_argument("--kv-port", type=int, default=0, help="prefill engine: its KV store's port (default: free)")
    serve.add_argument("--kv-transfer-timeout", type=float, default=30.0,
                       help="seconds a KV transfer may take before its request fails (default 30)")
    _add_engine_args(serve, serve=True)
    _add_async_arg(serve)
    return parser


# ---- commands ----------------------------------------------------------------------------------

def _serve_router(args) -> int:
    if args.model is not None:
        raise CLIError("--role router serves no model: give the engines with --prefill URL and --decode URL")
    if not args.prefill or not args.decode:
        raise CLIError("--role router needs at least one --prefill URL and one --decode URL")
    for url in args.prefill + args.decode:
        if not url.startswith(("http://", "https://")):
            raise CLIError(f"engine URL {url!r} must start with http:// or https://")
    from tidal.serve.router import run_router

    run_router(args.prefill, args.decode, host=args.host, port=args.port, api_key=args.api_key,
               served_model_name=args.served_model_name)
    return 0


def _check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise CLIError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{path!r} is not a Hugging Face model directory (no config.json)")


def _torchrun_worker(config) -> bool:
    """Whether this process is a rank > 0 of a tensor-parallel engine that torchrun started (it then
    serves as a worker of rank 0's engine instead of running the command)."""
    from tidal.serve.tensor_parallel import torchrun_rank

    try:
        return (torchrun_rank(config.tensor_parallel_size) or 0) > 0
    except ValueError as e:
        raise CLIError(str(e)) from None


def _run_torchrun_worker(config) -> int:
    from tidal.serve.tensor_parallel import run_torchrun_worker

    return run_torchrun_worker(config)


def cmd_generate(args) -> int:
    _check_model_dir(args.model)
    import asyncio

    from tidal.serve import EngineConfig, SamplingParams
    from tidal.serve.async_engine import AsyncLLMEngine

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k if args.top_k > 0 else -1, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                          tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=1,
                          num_kv_blocks=_kv_blocks_for_one(args.model, args.max_model_len),
                          enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling)
    if _torchrun_worker(config):
        return _run_torchrun_worker(config)
    try:
        engine = AsyncLLMEngine.from_config(config)
    except Exception as e:  # noqa: BLE001  (whatever a broken directory raises: one line, no traceback)
        raise CLIError(f"cannot load {args.model!r}: {e}") from None
    if engine.engine.tokenizer is None:
        raise CLIError(f"{args.model!r} has no tokenizer.json; `tidal generate` needs one for a text prompt")

    async def stream() -> None:
        out = sys.stdout
        out.write(args.prompt)
        out.flush()
        printed = 0
        try:
            async for output in engine.generate(args.prompt, params):
                if output.error:
                    raise CLIError(output.error)
                text = output.outputs[0].text
                if len(text) > printed:
                    out.write(text[printed:])
                    out.flush()
                    printed = len(text)
        finally:
            await engine.shutdown()
        out.write("\n")
        out.flush()

    try:
        asyncio.run(stream())
    except ValueError as e:  # a prompt the engine refuses (too long, ...)
        raise CLIError(str(e)) from None
    return 0


def cmd_eval_ppl(args) -> int:
    _check_model_dir(args.model)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read --file {args.file!r}: {e}") from None
    import tidal
    from tidal.serve.eval import perplexity

    # a pool for two windows beside one step's token budget (8192): what a prefill-only run keeps in flight
    num_kv_blocks = 2 * _kv_blocks_for_one(args.model, args.max_model_len) + 8192 // 16
    try:
        llm = tidal.LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                        num_kv_blocks=num_kv_blocks, enforce_eager=args.enforce_eager,
                        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                        tensor_parallel_size=args.tensor_parallel_size)
    except Exception as e:  # noqa: BLE001  (whatever a broken directory raises: one line, no traceback)
        raise CLIError(f"cannot load {args.model!r}: {e}") from None
    if llm.tokenizer is None:
        raise CLIError(f"{args.model!r} has no tokenizer.json; `tidal eval-ppl` needs one to tokenize --file")
    try:
        result = perplexity(llm, text, context=args.context, stride=args.stride)
    except ValueError as e:
        raise CLIError(str(e).replace("context=", "--context=").replace("stride=", "--stride=")) from None
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"nll: {result.nll:.6f}")
    print(f"tokens: {result.num_tokens}")
    print(f"windows: {result.num_windows}")
    return 0


def cmd_quantize(args) -> int:
    _check_model_dir(args.model)
    from tidal.quant.command import quantize

    try:
        config = quantize(args.model, args.method, args.out, calib=args.calib, group_size=args.group_size,
                          num_samples=args.num_samples, seq_len=args.seq_len, device=args.device,
                          progress=sys.stderr.isatty(), act_order=args.act_order)
    except (ValueError, OSError) as e:
        raise CLIError(str(e).replace("group_size=", "--group-size=").replace("num_samples=", "--num-samples=")
                       .replace("seq_len=", "--seq-len=").replace("act_order", "--act-order")) from None
    group = f", groups of {config.group_size}" if config.group_size else ""
    print(f"wrote {args.out}: {config.format} ({config.source}{group})")
    return 0


def _kv_blocks_for_one(model: str, max_model_len: int | None, block_size: int = 16) -> int:
    """A KV pool for one request (``tidal generate`` needs no more; allocating the default pool --
    a share of all memory -- would only cost time)."""
    from tidal.models.config import ModelConfig

    try:
        cfg = ModelConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load {model!r}: {e}") from None
    length = max_model_len or cfg.max_position_embeddings
    return max(4, -(-min(length, 1 << 20) // block_size) + 1)


def cmd_serve(args) -> int:
    if args.role == "router":
        return _serve_router(args)
    if args.prefill or args.decode:
        raise CLIError("--prefill and --decode are the router's (--role router)")
    if args.role == "disaggregated" and args.num_decode < 1:
        raise CLIError(f"--num-decode={args.num_decode} must be >= 1")
    if args.role == "disaggregated" and not 0 < args.prefill_share < 1:
        raise CLIError(f"--prefill-share={args.prefill_share} must be in (0, 1)")
    if args.prefill_sms is not None and args.role != "disaggregated":
        raise CLIError("--prefill-sms is --role disaggregated's (its engines share one GPU)")
    model = args.model
    if model is None:
        from tidal import demo

        model = str(demo.ensure_model(out=sys.stderr))
        served = args.served_model_name or "tidal-demo"
    else:
        _check_model_dir(model)
        served = args.served_model_name
    from tidal.serve import EngineConfig

    try:
        config = EngineConfig(model=model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                              kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                              seed=args.seed, enforce_eager=args.enforce_eager,
                              async_scheduling=args.async_scheduling,
                              encoder_cache_bytes=args.encoder_cache_bytes,
                              kv_role=None if args.role == "disaggregated" else args.role,
                              kv_connector=args.kv_connector, kv_host=args.kv_host or args.host,
                              kv_port=args.kv_port, kv_transfer_timeout=args.kv_transfer_timeout,
                              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                              tensor_parallel_size=args.tensor_parallel_size)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if _torchrun_worker(config):
        return _run_torchrun_worker(config)
    if args.max_media_per_prompt < 0:
        raise CLIError(f"--max-media-per-prompt={args.max_media_per_prompt} must be >= 0")
    try:
        from tidal.serve.api_server import MediaOptions, ServerLimits, run_server
    except ImportError as e:  # fastapi/uvicorn missing, or a build without the server
        raise CLIError(f"the server is unavailable: {e}") from None

    media = MediaOptions(allow_urls=args.allow_media_urls, max_per_prompt=args.max_media_per_prompt)
    try:
        limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
                              max_n=args.max_n, max_logprobs=args.max_logprobs, max_stop_strings=args.max_stop_strings,
                              max_stop_length=args.max_stop_length,
                              max_concurrent_requests=args.max_concurrent_requests)
    except ValueError as e:
        raise CLIError(str(e).replace("max_", "--max-", 1).replace("_", "-")) from None
    if args.role == "disaggregated":
        from tidal.serve.disagg_local import DisaggregatedServer

        try:
            server = DisaggregatedServer(config, num_decode=args.num_decode, prefill_share=args.prefill_share,
                                         host=args.host, port=args.port, api_key=args.api_key,
                                         served_model_name=served, media=media, limits=limits,
                                         prefill_sms=args.prefill_sms)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if server.sm_groups is not None:
            prefill_count, decode_count = server.sm_groups.sm_counts
            print(f"tidal: the prefill engine runs on {prefill_count} SMs, the decode engines on {decode_count}",
                  file=sys.stderr)
        server.serve_forever()
        return 0
    run_server(config, host=args.host, port=args.port, api_key=args.api_key, served_model_name=served, media=media,
               limits=limits)
    return 0


def cmd_demo(args) -> int:
    from tidal import demo

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps={args.steps} must be at least 1")
    return demo.run(steps=args.steps, size=args.size, cache_dir=args.cache_dir, retrain=args.retrain,
                    prompts=args.prompts, max_tokens=args.max_tokens, device=args.device)


def cmd_train(args) -> int:
    from tidal import train_job

    try:
        train_job.run(args.config, args.out, args.steps, size=args.size, seq_len=args.seq_len,
                      save_interval=args.save_interval, keep_last=args.keep_last, async_save=args.async_save,
                      device=args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_rlhf(args) -> int:
    from tidal.rlhf import command

    try:
        command.run(args.role, args.config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return 0


_COMMANDS = {"demo": cmd_demo, "train": cmd_train, "rlhf": cmd_rlhf, "generate": cmd_generate, "serve": cmd_serve,
             "eval-ppl": cmd_eval_ppl, "quantize": cmd_quantize}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args) or 0
    except CLIError as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tidal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
