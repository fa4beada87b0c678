"""``precompute-ref``: tokenize every (prompt, response) once and cache Σ log πref(y|x).

The cache's format, manifest and semantics are documented in :mod:`gvpo_offline.stages.reference.cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console

from gvpo_offline import __version__
from gvpo_offline.data import DataConfig, FileInfo, check_inputs, input_files, input_paths, load_groups
from gvpo_offline.data.locate import chat_prompts_located
from gvpo_offline.data.tokenize import (
    RESPONSE_RULE,
    TokenizeConfig,
    encode_prompt,
    encode_response,
    fit_to_model,
    tokenizer_fingerprint,
    truncate_response,
    truncation_warning,
)
from gvpo_offline.model import distributed, hub, loading, logprobs, packing, quantization, scoring, sharded_scoring
from gvpo_offline.runtime import memory
from gvpo_offline.runtime import workdir as workdirs
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import TMP_PREFIX, atomic_write_json, atomic_write_table, sha256_file
from gvpo_offline.runtime.progress import progress
from gvpo_offline.stages.reference.config import PrecomputeConfig, auto_shard_bytes  # noqa: F401  (re-exported)
from gvpo_offline.stages.reference.hit import dtype_without_torch, request_key
from gvpo_offline.stages.reference.cache import (
    _KEY_META,
    _LABELS,
    _TRUNC_META,
    MANIFEST,
    REF_DIR,
    REF_SCHEMA,
    RERUN,
    SPLITS,
    Manifest,
    SplitCounts,
    _read_any_manifest,
    _shard_meta,
    bad_shards,
    cache_summary,
    describe_changes,
    read_manifest,
)


def split_value(prompt_json: str) -> float:
    """Stable hash of a prompt (the data table's canonical JSON string) -> uniform in [0, 1)."""
    digest = hashlib.sha256(prompt_json.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53  # 53 bits: exact in a float, never 1.0


def assign_split(prompt_json: str, eval_fraction: float) -> str:
    """'eval' for a stable ``eval_fraction`` of prompts, else 'train'. Same prompt -> same split, always."""
    return "eval" if split_value(prompt_json) < eval_fraction else "train"


def file_infos(paths) -> list[dict]:
    """[{"path" (absolute), "size" (bytes), "sha256"}] of the files data.load_groups reads for ``paths``."""
    return _file_dicts(input_files(tuple(paths)))


def _file_dicts(files: list[FileInfo]) -> list[dict]:
    """data.FileInfo fingerprints as the manifest records them (absolute paths)."""
    return [{**asdict(f), "path": str(Path(f.path).resolve())} for f in files]


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _encode_groups(tokenizer, groups: pa.Table, splits: list[str], cfg: TokenizeConfig) -> tuple[dict, int, int]:
    """Tokenize one shard's groups -> (REF_SCHEMA columns but ref_logp, truncated prompts, truncated
    responses). The prompt is encoded once per group; the pieces are those of tokenize.encode_pair."""
    cols: dict[str, list] = {name: [] for name in REF_SCHEMA.names if name != "ref_logp"}
    cut_prompts = cut_responses = 0
    for g, split in zip(groups.to_pylist(), splits):
        prompt = json.loads(g["prompt"])
        prompt_ids, prompt_cut = encode_prompt(tokenizer, prompt, cfg)
        cut_prompts += prompt_cut
        for i, (response, reward) in enumerate(zip(g["responses"], g["rewards"])):
            pair = truncate_response(prompt_ids, prompt_cut, encode_response(tokenizer, response, cfg, prompt), cfg)
            if not pair.response_ids:
                raise GvpoError(f"group {g['group_id']}: response {i} has no tokens (blank, and --no-eos)")
            cut_responses += pair.response_truncated
            row = (g["group_id"], split, i, pair.prompt_ids, pair.response_ids, float(reward), len(pair.response_ids))
            for name, value in zip(cols, row):
                cols[name].append(value)
    return cols, cut_prompts, cut_responses


def _describe_rate(fields: dict, elapsed: float) -> str:
    """Responses/s and tokens/s (prompt + response tokens through the model) since the start."""
    return f"{fields['responses'] / max(elapsed, 1e-9):,.1f} resp/s {fields['tokens'] / max(elapsed, 1e-9):,.0f} tok/s"


def _say(console: Console, message: str) -> None:
    """One message on the console: not wrapped, no rich markup (paths may hold [])."""
    console.print(message, soft_wrap=True, highlight=False, markup=False)


def precompute(config: PrecomputeConfig, console: Console | None = None) -> Manifest:
    """Compute and cache Σ log πref(y|x) of every response (see CACHE FORMAT); return the manifest.

    The same inputs again (data content, model and tokenizer fingerprints, settings: ``Manifest.inputs``)
    are a cache hit that loads no model; an unfinished cache with the same inputs is resumed from its
    finished shards; other inputs recompute it (or raise with ``overwrite=False``, naming the change).
    The workdir must be new, empty or one of ours (workdir.claim); it is locked while the cache is written.
    """
    console = console or Console(stderr=True)
    workdir = Path(config.workdir)
    paths = [{"path": p} for p in input_paths(config.data.paths) + input_paths(config.eval_data)]
    _check_inputs_outside_workdirs(paths)  # never a workdir's own files (before reading any of them)
    check_inputs(config.data)  # a missing file or column: reported now, before any model work
    if config.eval_data:
        check_inputs(replace(config.data, paths=tuple(config.eval_data)))
    ctx = distributed.context(config.device)  # under torchrun: each rank scores a share of every shard
    created = ctx.is_main and not workdir.exists()
    inputs = (*config.data.paths, *config.eval_data)
    try:  # rank 0 claims, locks and reports for all ranks
        with distributed.main_only(ctx, _claimed(workdir)), chat_prompts_located(inputs, config.data.columns.prompt):
            manifest = _precompute(config, workdir, console if ctx.is_main else Console(quiet=True), ctx)
    except BaseException:
        if created:  # nothing of the user's is in a folder we made: leave no trace of a failed first run
            _remove_if_only_ours(workdir)
        raise
    memory.release_freed_memory()  # the reference model and tokenized groups are gone: a train in this process reuses none
    return manifest


@contextlib.contextmanager
def _claimed(workdir: Path):
    """Claim ``workdir`` (workdir.claim) and hold its precompute-ref lock for the block."""
    workdirs.claim(workdir)
    with workdirs.stage_locks(workdir, "precompute"):
        yield


def _remove_if_only_ours(folder: Path) -> None:
    """Delete ``folder`` if it holds nothing but the marker and lock files (a run that wrote nothing)."""
    import shutil

    ours = {workdirs.MARKER, f"{workdirs.LOCK_PREFIX}ref", f"{workdirs.LOCK_PREFIX}train"}
    try:
        if folder.is_dir() and all(p.name in ours for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass


def _check_inputs_outside_workdirs(paths: list[dict]) -> None:
    """Never read a workdir (its manifest, shards, model) as data: refuse data files inside one."""
    for info in paths:
        owner = workdirs.inside_workdir(Path(info["path"]).parent)
        if owner is not None:
            raise GvpoError(f"{info['path']}: this file lies in the gvpo-offline workdir {owner}; "
                            "a workdir is never read as data")


def _precompute(config: PrecomputeConfig, workdir: Path, console: Console,
                ctx: distributed.Dist = distributed.Dist()) -> Manifest:
    device = loading.resolve_device(distributed.stage_device(ctx, config.device))
    dtype = loading.resolve_dtype(config.dtype, device)
    if config.load_in_4bit:
        quantization.require_cuda(device)
    source = hub.resolve_model(config.model)  # a local folder, or a hub id's snapshot in the HF cache
    model_path = str(source.path.resolve())
    tokenizer = loading.load_tokenizer(model_path, config.trust_remote_code)
    tok_cfg, clamp_note = fit_to_model(config.tokenize, model_path, config.trust_remote_code)
    if clamp_note:
        _say(console, clamp_note)
    fingerprints = input_files(config.data.paths), input_files(config.eval_data)  # hashed once, reused by _plan
    data_files, eval_files = _file_dicts(fingerprints[0]), _file_dicts(fingerprints[1])
    _check_inputs_outside_workdirs(data_files + eval_files)
    inputs = {
        "tool_version": __version__,
        "data_files": [f["sha256"] for f in data_files],
        "eval_data_files": [f["sha256"] for f in eval_files],
        "layout": config.data.layout,
        "columns": asdict(config.data.columns),
        "model_fingerprint": loading.model_fingerprint(model_path),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenize": tok_cfg.to_json(),
        "response_rule": RESPONSE_RULE,
        "weights_dtype": str(dtype).removeprefix("torch."),  # the forward runs in it (no fp32 copy, no autocast)
        "eval_fraction": 0.0 if config.eval_data else float(config.eval_fraction),
        "shard_groups": config.shard_groups,
        "shard_bytes": config.shard_bytes or auto_shard_bytes(_weight_bytes(Path(model_path))),
        "packing": config.packing,
        **({"load_in_4bit": True} if config.load_in_4bit else {}),  # absent otherwise: earlier caches keep their key
    }
    for name, expected in (
        ("model_fingerprint", config.require_model_fingerprint),
        ("tokenizer_fingerprint", config.require_tokenizer_fingerprint),
    ):
        if expected is not None and inputs[name] != expected:
            raise GvpoError(f"{model_path}: the reference {_LABELS[name]} changed since the cache was made")
    key = _sha256_json(inputs)
    request = None  # the options as given, for a cache hit without torch next time (hit.py)
    if dtype_without_torch(config.device, config.dtype) == inputs["weights_dtype"]:
        request = request_key(config, Path(model_path), *fingerprints, inputs["model_fingerprint"])

    old = _read_any_manifest(workdir)
    changes: list[str] = []
    if old is not None and old.key == key and old.complete:
        bad = bad_shards(workdir, old)
        if not bad:
            moved = replace(old, model_path=model_path, data_files=data_files, eval_data_files=eval_files,
                            model_id=source.hub_id, model_revision=source.revision, request_key=request)
            if moved != old:  # the same content at other paths: record where it is now
                old = moved
                if ctx.is_main:
                    atomic_write_json(workdir / MANIFEST, old.to_json())
            distributed.barrier(ctx)
            _say(console, f"cache hit: {workdir / MANIFEST} matches the data, model, tokenizer and settings; "
                          f"nothing to compute (no model loaded). {cache_summary(old)}")
            return old
        _say(console, "repairing the reference cache: " + "; ".join(f"{old.shards[s]} {why}" for s, why in bad.items()))
        for s in bad if ctx.is_main else ():
            (workdir / old.shards[s]).unlink(missing_ok=True)
    # A manifest whose run stopped before its first shard holds nothing to replace: no "recomputing".
    computed = old is None or any((workdir / s).is_file() for s in old.shards)
    if (workdir / MANIFEST).exists() and (old is None or old.key != key) and computed:
        changes = describe_changes(old.inputs, inputs) if old and old.inputs else ["unreadable/old manifest"]
        if not config.overwrite:
            raise GvpoError(
                f"{workdir}: the cached reference log-probs were made from other inputs "
                f"({'; '.join(changes)}); not overwriting them (--no-overwrite). "
                "Use another --workdir or drop --no-overwrite."
            )

    groups, splits, layout = _plan(config, console, *fingerprints)
    starts = shard_starts(groups, config.shard_groups, inputs["shard_bytes"])
    encoded: dict[int, tuple] = {}  # shard -> its tokenization, when it was needed up front
    if old is None or old.key != key:  # validate every group's tokenization before touching the old cache
        encoded = _encode_all(tokenizer, groups, splits, tok_cfg, starts)
        if changes:  # an earlier cache with computed shards is being replaced
            _say(console, f"recomputing the reference cache: {'; '.join(changes)}")
    manifest = Manifest(
        tool_version=__version__, data_files=data_files, eval_data_files=eval_files, layout=layout,
        columns=inputs["columns"], model_path=model_path, model_fingerprint=inputs["model_fingerprint"],
        tokenizer_fingerprint=inputs["tokenizer_fingerprint"], tokenize=inputs["tokenize"],
        dtype=inputs["weights_dtype"], eval_fraction=inputs["eval_fraction"], model_id=source.hub_id,
        model_revision=source.revision,
        shards=[f"{REF_DIR}/shard-{s:05d}.parquet" for s in range(len(starts))], shard_starts=starts,
        shard_groups=config.shard_groups, inputs=inputs, key=key, request_key=request,
    )
    if ctx.is_main:
        atomic_write_json(workdir / MANIFEST, manifest.to_json())  # complete=false: a rerun resumes
        _clean_shards(workdir, manifest)
    distributed.barrier(ctx)
    todo = [s for s, name in enumerate(manifest.shards) if not (workdir / name).is_file()]
    if len(todo) < len(manifest.shards):
        _say(console, f"resuming: {len(manifest.shards) - len(todo)} of {len(manifest.shards)} shards already computed")
    if todo:
        import transformers

        memory.keep_freed_memory()  # freed large blocks reused, not page-faulted afresh (runtime/memory.py)
        transformers.utils.logging.disable_progress_bar()
        # the weights loaded directly in ``dtype`` and run in it: train's policy and eval run the same
        # weights dtype (train refuses another), so ℓ = 0 at step 0 to rounding
        if config.load_in_4bit:
            model, sharded = quantization.load_4bit(model_path, device, config.trust_remote_code), False
        else:
            model, sharded = sharded_scoring.load_for_scoring(ctx, model_path, device, config.shard_model, dtype,
                                                              config.trust_remote_code, lambda m: _say(console, m))
        batch_tokens = config.batch_tokens or logprobs.default_batch_tokens(device)
        _compute_shards(workdir, manifest, todo, groups, splits, tokenizer, model, batch_tokens, config,
                        console, ctx, encoded, sharded_scoring.lockstep(ctx, sharded))
    distributed.barrier(ctx)
    with distributed.together(ctx):  # rank 0 completes the manifest; its GvpoError stops every rank
        if ctx.is_main:
            _finish(workdir, manifest)
    _say(console, f"reference log-probs cached in {workdir}: {cache_summary(manifest)}")
    responses = sum(c.responses for c in manifest.counts.values())
    warning = truncation_warning(manifest.truncated_responses, responses, manifest.tokenize_config)
    if warning:
        _say(console, warning)
    return read_manifest(workdir) if ctx.enabled else manifest  # the manifest rank 0 completed


def _encode_all(tokenizer, groups: pa.Table, splits: list[str], cfg: TokenizeConfig,
                starts: list[int]) -> dict[int, tuple]:
    """Tokenize every shard's groups before anything is written, so that a template or tokenization
    error stops the run first: {shard: (its columns as an Arrow table, truncated prompts, truncated
    responses)}. Arrow keeps the token ids compact (int32) until :func:`_compute_shards` uses them."""
    encoded = {}
    for s, (lo, hi) in enumerate(_shard_ranges(starts, groups.num_rows)):
        cols, cut_p, cut_r = _encode_groups(tokenizer, groups.slice(lo, hi - lo), splits[lo:hi], cfg)
        encoded[s] = (pa.table(cols, schema=REF_SCHEMA.remove(REF_SCHEMA.get_field_index("ref_logp"))), cut_p, cut_r)
    return encoded


def shard_starts(groups: pa.Table, max_groups: int, max_bytes: int) -> list[int]:
    """The first group of each shard: consecutive groups until the next would pass ``max_groups`` groups
    or ``max_bytes`` of text (Σ over responses of prompt + response UTF-8 bytes: what scoring costs, about
    4 bytes per token); at least one group per shard. Deterministic in the data and the two limits."""
    k = pc.list_value_length(groups["responses"]).to_numpy().astype(np.int64)
    prompt = pc.binary_length(groups["prompt"]).to_numpy().astype(np.int64)
    flat = pc.binary_length(pc.list_flatten(groups["responses"])).to_numpy().astype(np.int64)
    responses = np.add.reduceat(flat, np.concatenate([[0], np.cumsum(k)[:-1]])) if len(k) else flat
    cost = k * prompt + responses
    starts, size, count = [], 0, 0
    for g, c in enumerate(cost.tolist()):
        if not starts or count >= max_groups or (count and size + c > max_bytes):
            starts.append(g)
            size, count = 0, 0
        size, count = size + c, count + 1
    return starts


def _shard_ranges(starts: list[int], n_groups: int) -> list[tuple[int, int]]:
    """[(first group, end)] of each shard."""
    return list(zip(starts, [*starts[1:], n_groups]))


def _weight_bytes(model_path: Path) -> int:
    """Bytes of the model's weight files (an adapter's base model's for an adapter folder)."""
    folder = loading.model_folder(loading.base_spec(model_path)) if loading.is_adapter(model_path) else model_path
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in loading.WEIGHT_SUFFIXES and p.is_file())


def _plan(config: PrecomputeConfig, console: Console, data_files: list[FileInfo] | None = None,
          eval_files: list[FileInfo] | None = None) -> tuple[pa.Table, list[str], str]:
    """The groups to cache, in order (DATA, then --eval-data), their splits, and the data layout.
    Shards are cut by :func:`shard_starts`: the same on every run of the same inputs.
    ``data_files``/``eval_files``: the inputs' fingerprints, already computed for the cache key."""
    data = load_groups(config.data, data_files)
    table = data.table.select(["group_id", "prompt", "responses", "rewards"])
    if not config.eval_data:
        return table, [assign_split(p, config.eval_fraction) for p in table["prompt"].to_pylist()], data.layout
    held = load_groups(DataConfig(tuple(config.eval_data), config.data.layout, config.data.columns), eval_files)
    overlap = pc.sum(pc.is_in(held.table["prompt"], value_set=table["prompt"])).as_py() or 0
    if overlap:
        _say(console, f"warning: {overlap} --eval-data prompts also appear in the training data")
    groups = pa.concat_tables([table, held.table.select(table.column_names)], promote_options="default")
    return groups.combine_chunks(), ["train"] * table.num_rows + ["eval"] * held.table.num_rows, data.layout



def _compute_shards(workdir, manifest, todo, groups, splits, tokenizer, model, batch_tokens, config, console,
                    ctx: distributed.Dist = distributed.Dist(), encoded: dict[int, tuple] | None = None,
                    passes=None):
    """Tokenize (unless ``encoded`` by :func:`_encode_all` already), score and write (atomically) the
    shards ``todo``, under a progress bar on ``console``.
    Several processes: every rank scores a token-balanced share of each shard's groups, and rank
    ``s % world_size`` writes shard s (the progress bar counts the whole job's responses: see advance).
    ``passes``: lock-step forwards of a model sharded over the processes (sharded_scoring.lockstep)."""
    ranges, tok_cfg = _shard_ranges(manifest.shard_starts, groups.num_rows), manifest.tokenize_config
    k = pc.list_value_length(groups["responses"]).to_numpy()
    packing_mode, note = packing.resolve(config.packing, model.config, model)
    if note:
        _say(console, f"note: {note}")
    total = int(sum(k[ranges[s][0] : ranges[s][1]].sum() for s in todo))
    with progress(console, "reference log-probs", total, unit="responses", describe=_describe_rate,
                  enabled=config.progress) as update:
        # the whole job's count: exact at each shard's end (its rows are gathered on every rank); within a
        # shard, rank 0's share × world size, never beyond the shard (shares are balanced by tokens, not rows)
        finished_pairs = finished_tokens = mine_pairs = mine_tokens = 0
        shard_pairs = shard_tokens = 0

        def advance(n_pairs: int, n_tokens: int) -> None:
            nonlocal mine_pairs, mine_tokens
            mine_pairs, mine_tokens = mine_pairs + n_pairs, mine_tokens + n_tokens
            pairs = finished_pairs + min(mine_pairs * ctx.world_size, shard_pairs)
            tokens = finished_tokens + min(mine_tokens * ctx.world_size, shard_tokens)
            update(completed=pairs, responses=pairs, tokens=tokens)

        for done, s in enumerate(todo):
            lo, hi = ranges[s]
            shard_pairs, mine_pairs, mine_tokens = int(k[lo:hi].sum()), 0, 0
            try:
                if encoded and s in encoded:
                    table, cut_p, cut_r = encoded.pop(s)
                    cols = table.to_pydict()
                else:
                    cols, cut_p, cut_r = _encode_groups(tokenizer, groups.slice(lo, hi - lo), splits[lo:hi], tok_cfg)
                packed = packing.use_packing(packing_mode, cols["prompt_ids"], cols["response_ids"])
                shard_tokens = sum(len(p) + len(r) for p, r in zip(cols["prompt_ids"], cols["response_ids"]))
                cols["ref_logp"] = distributed.score_groups(
                    ctx, cols["group_id"], [len(p) + len(r) for p, r in zip(cols["prompt_ids"], cols["response_ids"])],
                    lambda rows: scoring.batched_logps(
                        model, [cols["prompt_ids"][i] for i in rows], [cols["response_ids"][i] for i in rows],
                        batch_tokens, config.chunk_tokens, advance, packed, passes,
                    ),
                )
                finished_pairs, finished_tokens = finished_pairs + shard_pairs, finished_tokens + shard_tokens
                update(completed=finished_pairs, responses=finished_pairs, tokens=finished_tokens)
            except KeyboardInterrupt:
                finished = len(manifest.shards) - len(todo) + done
                _say(console, f"stopped after {finished} of {len(manifest.shards)} shards; rerun to resume")
                raise
            if s % ctx.world_size != ctx.rank:
                continue
            meta = {_KEY_META: manifest.key.encode(), _TRUNC_META[0]: b"%d" % cut_p, _TRUNC_META[1]: b"%d" % cut_r}
            atomic_write_table(workdir / manifest.shards[s], pa.table(cols, schema=REF_SCHEMA.with_metadata(meta)))


def _clean_shards(workdir: Path, manifest: Manifest) -> list[int]:
    """Delete temp files and shards not made under ``manifest.key``; return the shards still to compute."""
    ref = workdir / REF_DIR
    planned = set(manifest.shards)
    if ref.is_dir():
        for path in ref.iterdir():
            name = f"{REF_DIR}/{path.name}"
            stale = path.name.startswith(TMP_PREFIX)
            if path.name.startswith("shard-") and path.suffix == ".parquet":
                stale = name not in planned or _shard_meta(path).get(_KEY_META) != manifest.key.encode()
            if stale:
                path.unlink(missing_ok=True)
    return [s for s, name in enumerate(manifest.shards) if not (workdir / name).is_file()]


def _finish(workdir: Path, manifest: Manifest) -> None:
    """Check that every shard was made under this manifest's key, fill the counts, sizes and checksums
    from the shards on disk, set complete=true and write the manifest (atomically)."""
    paths = [workdir / name for name in manifest.shards]
    metas = [_shard_meta(p) for p in paths]
    for path, meta in zip(paths, metas):
        if meta.get(_KEY_META) != manifest.key.encode():
            raise GvpoError(f"{path}: this shard was not computed from these inputs (another precompute-ref "
                            f"wrote it?); {RERUN}")
    manifest.shard_sizes = [p.stat().st_size for p in paths]
    manifest.shard_sha256 = [sha256_file(p) for p in paths]
    manifest.truncated_prompts = sum(int(m[_TRUNC_META[0]]) for m in metas)
    manifest.truncated_responses = sum(int(m[_TRUNC_META[1]]) for m in metas)
    rows = pa.concat_tables([pq.read_table(p, columns=["split", "response_index", "n_tokens"]) for p in paths])
    manifest.counts = {}
    for split in SPLITS:
        mine = rows.filter(pc.equal(rows["split"], split))
        manifest.counts[split] = SplitCounts(
            groups=pc.sum(pc.equal(mine["response_index"], 0)).as_py() or 0,
            responses=mine.num_rows,
            tokens=pc.sum(mine["n_tokens"]).as_py() or 0,
        )
    manifest.complete = True
    atomic_write_json(workdir / MANIFEST, manifest.to_json())


def precompute_extra(
    workdir: str | Path,
    data: DataConfig,
    *,
    device: str = "auto",
    batch_tokens: int | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    console: Console | None = None,
    shard_model: str = "auto",
) -> Path:
    """Reference log-probs of other files (``eval --data FILE``) with WORKDIR's reference model and
    tokenization, every row split='eval'. Cached like the main cache in its own workdir,
    WORKDIR/extra/<sha256 of the files' content and data options, 16 hex>/, which is returned: read it
    with ``load_split(path, "eval")``. Raises if the model or tokenizer changed since WORKDIR was made.
    """
    main = read_manifest(workdir)
    name = _sha256_json({
        "files": [f["sha256"] for f in file_infos(data.paths)],
        "layout": data.layout,
        "columns": asdict(data.columns),
    })[:16]
    sub = Path(workdir) / "extra" / name
    workdirs.refuse_links(Path(workdir), ("extra",))
    workdirs.refuse_links(Path(workdir) / "extra", (name,))
    config = PrecomputeConfig(
        data=data, model=main.model_path, workdir=sub, tokenize=main.tokenize_config, eval_fraction=1.0,
        shard_groups=main.shard_groups or 1000, shard_bytes=main.inputs.get("shard_bytes"), batch_tokens=batch_tokens,
        device=device, dtype=main.dtype, packing=main.inputs.get("packing", "off"),
        load_in_4bit=bool(main.inputs.get("load_in_4bit")),
        trust_remote_code=trust_remote_code, progress=progress, shard_model=shard_model,
        require_model_fingerprint=main.model_fingerprint, require_tokenizer_fingerprint=main.tokenizer_fingerprint,
    )
    precompute(config, console)
    return sub
