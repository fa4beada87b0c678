"""Benchmark: `precompute-ref` against a naive reference log-prob loop, on two models.

    python benchmarks/precompute.py [--groups 48] [--wide-groups 12] [--k 4] [--device cpu] [--threads N]

naive:      one sequence at a time, full logits [T, vocab] -> log_softmax over everything -> sum the
            response positions (what one writes first with plain transformers).
precompute: reference.precompute (length-bucketed batches under --batch-tokens, LM head only on response
            positions, chunked), end to end: tokenize, forward, write the Parquet cache.
Models: sample_data/stories260K (vocab 512) and a random-init Llama with a 128,256-token vocabulary and a
small body (hidden 64, 2 layers), saved to a temp dir. Same synthetic data for both methods.
Each measurement runs in a fresh (spawned) process so its peak RSS is its own; model and tokenizer are
loaded once before the clock starts (both methods); each method runs --repeat times, interleaved, and its
fastest run counts. Prints a table: tokens/s (prompt + response tokens per second), peak RSS, the ratios,
and max |Δ ref_logp| between the two methods. Not a test; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "sample_data" / "stories260K"
WORDS = (
    "once upon a time there was a little girl named lily she loved to play outside in the park with her "
    "dog max one day they found a big red ball under a tree and the sun was warm so they ran and laughed "
    "until mom called them home for dinner because it was late"
).split()
MAX_LENGTH, MAX_PROMPT = 320, 96


def write_data(path: Path, n_groups: int, k: int) -> None:
    """Grouped JSONL: prompts of 8..40 words, k responses of 10..120 words (deterministic)."""
    def text(seed: int, n: int) -> str:
        return " ".join(WORDS[(seed * 7919 + i * 31 + i * i * 7) % len(WORDS)] for i in range(n))

    with open(path, "w") as f:
        for g in range(n_groups):
            responses = [text(g * 10 + i, 10 + (g * 37 + i * 53) % 111) for i in range(k)]
            f.write(json.dumps({"prompt": f"{g}. " + text(g, 8 + g % 33), "responses": responses,
                                "rewards": [float(i % 2) for i in range(k)]}) + "\n")


def make_wide_llama(path: Path, vocab: int = 128_256) -> None:
    """Random-init Llama with a wide vocabulary and a tiny body; stories260K's tokenizer (ids < 512)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, path / name)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(
    method: str, model_path: str, data: str, workdir: str, device: str, batch_tokens: int | None, threads: int
) -> dict:
    """Runs in a fresh process: time one method, return tokens/s, peak RSS and the log-probs."""
    import io

    import torch
    import transformers
    from rich.console import Console

    from gvpo_offline.data import DataConfig, load_groups
    from gvpo_offline.data.tokenize import TokenizeConfig, encode_pair
    from gvpo_offline.model import loading
    from gvpo_offline.stages import reference

    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    cfg = TokenizeConfig(MAX_LENGTH, MAX_PROMPT)
    dev = torch.device(device)
    tokenizer, model = loading.load_tokenizer(model_path), loading.load_model(model_path, dev)  # warm-up
    rss_before = _rss_mb()
    start = time.perf_counter()
    if method == "precompute":
        config = reference.PrecomputeConfig(
            data=DataConfig((data,), "grouped"), model=model_path, workdir=Path(workdir), tokenize=cfg,
            eval_fraction=0.0, batch_tokens=batch_tokens, device=device, progress=False,
        )
        reference.precompute(config, Console(file=io.StringIO()))
        table = reference.load_split(workdir, "train")
        logps = table["ref_logp"].to_pylist()
        tokens = sum(len(p) + len(r) for p, r in zip(table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()))
    else:
        logps, tokens = [], 0
        groups = sorted(load_groups(DataConfig((data,), "grouped")).iter_groups(), key=lambda g: g.group_id)
        with torch.no_grad():
            for g in groups:
                for response in g.responses:
                    pair = encode_pair(tokenizer, g.prompt, response, cfg)
                    ids = torch.tensor([pair.prompt_ids + pair.response_ids], device=dev)
                    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                    n = len(pair.prompt_ids)
                    pos = torch.arange(n - 1, n - 1 + len(pair.response_ids), device=dev)
                    logps.append(logp[pos, torch.tensor(pair.response_ids, device=dev)].sum().item())
                    tokens += ids.shape[1]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "tokens": tokens, "peak_mb": peak, "delta_mb": peak - rss_before, "logps": logps}


def run_one(method: str, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, method, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=48, help="groups for stories260K")
    parser.add_argument("--wide-groups", type=int, default=12, help="groups for the 128k-vocab Llama")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, default=None, help="default: precompute's (2048 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=2, help="fresh processes per method; the fastest counts")
    args = parser.parse_args()

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    transformers.utils.logging.disable_progress_bar()
    console = Console(width=150)
    threads = args.threads or torch.get_num_threads()
    table = Table(title=f"precompute-ref vs naive: {args.device}, {threads} torch threads, "
                        f"load average {os.getloadavg()[0]:.1f} at start")
    for col in ("model", "responses", "tokens", "naive tok/s", "precompute tok/s", "speed-up",
                "naive peak RSS", "precompute peak RSS", "RSS ratio", "max |Δ logp| (relative)"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_wide_llama(tmp / "wide")
        for name, model, n_groups in (("stories260K (V=512)", STORIES, args.groups),
                                      ("wide Llama (V=128,256)", tmp / "wide", args.wide_groups)):
            data = tmp / f"{n_groups}.jsonl"
            write_data(data, n_groups, args.k)
            res: dict[str, dict] = {}
            for r in range(args.repeat):  # interleaved; the fastest run of each method counts (noisy machines)
                for m in ("naive", "precompute"):
                    out = run_one(m, str(model), str(data), str(tmp / f"w-{m}-{n_groups}-{r}"), args.device,
                                  args.batch_tokens, args.threads)
                    if m not in res or out["seconds"] < res[m]["seconds"]:
                        res[m] = out
            naive, ours = res["naive"], res["precompute"]
            assert naive["tokens"] == ours["tokens"]
            rate = {m: r["tokens"] / r["seconds"] for m, r in res.items()}
            delta = max(abs(a - b) for a, b in zip(naive["logps"], ours["logps"]))
            rel = max(abs(a - b) / abs(a) for a, b in zip(naive["logps"], ours["logps"]))
            table.add_row(
                name, str(len(ours["logps"])), f"{ours['tokens']:,}", f"{rate['naive']:,.0f}",
                f"{rate['precompute']:,.0f}", f"{rate['precompute'] / rate['naive']:.1f}x",
                f"{naive['peak_mb']:,.0f} MB (+{naive['delta_mb']:,.0f})",
                f"{ours['peak_mb']:,.0f} MB (+{ours['delta_mb']:,.0f})",
                f"{ours['peak_mb'] / naive['peak_mb']:.2f}", f"{delta:.1e} ({rel:.0e})",
            )
            console.print(f"done: {name}", style="dim")
    console.print(table)
    console.print("tokens = prompt + response tokens through the model; peak RSS of the measuring process "
                  "(+ the rise over its RSS after loading the model). Timing includes tokenization and, "
                  "for precompute, fingerprinting and writing the cache. |Δ logp| is fp32 rounding of sums "
                  "over up to ~250 tokens (a few ulps of the sum).")


if __name__ == "__main__":
    main()
