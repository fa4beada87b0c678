"""GPU acceptance: the whole pipeline on one CUDA GPU, in bf16, on a ~0.8B Llama-shaped model; one table.

    bash benchmarks/gpu_acceptance.sh [--out DIR] [--groups 48] [--k 4] [--steps 5] [--peak-tflops auto]

The first thing to run on any machine with a CUDA GPU (target: under 8 minutes on one H100; the .sh
stops it at 8). Without a CUDA GPU it stops at once with one line and exit code 1.

What it does, with the tool's own stages (precompute-ref and train as functions, same code as the CLI):

1. Builds a Llama-shaped model from a config (hidden 1536, 20 layers, 12/4 GQA heads, MLP 6144, vocabulary
   32,000, untied: 0.79B parameters), random weights, saved with ``save_pretrained`` in bf16 next to the
   stories260K tokenizer (its ids are < 512, so every token id is valid for the model). Nothing downloaded.
2. Writes ``--groups`` groups of ``--k`` responses (prompts ~200 tokens, responses ~60-120) of random words.
3. For ``--packing off`` and ``--packing on`` (each prompt once, the flash varlen kernel, whose first call
   is checked against SDPA): ``precompute-ref --dtype bfloat16``, then ``train --dtype bfloat16`` full
   fine-tuning and LoRA (r = 16, all linear layers) for ``--steps`` steps of 8 groups. With bitsandbytes
   installed, also QLoRA (``--load-in-4bit`` on both stages).
4. Prints, per run: max |ℓ| at step 0 (the policy must start at the reference: ~0, bf16 rounding at most),
   tokens/s (prompt + response tokens of every pair; train: median over the steps after the first;
   precompute: the whole stage, model load included), model-FLOPs utilisation (benchmarks/gpu.py's
   model_flops: packed rows count each prompt once; ×3 for a full train step, ×2 for LoRA, whose frozen
   weights get no weight gradient; the padded path's extra no-grad pass is not counted), peak
   ``torch.cuda.max_memory_allocated`` and the memory plan train printed (weights + gradients + AdamW
   state, no activations) with their ratio; and the varlen kernel's first-call check.

``--cpu-smoke`` runs the same plumbing on CPU with a tiny model (no GPU numbers: MFU and memory show
"-"), so the script itself is tested without a GPU (tests/test_gpu_acceptance.py, with the no-GPU refusal).
Not yet run on a GPU (the project's machines have none).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "sample_data" / "stories260K"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ("the cat dog sun tree ran saw big little happy sad park ball bird girl boy friend mom dad home "  # noqa: SIM905
         "played found went wanted said was had day time one very good new look jump red blue toy car").split()


def require_cuda() -> None:
    """Stop with one line (exit 1) when there is no CUDA GPU."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu_acceptance: torch is not installed (pip install -e . first)")
    if not torch.cuda.is_available():
        sys.exit("gpu_acceptance: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine "
                 "with an NVIDIA GPU")


def model_config(tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # --cpu-smoke
        return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaConfig(vocab_size=32_000, hidden_size=1536, intermediate_size=6144, num_hidden_layers=20,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                       tie_word_embeddings=False, rope_theta=500_000.0)


def build_model(folder: Path, device: str, tiny: bool) -> None:
    """Random weights from the config, saved in bf16 with save_pretrained, with the stories260K tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(model_config(tiny)).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (STORIES / name).is_file():
            shutil.copy(STORIES / name, folder / name)
    del model


def write_data(path: Path, groups: int, k: int) -> None:
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    with open(path, "w") as fh:
        for g in range(groups):
            responses = [text(rng.randint(20, 40)) for _ in range(k)]
            fh.write(json.dumps({"prompt": text(70), "responses": responses,
                                 "rewards": [rng.uniform(-1, 1) for _ in range(k)], "id": f"g{g}"}) + "\n")


def flops_model(tiny: bool):
    """The model on the meta device: parameter counts for benchmarks/gpu.py's model_flops."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(model_config(tiny))


def train_rows(workdir: Path, groups_per_step: int, steps: int, seed: int):
    """(prompt ids, response ids) of each step's groups, in the order train took them (one epoch)."""
    from gvpo_offline.stages.train.step import epoch_order, load_train_groups

    groups = load_train_groups(workdir)
    table = groups.table
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    order = epoch_order(groups.n_groups, seed, 0)
    out = []
    for s in range(steps):
        rows = [r for g in order[s * groups_per_step:(s + 1) * groups_per_step]
                for r in range(groups.offsets[g], groups.offsets[g + 1])]
        out.append(([prompts[r] for r in rows], [responses[r] for r in rows]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="working folder (default: a new temp folder, deleted at the end)")
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="train steps of 8 groups per run")
    parser.add_argument("--peak-tflops", default="auto", help="dense bf16 peak of the GPU (auto: H100/H200/A100)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same runs on CPU with a tiny model (tests)")
    args = parser.parse_args()
    if not args.cpu_smoke:
        require_cuda()
    device, dtype = ("cpu", "float32") if args.cpu_smoke else ("cuda", "bfloat16")

    import torch
    from rich.console import Console

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu import model_flops, peak_flops

    from gvpo_offline.data import DataConfig
    from gvpo_offline.model import memory_plan, packing
    from gvpo_offline.model.adapters import LoraSettings
    from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    started = time.perf_counter()
    cuda = device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else "CPU (--cpu-smoke)"
    try:
        peak = peak_flops(name, args.peak_tflops) if cuda else None
    except SystemExit:
        peak = None

    def reset_memory() -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory() -> int | None:
        return torch.cuda.max_memory_allocated() if cuda else None

    temp = args.out is None
    root = Path(tempfile.mkdtemp(prefix="gvpo-acceptance-") if temp else args.out)
    root.mkdir(parents=True, exist_ok=True)
    plans = []  # the memory plan each train run computed (captured where train checks it)
    check_fits = memory_plan.check_fits
    memory_plan.check_fits = lambda ctx, plan: (plans.append(plan), check_fits(ctx, plan))[1]
    quiet = Console(stderr=True, quiet=True)
    meta = flops_model(args.cpu_smoke)
    params = sum(p.numel() for p in meta.parameters())
    try:
        model_dir, data = root / "model", root / "data.jsonl"
        build_model(model_dir, device, args.cpu_smoke)
        write_data(data, args.groups, args.k)
        runs = [("off", False), ("on", False)]
        try:
            import bitsandbytes  # noqa: F401

            runs.append(("off", True))
        except ImportError:
            pass
        table = []
        for mode, four_bit in runs:
            workdir = root / f"run-{mode}{'-4bit' if four_bit else ''}"
            reset_memory()
            t0 = time.perf_counter()
            precompute(PrecomputeConfig(
                data=DataConfig((str(data),)), model=str(model_dir), workdir=workdir, eval_fraction=0.0,
                device=device, dtype=dtype, packing=mode, progress=False, load_in_4bit=four_bit), quiet)
            seconds = time.perf_counter() - t0
            prompts, responses = train_rows(workdir, 10**9, 1, 0)[0]  # every cached pair
            tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
            flops = model_flops(meta, prompts, responses, packed=mode == "on")
            table.append({"run": "precompute-ref" + (" 4-bit" if four_bit else ""), "packing": mode,
                          "l0": None, "tok_s": tokens / seconds, "mfu": flops / seconds / peak if peak else None,
                          "peak": peak_memory(), "plan": None})
            methods = [("QLoRA r=16", LoraSettings(r=16))] if four_bit else [("full", None), ("LoRA r=16", LoraSettings(r=16))]
            for label, lora in methods:
                reset_memory()
                cfg = TrainConfig(workdir=workdir, beta=1.0, lr=1e-5 if lora is None else 1e-4, groups_per_step=8,
                                  max_steps=args.steps, device=device, dtype=dtype, lora=lora,
                                  load_in_4bit=four_bit, overwrite=True, save_every=0, progress=False)
                train(cfg, log=lambda _: None)
                metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
                steps = train_rows(workdir, 8, len(metrics), cfg.seed)
                later = list(zip(metrics, steps))[1:] or list(zip(metrics, steps))
                step_seconds = statistics.median(m["seconds"] for m, _ in later)
                step_tokens = statistics.median(m["tokens"] for m, _ in later)
                factor = 3 if lora is None else 2
                step_flops = statistics.median(factor * model_flops(meta, p, r, packed=mode == "on") for _, (p, r) in later)
                plan = plans[-1].per_rank_bytes if plans else None
                table.append({"run": f"train {label}", "packing": mode, "l0": metrics[0]["log_ratio_absmax"],
                              "tok_s": step_tokens / step_seconds,
                              "mfu": step_flops / step_seconds / peak if peak else None,
                              "peak": peak_memory(), "plan": plan})
                shutil.rmtree(workdir / "model", ignore_errors=True)  # the next run's --overwrite
    finally:
        memory_plan.check_fits = check_fits
        if temp:
            shutil.rmtree(root, ignore_errors=True)

    gib = 2 ** 30
    print(f"{name}; torch {torch.__version__}; model {params / 1e9:.2f}B params, bf16 on disk; "
          f"{args.groups} groups × k = {args.k}; peak {peak / 1e12:.0f} TFLOP/s" if peak else
          f"{name}; torch {torch.__version__}; model {params / 1e6:,.1f}M params; peak FLOP/s unknown (--peak-tflops)")
    print(f"{'run':<22}{'packing':>8}{'max|ℓ| step 0':>15}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}"
          f"{'peak/plan':>10}")
    for row in table:
        l0 = f"{row['l0']:.3g}" if row["l0"] is not None else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        plan = f"{row['plan'] / gib:.1f}" if row["plan"] else "-"
        used = f"{row['peak'] / gib:.1f}" if row["peak"] is not None else "-"
        ratio = f"{row['peak'] / row['plan']:.2f}" if row["plan"] and row["peak"] is not None else "-"
        print(f"{row['run']:<22}{row['packing']:>8}{l0:>15}{row['tok_s']:>10,.0f}{mfu:>7}{used:>10}{plan:>10}{ratio:>10}")
    check = packing._VARLEN_CHECK
    varlen = ("passed: packed rows ran on the flash varlen kernel" if check.get("ok") else
              "FAILED: packed rows fell back to SDPA per piece" if check else
              "not reached (no varlen kernel in this torch build, or no packed attention call)")
    print(f"varlen kernel first-call check: {varlen}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
