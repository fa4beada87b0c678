"""The model folder ``train`` hands back (:func:`write_model_folder`) and its card, in the Hugging Face
convention.

Folder: weights (or a PEFT adapter), tokenizer files, generation_config.json, train_config.json (with
:func:`provenance`: base model id, commit and fingerprint, data files) and README.md, the card:

A YAML header (``huggingface_hub.ModelCardData``: base_model when the base is a hub id, library_name
``transformers`` or ``peft``, tags incl. ``gvpo``), then what was trained (base model, full fine-tuning or
LoRA, data files, β, steps, learning rate) read from the folder's ``train_config.json``, and the eval
table (model, reference, Δ with 95% bootstrap intervals) once ``eval`` has run on the folder
(:func:`update_card_with_eval`). The card's own eval table is only ever the model's own held-out data:
a report whose rows came from the cache the model was trained on (its ``data_cache_key`` is
train_config.json's ``cache_key``). A report on other data (``eval --data``, another workdir) gets a
separate section labelled with its data and cache key, one per dataset, never replacing the own table.
The latest report per dataset is kept in the folder's ``eval_reports.json`` ({data cache key: report}),
from which the card is rebuilt. A README.md not written by this tool is never touched.

The folder is ready to upload: the base is named by its hub id when it has one, and no file holds a
local absolute path (:func:`portable`, :func:`provenance`). The title and tags name the objective that
trained it.
"""

from __future__ import annotations

import json
from pathlib import Path

from gvpo_offline.math.metrics import METRICS, format_interval, format_value
from gvpo_offline.runtime.files import atomic_write_bytes

CARD = "README.md"
EVAL_REPORTS = "eval_reports.json"  # {data_cache_key: eval report}, the latest report per dataset
MARK = "gvpo-offline"  # a tag; a card without it is not ours
NOT_EVALUATED = "Not evaluated yet: `gvpo-offline eval --model THIS_FOLDER` adds the table here."


def eval_section(report: dict) -> str:
    """Markdown of an eval report (EvalReport.to_json())."""
    meta, iv = report.get("meta", {}), report.get("intervals", {})
    counts = report.get("counts", {})
    lines = [
        f"Held-out data: {', '.join(meta.get('data', []))} ({counts.get('groups')} groups, "
        f"{counts.get('responses')} responses), β = {format_value(meta.get('beta'))}; intervals: 95% bootstrap over "
        f"groups ({meta.get('bootstrap')} resamples). The reference column is the reference model (ℓ ≡ 0).",
        "",
        "| metric | model | reference | Δ | model 95% CI | Δ 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    model = report.get("model", {})  # rows in METRICS order (a report read back from JSON has sorted keys)
    for name in sorted(model, key=lambda m: METRICS.index(m) if m in METRICS else len(METRICS)):
        value = model[name]
        lines.append(f"| {name} | {format_value(value)} | {format_value(report['reference'].get(name))} | "
                     f"{format_value(report['delta'].get(name))} | {format_interval(iv.get('model', {}).get(name))} | "
                     f"{format_interval(iv.get('delta', {}).get(name))} |")
    gen = report.get("generation")
    if gen:
        lines.append(f"| mean generated reward ({gen['prompts']} prompts × {gen['samples_per_prompt']}) | "
                     f"{format_value(gen['model_mean_reward'])} | {format_value(gen['reference_mean_reward'])} | "
                     f"{format_value(gen['mean_reward_difference'])} | | {format_interval(gen['difference_interval'])} |")
    return "\n".join(lines)


# What the card calls the model, by the objective that trained it (train --loss; loss.OBJECTIVES)
OBJECTIVE_TITLES = {
    "gvpo": ("GVPO policy", "GVPO (Group Variance Policy Optimization, Zhang et al.): prompts with k ≥ 2 "
                            "scored responses pull the model toward π* ∝ πref·exp(R/β)"),
    "dpo": ("DPO policy", "DPO (Rafailov et al.) on every within-group pair of responses with different rewards"),
    "ipo": ("IPO policy", "IPO (Azar et al.) on every within-group pair of responses with different rewards"),
    "rebel": ("REBEL policy", "REBEL (Gao et al.): regression of β·(ℓ_i − ℓ_j) onto reward differences, "
                              "all within-group pairs"),
    "sft-best": ("SFT policy (best response per group)", "supervised fine-tuning on the highest-reward "
                                                         "response of each group"),
}
LICENSE_FIELDS = ("license", "license_name", "license_link")  # copied from the base model's card


def base_license(folder: Path) -> dict:
    """``license`` (and ``license_name``, ``license_link`` for "other" licenses) from the YAML header of
    the model card (README.md) in ``folder``; {} when there is none or it cannot be read."""
    from huggingface_hub import ModelCard

    card = Path(folder) / CARD
    if not card.is_file():
        return {}
    try:
        data = ModelCard.load(card).data.to_dict()
    except Exception:  # noqa: BLE001 - no header, bad YAML: no license to copy
        return {}
    return {k: data[k] for k in LICENSE_FIELDS if isinstance(data.get(k), str) and data[k]}


def is_own_data(train_config: dict, report: dict) -> bool:
    """Did the report score the model's own held-out data (the eval split of the cache it trained on)?"""
    own = train_config.get("cache_key")
    return own is not None and report.get("meta", {}).get("data_cache_key") == own


def other_data_section(report: dict) -> str:
    """A labelled section for a report on data other than the model's own held-out split."""
    meta = report.get("meta", {})
    key = str(meta.get("data_cache_key") or "?")[:12]
    return "\n".join([
        f"### On other data: {', '.join(f'`{d}`' for d in meta.get('data', [])) or '?'} (cache {key})", "",
        "Not the data this model was trained and held out on; scored against the reference cache "
        f"{str(meta.get('cache_key') or '?')[:12]}.", "",
        eval_section(report),
    ])


def card_text(train_config: dict, report: dict | None = None, others: list[dict] = ()) -> str:
    """The whole README.md for a folder whose train_config.json is ``train_config``: ``report`` is the
    eval of its own held-out data, ``others`` reports on other data (each its own labelled section)."""
    from huggingface_hub import ModelCardData

    lora = train_config.get("lora")
    merged = bool(train_config.get("merged"))
    adapter = bool(lora) and not merged
    objective = str(train_config.get("loss") or "gvpo")
    title, about = OBJECTIVE_TITLES.get(objective, (f"{objective} policy", f"the `{objective}` objective"))
    base_id = train_config.get("base_model_id")
    base = base_id or train_config.get("base_model_name") or Path(str(train_config.get("init_model_path"))).name
    tags = [objective, MARK, "text-generation"] + (["lora"] if lora else [])
    license_fields = train_config.get("base_model_license") or {}
    data = ModelCardData(base_model=base_id, library_name="peft" if adapter else "transformers", tags=tags,
                         pipeline_tag="text-generation", **{k: license_fields[k] for k in LICENSE_FIELDS
                                                             if license_fields.get(k)})
    if lora:
        extras = [name for name, on in (("rsLoRA", lora.get("use_rslora")), ("DoRA", lora.get("use_dora"))) if on]
        saved = lora.get("modules_to_save")
        method = (f"LoRA r = {lora['r']}, α = {lora.get('alpha') or lora['r']}, dropout {lora.get('dropout', 0)}, "
                  f"target modules {lora.get('target_modules')}"
                  + "".join(f", {name}" for name in extras)
                  + (f", fully trained modules {', '.join(saved)}" if saved else "")
                  + f"; base weights in {train_config.get('base_dtype')}"
                  + (" (4-bit NF4, QLoRA)" if train_config.get("load_in_4bit") else "")
                  + ("; the adapter merged into the base weights" if merged else ""))
    else:
        method = "full fine-tuning (float32 master weights)"
    files = train_config.get("data_files") or []
    data_desc = ", ".join(f"`{Path(f.get('name') or f.get('path', '')).name}` (sha256 {f['sha256'][:12]})"
                          for f in files) or "—"
    revision = train_config.get("base_model_revision")
    reference = (train_config.get("reference_model_id") or train_config.get("reference_model_name")
                 or Path(str(train_config.get("reference_model_path"))).name)  # folders from before: their name
    rows = [
        ("base model", f"`{base}`" + (f" (commit {revision})" if revision else "")),
        ("reference model", f"`{reference}`"),
        ("method", method),
        ("data", f"{data_desc}; train split: {train_config.get('train_groups')} groups, "
                 f"{train_config.get('train_responses')} scored responses"),
        ("β (KL strength)", format_value(train_config.get("beta"))),
        ("steps", f"{train_config.get('total_steps')} × {train_config.get('groups_per_step')} groups, "
                  f"peak lr {train_config.get('lr')}, warmup ratio {train_config.get('warmup_ratio')}, "
                  f"seed {train_config.get('seed')}"),
        ("objective", f"`--loss {objective}`: {train_config.get('loss_formula') or about}"),
    ]
    loader = "peft import AutoPeftModelForCausalLM" if adapter else "transformers import AutoModelForCausalLM"
    auto = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    use = (f"```python\nfrom {loader}\nfrom transformers import AutoTokenizer\n\n"
           f"model = {auto}.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```")
    body = [
        "---", data.to_yaml(), "---", "",
        f"# {title}" + (" (LoRA adapter)" if adapter else ""), "",
        f"Post-trained offline by gvpo-offline with {about}.", "",
        "## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Evaluation", "",
        eval_section(report) if report else NOT_EVALUATED,
        *(part for other in others for part in ("", other_data_section(other))),
        "", "## Use", "", use, "",
    ]
    return "\n".join(body)


def write_card(folder: Path, train_config: dict, report: dict | None = None, others: list[dict] = ()) -> None:
    atomic_write_bytes(Path(folder) / CARD, card_text(train_config, report, others).encode())


def _is_ours(card: Path) -> bool:
    from huggingface_hub import ModelCard

    try:
        return MARK in (ModelCard.load(card).data.tags or [])
    except Exception:  # noqa: BLE001 - unreadable or not a card: not ours
        return False


def update_card_with_eval(folder: Path, report: dict) -> bool:
    """Add this eval report to ``folder``'s card when the folder was written by ``train`` (its
    train_config.json is there and README.md is absent or ours): as the eval table when it scored the
    model's own held-out data (:func:`is_own_data`), else as the labelled section of its dataset; the
    other datasets' sections stay. Returns whether it did."""
    from gvpo_offline.runtime.files import atomic_write_json

    folder = Path(folder)
    config_path, card = folder / "train_config.json", folder / CARD
    if not config_path.is_file():
        return False
    if card.is_file() and not _is_ours(card):
        return False
    try:
        train_config = json.loads(config_path.read_text())
        try:
            reports = json.loads((folder / EVAL_REPORTS).read_text())
        except (OSError, ValueError):
            reports = {}
        reports = reports if isinstance(reports, dict) else {}
        reports[str(report.get("meta", {}).get("data_cache_key"))] = report
        own = next((r for r in reports.values() if is_own_data(train_config, r)), None)
        others = [r for _, r in sorted(reports.items()) if not is_own_data(train_config, r)]
        atomic_write_json(folder / EVAL_REPORTS, reports)
        write_card(folder, train_config, own, others)
    except (OSError, ValueError):
        return False
    return True


def write_model_folder(folder: Path, model, tokenizer, train_config: dict | None = None,
                       state_dict: dict | None = None) -> None:
    """Fill ``folder`` so that it loads with plain ``from_pretrained``: the weights (a full model's
    safetensors, or a peft model's adapter_config.json + adapter_model.safetensors), the tokenizer
    files, generation_config.json and, given a ``train_config``, train_config.json and the card.
    ``state_dict``: the weights to save instead of the model's own (a sharded model's, gathered)."""
    from gvpo_offline.model.loading import unwrap_peft
    from gvpo_offline.runtime.files import atomic_write_json

    folder = Path(folder)
    if state_dict is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:  # a sharded model's gathered full weights (distributed.full_state_dict)
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    core = unwrap_peft(model)
    generation = getattr(core, "generation_config", None)
    if generation is not None and not (folder / "generation_config.json").is_file():
        generation.save_pretrained(folder)
    if train_config is not None:
        atomic_write_json(folder / "train_config.json", train_config)
        write_card(folder, train_config)


# ---- what train records about the model it started from ----------------------------------------------


def base_model_name(manifest, init_model: str | None, init_path: Path) -> tuple[str, str | None]:
    """(hub id, or absolute folder when the base has no hub id; commit or None) of the model training
    starts from: what a LoRA adapter names as its base (adapter_config.json) and the card as base_model.
    A folder of the Hugging Face cache counts as its hub id (hub.resolve_model)."""
    from gvpo_offline.model.hub import resolve_model

    if init_model is None:
        if manifest.model_id:
            return manifest.model_id, manifest.model_revision
        source = resolve_model(init_path)
    else:
        source = resolve_model(init_model)
    return (source.hub_id, source.revision) if source.hub_id else (str(init_path.resolve()), None)


def provenance(manifest, init_path: Path, base_name: tuple[str, str | None], train_groups: int,
               train_responses: int) -> dict:
    """train_config.json entries for the card and for checks on the saved folder: the base model (hub id
    and commit when it came from the hub, else its folder's name; content fingerprint:
    adapters.BASE_FINGERPRINT; the license of its card), the reference model's hub id or folder name, the
    data files (names, sizes and sha256: no local paths) and the train split's size."""
    from gvpo_offline.model.adapters import BASE_FINGERPRINT
    from gvpo_offline.model.loading import model_fingerprint

    name, revision = base_name
    return {
        "base_model_id": name if revision else None,
        "base_model_revision": revision,
        "base_model_name": name if revision else Path(name).name,
        "base_model_license": base_license(init_path),
        BASE_FINGERPRINT: model_fingerprint(init_path),
        "reference_model_id": manifest.model_id,
        "reference_model_name": manifest.model_id or Path(manifest.model_path).name,
        "data_files": [{"name": Path(f["path"]).name, "size": f.get("size"), "sha256": f["sha256"]}
                       for f in manifest.data_files],
        "train_groups": train_groups,
        "train_responses": train_responses,
    }


def portable(train_config: dict, base_name: tuple[str, str | None]) -> dict:
    """``train_config`` as the model folder keeps it: the workdir by its name, ``init_model`` by its hub
    id (or folder name), no absolute local path (a folder is uploaded to the hub as it is)."""
    name, revision = base_name
    out = dict(train_config)
    out["workdir"] = Path(str(out.get("workdir", ""))).name
    if out.get("init_model") is not None:
        out["init_model"] = name if revision else Path(name).name
    for key in ("init_model_path", "reference_model_path"):
        out.pop(key, None)
    return out
