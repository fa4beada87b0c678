"""Loading under torchrun without a full copy anywhere (model/sliced_load.py): each of 4 gloo processes reads
only its own rows of the safetensors files; its peak RSS stays within its shard, one layer and a fixed
overhead measured in the same launch; the weights are bit-identical to a plain load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_distributed import env

from gvpo_offline.model import sliced_load

MIB = 1 << 20


def save_llama(folder, dtype=torch.float32, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    return model


def test_weight_keys_cover_every_parameter_once_and_tied_ones_by_their_file_name(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    files = sliced_load.WeightFiles.of(tmp_path)
    assert "lm_head.weight" not in files.where  # tied: saved once
    model = sliced_load.build_empty(tmp_path, torch.float32)
    assert all(sliced_load.is_placeholder(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    entries = sliced_load.weight_keys(model, files)
    assert sorted(key for *_, key in entries) == sorted(files.where)  # each file tensor once, nothing else
    assert files.read("model.embed_tokens.weight", slice(15, 31)).shape == (16, 16)

    other = tmp_path / "other"  # a checkpoint whose names the model does not have: not loadable this way
    other.mkdir()
    from safetensors.torch import save_file

    save_file({"renamed": torch.zeros(2)}, other / "model.safetensors")
    (other / "config.json").write_text((tmp_path / "config.json").read_text())
    assert sliced_load.weight_keys(sliced_load.build_empty(other, torch.float32), sliced_load.WeightFiles.of(other)) is None


@pytest.mark.slow
def test_four_ranks_each_hold_their_shard_plus_one_layer_while_loading(tmp_path):
    tiny = tmp_path / "tiny"  # uneven shards over 4 ranks (61 rows, 3 layers)
    save_llama(tiny, vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=3)
    big = tmp_path / "big"  # ~100M parameters, saved in bfloat16 as published checkpoints are (loaded in fp32)
    model = save_llama(big, torch.bfloat16, vocab_size=16000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=10)
    full = sum(p.numel() for p in model.parameters()) * 4  # fp32, as train loads it
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    del model
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
         *map(str, [REPO / "tests" / "load_rss_worker.py", tiny, big, out])],
        env={**env(), "MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["tiny_equal"]  # bit-identical to a plain load, with uneven shards
    for r in got["ranks"]:
        overhead = r["tiny_peak"] - r["before"]  # the fixed cost of a load, measured on the tiny model
        added = r["big_peak"] - r["before"]
        assert r["shard"] <= full / 4 + 4 * 16000  # its share (rows rounded up)
        print(f"rank: added {added / MIB:.0f} MiB, shard {r['shard'] / MIB:.0f} MiB, layer {layer / MIB:.0f} MiB, "
              f"overhead {overhead / MIB:.0f} MiB, full {full / MIB:.0f} MiB")
        assert added <= full / 4 + layer + overhead + 32 * MIB, (added / MIB, full / MIB)
        assert added < full / 2  # far from the whole model (rank 0 held it all before)
