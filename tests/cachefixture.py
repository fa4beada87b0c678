"""Build a small reference-cache workdir directly (REF_SCHEMA shard + complete Manifest), for train tests.

Uses the same pieces as `precompute-ref` (tokenize.encode_pair, logprobs.sequence_logps, the atomic
writers of reference.py) so that a freshly initialised policy reproduces the cached ref_logp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from gvpo_offline.data.tokenize import TokenizeConfig, encode_pair, tokenizer_fingerprint
from gvpo_offline.model.loading import load_model, load_tokenizer, model_fingerprint
from gvpo_offline.model.logprobs import sequence_logps
from gvpo_offline.runtime import workdir as workdirs
from gvpo_offline.runtime.files import atomic_write_json, atomic_write_table, sha256_file
from gvpo_offline.stages import reference

STORIES = Path(__file__).resolve().parents[1] / "sample_data" / "stories260K"


@dataclass
class IdGroup:
    """One prompt and its k scored responses, already as token ids."""

    group_id: str
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    split: str = "train"


def text_groups(
    model_path: str | Path, groups: list[tuple[str, list[str], list[float]]], cfg: TokenizeConfig | None = None
) -> list[IdGroup]:
    """(prompt, responses, rewards) texts -> IdGroups via the project's one tokenization."""
    tokenizer = load_tokenizer(model_path)
    cfg = cfg or TokenizeConfig(max_length=96, max_prompt_length=32)
    out = []
    for n, (prompt, responses, rewards) in enumerate(groups):
        pairs = [encode_pair(tokenizer, prompt, r, cfg) for r in responses]
        out.append(IdGroup(f"g{n:04d}", pairs[0].prompt_ids, [p.response_ids for p in pairs], list(rewards)))
    return out


def build_cache(
    workdir: str | Path, model_path: str | Path, groups: list[IdGroup], *, complete: bool = True
) -> reference.Manifest:
    """Write WORKDIR/manifest.json + WORKDIR/ref/shard-00000.parquet for ``groups`` scored by ``model_path``."""
    workdir, model_path = Path(workdir), Path(model_path)
    workdirs.claim(workdir)
    model = load_model(model_path, torch.device("cpu"), torch.float32)
    rows = []
    with torch.no_grad():
        for g in groups:
            ref = sequence_logps(model, [g.prompt_ids] * len(g.responses), g.responses).double().tolist()
            for i, (resp, reward) in enumerate(zip(g.responses, g.rewards)):
                rows.append({
                    "group_id": g.group_id, "split": g.split, "response_index": i, "prompt_ids": g.prompt_ids,
                    "response_ids": resp, "reward": float(reward), "ref_logp": ref[i], "n_tokens": len(resp),
                })
    shard = f"{reference.REF_DIR}/shard-00000.parquet"
    atomic_write_table(workdir / shard, pa.Table.from_pylist(rows, schema=reference.REF_SCHEMA))
    counts = {}
    for split in reference.SPLITS:
        mine = [g for g in groups if g.split == split]
        counts[split] = reference.SplitCounts(
            groups=len(mine),
            responses=sum(len(g.responses) for g in mine),
            tokens=sum(len(r) for g in mine for r in g.responses),
        )
    manifest = reference.Manifest(
        tool_version="test", data_files=[], eval_data_files=[], layout="grouped", columns={},
        model_path=str(model_path), model_fingerprint=model_fingerprint(model_path),
        tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(model_path)),
        tokenize=TokenizeConfig().to_json(), dtype="float32", eval_fraction=0.0, counts=counts,
        shards=[shard], complete=complete,
        shard_sizes=[(workdir / shard).stat().st_size], shard_sha256=[sha256_file(workdir / shard)],
    )
    atomic_write_json(workdir / reference.MANIFEST, manifest.to_json())
    return manifest


STORY_GROUPS = [
    ("Once upon a time, there was a little dog named Max.", ["He ran.", "Max was sad.", "He found a ball."], [1.0, -1.0, 0.5]),
    ("Lily went to the park.", ["She saw a bird.", "She cried."], [0.8, -0.3]),
    ("Tom had a toy car.", ["He played.", "It broke.", "He shared it.", "Tom was happy.", "It was blue."], [0.2, -0.6, 1.0, 0.7, 0.0]),
    ("The sun was shining.", ["The birds sang.", "Ben went out to play.", "It was hot.", "Sue had a hat."], [0.4, 0.9, -0.2, 0.1]),
]
"""Four story prompts with k = 3, 2, 5, 4 short scored responses (rewards in [-1, 1])."""


def set_lora_weights(model) -> None:
    """Give every LoRA A and B of a peft model a fixed random value (by parameter name order): the same in
    every process whatever its RNG state, and B off its initial 0 so that a step's gradient reaches A too."""
    with torch.no_grad():
        for n, (name, p) in enumerate(sorted(model.named_parameters())):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(n)))


def save_perturbed_policy(folder: Path, scale: float = 0.02) -> Path:
    """stories260K with seeded noise (``scale``·N(0, 1), one seed per parameter) added to every weight, saved to
    ``folder``: a policy away from the reference, for eval tests."""
    policy = load_model(STORIES, torch.device("cpu"))
    with torch.no_grad():
        for n, p in enumerate(policy.parameters()):
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(n)))
    policy.save_pretrained(folder)
    return folder
