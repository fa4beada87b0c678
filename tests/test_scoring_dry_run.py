"""``precompute-ref --dry-run`` and ``eval --dry-run`` (issue 21): the memory plan of scoring a model whole and
sharded, from a config.json alone (no weight file exists to read), and --shard-model auto's choice."""

from __future__ import annotations

from test_memory_plan import GIB, LLAMA_31_8B, config_folder, llama_params


def test_precompute_ref_dry_run_plans_whole_and_sharded_scoring_from_config_json(tmp_path, run_cli):
    folder = config_folder(tmp_path / "llama-3.1-8b", LLAMA_31_8B)  # config.json only
    workdir = tmp_path / "nothing-here"
    result = run_cli("precompute-ref", tmp_path / "no-data.jsonl", "--model", folder, "--workdir", workdir, "--dry-run",
                     "--plan-processes", "8", "--plan-gpu-memory", "12")
    assert result.code == 0, result.err
    c, params = LLAMA_31_8B, llama_params(LLAMA_31_8B)
    weights = 2 * params  # --dtype auto on a GPU: bf16
    assert f"{params / 1e6:,.1f}M parameters in bfloat16, 8 process(es), batch 16,384 tokens" in result.out
    assert f"whole model per process: weights {weights / GIB:.2f} GiB" in result.out
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"] + 2 * h
    gathered = 2 * (2 * c["vocab_size"] * h + h + 2 * layer)  # embeddings, LM head, final norm, two layers, bf16
    assert (f"sharded over 8 processes: weights {weights / 8 / GIB:.2f} GiB + gathered by FSDP {gathered / GIB:.2f} GiB"
            in result.out)
    whole_line = next(line for line in result.out.splitlines() if line.startswith("whole model"))
    assert whole_line.endswith("does NOT fit")  # 15 GiB of weights on a 12 GiB GPU
    assert "per process: fits" in result.out  # 1/8 of them
    assert "--shard-model auto: sharded" in result.out
    assert not workdir.exists() and sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_eval_dry_run_takes_the_caches_dtype_and_auto_keeps_a_model_that_fits_whole(tmp_path, run_cli):
    from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups

    folder = config_folder(tmp_path / "llama-3.1-8b", LLAMA_31_8B)
    build_cache(tmp_path / "run", STORIES, text_groups(STORIES, STORY_GROUPS[:1]))  # its manifest: float32
    result = run_cli("eval", "--workdir", tmp_path / "run", "--model", folder, "--dry-run", "--plan-processes", "2",
                     "--plan-gpu-memory", "80")
    assert result.code == 0, result.err
    weights = 4 * llama_params(LLAMA_31_8B)
    assert "in float32, 2 process(es)" in result.out and f"weights {weights / GIB:.2f} GiB" in result.out
    assert f"--shard-model auto: whole (the weights take {weights / (80 * GIB):.0%} of a device" in result.out

    no_cache = run_cli("eval", "--workdir", tmp_path / "none", "--model", folder, "--dry-run")
    assert no_cache.code == 2 and "has no reference cache to take the weights dtype from; pass --dtype" in no_cache.err
    bf16 = run_cli("eval", "--workdir", tmp_path / "none", "--model", folder, "--dry-run", "--dtype", "bfloat16")
    assert bf16.code == 0 and f"weights {weights / 2 / GIB:.2f} GiB" in bf16.out
    assert "sharded over" not in bf16.out  # one process: nothing to shard
    alone = run_cli("eval", "--workdir", tmp_path / "run", "--model", folder, "--plan-processes", "2")
    assert alone.code == 2 and "need --dry-run" in alone.err
