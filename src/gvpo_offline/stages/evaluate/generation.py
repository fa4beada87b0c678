"""The generation eval of ``eval --prompts FILE --reward module:function``: sample from the model and from
the reference with the same seeds and decoding settings, score both with the reward, compare the means
(keys: see :mod:`gvpo_offline.stages.evaluate.heldout`'s GENERATION section)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gvpo_offline.math.metrics import mean_difference_interval
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.generate import SamplingConfig

GENERATION_KEYS = (
    "prompts",
    "samples_per_prompt",
    "model_mean_reward",
    "reference_mean_reward",
    "mean_reward_difference",
    "difference_interval",
)


@dataclass(frozen=True)
class GenerationEvalConfig:
    """``--prompts FILE --reward module:function``: sample from the model and the reference alike."""

    prompts_path: str  # a prompts file, or "eval": the workdir's held-out prompts (prompts.py)
    reward: str
    samples_per_prompt: int = 4
    sampling: SamplingConfig = SamplingConfig()  # its seed is the one both models sample with
    reward_timeout: float | None = None  # seconds per reward call (--reward-timeout)
    prompt_col: str | None = None  # the prompt field of a JSONL/data prompts file (default: prompt)
    samples_out: str | None = None  # JSONL of every sample: prompt, model, sample index, sample, reward

    def __post_init__(self):
        if self.samples_per_prompt < 1:
            raise GvpoError("--samples-per-prompt must be >= 1")


def read_eval_prompts(path: str | Path, prompt_col: str | None = None) -> list:
    """Prompts for the generation eval, deduplicated in order (see :func:`read_eval_prompt_rows`)."""
    return [prompt for prompt, _ in read_eval_prompt_rows(path, prompt_col)]


def read_eval_prompt_rows(path: str | Path, prompt_col: str | None = None) -> list[tuple]:
    """(prompt, other fields) for the generation eval, deduplicated by prompt in order. ``.txt`` (one per
    line) and ``.jsonl``/``.json`` with a ``prompt`` field are read by sample.read_prompts (a line's other
    fields, e.g. ``ground_truth``, go to a reward that accepts them); any other data file (Parquet,
    ``.jsonl.gz``, a folder) by the data layer, whose ``prompt`` column is taken (no other fields).
    ``prompt_col``: the prompt's field/column when it is not ``prompt``."""
    from gvpo_offline.data import ColumnMap, DataConfig, load_groups
    from gvpo_offline.stages.sample import read_prompts

    if Path(path).suffix in (".txt", ".jsonl", ".json"):
        candidates = [(record.prompt, record.fields)
                      for record in read_prompts(path, unique_ids=False, prompt_field=prompt_col or "prompt")]
    else:
        table = load_groups(DataConfig((str(path),), columns=ColumnMap(prompt=prompt_col))).table
        candidates = [(json.loads(p), {}) for p in table["prompt"].to_pylist()]
    rows, seen = [], set()
    for prompt, fields in candidates:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append((prompt, fields))
    return rows


def _score_all(fn, prompts, responses, fields) -> np.ndarray:
    """[P, n] rewards of the sampled responses (``fields``: each prompt's other fields); a failing reward
    names the prompt."""
    from gvpo_offline.data.rewards import Unscorable, score_responses

    out = np.zeros((len(prompts), max(len(r) for r in responses)))
    for i, (prompt, group, extra) in enumerate(zip(prompts, responses, fields)):
        try:
            out[i, : len(group)] = score_responses(fn, prompt, group, f"prompt {i + 1}", extra)
        except Unscorable as err:  # a mean over rewards that are not there would be silently wrong
            raise GvpoError(f"the reward function cannot score {err}") from None
    return out

def generation_eval(
    gen: GenerationEvalConfig,
    rows: list[tuple],
    model,
    model_is_reference: bool,
    manifest,
    device,
    dtype,
    seed: int,
    bootstrap: int,
    console=None,
    trust_remote_code: bool = False,
    model_path: str | Path = "",
) -> dict:
    """Sample ``samples_per_prompt`` responses per prompt from ``model`` and from the reference with the
    same seeds and decoding settings (generate.generate_responses: each (prompt, j) has its own seeded
    generator, so both models see the same noise), score them, and compare mean rewards. ``rows``:
    (prompt, row fields) from prompts.generation_prompt_rows. With ``gen.samples_out`` every sample is
    written there (JSONL, atomically): prompt, model ("trained"/"reference"), model_path, sample_index,
    sample, reward."""
    import torch

    from gvpo_offline.data.locate import chat_prompts_located
    from gvpo_offline.data.rewards import check_reward_fields, load_reward_fn
    from gvpo_offline.model.loading import load_model, load_tokenizer
    from gvpo_offline.runtime.progress import progress
    from gvpo_offline.stages.generate import generate_responses

    prompts, fields = [prompt for prompt, _ in rows], [extra for _, extra in rows]
    reward_fn = load_reward_fn(gen.reward, gen.reward_timeout)
    check_reward_fields(reward_fn, ((f"{gen.prompts_path}: prompt {i + 1}", extra) for i, extra in enumerate(fields)))
    tokenizer = load_tokenizer(manifest.model_path, trust_remote_code)  # the cache's tokenization
    sampling = gen.sampling
    tok_cfg = manifest.tokenize_config
    n, keys = gen.samples_per_prompt, list(range(len(prompts)))

    samples: list[dict] = []

    def run(m, label: str, which: str, path: str) -> np.ndarray:
        with progress(console, label, len(prompts) * n, unit="samples") as update, \
                chat_prompts_located((str(gen.prompts_path),)):
            texts = generate_responses(
                m, tokenizer, prompts, n, sampling, tok_cfg, seed_keys=keys, progress=lambda k: update(advance=k)
            )
        rewards = _score_all(reward_fn, prompts, texts, fields)
        samples.extend({"prompt": prompt, "model": which, "model_path": path, "sample_index": j, "sample": text,
                        "reward": float(rewards[i, j])}
                       for i, (prompt, group) in enumerate(zip(prompts, texts)) for j, text in enumerate(group))
        return rewards

    if not model_is_reference:
        from gvpo_offline.model.loading import model_fingerprint

        if not (Path(manifest.model_path) / "config.json").is_file() or (
                model_fingerprint(manifest.model_path) != manifest.model_fingerprint):
            raise GvpoError(f"{manifest.model_path}: the reference model is missing or changed since precompute-ref "
                            "(its fingerprint differs from the manifest's); the generation eval would not compare "
                            "against the reference. Rerun precompute-ref")
    model_rewards = run(model, "sampling (model)", "trained", str(model_path))
    if model_is_reference:
        ref_rewards = model_rewards
    else:
        ref_model = load_model(manifest.model_path, device, next(model.parameters()).dtype, trust_remote_code)
        ref_rewards = run(ref_model, "sampling (reference)", "reference", str(manifest.model_path))
        del ref_model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if gen.samples_out:
        from gvpo_offline.runtime.files import atomic_write_jsonl

        atomic_write_jsonl(gen.samples_out, samples)
    per_prompt_m, per_prompt_r = model_rewards.mean(1), ref_rewards.mean(1)
    return {
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "model_mean_reward": float(per_prompt_m.mean()),
        "reference_mean_reward": float(per_prompt_r.mean()),
        "mean_reward_difference": float((per_prompt_m - per_prompt_r).mean()),
        "difference_interval": mean_difference_interval(per_prompt_m, per_prompt_r, bootstrap, seed),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "model_rewards": model_rewards.tolist(),  # [prompts][samples_per_prompt], for plots/analysis
        "reference_rewards": ref_rewards.tolist(),
    }
