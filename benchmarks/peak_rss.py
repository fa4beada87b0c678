"""Benchmark: peak RSS of the train step, old vs new, each in a fresh process (issue 23 item 3, memory).

    python benchmarks/peak_rss.py                       # the train step: ~1 CPU minute
    python benchmarks/peak_rss.py --pipeline            # also precompute-ref + one epoch of train in one process,
                                                        # the package at --old-rev against this working tree

Model: vs_trl.py's random Llama (hidden 256, 4 layers, vocabulary 32,000, untied head: 19.5M parameters,
float32: weights 78 MB, gradients 78 MB, AdamW's two moments 156 MB), saved to a temp folder.

train step (default): the same synthetic groups (vs_trl.py's shape: one group per step, a prompt of
--prompt-min..--prompt-max tokens and k responses of 60-100 tokens, --micro-batch-tokens 2048), --steps
steps of gvpo_backward + clipping + AdamW, in a fresh spawned process per variant:
  old   torch's default AdamW (on CPU its per-tensor loop: two temporaries the size of each weight per
        step) and the gradients freed at the start of the next step (what stages/train/recipe.py did)
  new   optimizer.adamw (torch's fused kernel in one process: no such temporary) and the gradients freed
        right after the step (what recipe.py does now)
Printed per variant: VmRSS before the first step (model loaded, imports done), peak RSS (ru_maxrss), the
rise (peak − before), CPU seconds per step; and new / old for each; and the largest difference between
the two variants' weights (saved after the peak is read), after the --steps steps and, from one more
fresh process per variant, after one step (the same gradients into both AdamWs), in float32 ulps of
the tensor's largest weight and as a fraction of its largest change.

--pipeline: vs_trl.run_ours (precompute-ref, then one epoch of train on 8 groups, one process: what
benchmarks/vs_trl.py measures) with the package at --old-rev (extracted with git archive) and with
this working tree's src/, each in a fresh process: peak RSS and its rise above the post-import VmRSS.
--timeline: where the peak goes. vs_trl.run_ours' work with this working tree in a fresh process, printing
VmRSS and VmHWM (the peak so far) at each stage boundary: after the imports, after precompute-ref, around
train's model load and its first gvpo_backward and AdamW steps; then, in another fresh process, the VmRSS
that importing alone the modules precompute-ref imported (transformers' model loading) adds.
Not a test: tests/test_train.py checks the weights of fused against default AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_trl import FULL, cpu_seconds, make_model, rss_mb, write_groups


def synthetic_batches(steps: int, k: int, prompt_min: int, prompt_max: int, seed: int = 0) -> list:
    """``steps`` one-group StepBatches: token ids < 512, a prompt of prompt_min..prompt_max tokens, k responses
    of 60-100 tokens, random rewards and reference log-probs."""
    import torch

    from gvpo_offline.stages.train.step import StepBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        prompt = torch.randint(3, 512, (int(torch.randint(prompt_min, prompt_max + 1, (1,), generator=g)),),
                               generator=g).tolist()
        responses = [torch.randint(3, 512, (int(torch.randint(60, 101, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(k)]
        out.append(StepBatch([prompt] * k, responses, rewards=torch.randn(k, generator=g, dtype=torch.float64),
                             ref_logps=-300 - 10 * torch.rand(k, generator=g, dtype=torch.float64),
                             group_index=torch.zeros(k, dtype=torch.long), n_groups=1))
    return out


def train_steps(model_path: str, variant: str, args: dict, weights_out: str) -> dict:
    """In a fresh process: load the model, run ``steps`` train steps the ``variant`` way, save the weights."""
    import torch
    from safetensors.torch import save_file

    from gvpo_offline.model.loading import load_model
    from gvpo_offline.stages.train.optimizer import adamw
    from gvpo_offline.stages.train.recipe import _clip
    from gvpo_offline.stages.train.step import gvpo_backward

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    model = load_model(model_path, torch.device("cpu"), torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "old":
        optimizer = torch.optim.AdamW(params, lr=args["lr"], weight_decay=0.0)  # the recipe's default --weight-decay
    else:
        optimizer = adamw(params, args["lr"], 0.0, sharded=False)
    batches = synthetic_batches(args["steps"], args["k"], args["prompt_min"], args["prompt_max"])
    before, cpu0 = rss_mb(), cpu_seconds()
    for batch in batches:
        if variant == "old":
            optimizer.zero_grad(set_to_none=True)  # freed at the start of the next step
        gvpo_backward(model, batch, 0.1, args["micro_batch_tokens"])
        _clip(params, 1.0)
        optimizer.step()
        if variant == "new":
            optimizer.zero_grad(set_to_none=True)  # freed right after the step
    cpu = (cpu_seconds() - cpu0) / len(batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, weights_out)  # after the peak
    return {"before_mb": before, "peak_mb": peak, "rise_mb": peak - before, "cpu_s_per_step": cpu,
            "fused": bool(optimizer.param_groups[0]["fused"])}


def spawn(fn, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def weight_difference(a_path: Path, b_path: Path, start_path: Path) -> tuple[float, float]:
    """(largest |a − b| in float32 ulps of its tensor's largest |weight|, largest |a − b| / largest |a − start|
    of its tensor: the difference as a fraction of what the steps changed)."""
    import torch
    from safetensors.torch import load_file

    a, b, start = load_file(a_path), load_file(b_path), load_file(start_path)
    eps = torch.finfo(torch.float32).eps
    ulps = max(((a[n] - b[n]).abs().max() / (eps * a[n].abs().max())).item() for n in a)
    of_change = max(((a[n] - b[n]).abs().max() / (a[n] - start[n]).abs().max().clamp_min(1e-30)).item() for n in a)
    return ulps, of_change


def pipeline(src: Path, model: Path, data: Path, workdir: Path, threads: int) -> dict:
    """vs_trl.run_ours in a fresh interpreter that imports the package from ``src``."""
    code = ("import json, sys; import vs_trl; "
            f"print('RESULT', json.dumps(vs_trl.run_ours({str(model)!r}, {str(data)!r}, {str(workdir)!r}, 1, {threads})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "benchmarks")]),
           "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"run_ours with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def status_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MB."""
    with open("/proc/self/status") as f:
        values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return values["VmRSS"], values["VmHWM"]


def timeline(model: str, data: str, workdir: str, threads: int, modules_out: str) -> None:
    """In a fresh process: run_ours' precompute-ref + train, printing VmRSS/VmHWM at each stage boundary."""
    import io

    import datasets  # noqa: F401 - the imports run_ours makes before its clock
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.stages import reference
    from gvpo_offline.stages.train import recipe
    from gvpo_offline.stages.train.config import TrainConfig

    def mark(label: str) -> None:
        rss, hwm = status_mb()
        print(f"  {label:<40} VmRSS {rss:7.0f} MB   VmHWM {hwm:7.0f} MB", flush=True)

    def around(module, name: str, times: int) -> None:
        inner, seen = getattr(module, name), [0]

        def wrapped(*args, **kw):
            if seen[0] >= times:
                return inner(*args, **kw)
            mark(f"> {name} {seen[0] + 1}")
            out = inner(*args, **kw)
            mark(f"< {name} {seen[0] + 1}")
            seen[0] += 1
            return out
        setattr(module, name, wrapped)

    torch.set_num_threads(threads)
    mark("after imports")
    before = set(sys.modules)
    reference.precompute(reference.PrecomputeConfig(
        data=DataConfig((data,), "grouped"), model=model, workdir=Path(workdir), eval_fraction=0.0,
        tokenize=TokenizeConfig(max_length=2048, max_prompt_length=1536), batch_tokens=2048, device="cpu",
        progress=False), Console(file=io.StringIO()))
    mark("after precompute-ref")
    Path(modules_out).write_text("\n".join(sorted(set(sys.modules) - before)))
    around(recipe, "load_model", 1)
    around(recipe, "gvpo_backward", 2)
    step = torch.optim.AdamW.step
    count = [0]

    def adamw_step(self, *args, **kw):
        count[0] += 1
        if count[0] > 2:
            return step(self, *args, **kw)
        mark(f"> AdamW step {count[0]}")
        out = step(self, *args, **kw)
        mark(f"< AdamW step {count[0]}")
        return out
    torch.optim.AdamW.step = adamw_step
    recipe.train(TrainConfig(workdir=Path(workdir), beta=0.1, groups_per_step=1, micro_batch_tokens=2048,
                             save_every=0, progress=False, device="cpu", epochs=1), log=lambda _m: None)
    mark("after train (peak = VmHWM)")


def import_cost(modules_file: str) -> tuple[float, int]:
    """In a fresh process, after run_ours' imports: the VmRSS that importing the listed modules adds (MB)."""
    import contextlib
    import importlib

    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from gvpo_offline.stages import reference  # noqa: F401
    from gvpo_offline.stages.train import recipe  # noqa: F401

    names = Path(modules_file).read_text().split()
    before = status_mb()[0]
    for name in names:
        with contextlib.suppress(Exception):  # a module that only imports in its own context: skipped
            importlib.import_module(name)
    return status_mb()[0] - before, len(names)


def ratio_rows(rows: list[tuple[str, dict, dict]]) -> list[str]:
    lines = ["| measure | old | new | new / old |", "|---|---|---|---|"]
    for name, old, new in rows:
        for key, label in (("before_mb", "VmRSS before (MB)"), ("base_mb", "VmRSS after imports (MB)"),
                           ("peak_mb", "peak RSS (MB)"), ("rise_mb", "RSS rise (MB)"),
                           ("cpu_s_per_step", "CPU s per step"), ("epoch", "one-epoch CPU s")):
            if key in old:
                lines.append(f"| {name}: {label} | {old[key]:,.2f} | {new[key]:,.2f} | **{new[key] / old[key]:.2f}×** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt-min", type=int, default=250)
    parser.add_argument("--prompt-max", type=int, default=400)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="a tiny model (vocabulary 1,000): seconds, to check it runs")
    parser.add_argument("--pipeline", action="store_true", help="also precompute + one epoch, --old-rev against now")
    parser.add_argument("--timeline", action="store_true", help="only: VmRSS at each stage of precompute + train")
    parser.add_argument("--old-rev", default="59b08a1", help="the git revision whose src/ is 'old' in --pipeline")
    args = parser.parse_args()
    shape = dict(FULL, hidden=64, layers=1, intermediate=128, vocab=1000) if args.small else FULL
    settings = {"steps": args.steps, "k": args.k, "prompt_min": args.prompt_min, "prompt_max": args.prompt_max,
                "micro_batch_tokens": args.micro_batch_tokens, "lr": args.lr, "threads": args.threads}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_model(tmp / "model", shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"])
        print(f"{started}: Llama d={shape['hidden']} L={shape['layers']} V={shape['vocab']:,} ({n / 1e6:.1f}M "
              f"parameters), fp32, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.timeline:
            from transformers import AutoTokenizer

            data = tmp / "data.jsonl"
            groups = 2 if args.small else 8
            write_groups(data, AutoTokenizer.from_pretrained(tmp / "model"), groups, args.k,
                         args.prompt_min, args.prompt_max, 5 if args.small else 60)
            print(f"precompute-ref + one epoch of train, {groups} groups of k = {args.k}, this working tree:")
            spawn(timeline, str(tmp / "model"), str(data), str(tmp / "workdir"), args.threads, str(tmp / "modules"))
            added, count = spawn(import_cost, str(tmp / "modules"))
            from collections import Counter

            packages = Counter(".".join(m.split(".")[:2]) for m in (tmp / "modules").read_text().split())
            print(f"the {count} modules precompute-ref imported, imported alone after the same imports: "
                  f"+{added:.0f} MB VmRSS; most: " + ", ".join(f"{p} ({n})" for p, n in packages.most_common(8)))
            return
        step = {v: spawn(train_steps, str(tmp / "model"), v, settings, str(tmp / f"{v}.safetensors"))
                for v in ("old", "new")}
        for v in ("old", "new"):  # one step only: the same gradients go into both variants' AdamW
            spawn(train_steps, str(tmp / "model"), v, {**settings, "steps": 1}, str(tmp / f"{v}-step1.safetensors"))
        start = tmp / "model" / "model.safetensors"
        diff = {name: weight_difference(tmp / f"old{name}.safetensors", tmp / f"new{name}.safetensors", start)
                for name in ("-step1", "")}
        rows.append((f"train step ({args.steps} steps, k = {args.k})", step["old"], step["new"]))
        if args.pipeline:
            from transformers import AutoTokenizer

            old_src = tmp / "old"
            old_src.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_rev, "src"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
            data = tmp / "data.jsonl"
            groups = 2 if args.small else 8
            write_groups(data, AutoTokenizer.from_pretrained(tmp / "model"), groups, args.k,
                         args.prompt_min, args.prompt_max, 5 if args.small else 60)
            runs = {v: pipeline(src, tmp / "model", data, tmp / f"workdir-{v}", args.threads)
                    for v, src in (("old", old_src / "src"), ("new", ROOT / "src"))}
            for r in runs.values():
                r["epoch"] = r["precompute"] + r["train"]
            rows.append((f"precompute + train ({groups} groups, k = {args.k})", runs["old"], runs["new"]))
    print(f"\nold: torch's default AdamW, gradients freed at the next step{'; pipeline: src/ at ' + args.old_rev if args.pipeline else ''}")
    print(f"new: fused AdamW (fused={step['new']['fused']}), gradients freed after the step, heap trimmed after precompute-ref\n")
    print("\n".join(ratio_rows(rows)))
    print("\nweights, new vs old: largest difference in float32 ulps of its tensor's largest weight, and as a "
          "fraction of that tensor's largest change over the steps:")
    print(f"  after step 1 (the same gradients into both AdamWs): {diff['-step1'][0]:.1f} ulps, {diff['-step1'][1]:.1e}")
    print(f"  after step {args.steps} (step 1's rounding fed back through the gradients; Adam's g/√v enlarges it where "
          f"g ≈ 0): {diff[''][0]:.1f} ulps, {diff[''][1]:.1e}")


if __name__ == "__main__":
    main()
