"""Benchmark: gvpo-offline against TRL's DPOTrainer on the same model, groups and token budget.

    pip install -e '.[bench]'          # TRL, only for this benchmark
    python benchmarks/vs_trl.py [--groups 8] [--k 4] [--prompt-words 300] [--response-words 60]
                                [--hidden 1024] [--layers 2] [--threads 1]

The same G groups of k scored text responses (long prompts) go to both tools. DPO takes pairs only, so
it gets what a user would have to feed it for k > 2: every pair of a group's responses with different
rewards (higher reward = chosen), k(k−1)/2 pairs per group. The model is a random-init Llama built from
a config (default hidden 1024, 2 layers, 16/8 GQA heads) with stories260K's tokenizer (vocabulary 512),
saved to a temp folder; both sides load it from there, float32 on CPU.
  gvpo-offline  precompute-ref (reference.precompute, --packing auto: these long-prompt groups are packed, --batch-tokens 2048), then train
                one epoch (train.train, --groups-per-step --step-groups, --micro-batch-tokens 2048)
  TRL           DPOTrainer with precompute_ref_log_probs=True (its fastest CPU setting: the reference is
                scored once, no second model in the loop), per_device_train_batch_size chosen so that a
                step's padded tokens (2 × pairs × longest pair) are within the same 2048-token budget as
                ours per pass (at least 1 pair), one epoch, no logging/saving, dataloader in-process.
Reported: precompute seconds (TRL: the DPOTrainer constructor, which tokenizes and precomputes), train
seconds per step and per processed group, one-epoch wall time (precompute + training) over the same
groups, and peak RSS. Each tool runs in a fresh spawned process. Not a test; minutes on 2 CPU cores.
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

from precompute import STORIES, WORDS  # the bundled model and the benchmark's story words
from shared_prompt import spawn  # fn(*args) in a fresh process


def text(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7919 + i * 31 + i * i * 7) % len(WORDS)] for i in range(n))


def write_groups(path: Path, n_groups: int, k: int, prompt_words: int, response_words: int) -> list[dict]:
    groups = [{
        "id": f"g{g}", "prompt": f"{g}. " + text(g, prompt_words),
        "responses": [text(g * 100 + i, response_words + i) for i in range(k)],
        "rewards": [float(i) for i in range(k)],
    } for g in range(n_groups)]
    path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return groups


def make_model(path: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (STORIES / name).exists():
            shutil.copy(STORIES / name, path / name)


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
    start = time.perf_counter()
    reference.precompute(reference.PrecomputeConfig(
        data=DataConfig((data,), "grouped"), model=model, workdir=Path(workdir), eval_fraction=0.0,
        tokenize=TokenizeConfig(max_length=2048, max_prompt_length=1536), batch_tokens=2048, device="cpu",
        progress=False,
    ), Console(file=io.StringIO()))
    precompute = time.perf_counter() - start
    train(TrainConfig(workdir=Path(workdir), beta=0.1, groups_per_step=step_groups, micro_batch_tokens=2048,
                      save_every=0, progress=False, device="cpu", epochs=1), log=lambda _m: None)
    total = time.perf_counter() - start
    steps = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {"precompute": precompute, "train": total - precompute, "steps": len(steps),
            "step": sorted(s["seconds"] for s in steps)[len(steps) // 2], "total": total,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_trl(model: str, groups: list[dict], workdir: str, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = []
    for g in groups:
        for i, j in combinations(range(len(g["responses"])), 2):
            if g["rewards"][i] != g["rewards"][j]:
                hi, lo = (i, j) if g["rewards"][i] > g["rewards"][j] else (j, i)
                pairs.append({"prompt": g["prompt"], "chosen": g["responses"][hi], "rejected": g["responses"][lo]})
    longest = max(len(tokenizer(p["prompt"] + " " + max(p["chosen"], p["rejected"], key=len))["input_ids"])
                  for p in pairs)
    batch = max(1, 2048 // (2 * longest))  # padded tokens per step within our per-pass budget
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = DPOConfig(
        output_dir=workdir, per_device_train_batch_size=batch, precompute_ref_log_probs=True,
        precompute_ref_batch_size=batch, num_train_epochs=1, learning_rate=1e-6, beta=0.1, max_length=None,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        bf16=False, fp16=False, seed=0,
    )
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    precompute = time.perf_counter() - start
    out = trainer.train()
    total = time.perf_counter() - start
    steps = out.global_step
    return {"precompute": precompute, "train": total - precompute, "steps": steps,
            "step": (total - precompute) / max(1, steps), "total": total, "pairs": len(pairs), "batch": batch,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--response-words", type=int, default=60)
    parser.add_argument("--step-groups", type=int, default=1, help="our --groups-per-step")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", args.hidden, args.layers)
        groups = write_groups(tmp / "data.jsonl", args.groups, args.k, args.prompt_words, args.response_words)
        ours = spawn(run_ours, str(tmp / "model"), str(tmp / "data.jsonl"), str(tmp / "ours"), args.step_groups,
                     args.threads)
        trl = spawn(run_trl, str(tmp / "model"), groups, str(tmp / "trl"), args.threads)
    print(f"{args.groups} groups × k = {args.k} (prompts {args.prompt_words} words, responses ~{args.response_words}); "
          f"TRL: {trl['pairs']} pairs, batch {trl['batch']} pairs/step; Llama d={args.hidden} L={args.layers}; "
          f"cpu, {args.threads} thread(s); load {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    print(f"{'':<30}{'gvpo-offline':>14}{'TRL DPO':>14}{'TRL / ours':>12}")
    rows = (
        ("precompute s", "precompute"), ("train s (one epoch)", "train"), ("epoch wall s (both)", "total"),
    )
    for label, key in rows:
        print(f"{label:<30}{ours[key]:>14.1f}{trl[key]:>14.1f}{trl[key] / ours[key]:>11.2f}x")
    per_group = {n: r["train"] / args.groups for n, r in (("ours", ours), ("trl", trl))}
    print(f"{'train s per group':<30}{per_group['ours']:>14.2f}{per_group['trl']:>14.2f}"
          f"{per_group['trl'] / per_group['ours']:>11.2f}x")
    print(f"{'train s per step (steps)':<30}{ours['step']:>9.2f} ({ours['steps']:>2}){trl['step']:>9.2f} ({trl['steps']:>2})")
    print(f"{'peak RSS MB':<30}{ours['peak_mb']:>14,.0f}{trl['peak_mb']:>14,.0f}{trl['peak_mb'] / ours['peak_mb']:>11.2f}x")


if __name__ == "__main__":
    main()
