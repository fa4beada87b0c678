"""CPU threads for the default small batches (issue 22.2): tokens/s of the reference forward pass
(precompute-ref's scoring) and of a train step (forward + backward) at 1, 2, ... threads, for the bundled
stories260K and a wider random Llama (hidden 512, 4 layers, vocab 32,000), in one run; also whether two
runs at the same thread count give bit-identical gradients and whether 1 and N threads agree.

    python benchmarks/threads.py [--threads 1,2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gvpo_offline.model.logprobs import sequence_logps

REPO = Path(__file__).resolve().parents[1]


def batch(vocab: int, rows: int = 16, seed: int = 0):
    """16 rows of 40–100 prompt and 20–60 response tokens: about the default 2048-token batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = lambda lo, hi: torch.randint(lo, hi, (rows,), generator=g).tolist()  # noqa: E731
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths(40, 100)]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths(20, 60)]
    return prompts, responses


def measure(model, threads: int, repeat: int) -> tuple[float, float, dict]:
    torch.set_num_threads(threads)
    prompts, responses = batch(model.config.vocab_size)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    fwd, step = [], []
    grads = {}
    for _ in range(repeat):
        start = time.perf_counter()
        with torch.no_grad():
            sequence_logps(model, prompts, responses)
        fwd.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logps = sequence_logps(model, prompts, responses)
        (logps * torch.linspace(-1, 1, len(logps), dtype=logps.dtype)).sum().backward()
        step.append(time.perf_counter() - start)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return tokens / statistics.median(fwd), tokens / statistics.median(step), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    counts = [int(t) for t in opts.threads.split(",")]
    torch.manual_seed(0)
    models = {
        "stories260K": AutoModelForCausalLM.from_pretrained(REPO / "sample_data" / "stories260K").eval(),
        "llama h512 L4 V32k": LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)).eval(),
    }
    print(f"tokens/s, median of {opts.repeat}; ratio = N threads / 1 thread (torch {torch.__version__})")
    for name, model in models.items():
        results = {t: measure(model, t, opts.repeat) for t in counts}
        again = measure(model, counts[-1], 1)[2]
        same_n = all(torch.equal(again[k], results[counts[-1]][2][k]) for k in again)
        across = max((results[counts[-1]][2][k] - results[counts[0]][2][k]).abs().max().item() for k in again)
        for t, (f, s, _) in results.items():
            base_f, base_s = results[counts[0]][0], results[counts[0]][1]
            print(f"{name:20} threads {t}: forward {f:9,.0f} tok/s ({f / base_f:4.2f}x)  "
                  f"train step {s:9,.0f} tok/s ({s / base_s:4.2f}x)")
        print(f"{name:20} {counts[-1]} threads twice: gradients bit-identical {same_n}; "
              f"{counts[0]} vs {counts[-1]} threads: max |Δ grad| {across:.2e}")


if __name__ == "__main__":
    main()
