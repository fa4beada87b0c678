"""Benchmark: gvpo-offline against TRL's DPOTrainer on the same model, groups and token budget (issue 23 item 3).

    pip install -e '.[bench]'          # TRL, only for this benchmark
    python benchmarks/vs_trl.py                 # the full comparison: k = 4 and 8, ~10-20 CPU minutes
    python benchmarks/vs_trl.py --small         # smoke setting: a tiny model and 2 groups, seconds
    python benchmarks/vs_trl.py --ks 4 --pairs best-vs-worst   # TRL on best-vs-worst pairs only: minutes
    python benchmarks/vs_trl.py --ks 4 --pairs best-vs-worst --readme README.md   # and write the table there

The same G groups of k scored text responses go to both tools, for each k in --ks. DPO takes pairs only, so
it is run twice per k, on what a user would have to feed it for k > 2:
  all pairs      every pair of a group's responses with different rewards (higher reward = chosen), k(k−1)/2
  best-vs-worst  one pair per group: the highest-reward response against the lowest
Data: GSM8K-style groups: a word-problem prompt of a target length drawn in [--prompt-tokens-min,
--prompt-tokens-max] tokens (grown word by word until the tokenizer reaches it), k responses of
--response-words + i words. Model: a random-init Llama built from a config (default hidden 256, 4 layers,
intermediate 768, 4/2 GQA heads, vocabulary 32,000, untied head: 19.5M parameters) with stories260K's
tokenizer (its ids are < 512; the LM head still scores all 32,000 logits, which is what costs), saved to a
temp folder; both sides load it from there, float32 on CPU, --threads threads.
  gvpo-offline  precompute-ref (reference.precompute, --packing auto, --batch-tokens 2048), then one epoch
                of train (train.train, --groups-per-step --step-groups, --micro-batch-tokens 2048)
  TRL           DPOTrainer with precompute_ref_log_probs=True (its fastest CPU setting: the reference is
                scored once), per_device_train_batch_size such that a step's padded tokens (2 × pairs ×
                longest pair) fit the same 2048-token budget (at least 1 pair), one epoch, no logging/saving.
Measured per tool in a fresh spawned process, after its imports and a warm-up (warm_up: the tokenizer and the
model loaded once and dropped, so that neither clock counts transformers' first-use imports): CPU seconds (user + system of that
process, from getrusage: the machine is shared, so wall time is not the measure) of precompute (TRL: the
DPOTrainer constructor, which tokenizes and precomputes) and of the training epoch; peak RSS (ru_maxrss of
the process, imports included) and the RSS rise: that peak minus the process's VmRSS just before the clock
starts (after its imports and the warm-up: what the tool's own work adds, apart from the ~0.35-0.45 GB that importing torch,
transformers and datasets holds in both). Tokens: the non-padding tokens each tool runs through the model in one pass
over its input, counted with the tokenizer: gvpo-offline the prompt once plus every response per group,
TRL prompt + chosen and prompt + rejected per pair. tokens per CPU-second = those tokens / one-epoch
(precompute + train) CPU seconds, each tool's own tokens: it says how fast each computes a token, apart
from how many tokens it needs. Both tools spend the same model FLOPs per token (epoch_flops_per_token:
the reference's forward, the policy's forward and backward), so the per-token ratio is a ratio of FLOP
rates; the verdict prints each tool's rate and the rate of the model's matmuls alone on this machine
(matmul_gflops, measured in the run): how far either is from doing nothing but its FLOPs. --pairs picks TRL's runs: both (default), all or best-vs-worst (the
all-pairs runs take ~20 CPU minutes at k = 8, and TRL's per-token rate is the same either way). Not a test (tests/test_benchmarks_vs_trl.py smoke-runs --small only).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import tempfile
import time
from itertools import combinations
from pathlib import Path

# the bundled model and the benchmark's story words; fn(*args) in a fresh process
from precompute import STORIES, WORDS
from shared_prompt import spawn

FULL = {"groups": 8, "ks": [4, 8], "prompt_tokens_min": 250, "prompt_tokens_max": 400, "response_words": 60,
        "hidden": 256, "layers": 4, "intermediate": 768, "vocab": 32000}
SMALL = {"groups": 2, "ks": [4], "prompt_tokens_min": 20, "prompt_tokens_max": 40, "response_words": 5,
         "hidden": 64, "layers": 1, "intermediate": 128, "vocab": 1000}
TARGETS = "≥ 4× TRL per token, ≥ 2× on best-vs-worst one-epoch time at k = 4, ≤ 0.3× TRL's peak RSS"


def text(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7919 + i * 31 + i * i * 7) % len(WORDS)] for i in range(n))


def word_problem(tokenizer, g: int, target_tokens: int) -> str:
    """A GSM8K-style question of about ``target_tokens`` tokens: story words with numbers, then the ask."""
    words, i = [f"Question {g}:"], 0
    while len(tokenizer(" ".join(words) + " How many are left?")["input_ids"]) < target_tokens:
        word = WORDS[(g * 7919 + i * 31 + i * i * 7) % len(WORDS)]
        words.append(f"{(g * 13 + i) % 97} {word}" if i % 9 == 4 else word)
        i += 1
    return " ".join(words) + " How many are left?"


def write_groups(path: Path, tokenizer, n_groups: int, k: int, lo: int, hi: int, response_words: int) -> list[dict]:
    groups = [{
        "id": f"g{g}", "prompt": word_problem(tokenizer, g, lo + (g * 61) % (hi - lo + 1)),
        "responses": [text(g * 100 + i, response_words + i) + f" The answer is {g + i}." for i in range(k)],
        "rewards": [float(i) for i in range(k)],
    } for g in range(n_groups)]
    path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return groups


def dpo_pairs(groups: list[dict], which: str) -> list[dict]:
    """DPO's input from the groups: ``all`` pairs with different rewards, or ``best-vs-worst`` (one per group)."""
    pairs = []
    for g in groups:
        r = g["rewards"]
        if which == "best-vs-worst":
            index = [(max(range(len(r)), key=r.__getitem__), min(range(len(r)), key=r.__getitem__))]
        else:
            index = [(i, j) if r[i] > r[j] else (j, i) for i, j in combinations(range(len(r)), 2) if r[i] != r[j]]
        pairs += [{"prompt": g["prompt"], "chosen": g["responses"][hi], "rejected": g["responses"][lo]}
                  for hi, lo in index]
    return pairs


def count_tokens(tokenizer, groups: list[dict], pairs: list[dict]) -> tuple[int, int]:
    """(gvpo-offline's tokens: prompt once + each response, TRL's: prompt + chosen + prompt + rejected per pair)."""
    n = lambda s, special=True: len(tokenizer(s, add_special_tokens=special)["input_ids"])
    ours = sum(n(g["prompt"]) + sum(n(r, False) for r in g["responses"]) for g in groups)
    theirs = sum(2 * n(p["prompt"]) + n(p["chosen"], False) + n(p["rejected"], False) for p in pairs)
    return ours, theirs


def make_model(path: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """A random Llama saved to ``path`` with stories260K's tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    ))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (STORIES / name).exists():
            shutil.copy(STORIES / name, path / name)
    return sum(p.numel() for p in model.parameters())


def rss_mb() -> float:
    """This process's resident set now (VmRSS), in MB; its peak (ru_maxrss) where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(base_mb: float) -> dict:
    """Peak RSS (ru_maxrss, imports included) and its rise above ``base_mb`` (VmRSS after the imports), MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "base_mb": base_mb, "rise_mb": peak - base_mb}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def warm_up(model: str) -> None:
    """Load the tokenizer and the model once, and drop them, before either tool's clock starts.

    transformers imports ~1,000 modules on its first ``from_pretrained`` (torch.distributed.tensor,
    torch._dynamo, its quantizers): ~2.4 CPU s. ``from trl import DPOTrainer`` imports most of them before
    TRL's clock; without this, our clock would count them and TRL's would not."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(model)
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    gc.collect()


def run_ours(model: str, data: str, workdir: str, step_groups: int, threads: int) -> dict:
    import datasets  # noqa: F401 - imported before the clock starts, as TRL's are
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.stages import reference
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    torch.set_num_threads(threads)
    warm_up(model)
    base = rss_mb()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    reference.precompute(reference.PrecomputeConfig(
        data=DataConfig((data,), "grouped"), model=model, workdir=Path(workdir), eval_fraction=0.0,
        tokenize=TokenizeConfig(max_length=2048, max_prompt_length=1536), batch_tokens=2048, device="cpu",
        progress=False,
    ), Console(file=io.StringIO()))
    cpu1 = cpu_seconds()
    train(TrainConfig(workdir=Path(workdir), beta=0.1, groups_per_step=step_groups, micro_batch_tokens=2048,
                      save_every=0, progress=False, device="cpu", epochs=1), log=lambda _m: None)
    steps = len((Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return {"precompute": cpu1 - cpu0, "train": cpu_seconds() - cpu1, "steps": steps,
            "wall": time.perf_counter() - wall0, **memory(base)}


def run_trl(model: str, pairs: list[dict], workdir: str, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    longest = max(len(tokenizer(p["prompt"] + " " + max(p["chosen"], p["rejected"], key=len))["input_ids"])
                  for p in pairs)
    batch = max(1, 2048 // (2 * longest))  # padded tokens per step within our per-pass budget
    warm_up(model)
    base = rss_mb()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = DPOConfig(
        output_dir=workdir, per_device_train_batch_size=batch, precompute_ref_log_probs=True,
        precompute_ref_batch_size=batch, num_train_epochs=1, learning_rate=1e-6, beta=0.1, max_length=None,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        bf16=False, fp16=False, seed=0,
    )
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    cpu1 = cpu_seconds()
    out = trainer.train()
    return {"precompute": cpu1 - cpu0, "train": cpu_seconds() - cpu1, "steps": out.global_step, "batch": batch,
            "wall": time.perf_counter() - wall0, **memory(base)}


def epoch_flops_per_token(n_params: int, hidden: int, vocab: int) -> float:
    """Model FLOPs one epoch spends per token, the same for both tools: 4 forward-equivalents (the reference's
    forward, then the policy's forward and its backward, 2×) of 2 FLOPs per weight that multiplies (all but the
    input embedding, a lookup; attention scores left out: a few % here)."""
    return 4 * 2 * (n_params - vocab * hidden)


def matmul_gflops(model: Path, threads: int, rows: int = 1024) -> float:
    """This machine's float32 rate over the model's own matmuls — each linear layer of each decoder layer and
    the LM head, x [rows, in] · Wᵀ, best of 5 each — in GFLOP per CPU-second: the rate an epoch's model FLOPs
    would run at with nothing else to do (a reference, not a hard bound: other shapes, the backward's among
    them, run at other rates)."""
    import torch

    config = json.loads((Path(model) / "config.json").read_text())
    d, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (d // config["num_attention_heads"])
    layer = [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d)]  # q k v o, gate up down
    shapes = layer * config["num_hidden_layers"] + [(d, vocab)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best: dict[tuple[int, int], float] = {}
    for n_in, n_out in set(shapes):
        x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
        out = torch.empty(rows, n_out)
        times = []
        for _ in range(6):
            cpu0 = cpu_seconds()
            torch.mm(x, w.t(), out=out)
            times.append(cpu_seconds() - cpu0)
        best[n_in, n_out] = min(times[1:])
    torch.set_num_threads(before)
    return sum(2 * rows * n_in * n_out for n_in, n_out in shapes) / sum(best[s] for s in shapes) / 1e9


def ceiling(ours: dict, theirs: dict) -> str | None:
    """What the rows' FLOPs say: each tool's GFLOP per CPU-second, and the per-token ratio ours / TRL if ours
    ran every FLOP at the rate of the model's matmuls alone (None for rows saved without them)."""
    if not all(r.get("flops_per_token") and r.get("matmul_gflops") for r in (ours, theirs)):
        return None
    rate = lambda r: r["tokens_per_cpu_s"] * r["flops_per_token"] / 1e9  # noqa: E731
    return (f"GFLOP per CPU-s: ours {rate(ours):.1f}, TRL {rate(theirs):.1f}, the model's matmuls alone "
            f"{ours['matmul_gflops']:.1f}: per token ours / TRL would be {ours['matmul_gflops'] / rate(theirs):.2f}× "
            f"with every FLOP at that rate (ours now at {rate(ours) / ours['matmul_gflops']:.0%} of it)")


def rise_ratio(ours: dict, theirs: dict) -> float | None:
    """Our RSS rise over TRL's, or None for rows saved before the rise was measured."""
    if ours.get("rise_mb") is None or theirs.get("rise_mb") is None:
        return None
    return ours["rise_mb"] / theirs["rise_mb"]


def table(rows: list[dict]) -> str:
    """The markdown table: one row per (k, tool), ratios against gvpo-offline at the same k. Rows saved by
    an earlier version (no RSS rise) show — in the rise columns."""
    lines = [("| k | tool (pairs) | tokens | tokens per CPU-s | precompute CPU s | train CPU s (steps) | one-epoch CPU s "
              "| peak RSS MB | RSS rise MB (base) | tokens per CPU-s, ours / TRL | one-epoch CPU s, TRL / ours "
              "| peak RSS, ours / TRL | RSS rise, ours / TRL |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = next(o for o in rows if o["k"] == r["k"] and o["tool"] == "gvpo-offline")
        is_ours = r is ours
        rise = "—" if r.get("rise_mb") is None else f"{r['rise_mb']:,.0f} ({r['base_mb']:,.0f})"
        ratio = rise_ratio(ours, r)
        lines.append(
            f"| {r['k']} | {r['tool']} | {r['tokens']:,} | {r['tokens_per_cpu_s']:,.0f} | {r['precompute']:.1f} "
            f"| {r['train']:.1f} ({r['steps']}) | {r['epoch']:.1f} | {r['peak_mb']:,.0f} | {rise} | "
            + ("— | — | — | — |" if is_ours else
               f"**{ours['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}×** | **{r['epoch'] / ours['epoch']:.2f}×** "
               f"| **{ours['peak_mb'] / r['peak_mb']:.2f}×** | " + ("— |" if ratio is None else f"**{ratio:.2f}×** |")))
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Whether issue 23's targets are met, read off the rows (not tuned: reported as measured)."""
    out = []
    for r in rows:
        if r["tool"] == "gvpo-offline":
            continue
        ours = next(o for o in rows if o["k"] == r["k"] and o["tool"] == "gvpo-offline")
        per_token = ours["tokens_per_cpu_s"] / r["tokens_per_cpu_s"]
        rss = ours["peak_mb"] / r["peak_mb"]
        line = (f"k = {r['k']}, {r['tool']}: per token {per_token:.2f}× ({'met' if per_token >= 4 else 'NOT met'}: ≥ 4×), "
                f"peak RSS {rss:.2f}× ({'met' if rss <= 0.3 else 'NOT met'}: ≤ 0.3×)")
        rise = rise_ratio(ours, r)
        if rise is not None:
            line += f", RSS rise above the imports {rise:.2f}×"
        if r["k"] == 4 and "best-vs-worst" in r["tool"]:
            epoch = r["epoch"] / ours["epoch"]
            line += f", one-epoch time {epoch:.2f}× ({'met' if epoch >= 2 else 'NOT met'}: ≥ 2×)"
        if (bound := ceiling(ours, r)) is not None:
            line += f"; {bound}"
        out.append(line)
    return out


README_BEGIN, README_END = "<!-- benchmarks/vs_trl.py: begin -->", "<!-- benchmarks/vs_trl.py: end -->"


def report(header: str, rows: list[dict]) -> str:
    """The header line, the table and the targets' verdict, as printed and as written into the README."""
    return (f"{header}\n\n{table(rows)}\n\nTargets ({TARGETS}):\n\n"
            + "\n".join(f"- {line}" for line in verdict(rows)))


def write_readme(path: Path, text: str) -> None:
    """Replace what lies between the README's two markers (README_BEGIN, README_END) with ``text``;
    atomically (runtime/files.py)."""
    from gvpo_offline.runtime.files import atomic_write_bytes

    readme = path.read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} markers to write the table between")
    head, rest = readme.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write_bytes(path, f"{head}{README_BEGIN}\n{text}\n{README_END}{tail}".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke setting: tiny model, 2 groups, k = 4 (seconds)")
    parser.add_argument("--groups", type=int)
    parser.add_argument("--ks", type=int, nargs="+")
    parser.add_argument("--prompt-tokens-min", type=int)
    parser.add_argument("--prompt-tokens-max", type=int)
    parser.add_argument("--response-words", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--pairs", choices=("both", "all", "best-vs-worst"), default="both",
                        help="TRL's runs: every pair of a group, best-vs-worst only, or both (all pairs take "
                             "~20 CPU minutes at k = 8; TRL's per-token rate is the same either way)")
    parser.add_argument("--step-groups", type=int, default=1, help="our --groups-per-step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--from-json", type=Path, nargs="+", help="print the table of rows saved by --json (runs nothing)")
    parser.add_argument("--readme", type=Path, help="also write the table and the verdict into this README, "
                        f"between its lines {README_BEGIN} and {README_END}")
    args = parser.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
        header = "Rows of " + ", ".join(f"`{path.name}`" for path in args.from_json) + "."
        print(report(header, rows))
        if args.readme:
            write_readme(args.readme, report(header, rows))
        return
    for key, value in (SMALL if args.small else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from transformers import AutoTokenizer

    load = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_params = make_model(tmp / "model", args.hidden, args.layers, args.intermediate, args.vocab)
        flops = {"flops_per_token": epoch_flops_per_token(n_params, args.hidden, args.vocab),
                 "matmul_gflops": matmul_gflops(tmp / "model", args.threads)}
        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        for k in args.ks:
            data = tmp / f"data-k{k}.jsonl"
            groups = write_groups(data, tokenizer, args.groups, k, args.prompt_tokens_min, args.prompt_tokens_max,
                                  args.response_words)
            prompt_lengths = [len(tokenizer(g["prompt"])["input_ids"]) for g in groups]
            print(f"k = {k}: {args.groups} groups, prompts {min(prompt_lengths)}–{max(prompt_lengths)} tokens", flush=True)
            runs = [("gvpo-offline", None, spawn(run_ours, str(tmp / "model"), str(data), str(tmp / f"ours-k{k}"),
                                                 args.step_groups, args.threads))]
            for which in ("all", "best-vs-worst") if args.pairs == "both" else (args.pairs,):
                pairs = dpo_pairs(groups, which)
                runs.append((f"TRL DPO, {which} ({len(pairs)})", pairs,
                             spawn(run_trl, str(tmp / "model"), pairs, str(tmp / f"trl-{which}-k{k}"), args.threads)))
            for tool, pairs, result in runs:
                ours_tokens, trl_tokens = count_tokens(tokenizer, groups, pairs or [])
                tokens = ours_tokens if pairs is None else trl_tokens
                epoch = result["precompute"] + result["train"]
                rows.append({"k": k, "tool": tool, "tokens": tokens, "epoch": epoch, "tokens_per_cpu_s": tokens / epoch,
                             **result, **flops})
                print(f"  {tool}: {epoch:.1f} CPU s, {result['wall']:.1f} wall s, peak {result['peak_mb']:,.0f} MB "
                      f"(rise {result['rise_mb']:,.0f} MB above {result['base_mb']:,.0f} MB after imports)", flush=True)
    command = f"python benchmarks/vs_trl.py --ks {' '.join(map(str, args.ks))} --pairs {args.pairs}" + (" --small" if args.small else "")
    header = (f"`{command}`, {started}: Llama d={args.hidden} L={args.layers} "
              f"ffn={args.intermediate} V={args.vocab:,} ({n_params / 1e6:.1f}M parameters), {args.groups} groups per k, "
              f"prompts {args.prompt_tokens_min}–{args.prompt_tokens_max} tokens, responses ~{args.response_words} "
              f"words; fp32, cpu, {args.threads} thread(s); load average {load[0]:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end")
    print("\n" + report(header, rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.readme:
        write_readme(args.readme, report(header, rows))


if __name__ == "__main__":
    main()
