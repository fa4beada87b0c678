"""The `eval` stage: how much closer is a trained policy to the GVPO target than the reference?

METRICS (stable names; the JSON report uses exactly these keys). Per response i of group x (k = k(x)):
ℓ_i = log πθ(y_i|x) − log πref(y_i|x) (sequence log-probs) and the implicit reward Rθ_i = β·ℓ_i.

    gvpo_loss                   the unbiased GVPO loss of eq. 16 (loss.gvpo_loss), mean over groups.
    pairwise_accuracy           over ordered response pairs of a group with different rewards (pooled over
                                all groups), the share where β·ℓ orders them as the rewards do; a tie in ℓ
                                counts ½, so the reference (ℓ ≡ 0) scores exactly 0.5.
    spearman                    Spearman rank correlation of β·ℓ and R within each group (average ranks for
                                ties), averaged over the ranked groups. A group whose ℓ is constant counts 0.
    top1_agreement              the share of ranked groups where the response with the highest β·ℓ is one
                                of the highest-reward ones; ties for the highest β·ℓ are averaged over the
                                tied set, so the reference scores the chance rate |argmax R| / k.
    mean_log_ratio              Σℓ / responses: how far the policy moved from the reference, per response.
    mean_log_ratio_per_token    Σℓ / Σ response tokens (token-weighted).
    implicit_reward_variance    within-group unbiased (1/(k−1)) variance of β·ℓ, mean over groups.
    implicit_reward_covariance  within-group unbiased covariance of β·ℓ with R, mean over groups.
    reward_variance             within-group unbiased variance of R, mean over groups (the data's; the same
                                for every model). Eq. 17 decomposition, exact per group and on average:
                                gvpo_loss = implicit_reward_variance + reward_variance − 2·covariance.

"Ranked groups" are the groups whose rewards are not all equal; groups with all-equal rewards are
skipped by pairwise_accuracy, spearman and top1_agreement (counted in ``counts.skipped_groups``) but
still enter the loss, the variance terms and the ℓ means.

COUNTS: groups, responses, tokens, ranked_groups, skipped_groups, pairs (ordered pairs with different
rewards, i.e. each unordered pair once).

INTERVALS: 95% percentile bootstrap over groups (resample G groups with replacement; every metric is a
ratio Σ_g num_g / Σ_g den_g of per-group sums, so a replicate is a weighted sum). ``intervals.model``
holds the model's interval and ``intervals.delta`` the interval of (model − reference) on the same
resamples.

GENERATION (optional, ``--prompts FILE --reward module:function``): responses sampled from the model and
from the reference with the same seed and decoding settings; keys: prompts, samples_per_prompt,
model_mean_reward, reference_mean_reward, mean_reward_difference, difference_interval (bootstrap over
prompts), and every sample's reward: model_rewards, reference_rewards ([prompt][sample]). The PROMPTS
file is ``.txt`` (one prompt per non-empty line) or ``.jsonl`` (one object per line with a ``prompt``
field: a string or a list of {"role", "content"} messages; grouped and flat data files qualify, their
repeated prompts are deduplicated in order; ``--prompt-col`` names another field), or ``eval``: the
workdir's held-out prompts with their rows' other fields (prompts.py). The reward's signature is checked
against the rows' fields before any model loads; ``--samples-out FILE`` keeps every sample (generation.py).

INPUTS. Data: the workdir's cached ``eval`` split, or ``--data FILE...`` whose reference log-probs are
computed once with the manifest's reference model, tokenization and dtype (reference.precompute_extra)
and cached under ``WORKDIR/extra/<content hash>/``. Model: ``WORKDIR/model`` or ``--model``; a model
whose content fingerprint is the reference's gets ℓ ≡ 0 by definition (no forward pass), so it scores
exactly the reference row; a hub id is resolved through the Hugging Face cache, a LoRA adapter folder is
loaded merged into its base (checked against the base's recorded fingerprint). β: ``--beta`` if given,
else the ``beta`` of the model's ``train_config.json`` (a train checkpoint's ``trainer_state.json``).
The policy's weights are loaded in the weights dtype of the cached reference log-probs (and run in it)
unless ``--dtype`` says otherwise. A model whose train_config.json names another reference or
tokenizer than the workdir's manifest is refused. A model folder written by ``train`` gets this report
in its README.md card (modelcard.update_card_with_eval): as the eval table when it scored the model's
own held-out data, else as a labelled section of its own.

JSON (``--json FILE``, written atomically): {"model": {metric: value}, "reference": {...}, "delta":
{...}, "intervals": {"model": {metric: [lo, hi]}, "delta": {...}}, "counts": {...}, "generation": {...}
or null, "meta": {model_path, data, beta, beta_source, model_is_reference, objective, cache_key,
data_cache_key, model_cache_key, bootstrap, seed, confidence}}. ``objective`` is the ``train --loss`` that
made the model (gvpo, dpo, ipo, ipo-trl, rebel, sft-best; "gvpo" for models trained before --loss existed; null for
the reference or a model not saved by ``train``). The cache keys (reference.Manifest.key: the sha256 of
everything that decided a cache's content) say what the numbers were computed from: ``cache_key`` is
WORKDIR/manifest.json's (reference model, tokenization), ``data_cache_key`` that of the cache the scored
rows came from (the same for the eval split; WORKDIR/extra/<hash>/'s for ``--data``), ``model_cache_key``
the cache the model was trained on (its train_config.json's ``cache_key``; null when it has none).
Undefined values (NaN, e.g. no ranked group) are written as null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gvpo_offline.data import ColumnMap
from gvpo_offline.math.metrics import (
    METRICS,
    aggregate_metrics,
    bootstrap_intervals,
    count_stats,
    group_index,
    group_statistics,
)
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import atomic_write_json
from gvpo_offline.stages.evaluate.generation import GenerationEvalConfig, generation_eval
from gvpo_offline.stages.evaluate.table import report_table  # noqa: F401 (re-exported: the display)

# ---- the `eval` stage ----------------------------------------------------------------------------

TRAIN_CONFIG = "train_config.json"  # train writes it next to the final model
TRAINER_STATE = "trainer_state.json"  # in train checkpoints: {"config": {...}}


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``gvpo-offline eval``.

    model_path: the checkpoint to evaluate (default ``WORKDIR/model``); may be the reference itself.
    data_paths: files to evaluate instead of the workdir's ``eval`` split; their reference log-probs
        are computed with the manifest's model and tokenization and cached in the workdir.
    beta: β; overrides the ``beta`` of ``MODEL/train_config.json``; required when there is none.
    dtype: the weights dtype; None = the one the reference log-probs were computed in (the manifest's).
    packing: auto|on|off (gvpo_offline.model.packing); None = the reference cache's setting.
    bootstrap: resamples for the 95% intervals (0 = no intervals).
    """

    workdir: str = "gvpo-run"
    model_path: str | None = None
    data_paths: tuple[str, ...] = ()
    json_path: str | None = None
    beta: float | None = None
    batch_tokens: int | None = None  # None: logprobs.default_batch_tokens (2048 CPU, 16384 GPU)
    device: str = "auto"
    dtype: str | None = None
    packing: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    generation: GenerationEvalConfig | None = None
    layout: str = "auto"
    columns: ColumnMap = ColumnMap()
    trust_remote_code: bool = False
    shard_model: str = "auto"  # under torchrun: shard the model over the processes (sharded_scoring.py)

    def __post_init__(self):
        if self.beta is not None and not 0 < self.beta < math.inf:
            raise GvpoError(f"--beta must be a finite number > 0, got {self.beta}")
        if self.bootstrap < 0:
            raise GvpoError("--bootstrap must be >= 0")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise GvpoError("--batch-tokens must be >= 1")
        from gvpo_offline.model.packing import PACKING_CHOICES

        if self.packing is not None and self.packing not in PACKING_CHOICES:
            raise GvpoError(f"--packing must be one of {', '.join(PACKING_CHOICES)}, got {self.packing!r}")
        from gvpo_offline.stages.reference.config import SHARD_MODEL_CHOICES

        if self.shard_model not in SHARD_MODEL_CHOICES:
            raise GvpoError(f"--shard-model must be one of {', '.join(SHARD_MODEL_CHOICES)}, got {self.shard_model!r}")


@dataclass
class EvalReport:
    """What ``eval`` found; :meth:`to_json` is the stable JSON layout (see the module docstring)."""

    model_path: str
    data: list[str]  # ["WORKDIR:eval"] or the --data files
    beta: float
    beta_source: str  # "--beta" or the train_config.json path
    model_is_reference: bool
    model: dict[str, float]
    reference: dict[str, float]
    delta: dict[str, float]
    intervals: dict  # {"model": {metric: [lo, hi] | None}, "delta": {...}}; all None with bootstrap=0
    counts: dict[str, int]
    bootstrap: int
    seed: int
    generation: dict | None = None
    objective: str | None = None  # the `train --loss` that made the model; None: reference / not ours
    cache_key: str | None = None  # WORKDIR/manifest.json's key: the reference cache scored against
    data_cache_key: str | None = None  # the key of the cache the rows came from (WORKDIR's, or --data's)
    model_cache_key: str | None = None  # the cache the model was trained on (its train_config.json)

    def to_json(self) -> dict:
        return _finite(
            {
                "model": self.model,
                "reference": self.reference,
                "delta": self.delta,
                "intervals": self.intervals,
                "counts": self.counts,
                "generation": self.generation,
                "meta": {
                    "model_path": self.model_path,
                    "data": self.data,
                    "beta": self.beta,
                    "beta_source": self.beta_source,
                    "model_is_reference": self.model_is_reference,
                    "objective": self.objective,
                    "cache_key": self.cache_key,
                    "data_cache_key": self.data_cache_key,
                    "model_cache_key": self.model_cache_key,
                    "bootstrap": self.bootstrap,
                    "seed": self.seed,
                    "confidence": 0.95,
                },
            }
        )


def _finite(obj):
    """NaN/inf -> None, recursively, so the report is valid JSON (NaN = undefined, e.g. no ranked group)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def metrics_from_arrays(
    log_ratio, rewards, group_ids, beta: float, n_tokens=None, bootstrap: int = 1000, seed: int = 0
) -> tuple[dict, dict, dict, dict, dict]:
    """(model, reference, delta, intervals, counts) for per-response arrays; the reference row uses ℓ ≡ 0.

    The loss is the per-group statistic whose mean equals :func:`gvpo_offline.math.loss.gvpo_loss` (tested),
    so the point estimate and its bootstrap interval come from the same numbers.
    """
    gi = group_index(group_ids)
    ell = np.asarray(log_ratio, dtype=np.float64)
    rew = np.asarray(rewards, dtype=np.float64)
    model_stats = group_statistics(ell, rew, gi, beta, n_tokens)
    ref_stats = group_statistics(np.zeros_like(ell), rew, gi, beta, n_tokens)
    model, reference = aggregate_metrics(model_stats), aggregate_metrics(ref_stats)
    delta = {m: model[m] - reference[m] for m in METRICS}
    if bootstrap > 0:
        intervals = bootstrap_intervals(model_stats, ref_stats, bootstrap, seed)
    else:
        intervals = {"model": dict.fromkeys(METRICS), "delta": dict.fromkeys(METRICS)}
    return model, reference, delta, intervals, count_stats(model_stats)


def resolve_beta(config: EvalConfig, model_path: Path, console=None) -> tuple[float, str]:
    """β and where it came from: ``--beta`` if given, else the training config saved with the model
    (``MODEL/train_config.json`` of a final model, ``trainer_state.json`` of a train checkpoint)."""
    train_cfg, source = _read_train_config(model_path)
    from_file = train_cfg.get("beta") if train_cfg else None
    try:
        beta = float("nan") if isinstance(from_file, bool) else float(from_file)
    except (TypeError, ValueError):  # a string, a list, ...: refused below unless --beta overrides it
        beta = float("nan")
    if config.beta is not None:
        if from_file is not None and beta != config.beta and console is not None:
            console.print(f"note: --beta {config.beta} overrides β = {from_file} of {source}", markup=False)
        return float(config.beta), "--beta"
    if from_file is None:
        raise GvpoError(
            f"{model_path}: no {TRAIN_CONFIG} with the training β (not a model saved by `train`); pass --beta"
        )
    if not 0 < beta < math.inf:
        raise GvpoError(f"{source}: field 'beta': expected a finite number > 0, got {from_file!r}; pass --beta")
    return beta, str(source)


def _read_train_config(model_path: Path) -> tuple[dict | None, Path | None]:
    """The training config saved with a model: train_config.json, or a checkpoint's trainer_state.json."""
    for name, pick in ((TRAIN_CONFIG, lambda o: o), (TRAINER_STATE, lambda o: o.get("config"))):
        path = model_path / name
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text())
        except ValueError as err:
            raise GvpoError(f"{path}: not valid JSON ({err})") from None
        cfg = pick(obj) if isinstance(obj, dict) else None
        if isinstance(cfg, dict):
            return cfg, path
    return None, None


def model_step(model_path: Path) -> int:
    """The optimizer step a model was saved at: train_config.json's total_steps, a train checkpoint's
    step; 0 for a model not saved by ``train`` (the reference)."""
    for name, key in ((TRAIN_CONFIG, "total_steps"), (TRAINER_STATE, "step")):
        try:
            value = json.loads((Path(model_path) / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return value
    return 0


def check_model_tokenizer(model_path: Path, manifest, trust_remote_code: bool = False) -> None:
    """Refuse a model whose tokenizer is not the one the cached token ids were made with."""
    from gvpo_offline.data.tokenize import tokenizer_fingerprint
    from gvpo_offline.model.loading import load_tokenizer

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((model_path / name).is_file() for name in tokenizer_files):
        return  # a bare checkpoint (weights only): it uses the cache's tokenizer
    if tokenizer_fingerprint(load_tokenizer(model_path, trust_remote_code)) != manifest.tokenizer_fingerprint:
        raise GvpoError(f"{model_path}: its tokenizer differs from the one precompute-ref used for the cache "
                        "(the cached token ids would mean something else); evaluate it with its own --workdir")


def trained_objective(train_cfg: dict | None) -> str | None:
    """The ``train --loss`` recorded in a model's training config; "gvpo" for configs written before
    --loss existed (their "loss" was a formula, or absent); None when there is no training config."""
    from gvpo_offline.math.loss import OBJECTIVES

    if not train_cfg:
        return None
    name = train_cfg.get("loss")
    return name if isinstance(name, str) and name in OBJECTIVES else "gvpo"


def _weight_signature(path: Path) -> list[tuple[str, int]]:
    from gvpo_offline.model.loading import WEIGHT_SUFFIXES

    return sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def is_reference_model(model_path: Path, manifest) -> bool:
    """Is ``model_path`` the cached reference (same content fingerprint)? A model saved by ``train``
    (it has a training config) is not; otherwise the weights are hashed only when their file names and
    sizes match the reference folder's."""
    from gvpo_offline.model.loading import model_fingerprint

    if _read_train_config(model_path)[0] is not None:
        return False
    ref = Path(manifest.model_path)
    if ref.is_dir() and _weight_signature(model_path) != _weight_signature(ref):
        return False
    return model_fingerprint(model_path) == manifest.model_fingerprint


def policy_log_probs(model, prompt_ids, response_ids, batch_tokens: int, console=None,
                     packed: bool = False, passes=None) -> np.ndarray:
    """Σ log πθ(response | prompt) per pair, [N] float64 (scoring.batched_logps: no grad, batched by
    length under ``batch_tokens`` or ``packed`` rows, in the model's weights dtype), with a progress bar.
    ``passes``: lock-step forwards of a sharded model (sharded_scoring.lockstep)."""
    from gvpo_offline.model.scoring import batched_logps
    from gvpo_offline.runtime.progress import progress

    with progress(console, "policy log-probs", len(prompt_ids), unit="responses") as update:
        return batched_logps(model, prompt_ids, response_ids, batch_tokens,
                             on_batch=lambda n, _tokens: update(advance=n), packed=packed, passes=passes)


def _load_rows(config: EvalConfig, console=None):
    """The rows to evaluate (REF_SCHEMA table), a description of where they came from, and the key of
    the manifest they were read from (WORKDIR's, or that of the WORKDIR/extra/ cache of ``--data``)."""
    from gvpo_offline.stages import reference

    if not config.data_paths:
        table = reference.load_split(config.workdir, "eval")
        if table.num_rows == 0:
            raise GvpoError(
                f"{config.workdir}: the cached eval split is empty (precompute-ref with --eval-fraction > 0 "
                "or --eval-data), or pass --data FILE"
            )
        return table, [f"{config.workdir}:eval"], reference.read_manifest(config.workdir).key
    from gvpo_offline.data import DataConfig

    data = DataConfig(tuple(config.data_paths), config.layout, config.columns)
    sub = reference.precompute_extra(
        config.workdir, data, device=config.device, batch_tokens=config.batch_tokens,
        trust_remote_code=config.trust_remote_code, console=console, shard_model=config.shard_model,
    )
    return reference.load_split(sub, "eval"), [str(Path(p)) for p in config.data_paths], reference.read_manifest(sub).key


def _generation_prompts(config: EvalConfig) -> list[tuple]:
    """The generation eval's (prompt, row fields), with the reward's signature checked against the
    fields, before any model work."""
    from gvpo_offline.data.rewards import check_reward_signature, load_reward_fn
    from gvpo_offline.stages.evaluate.prompts import generation_prompt_rows

    gen = config.generation
    rows = generation_prompt_rows(gen.prompts_path, config.workdir, gen.prompt_col)
    check_reward_signature(load_reward_fn(gen.reward), gen.reward, [extra for _, extra in rows],
                           f"--prompts {gen.prompts_path}")
    return rows


def evaluate(config: EvalConfig, console=None) -> EvalReport | None:
    """Run the ``eval`` stage (see the module docstring); ``console``: where progress and notes go.

    The workdir must be one made by precompute-ref; while eval reads it, it holds the cache shared (no
    precompute-ref rewrites it) and, when the model lies in a workdir, that workdir's train lock shared
    (no train replaces the model); other evals may run at the same time (workdir.stage_locks).

    Under torchrun every rank scores a token-balanced share of the groups (distributed.score_groups);
    rank 0 computes the metrics from all of them and returns the report, the other ranks return None."""
    from rich.console import Console

    from gvpo_offline.model import distributed
    from gvpo_offline.model.loading import model_folder
    from gvpo_offline.runtime import workdir as workdirs

    console = console or Console(stderr=True)
    ctx = distributed.context(config.device)
    if ctx.enabled and config.generation is not None:
        raise GvpoError("the generation eval (--prompts/--reward) runs in one process: run it without torchrun")
    if not ctx.is_main:
        console = Console(quiet=True)
    workdirs.require(config.workdir)
    if config.data_paths:  # a missing file or column: reported now, before any model work
        from gvpo_offline.data import DataConfig, check_inputs

        check_inputs(DataConfig(tuple(config.data_paths), config.layout, config.columns))
    # a folder (model, adapter, checkpoint) or a hub id
    model_path = model_folder(config.model_path) if config.model_path else Path(config.workdir) / "model"
    with distributed.main_only(ctx, workdirs.stage_locks(config.workdir, "eval", model_path)):  # rank 0 locks
        return _evaluate(config, console, ctx, model_path)


def _evaluate(config: EvalConfig, console, ctx, model_path: Path) -> EvalReport | None:
    from gvpo_offline.model import distributed
    from gvpo_offline.model.loading import load_model, resolve_device, resolve_dtype
    from gvpo_offline.model.logprobs import default_batch_tokens
    from gvpo_offline.runtime import memory
    from gvpo_offline.stages import reference

    memory.keep_freed_memory()  # each pass's freed logits and activations reused (runtime/memory.py)
    manifest = reference.read_manifest(config.workdir)
    if not config.model_path:
        if not any((model_path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise GvpoError(f"{model_path}: no model here (run `gvpo-offline train` first, or pass --model)")
    beta, beta_source = resolve_beta(config, model_path, console)
    train_cfg = _read_train_config(model_path)[0] or {}
    for key in ("reference_model_fingerprint", "tokenizer_fingerprint"):
        if train_cfg.get(key) and train_cfg[key] != getattr(manifest, key.removeprefix("reference_")):
            raise GvpoError(
                f"{model_path} was trained against another reference cache ({key.replace('_', ' ')} differs "
                f"from {Path(config.workdir) / reference.MANIFEST}); evaluate it with its own --workdir"
            )
    check_model_tokenizer(model_path, manifest, config.trust_remote_code)
    if train_cfg.get("cache_key") and train_cfg["cache_key"] != manifest.key:
        console.print(
            f"note: {model_path} was trained on the cache of another precompute-ref run (key "
            f"{str(train_cfg['cache_key'])[:12]}); scoring it on the data of {config.workdir} (key {manifest.key[:12]})",
            markup=False, highlight=False, soft_wrap=True,
        )

    prompt_rows = _generation_prompts(config) if config.generation is not None and ctx.is_main else None
    table, data_desc, data_cache_key = _load_rows(config, console)
    reference.check_reward_range(table, data_desc[0] if len(data_desc) == 1 else config.workdir)
    rewards = table.column("reward").to_numpy().astype(np.float64)
    ref_logp = table.column("ref_logp").to_numpy().astype(np.float64)
    n_tokens = table.column("n_tokens").to_numpy().astype(np.float64)
    group_ids = np.asarray(table.column("group_id").to_pylist())

    device = resolve_device(distributed.stage_device(ctx, config.device))
    dtype = resolve_dtype(config.dtype or str(manifest.dtype).removeprefix("torch."), device)
    model_is_ref = is_reference_model(model_path, manifest)
    model = None
    if model_is_ref:
        console.print(f"note: {model_path} is the reference model: ℓ = 0 by definition (no forward pass)",
                      markup=False, highlight=False)
        log_ratio = np.zeros_like(ref_logp)
    else:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        from gvpo_offline.model import sharded_scoring
        from gvpo_offline.runtime.progress import say

        model, sharded = sharded_scoring.load_for_scoring(ctx, model_path, device, config.shard_model, dtype,
                                                          config.trust_remote_code, lambda m: say(console, m))
        passes = sharded_scoring.lockstep(ctx, sharded)
        if manifest.inputs.get("load_in_4bit"):  # QLoRA: not yet scored on its 4-bit base here
            console.print(f"note: the reference log-probs came from the 4-bit base (precompute-ref --load-in-4bit); "
                          f"{model_path} is scored unquantised, so ℓ includes the base's 4-bit rounding",
                          markup=False, highlight=False)
        vocab = model.get_output_embeddings().weight.shape[0]
        prompt_ids = table.column("prompt_ids").to_pylist()
        response_ids = table.column("response_ids").to_pylist()
        top = max(max(max(p, default=0), max(r)) for p, r in zip(prompt_ids, response_ids))
        if top >= vocab:
            raise GvpoError(f"{model_path}: vocabulary of {vocab} tokens, but the cached token ids go up to {top}")
        from gvpo_offline.model import packing

        packing_mode, note = packing.resolve(config.packing or manifest.inputs.get("packing", "off"), model.config, model)
        packed = packing.use_packing(packing_mode, prompt_ids, response_ids)
        if note:
            console.print(f"note: {note}", highlight=False, markup=False)
        batch_tokens = config.batch_tokens or default_batch_tokens(device)
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        log_ratio = distributed.score_groups(ctx, group_ids, lengths, lambda rows: policy_log_probs(
            model, [prompt_ids[i] for i in rows], [response_ids[i] for i in rows], batch_tokens, console, packed,
            passes,
        )) - ref_logp
        if not np.isfinite(log_ratio).all():
            raise GvpoError(f"{model_path}: non-finite log-probs on the evaluation data")

    if not ctx.is_main:
        return None  # rank 0 reports, from every rank's log-probs
    model_m, ref_m, delta, intervals, counts = metrics_from_arrays(
        log_ratio, rewards, group_ids, beta, n_tokens, config.bootstrap, config.seed
    )
    generation = None
    if config.generation is not None:
        if model is None:
            model = load_model(model_path, device, dtype, config.trust_remote_code)
        generation = generation_eval(
            config.generation, prompt_rows, model, model_is_ref, manifest, device, dtype, config.seed,
            config.bootstrap, console, config.trust_remote_code, model_path,
        )
    del model
    report = EvalReport(
        model_path=str(model_path), data=data_desc, beta=beta, beta_source=beta_source,
        model_is_reference=model_is_ref, model=model_m, reference=ref_m, delta=delta, intervals=intervals,
        counts=counts, bootstrap=config.bootstrap, seed=config.seed, generation=generation,
        objective=None if model_is_ref else trained_objective(train_cfg),
        cache_key=manifest.key, data_cache_key=data_cache_key, model_cache_key=train_cfg.get("cache_key"),
    )
    if config.json_path:
        atomic_write_json(Path(config.json_path), report.to_json())
    from gvpo_offline.model.modelcard import update_card_with_eval

    if update_card_with_eval(model_path, report.to_json()):
        console.print(f"note: the eval results are in {model_path / 'README.md'} (the model card)", highlight=False)
    return report
