"""The `gvpo-offline` command line: a thin typer layer that parses options and calls the stages.

Every user-facing failure is a GvpoError: printed as one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from gvpo_offline.runtime.config_file import ConfigCommand
from gvpo_offline.runtime.errors import GvpoError

app = typer.Typer(
    name="gvpo-offline",
    help="Offline GVPO post-training: precompute-ref -> train -> eval on prompts with k>=2 scored responses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: "[default: …]" in help texts stays text, no <type> tags
)
console = Console(stderr=True)

THREADS = "CPU threads for the model: 1 on the CPU by default (fastest for these small batches, and bit-identical reruns), torch's default on a GPU; OMP_NUM_THREADS when set; 0 = one per core. Resume with the same value."
TRUST_REMOTE_CODE = "Run the model's own Python code from its folder or hub repo (models whose architecture transformers lacks); only for code you trust."


def _print_version(value: bool) -> None:
    if value:
        from gvpo_offline import __version__

        typer.echo(f"gvpo-offline {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
) -> None:
    """Offline GVPO post-training: precompute-ref -> train -> eval on prompts with k>=2 scored responses."""


# ---- commands ------------------------------------------------------------------------------------
# Each command parses options into the stage's config dataclass and calls the stage. Keep them thin.


@app.command("sample", cls=ConfigCommand)
def sample_cmd(
    prompts: Annotated[str, typer.Argument(metavar="PROMPTS", hidden=True)],
    model: Annotated[str, typer.Option("--model", metavar="PATH", help="Model to sample from: a local model folder, a LoRA adapter folder, or a hub id org/name[@revision] (from the Hugging Face cache; downloaded when missing and the hub is reachable).")],
    reward: Annotated[str, typer.Option("--reward", metavar="MODULE:FUNCTION", help="module:function or path/to/file.py:function, called as fn(prompt, response, **fields) -> float with the prompt row's fields it names, e.g. def correct(prompt, response, ground_truth); checked before the model loads.")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH", help="Grouped JSONL to append to (resumes if it exists; the settings are kept in PATH.settings.json and an output made with others is refused).")],
    k: Annotated[Optional[int], typer.Option("--k", metavar="INT", help="Responses per prompt.")] = None,
    k_range: Annotated[Optional[str], typer.Option("--k-range", metavar="A:B", help="A:B, k per prompt drawn from [A, B] by seed and index.")] = None,
    temperature: Annotated[float, typer.Option(metavar="FLOAT", help="Sampling temperature (0 = greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", metavar="FLOAT", help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="INT", help="Most tokens generated per response.")] = 128,
    seed: Annotated[int, typer.Option(metavar="INT", help="Seed for sampling and for k per prompt.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="INT", help="Rows per generate call.")] = 32,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="auto, float32, bfloat16.")] = "auto",
    max_length: Annotated[int, typer.Option("--max-length", metavar="INT", help="Prompt + response tokens.")] = 1024,
    max_prompt_length: Annotated[int, typer.Option("--max-prompt-length", metavar="INT", help="Prompt tokens kept (from the end).")] = 512,
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template", metavar="TEMPLATE|FILE", help="Jinja chat template (or file) for message prompts.")] = None,
    reward_timeout: Annotated[Optional[float], typer.Option("--reward-timeout", metavar="SECONDS", help="Seconds a reward call may take before it counts as failed (default: no limit).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="INT", help=THREADS, show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE)] = False,
) -> None:
    """Generate k responses per prompt, score them with a reward and write grouped JSONL."""
    from gvpo_offline.model.distributed import single_process_only

    single_process_only("sample")
    from gvpo_offline.model.threads import apply_threads

    apply_threads(threads, device)
    from gvpo_offline.data.tokenize import TokenizeConfig, load_prompt_template
    from gvpo_offline.stages.sample import SampleConfig, SamplingConfig, parse_k_range, sample

    config = SampleConfig(
        prompts_path=prompts, model_path=model, reward=reward, output=output, k=k,
        k_range=parse_k_range(k_range) if k_range is not None else None,
        sampling=SamplingConfig(temperature, top_p, max_new_tokens, seed, batch_size),
        tokenize=TokenizeConfig(max_length, max_prompt_length, True, load_prompt_template(prompt_template)),
        device=device, dtype=dtype, trust_remote_code=trust_remote_code, reward_timeout=reward_timeout,
    )
    result = sample(config, progress_console=console)
    note = f" ({result.skipped} already there)" if result.skipped else ""
    dropped = f"; {result.empty_responses} empty responses dropped" if result.empty_responses else ""
    if result.unscorable:
        dropped += (f"; skipped {result.unscorable} prompts the reward could not score (first: "
                    f"{result.first_unscorable})")
    console.print(f"wrote {result.written} groups to {output}{note}{dropped}", highlight=False, soft_wrap=True, markup=False)
    if result.equal_rewards * 2 > result.written:
        console.print(f"warning: {result.equal_rewards} of {result.written} groups have all-equal rewards: no ranking "
                      "signal for GVPO there (a reward too coarse for these prompts, or k too small)",
                      style="yellow", highlight=False, soft_wrap=True, markup=False)


@app.command("precompute-ref", cls=ConfigCommand)
def precompute_ref_cmd(
    data: Annotated[list[str], typer.Argument(metavar="DATA", hidden=True)],
    model: Annotated[str, typer.Option("--model", metavar="PATH", help="The reference model: a local model folder, a LoRA adapter folder, or a hub id org/name[@revision] (from the Hugging Face cache; downloaded when missing and the hub is reachable).")],
    workdir: Annotated[str, typer.Option("--workdir", metavar="PATH", help="Where the cache goes.")] = "gvpo-run",
    layout: Annotated[str, typer.Option("--layout", metavar="LAYOUT", help="auto (from the columns), grouped (prompt, responses, rewards, id) or flat (prompt, response, reward, group_id).")] = "auto",
    prompt_col: Annotated[Optional[str], typer.Option("--prompt-col", metavar="COLUMN", help="Prompt column (default: prompt).")] = None,
    response_col: Annotated[Optional[str], typer.Option("--response-col", metavar="COLUMN", help="Response column: the list of responses (grouped) or one response (flat).")] = None,
    reward_col: Annotated[Optional[str], typer.Option("--reward-col", metavar="COLUMN", help="Reward column: the list of rewards (grouped) or one reward (flat).")] = None,
    group_col: Annotated[Optional[str], typer.Option("--group-col", metavar="COLUMN", help="Group id column (default: id for grouped, group_id for flat; else derived from the prompt).")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", metavar="FLOAT", help="Groups held out as eval, by a stable hash of the prompt.")] = 0.1,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", metavar="PATH", help="Held-out data instead of --eval-fraction (repeat for several files).")] = None,
    max_length: Annotated[int, typer.Option("--max-length", metavar="INT", help="Prompt + response tokens (clamped to the model's context).")] = 1024,
    max_prompt_length: Annotated[int, typer.Option("--max-prompt-length", metavar="INT", help="Prompt tokens kept (from the end).")] = 512,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Do not append EOS to responses.")] = False,
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template", metavar="TEMPLATE|FILE", help="Jinja chat template (or file) for message prompts.")] = None,
    shard_groups: Annotated[int, typer.Option("--shard-groups", metavar="INT", help="At most this many groups per cache shard.")] = 1000,
    shard_bytes: Annotated[Optional[int], typer.Option("--shard-bytes", metavar="INT", help="At most this much text per cache shard (UTF-8 bytes of every response with its prompt, ~4 per token), so that Ctrl-C loses about a minute of work [default: from the model's size: 0.5 MB for stories260K, 64 KB from ~500M parameters up]. Both limits are in the cache key: changing one recomputes.", show_default=False)] = None,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", metavar="INT", help="Tokens per forward pass (rows × longest row) [default: 16384 on GPU, 2048 on CPU].")] = None,
    packing: Annotated[str, typer.Option("--packing", metavar="MODE", help="on: each prompt computed once for all its responses, in rows packed without padding (padded rows, with a note, for unsupported models); off: padded separate sequences, batched by length; auto: packed when sharing the prompt saves at least 15% of the tokens (long prompts, many responses). Train and eval follow the cache's setting.")] = "auto",
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="Weights dtype: the model is loaded directly in it (no float32 copy) and runs in it. auto = bfloat16 on a GPU that supports it, float32 otherwise. Recorded in the manifest: train runs the policy in the same weights dtype, so ℓ = 0 at step 0.")] = "auto",
    no_overwrite: Annotated[bool, typer.Option("--no-overwrite", help="Refuse to replace a cache made from other inputs.")] = False,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Score with the model's weights in 4-bit NF4 (bitsandbytes, CUDA only: pip install 'gvpo-offline[qlora]'), for train --load-in-4bit (QLoRA): the same quantised base on both sides, so ℓ = 0 at step 0. Recorded in the manifest.")] = False,
    shard_model: Annotated[str, typer.Option("--shard-model", metavar="MODE", help="Under torchrun: on shards the model over the processes (FSDP forward passes, for a model too big for one device), off gives each process the whole model, auto shards when its weights (in the weights dtype) do not fit one device.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="INT", help=THREADS, show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory plan of scoring the model whole and sharded over the processes (--shard-model), from config.json (no weight read, nothing written), and whether each fits, then exit. The weights dtype: --dtype.")] = False,
    plan_processes: Annotated[Optional[int], typer.Option("--plan-processes", metavar="INT", help="With --dry-run: plan for a launch of this many processes (GPUs) in all [default: this launch's].", show_default=False)] = None,
    plan_processes_per_node: Annotated[Optional[int], typer.Option("--plan-processes-per-node", metavar="INT", help="With --dry-run on CPU: processes sharing one machine's RAM [default: all].", show_default=False)] = None,
    plan_gpu_memory: Annotated[Optional[float], typer.Option("--plan-gpu-memory", metavar="GIB", help="With --dry-run: plan for GPUs with this many GiB free each, instead of this machine's device.", show_default=False)] = None,
) -> None:
    """Compute log pi_ref(y|x) of every response once and cache it in WORKDIR (train and eval read it).

    DATA: .jsonl, .jsonl.gz, .json, .parquet files, folders or globs, or a datasets.save_to_disk folder.
    """
    from pathlib import Path

    from gvpo_offline.data import ColumnMap, DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig, load_prompt_template
    from gvpo_offline.stages.reference.config import PrecomputeConfig
    from gvpo_offline.stages.reference.hit import cache_hit
    from gvpo_offline.stages.scoring_dry_run import planned

    if planned("precompute-ref", dry_run, model, dtype, device, batch_tokens, plan_processes, plan_processes_per_node,
               plan_gpu_memory, trust_remote_code):  # --dry-run: the plan printed, nothing else done
        return
    config = PrecomputeConfig(
        data=DataConfig(tuple(data), layout, ColumnMap(prompt_col, response_col, reward_col, group_col)),
        model=model, workdir=Path(workdir),
        tokenize=TokenizeConfig(max_length, max_prompt_length, not no_eos, load_prompt_template(prompt_template)),
        eval_fraction=eval_fraction, eval_data=tuple(eval_data or ()), shard_groups=shard_groups, shard_bytes=shard_bytes,
        batch_tokens=batch_tokens, packing=packing, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        overwrite=not no_overwrite, load_in_4bit=load_in_4bit, shard_model=shard_model,
    )
    if cache_hit(config, console) is None:  # a hit imports neither torch nor transformers
        from gvpo_offline.model.threads import apply_threads
        from gvpo_offline.stages.reference.compute import precompute

        apply_threads(threads, device)
        precompute(config, console)


@app.command("train", cls=ConfigCommand)
def train_cmd(
    beta: Annotated[float, typer.Option("--beta", metavar="FLOAT", help="KL strength β > 0. The target is π* ∝ πref·exp(R/β): a reward gap ΔR between two responses becomes a log-prob gap ΔR/β, so pick β on the scale of the reward differences (small β: far from πref; large β: close to it).")],
    workdir: Annotated[str, typer.Option("--workdir", metavar="PATH", help="The precompute-ref workdir; checkpoints, metrics.jsonl and model/ go here too (or into WORKDIR/runs/NAME/ with --run).")] = "gvpo-run",
    run: Annotated[Optional[str], typer.Option("--run", metavar="NAME", help="A named run over the workdir's cache: its checkpoints/, metrics.jsonl, model/ (with its card) and train_config.json go to WORKDIR/runs/NAME/, so several runs (a β sweep, other --loss) share one cache. Locked per run; an earlier run of the same name is only replaced with --overwrite.", show_default=False)] = None,
    loss: Annotated[str, typer.Option("--loss", metavar="LOSS", help="Objective on the same groups: gvpo, or the baselines dpo, ipo (every pair with different rewards; on sequence log-ratios, summed over tokens), ipo-trl (ipo as TRL computes it: each log-ratio divided by its response length, so β is on a per-token scale), rebel (all pairs; = 2 × gvpo), sft-best (NLL of each group's best response).")] = "gvpo",
    init_model: Annotated[Optional[str], typer.Option("--init-model", metavar="PATH", help="Start from this model (a folder, e.g. an SFT checkpoint, or a hub id org/name[@revision]) instead of the reference; same tokenizer required.")] = None,
    groups_per_step: Annotated[int, typer.Option("--groups-per-step", metavar="INT", help="Prompts (whole groups) per optimizer step.")] = 8,
    micro_batch_tokens: Annotated[Optional[int], typer.Option("--micro-batch-tokens", metavar="INT", help="Tokens per forward pass, rows × longest row (memory bound; default 8192 on GPU, 2048 on CPU, where small batches run faster); a step that does not fit is split with the exact same gradient.", show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", "--learning-rate", metavar="FLOAT", help="Peak AdamW learning rate: about the size of each weight's update per step. 1e-6 suits billion-parameter LLMs; tiny models need far more (the stories260K quick start uses 2e-4). Try a few values on a short run and watch the loss in metrics.jsonl and the drift (mean ℓ per token) in eval. The authors' verl objective is (m/(2n))× ours per step (×2 for their script); under AdamW a constant factor mostly cancels, so their learning rates carry over.")] = 1e-6,
    weight_decay: Annotated[float, typer.Option("--weight-decay", metavar="FLOAT", help="AdamW decoupled weight decay (pulls weights toward 0, not toward the reference; the β·ℓ term already regularises).")] = 0.0,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", metavar="FLOAT", help="Fraction of steps with linear warmup; cosine decay after.")] = 0.1,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", metavar="FLOAT", help="Clip the gradient norm to this (0 = off). |g| in the log is the norm before clipping; with AdamW, clipping re-weights steps against each other rather than shrinking the update, and the end of train reports how many steps were clipped.")] = 1.0,
    epochs: Annotated[int, typer.Option("--epochs", "--num-train-epochs", metavar="INT", help="Passes over the cached train split (each reshuffled by --seed).")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", metavar="INT", help="Total optimizer steps; overrides --epochs.")] = None,
    seed: Annotated[int, typer.Option(metavar="INT", help="Seed of the per-epoch shuffle of the groups.")] = 0,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="Weights dtype of the policy's forward pass: auto = the cache's (precompute-ref --dtype), the only one accepted, so ℓ = 0 at step 0. Full fine-tuning in bfloat16 keeps float32 master weights for AdamW.")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute decoder layers in the backward pass (less memory, slower).")] = False,
    packing: Annotated[Optional[str], typer.Option("--packing", metavar="MODE", help="auto, on or off (see precompute-ref); default: the reference cache's setting, so policy and reference share one path.", show_default=False)] = None,
    cpu_offload: Annotated[bool, typer.Option("--cpu-offload", help="Under torchrun on GPUs: keep the FSDP shards, gradients and AdamW state in CPU RAM (slower, fits larger models).")] = False,
    hsdp: Annotated[str, typer.Option("--hsdp", metavar="MODE", help="Under torchrun: on shards the model within each node and replicates it across nodes (HSDP: layer all-gathers stay inside a node; gradients are all-reduced across nodes); off shards over all processes; auto: on when the job spans several nodes.")] = "auto",
    report_to: Annotated[Optional[list[str]], typer.Option("--report-to", metavar="TARGET", help="none, tensorboard (WORKDIR/tb/), wandb (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME honoured), mlflow (MLFLOW_TRACKING_URI, default a file store in WORKDIR/mlruns); repeat or comma-separate for several. Tags: train/loss, train/grad_norm, train/lr, ...")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", metavar="NAME", help="The tracker run's name [default: WANDB_NAME, else the workdir's folder name].", show_default=False)] = None,
    save_every: Annotated[int, typer.Option("--save-every", metavar="INT", help="Checkpoint every N steps into WORKDIR/checkpoints/ (0 = never).")] = 500,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", metavar="INT", help="How many of the newest checkpoints to keep.")] = 2,
    resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from the latest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run's WORKDIR/model and metrics.jsonl (refused otherwise).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="INT", help=THREADS, show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE)] = False,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", metavar="INT", help="Train a LoRA adapter of rank R on the frozen model (peft) instead of all weights; WORKDIR/model/ is then a PEFT adapter folder.", show_default=False)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", metavar="FLOAT", help="LoRA scale numerator α (scale α/r) [default: r].", show_default=False)] = None,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", metavar="FLOAT", help="Dropout on the LoRA input while training (the rest of the model stays in eval mode). ℓ = 0 at step 0 still (B = 0), but each later log-prob and gradient is a random draw: noisier GVPO gradients, and a group split over micro-batches gets its weights from another draw than its gradient. 0 keeps training deterministic.")] = 0.0,
    lora_target: Annotated[str, typer.Option("--lora-target", "--lora-target-modules", metavar="TEXT", help="Layers that get LoRA: all-linear (every linear layer but the LM head), module names (a name matches the end of a module's name), e.g. q_proj,v_proj, or a regular expression the whole module name must match, e.g. '.*layers\\.[0-9]\\..*(q|v)_proj'. --lora-target-modules is the old name.")] = "all-linear",
    use_rslora: Annotated[bool, typer.Option("--use-rslora", help="With --lora-r: rank-stabilised LoRA, scale α/√r instead of α/r (keeps the update's size as r grows).")] = False,
    use_dora: Annotated[bool, typer.Option("--use-dora", help="With --lora-r: DoRA, LoRA on the direction of each weight plus a trained magnitude (slower per step; ℓ = 0 at step 0 to rounding).")] = False,
    modules_to_save: Annotated[Optional[str], typer.Option("--modules-to-save", metavar="NAMES", help="With --lora-r: modules trained in full and saved in the adapter folder, e.g. lm_head or embed_tokens,lm_head.", show_default=False)] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="QLoRA: with --lora-r, hold the frozen base in 4-bit NF4 (bitsandbytes, CUDA only: pip install 'gvpo-offline[qlora]'). The reference cache must come from precompute-ref --load-in-4bit, so that ℓ = 0 at step 0.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="With --lora-r: also write WORKDIR/model-merged/, the adapter merged into the base weights, saved in the base checkpoint's own dtype (a plain transformers model). Refused with --load-in-4bit.")] = False,
    base_dtype: Annotated[Optional[str], typer.Option("--base-dtype", metavar="TEXT", help="With --lora-r: the frozen base weights' dtype, float32 or bfloat16; it must be the cache's weights dtype (precompute-ref --dtype), the default. The adapter and its optimizer state stay float32.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory plan (from config.json: no weight read, nothing written) and whether it fits, then exit. The model: --init-model (a folder with only a config.json will do) or WORKDIR's reference.")] = False,
    plan_processes: Annotated[Optional[int], typer.Option("--plan-processes", metavar="INT", help="With --dry-run: plan for a launch of this many processes (GPUs) in all [default: this launch's].", show_default=False)] = None,
    plan_processes_per_node: Annotated[Optional[int], typer.Option("--plan-processes-per-node", metavar="INT", help="With --dry-run: processes per node (machine): on CPU they share its RAM; fewer than --plan-processes plans the several nodes' HSDP run (--hsdp auto), each node holding the whole training state [default: all].", show_default=False)] = None,
    plan_gpu_memory: Annotated[Optional[float], typer.Option("--plan-gpu-memory", metavar="GIB", help="With --dry-run: plan for GPUs with this many GiB free each, instead of this machine's device.", show_default=False)] = None,
) -> None:
    """Train the policy with GVPO (or --loss) on the cached train split; the final model goes to WORKDIR/model/.

    The log shows per step the loss, |g| (gradient norm before clipping), the learning rate and tokens/s;
    without a terminal, a plain line every GVPO_LOG_EVERY seconds (default 30).
    """
    from pathlib import Path

    from gvpo_offline.model.adapters import LoraSettings, parse_modules
    from gvpo_offline.model.threads import apply_threads
    from gvpo_offline.runtime import config_file, tracking
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    if lora_r is None and (lora_alpha is not None or lora_dropout or lora_target != "all-linear" or use_rslora
                           or use_dora or modules_to_save):
        raise GvpoError("--lora-alpha, --lora-dropout, --lora-target, --use-rslora, --use-dora and "
                        "--modules-to-save need --lora-r")
    lora = (LoraSettings(lora_r, lora_alpha, lora_dropout, lora_target, use_rslora, use_dora,
                         parse_modules(modules_to_save)) if lora_r is not None else None)
    config = TrainConfig(
        workdir=Path(workdir), beta=beta, loss=loss, init_model=init_model, groups_per_step=groups_per_step,
        micro_batch_tokens=micro_batch_tokens, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm, epochs=epochs, max_steps=max_steps, seed=seed, device=device, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, cpu_offload=cpu_offload, hsdp=hsdp, save_every=save_every,
        keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite, trust_remote_code=trust_remote_code,
        packing=packing, lora=lora, merge=merge, base_dtype=base_dtype, load_in_4bit=load_in_4bit, run=run,
    )
    log = lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    if dry_run:
        from gvpo_offline.stages.train.dry_run import dry_run as plan_only

        plan_only(config, print, plan_processes, plan_processes_per_node, plan_gpu_memory)  # the output: stdout
        return
    if plan_processes is not None or plan_processes_per_node is not None or plan_gpu_memory is not None:
        raise GvpoError("--plan-processes, --plan-processes-per-node and --plan-gpu-memory need --dry-run")
    apply_threads(threads, device)
    backends = tracking.parse_report_to(report_to)
    config_file.set_resolved("report_to", list(backends) or None)  # stored split: ['tensorboard', 'wandb']
    with tracking.Tracker(backends, config.run_dir, config_file.resolved_options(), run_name or run,
                          continue_run=resume, record_ids=True) as tracker:
        train(config, log=log, on_step=tracker)
    config_file.write_resolved(config.run_dir / "train_config.json")  # the full run, reusable as --config


@app.command("eval", cls=ConfigCommand)
def eval_cmd(
    workdir: Annotated[str, typer.Option("--workdir", metavar="PATH", help="The precompute-ref/train workdir.")] = "gvpo-run",
    model: Annotated[Optional[str], typer.Option("--model", metavar="PATH", help="Model to evaluate (default WORKDIR/model): a model or LoRA adapter folder, a checkpoint, or a hub id org/name[@revision]; the reference itself gives the neutral baseline.")] = None,
    run: Annotated[Optional[str], typer.Option("--run", metavar="NAME", help="Evaluate the named run's model, WORKDIR/runs/NAME/model (train --run).", show_default=False)] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", metavar="PATH", help="Evaluate these files instead of the cached eval split (reference log-probs computed once and cached in WORKDIR/extra/). Repeatable.")] = None,
    json_path: Annotated[Optional[str], typer.Option("--json", "--output", "-o", metavar="PATH", help="Also write the metrics as JSON (stable key names) to this file.")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", metavar="FLOAT", help="β; default: MODEL/train_config.json's (required when there is none).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", metavar="INT", help="Bootstrap resamples over groups for the 95% intervals (0 = none).")] = 1000,
    seed: Annotated[int, typer.Option(metavar="INT", help="Seed for the bootstrap and for sampling.")] = 0,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", metavar="INT", help="Tokens per forward pass, rows × longest row (default 16384 on GPU, 2048 on CPU).", show_default=False)] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option(metavar="DTYPE", help="Weights dtype the model is loaded and run in: float32, bfloat16, auto (default: the cache's, as train used).")] = None,
    packing: Annotated[Optional[str], typer.Option("--packing", metavar="MODE", help="auto, on or off (see precompute-ref); default: the reference cache's setting.", show_default=False)] = None,
    layout: Annotated[str, typer.Option("--layout", metavar="LAYOUT", help="--data layout: auto, grouped or flat.")] = "auto",
    prompt_col: Annotated[Optional[str], typer.Option("--prompt-col", metavar="COLUMN", help="Prompt column of --data and field of --prompts (default: prompt).", show_default=False)] = None,
    response_col: Annotated[Optional[str], typer.Option("--response-col", metavar="COLUMN", help="Response column of --data: the list of responses (grouped) or one response (flat).")] = None,
    reward_col: Annotated[Optional[str], typer.Option("--reward-col", metavar="COLUMN", help="Reward column of --data: the list of rewards (grouped) or one reward (flat).")] = None,
    group_col: Annotated[Optional[str], typer.Option("--group-col", metavar="COLUMN", help="Group id column of --data (default: id for grouped, group_id for flat; else derived from the prompt).")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", metavar="PATH|eval", help="Generation eval: eval (the workdir's held-out prompts, with their rows' other fields, e.g. ground_truth), .txt (one prompt per line) or JSONL with a \"prompt\" field (or --prompt-col; data files work; the other fields go to the reward).")] = None,
    reward: Annotated[Optional[str], typer.Option("--reward", metavar="MODULE:FUNCTION", help="Generation eval: module:function or file.py:function, called as fn(prompt, response, **fields) -> float with the prompt row's fields it names, e.g. def correct(prompt, response, ground_truth); checked against the rows' fields before any model work.")] = None,
    samples_out: Annotated[Optional[str], typer.Option("--samples-out", metavar="FILE.jsonl", help="Generation eval: write every sample (prompt, model trained/reference, model_path, sample_index, sample, reward) to this JSONL.", show_default=False)] = None,
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", metavar="INT", help="Generation eval: responses sampled per prompt from each model.")] = 4,
    temperature: Annotated[float, typer.Option(metavar="FLOAT", help="Generation eval: sampling temperature (0 = greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", metavar="FLOAT", help="Generation eval: nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="INT", help="Generation eval: most tokens generated per response.")] = 128,
    reward_timeout: Annotated[Optional[float], typer.Option("--reward-timeout", metavar="SECONDS", help="Seconds a reward call may take before it counts as failed (default: no limit).")] = None,
    shard_model: Annotated[str, typer.Option("--shard-model", metavar="MODE", help="Under torchrun: on shards the model over the processes (FSDP forward passes, for a model too big for one device), off gives each process the whole model, auto shards when its weights (in the weights dtype) do not fit one device.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="INT", help=THREADS, show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE)] = False,
    report_to: Annotated[Optional[list[str]], typer.Option("--report-to", metavar="TARGET", help="Also log the metrics (eval/<metric>, eval/delta/<metric>, eval/generation/...) at the model's final training step to none, tensorboard, wandb, mlflow (as train --report-to; a model of WORKDIR logs into train's runs).")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", metavar="NAME", help="The tracker run's name when eval starts a new run [default: WANDB_NAME, else the workdir's folder name].", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory plan of scoring the model whole and sharded over the processes (--shard-model), from config.json (no weight read, nothing written), and whether each fits, then exit. The weights dtype: --dtype, else the cache's.")] = False,
    plan_processes: Annotated[Optional[int], typer.Option("--plan-processes", metavar="INT", help="With --dry-run: plan for a launch of this many processes (GPUs) in all [default: this launch's].", show_default=False)] = None,
    plan_processes_per_node: Annotated[Optional[int], typer.Option("--plan-processes-per-node", metavar="INT", help="With --dry-run on CPU: processes sharing one machine's RAM [default: all].", show_default=False)] = None,
    plan_gpu_memory: Annotated[Optional[float], typer.Option("--plan-gpu-memory", metavar="GIB", help="With --dry-run: plan for GPUs with this many GiB free each, instead of this machine's device.", show_default=False)] = None,
) -> None:
    """How much closer is the trained model to the GVPO target than the reference, on held-out groups."""
    from rich.console import Console as _Console

    from gvpo_offline.data import ColumnMap
    from gvpo_offline.model.threads import apply_threads
    from gvpo_offline.stages.evaluate.generation import GenerationEvalConfig
    from pathlib import Path

    from gvpo_offline.runtime import config_file, tracking
    from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate, model_step, report_table
    from gvpo_offline.stages.sample import SamplingConfig
    from gvpo_offline.stages.train.config import run_dir

    if (prompts is None) != (reward is None):
        raise GvpoError("the generation eval needs both --prompts and --reward")
    if samples_out and prompts is None:
        raise GvpoError("--samples-out needs the generation eval (--prompts and --reward)")
    generation = None
    if prompts is not None:
        sampling = SamplingConfig(temperature, top_p, max_new_tokens, seed)
        generation = GenerationEvalConfig(prompts, reward, samples_per_prompt, sampling, reward_timeout, prompt_col,
                                          samples_out)
    if run is not None:
        if model is not None:
            raise GvpoError("give --run NAME or --model PATH, not both")
        model = str(run_dir(workdir, run) / "model")
        if not Path(model).is_dir():
            raise GvpoError(f"{model}: no model here (run `gvpo-offline train --workdir {workdir} --run {run}` first)")
    from gvpo_offline.stages.scoring_dry_run import eval_model_and_dtype, planned

    plan_model, plan_dtype = eval_model_and_dtype(Path(workdir), model, dtype) if dry_run else (model, dtype)
    if planned("eval", dry_run, plan_model, plan_dtype, device, batch_tokens, plan_processes, plan_processes_per_node,
               plan_gpu_memory, trust_remote_code):
        return
    columns = ColumnMap(prompt_col, response_col, reward_col, group_col)
    config = EvalConfig(
        workdir=workdir, model_path=model, data_paths=tuple(data or ()), json_path=json_path, beta=beta,
        batch_tokens=batch_tokens, device=device, dtype=dtype, packing=packing, bootstrap=bootstrap, seed=seed,
        generation=generation, layout=layout, columns=columns, trust_remote_code=trust_remote_code,
        shard_model=shard_model,
    )
    apply_threads(threads, device)
    backends = tracking.parse_report_to(report_to)
    config_file.set_resolved("report_to", list(backends) or None)
    logdir = run_dir(workdir, run)  # where train of this run logged
    own_run = model is None or Path(model).resolve().is_relative_to(logdir.resolve())  # log into train's runs
    with tracking.Tracker(backends, logdir, config_file.resolved_options(), run_name or run, own_run) as tracker:
        report = evaluate(config, console)
        if report is None:  # not rank 0 of a torchrun launch: rank 0 reports
            return
        if backends:
            tracker.log(tracking.eval_scalars(report.to_json()), model_step(Path(report.model_path)))
    table = report_table(report)
    out = _Console()
    if not out.is_terminal:  # a file or a pipe: the table at its natural width, not wrapped at 80 columns
        out = _Console(width=_Console(width=10_000).measure(table).maximum)
    out.print(table)
    if json_path:
        console.print(f"wrote {json_path}", highlight=False, markup=False)


@app.command("inspect", cls=ConfigCommand)
def inspect_cmd(
    data: Annotated[list[str], typer.Argument(metavar="DATA", hidden=True)],
    layout: Annotated[str, typer.Option("--layout", metavar="LAYOUT", help="auto (from the columns), grouped (prompt, responses, rewards, id) or flat (prompt, response, reward, group_id).")] = "auto",
    prompt_col: Annotated[Optional[str], typer.Option("--prompt-col", metavar="COLUMN", help="Prompt column (default: prompt).")] = None,
    response_col: Annotated[Optional[str], typer.Option("--response-col", metavar="COLUMN", help="Response column: the list of responses (grouped) or one response (flat).")] = None,
    reward_col: Annotated[Optional[str], typer.Option("--reward-col", metavar="COLUMN", help="Reward column: the list of rewards (grouped) or one reward (flat).")] = None,
    group_col: Annotated[Optional[str], typer.Option("--group-col", metavar="COLUMN", help="Group id column (default: id for grouped, group_id for flat; else derived from the prompt).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", metavar="PATH", help="Model folder, adapter folder or hub id org/name[@revision]: load only its tokenizer and report token lengths.")] = None,
    max_length: Annotated[int, typer.Option("--max-length", metavar="INT", help="With --model: prompt + response tokens, for the truncation counts.")] = 1024,
    max_prompt_length: Annotated[int, typer.Option("--max-prompt-length", metavar="INT", help="With --model: prompt tokens kept, for the truncation counts.")] = 512,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="With --model: do not count an EOS token per response.")] = False,
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template", metavar="TEMPLATE|FILE", help="With --model: Jinja chat template (or file) for message prompts.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout (and nothing else).")] = False,
) -> None:
    """Validate data and summarise it: groups, k per prompt, rewards, duplicates, token lengths.

    DATA: .jsonl, .jsonl.gz, .json, .parquet files, folders or globs, or a datasets.save_to_disk folder.
    """
    from gvpo_offline.data import (
        ColumnMap,
        DataConfig,
        check_inputs,
        load_groups,
        summarize,
        summary_tables,
        token_stats,
    )

    config = DataConfig(tuple(data), layout, ColumnMap(prompt_col, response_col, reward_col, group_col))
    tokens = None
    check_inputs(config)  # a missing file or column is reported before the tokenizer loads
    if model is not None:
        from gvpo_offline.data.tokenize import (
            TokenizeConfig,
            fit_to_model,
            load_prompt_template,
            truncation_warning,
        )
        from gvpo_offline.model.loading import load_tokenizer
        from gvpo_offline.runtime.progress import progress

        cfg = TokenizeConfig(max_length, max_prompt_length, not no_eos, load_prompt_template(prompt_template))
        tokenizer = load_tokenizer(model)
        cfg, clamp_note = fit_to_model(cfg, model)  # the same rule as precompute-ref
    grouped = load_groups(config)
    if model is not None:
        from gvpo_offline.data.locate import chat_prompts_located

        with progress(console, "tokenizing", grouped.stats.n_responses, unit="responses", transient=True) as update, \
                chat_prompts_located(tuple(data), prompt_col):
            tokens = token_stats(grouped, tokenizer, cfg, lambda n: update(advance=n))
        for line in (clamp_note, truncation_warning(tokens.responses.truncated, tokens.responses.n, cfg)):
            if line:
                console.print(line, style="yellow", highlight=False, markup=False, soft_wrap=True)
    summary = summarize(grouped, tokens)
    if as_json:
        import json

        typer.echo(json.dumps(summary.to_json()))
    else:
        out = Console()
        for table in summary_tables(summary):
            out.print(table)


@app.command("convert", cls=ConfigCommand)
def convert_cmd(
    source: Annotated[str, typer.Argument(metavar="SOURCE", hidden=True)],
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH", help="Grouped-layout JSONL to write (atomically).", show_default=False)],
    input_path: Annotated[Optional[str], typer.Argument(metavar="INPUT", hidden=True)] = None,
    from_hub: Annotated[Optional[str], typer.Option("--from-hub", metavar="NAME", help="Read a Hugging Face datasets name (offline: from the local HF datasets cache) or a local dataset folder instead of INPUT.")] = None,
    split: Annotated[str, typer.Option("--split", metavar="SPLIT", help="With --from-hub: the split to read.")] = "train",
    score_field: Annotated[str, typer.Option("--score-field", metavar="FIELD", help="ultrafeedback: overall_score, fine-grained_score, helpfulness, honesty, instruction_following or truthfulness.")] = "overall_score",
    weights: Annotated[Optional[str], typer.Option("--weights", metavar="NAME=W,...", help="helpsteer2: attribute=weight pairs, e.g. helpfulness=1 (others 0) [default: helpfulness=0.3,correctness=0.74,coherence=0.46,complexity=0.47,verbosity=-0.33].", show_default=False)] = None,
) -> None:
    """Convert a public dataset to grouped-layout JSONL (prompt, responses, rewards, id).

    SOURCE: oasst (OpenAssistant trees, reward = -rank), gsm8k (example_model_solutions.jsonl, reward =
    is_correct, ground_truth kept), ultrafeedback (reward = --score-field), helpsteer2 (reward = weighted
    attributes), nectar (reward = -rank). INPUT: the dataset's .jsonl, .jsonl.gz or .parquet file (or use
    --from-hub).
    """
    from gvpo_offline.stages.convert import SOURCES, ConvertOptions, convert, parse_weights

    if source not in SOURCES:
        raise GvpoError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
    if (input_path is None) == (from_hub is None):
        raise GvpoError("convert needs either an INPUT file or --from-hub NAME (not both)")
    options = ConvertOptions(score_field, parse_weights(weights) if weights else None)
    result = convert(source, from_hub or input_path, output, options, from_hub=from_hub is not None, split=split)
    skipped = f"; skipped {result.skipped} {result.skipped_reason}" if result.skipped else ""
    console.print(f"wrote {result.groups} groups ({result.responses} responses) to {result.output}{skipped}", highlight=False, soft_wrap=True, markup=False)


@app.command("plot", cls=ConfigCommand)
def plot_cmd(
    workdir: Annotated[str, typer.Argument(metavar="WORKDIR", hidden=True)] = "gvpo-run",
    eval_json: Annotated[Optional[str], typer.Option("--eval", metavar="PATH", help="The `eval --json` file to plot [default: WORKDIR/eval.json if present].", show_default=False)] = None,
    out_dir: Annotated[Optional[str], typer.Option("--output-dir", "--out-dir", metavar="PATH", help="Where the PNGs go [default: WORKDIR/plots].", show_default=False)] = None,
    run: Annotated[Optional[list[str]], typer.Option("--run", metavar="NAME", help="A named run (train --run): plot WORKDIR/runs/NAME/ alone; repeat to overlay several runs' loss and drift in WORKDIR/plots/runs_*.png.", show_default=False)] = None,
) -> None:
    """Plot a run: loss and its eq. 17 terms, drift per token, and the eval results (PNG, needs matplotlib).

    WORKDIR: the train workdir (reads metrics.jsonl, and eval.json when there is one) [default: gvpo-run].
    """
    from gvpo_offline.stages.plot import plot_run, plot_runs
    from gvpo_offline.stages.train.config import run_dir

    runs = list(dict.fromkeys(run or ()))
    if len(runs) > 1 and eval_json:
        raise GvpoError("--eval plots one run: give one --run (or none)")
    paths = plot_runs(workdir, runs, out_dir) if len(runs) > 1 else plot_run(run_dir(workdir, runs[0] if runs else None), eval_json, out_dir)
    for path in paths:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True, markup=False)


# typer 0.26+ raises the exceptions of its own vendored click copy (typer._click), older typer those of
# click: take the classes from typer itself, so usage errors are recognised whichever it is.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_CLICK_ABORT = sys.modules[_USAGE_ERROR.__module__].__dict__.get("Abort", typer.Abort)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app. Usage errors print typer's usage message and exit 2 (no
    arguments: the help, exit 2); user errors (GvpoError) one line and exit 2; Ctrl-C 130, SIGTERM 143."""
    from gvpo_offline.runtime import interrupts

    from gvpo_offline.runtime.launcher import single_process_note

    args = _hyphenated(sys.argv[1:] if argv is None else list(argv))
    if (note := single_process_note()) is not None:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    try:
        with interrupts.installed():  # SIGINT -> 130, SIGTERM -> 143 (typer turns both into Exit(130))
            code = app(args=args or ["--help"], prog_name="gvpo-offline", standalone_mode=False)
    except GvpoError as err:
        console.print(f"error: {err}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except _USAGE_ERROR as err:  # bad option, missing option, bad value, unknown command
        _explain_unknown_option(err)
        err.show()
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, typer.Abort, _CLICK_ABORT) as exc:
        if _rank() == 0:  # torchrun sends SIGTERM to every rank: one "interrupted" per job
            console.print("interrupted", style="yellow")
        sys.exit(interrupts.exit_code(exc))
    except OSError as err:  # disk full, read-only or unreadable paths: one line naming the path
        console.print(f"error: {_os_error(err)}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as exc:  # --help, or a command that ends early on purpose
        sys.exit(exc.exit_code)
    except Exception as err:  # under a launcher: another rank died (a collective failed), one line from rank 0
        _exit_if_peer_lost(err)
        raise
    if not code and "gvpo_offline.model.distributed" in sys.modules:  # under torchrun: every rank reaches the end
        sys.modules["gvpo_offline.model.distributed"].finish()  # before any closes its process group
    if code == 130:  # typer caught a KeyboardInterrupt (Ctrl-C or SIGTERM) and returned its exit code
        console.print("interrupted", style="yellow")
        sys.exit(interrupts.exit_code())
    if not args:
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


def _hyphenated(args: list[str]) -> list[str]:
    """``--learning_rate`` (as HF/TRL scripts spell options) -> ``--learning-rate``; values untouched."""
    out = []
    for n, arg in enumerate(args):
        if arg == "--":
            return out + args[n:]
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


# HF Trainer / TRL options with no equivalent under that name: what to use instead.
HF_EQUIVALENTS = {
    "--per-device-train-batch-size": "--groups-per-step (whole prompts per optimizer step)",
    "--gradient-accumulation-steps": "--micro-batch-tokens (a step that does not fit is split with the exact same gradient)",
    "--model-name-or-path": "--model (precompute-ref, sample) or --init-model (train)",
    "--output-dir": "--workdir (train writes WORKDIR/model)",
    "--num-generations": "sample --k",
    "--bf16": "--dtype bfloat16",
    "--logging-steps": "metrics.jsonl (every step)",
    "--save-steps": "--save-every",
    "--save-total-limit": "--keep-checkpoints",
    "--resume-from-checkpoint": "--resume",
    "--loss-type": "--loss",
    "--max-completion-length": "--max-length (prompt + response) and --max-new-tokens (sample)",
}


def _explain_unknown_option(err) -> None:
    """An unknown option's message as "did you mean" (click's close matches) or the HF/TRL equivalent."""
    name = getattr(err, "option_name", None)
    if not name or type(err).__name__ != "NoSuchOption":
        return
    message = f"No such option: {name}"
    if name in HF_EQUIVALENTS:
        message += f" (HF/TRL name; here: {HF_EQUIVALENTS[name]})"
    elif getattr(err, "possibilities", None):
        message += f" (did you mean {' or '.join(sorted(err.possibilities)[:3])}?)"
    err.message, err.possibilities = message, None
def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _exit_if_peer_lost(err: Exception) -> None:
    """A collective that failed because another rank of the job died: rank 0 prints one line, every rank
    leaves with exit code 1 at once (``os._exit``: closing the process group or running atexit handlers
    would only wait on the dead rank or print more). Any other exception: return (the caller re-raises)."""
    from gvpo_offline.runtime import launcher

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    message = launcher.lost_peer_message(err, dist.get_rank(), dist.get_world_size())
    if message is None:
        return
    if dist.get_rank() == 0:
        console.print(f"error: {message}", style="bold red", highlight=False, markup=False, soft_wrap=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def _os_error(err: OSError) -> str:
    """An OSError as one line: "No space left on device: PATH" (both paths for a rename)."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    return f"{reason}: {paths}" if paths else reason


if __name__ == "__main__":
    main()
