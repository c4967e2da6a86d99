"""Workload C1 of BENCHMARKS.md on the CPU: tidal.LLM against transformers' generate, same run.

Model: Llama architecture, hidden 256, intermediate 688, 4 layers, 4 q / 2 kv heads, vocab 4096,
fp32, random weights, saved in Hugging Face format and loaded back by each side. Workload: 64
requests, input lengths uniform in [32, 256], output lengths uniform in [32, 128], prompt tokens
uniform random ids, random.Random(0); greedy, EOS ignored, every request generates exactly its
own output length. Peer: transformers generate() in static batches of 16 with left padding; tokens a
padded batch generates past a request's own length are wasted work and are not counted.

    python bench/bench_c1_cpu.py [--out FILE] [--repeats 3]
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import transformers

import tidal
from report import print_table, write_markdown

NUM_REQUESTS, PEER_BATCH = 64, 16


def build_model(path: str) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)


def workload():
    rng = random.Random(0)
    requests = []
    for _ in range(NUM_REQUESTS):
        n_in, n_out = rng.randint(32, 256), rng.randint(32, 128)
        requests.append(([rng.randrange(2, 4096) for _ in range(n_in)], n_out))
    return requests


def run_tidal(llm, requests) -> tuple[float, int, list]:
    # Every run starts cold: a repeat must not find the previous run's prompts in the prefix cache.
    llm.reset_prefix_cache()
    params = [tidal.SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True) for _, n_out in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return elapsed, tokens, outputs


def run_hf(model, requests) -> tuple[float, int]:
    counted = 0
    start = time.perf_counter()
    for i in range(0, len(requests), PEER_BATCH):
        batch = requests[i:i + PEER_BATCH]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), 1, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        n_new = max(n for _, n in batch)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           pad_token_id=1)
        counted += sum(n for _, n in batch)
    return time.perf_counter() - start, counted


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=1)
    return out[0, len(prompt):].tolist()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    requests = workload()
    with tempfile.TemporaryDirectory() as path:
        build_model(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        llm = tidal.LLM(path, dtype="float32", device="cpu", max_num_seqs=256)

        # correctness first: greedy tokens equal transformers' for a few requests
        _, _, outputs = run_tidal(llm, requests[:3])
        for (prompt, n_out), out in zip(requests[:3], outputs):
            if out.outputs[0].token_ids != hf_greedy(hf, prompt, n_out):
                print("FAIL: tidal's greedy tokens differ from transformers'", file=sys.stderr)
                return 1
        print("correctness: greedy tokens equal transformers' on 3 requests")

        run_tidal(llm, requests)  # warm up both sides on the whole workload
        run_hf(hf, requests[:PEER_BATCH])
        tidal_runs, hf_runs = [], []
        for _ in range(args.repeats):
            elapsed, tokens, _ = run_tidal(llm, requests)
            tidal_runs.append(tokens / elapsed)
            elapsed, tokens = run_hf(hf, requests)
            hf_runs.append(tokens / elapsed)
        stats = llm.stats()

    t, h = statistics.median(tidal_runs), statistics.median(hf_runs)
    header = ["system", "output tok/s (median)", "runs", "vs transformers"]
    rows = [["tidal.LLM", f"{t:,.0f}", " ".join(f"{x:,.0f}" for x in tidal_runs), f"{t / h:.2f}x"],
            [f"transformers {transformers.__version__} generate (batch {PEER_BATCH})", f"{h:,.0f}",
             " ".join(f"{x:,.0f}" for x in hf_runs), "1.00x"]]
    print(f"C1 on {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print_table(header, rows)
    print(f"preemptions {stats['preemptions']}, kv blocks {stats['kv_blocks_total']}")
    if args.out:
        write_markdown(args.out, f"C1, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"`python bench/bench_c1_cpu.py --repeats {args.repeats}`", header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
