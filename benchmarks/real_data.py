"""Benchmark: precompute-ref on the real bundled datasets, packed rows against padded separate sequences.

    python benchmarks/real_data.py [--groups 32] [--hidden 1024] [--layers 2] [--max-length 1024]
                                   [--threads 1] [--repeat 2]

The synthetic benchmark (shared_prompt.py) fixes every length; real groups vary in prompt length, k and
response lengths. Here the inputs are ../shared/assets (see its SOURCES.md): the OpenAssistant trees
(``convert oasst``: conversation histories as prompts, k = 2..9 human-ranked replies, rendered with
examples/chat_template.jinja) and GSM8K model solutions (``convert gsm8k``: a question, k = 4 sampled
solutions with 0/1 correctness), the first --groups groups of each. The model is a random Llama from a
config (hidden --hidden, --layers layers) with stories260K's tokenizer (vocabulary 512, so English is
long in tokens), float32 on CPU; --max-length truncates as precompute-ref does. Each run is
``reference.precompute`` (the tool's own stage, --batch-tokens 2048) with --packing off and on, in a
fresh process; the fastest of --repeat counts; peak RSS from one more process per path in which every
tensor is its own memory mapping (shared_prompt.spawn). "shared" is packing.shared_fraction of the
cached token ids (the share of tokens computing each prompt once saves); "padded tokens" is what the padded path's
length-batched rows occupy (rows × longest row, per pass) against the real tokens of separate sequences.
The log-probs of the two runs are compared (max |Δ|, relative to the largest |log p|). Not a test.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from shared_prompt import spawn  # a fresh process; memory=True: RSS that follows live memory
from vs_trl import make_model  # random Llama + stories260K's tokenizer in a folder

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets" / "data"
SOURCES = {"oasst": ASSETS / "oasst" / "en_100_tree.jsonl", "gsm8k": ASSETS / "gsm8k" / "example_model_solutions.jsonl"}


def prepare(name: str, folder: Path, n_groups: int) -> Path:
    """The first n_groups groups of a bundled dataset, converted by the tool's own converter."""
    from gvpo_offline.stages.convert import convert

    full = folder / f"{name}-all.jsonl"
    convert(name, str(SOURCES[name]), full)
    out = folder / f"{name}.jsonl"
    out.write_text("".join(full.read_text().splitlines(keepends=True)[:n_groups]))
    return out


def run(data: str, model: str, workdir: str, packing: str, max_length: int, threads: int) -> dict:
    """In a fresh process: precompute-ref with one --packing; seconds, CPU seconds, peak RSS, the cache."""
    import torch
    from rich.console import Console

    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.stages import reference

    torch.set_num_threads(threads)
    template = (REPO / "examples" / "chat_template.jinja").read_text()
    config = reference.PrecomputeConfig(
        data=DataConfig((data,), "grouped"), model=model, workdir=Path(workdir), eval_fraction=0.0,
        tokenize=TokenizeConfig(max_length=max_length, prompt_template=template), batch_tokens=2048,
        device="cpu", progress=False, packing=packing,
    )
    start, cpu = time.perf_counter(), time.process_time()
    reference.precompute(config, Console(file=io.StringIO()))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    table = reference.load_split(Path(workdir), "train")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prompt_ids": table.column("prompt_ids").to_pylist(),
            "response_ids": table.column("response_ids").to_pylist(),
            "ref_logp": table.column("ref_logp").to_pylist(), "group_id": table.column("group_id").to_pylist()}


def padded_tokens(prompt_ids, response_ids, budget: int = 2048) -> int:
    """Tokens the padded path's passes occupy: logprobs.length_batches of separate sequences, each pass
    rows × its longest row."""
    from gvpo_offline.model.logprobs import length_batches

    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    return sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not all(p.exists() for p in SOURCES.values()):
        sys.exit(f"needs the bundled datasets under {ASSETS}")

    from rich.console import Console
    from rich.table import Table

    from gvpo_offline.model.packing import shared_fraction

    console = Console(width=160)
    load = os.getloadavg()
    table = Table(title=f"precompute-ref on real groups, packed vs padded: Llama d={args.hidden} L={args.layers} "
                        f"(stories260K tokenizer), max length {args.max_length}, cpu, {args.threads} thread(s), "
                        f"load {load[0]:.1f} at start")
    for col in ("data", "groups", "pairs", "k", "tokens", "shared", "padded tokens", "padded tok/s",
                "packed tok/s", "speed-up", "CPU-time ratio", "peak RSS padded → packed", "max |Δ| / max |log p|"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        make_model(model, args.hidden, args.layers)
        for name in SOURCES:
            data = prepare(name, tmp, args.groups)
            best: dict[str, dict] = {}
            for r in range(args.repeat):
                for packing in ("off", "on"):
                    out = spawn(run, str(data), str(model), str(tmp / f"{name}-{packing}-{r}"), packing,
                                args.max_length, args.threads)
                    if packing not in best or out["seconds"] < best[packing]["seconds"]:
                        best[packing] = out
            memory = {packing: spawn(run, str(data), str(model), str(tmp / f"{name}-{packing}-mem"), packing,
                                     args.max_length, args.threads, memory=True)["peak_mb"] for packing in ("off", "on")}
            off, on = best["off"], best["on"]
            prompts, responses = off["prompt_ids"], off["response_ids"]
            tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
            ks = {}
            for g in off["group_id"]:
                ks[g] = ks.get(g, 0) + 1
            delta = max(abs(a - b) for a, b in zip(off["ref_logp"], on["ref_logp"]))
            scale = max(abs(a) for a in off["ref_logp"])
            table.add_row(
                name, str(len(ks)), str(len(prompts)), f"{min(ks.values())}..{max(ks.values())}", f"{tokens:,}",
                f"{shared_fraction(prompts, responses):.0%}", f"{padded_tokens(prompts, responses):,}",
                f"{tokens / off['seconds']:,.0f}", f"{tokens / on['seconds']:,.0f}",
                f"{off['seconds'] / on['seconds']:.2f}x", f"{off['cpu_seconds'] / on['cpu_seconds']:.2f}x",
                f"{memory['off']:,.0f} → {memory['on']:,.0f} MB", f"{delta / scale:.1e}",
            )
            console.print(f"done: {name}", style="dim")
    console.print(table)
    console.print(f"load average at the end {os.getloadavg()[0]:.1f}. tokens = prompt + response tokens of every "
                  "pair after truncation (the work as separate sequences); speed-up = padded / packed wall "
                  "seconds of the whole precompute-ref stage (tokenization and cache writing included).")


if __name__ == "__main__":
    main()
