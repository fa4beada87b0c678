"""Packed rows (each prompt once, no padding) against separate full-logits sequences: log-probs and
gradients for Llama-, Qwen2-, Gemma-, Gemma2- and Mistral-style tiny models and stories260K; the plan;
the fallback; and packing in precompute-ref / train / eval."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS
from rich.console import Console

from gvpo_offline.data import DataConfig
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.model import packing
from gvpo_offline.model.loading import load_model
from gvpo_offline.model.logprobs import sequence_logps
from gvpo_offline.model.packing import packed_logps, plan_rows, split_pairs
from gvpo_offline.model.scoring import batched_logps
from gvpo_offline.stages.reference.cache import load_split
from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train
from gvpo_offline.stages.train.step import StepBatch, gvpo_backward

VOCAB = 120


def tiny(kind: str, window: int | None = 4):
    """A 2-layer random model of one architecture family (window: sliding window where it has one)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "qwen2":  # layer 0 full attention, layer 1 sliding window: a {layer type: mask} dict
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=window is not None,
                                                   sliding_window=window, max_window_layers=1))
    elif kind == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=8))
    elif kind == "gemma2":  # eager attention (soft-capping), alternating sliding layers, final soft-cap
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, sliding_window=window or 4096))
    elif kind == "mistral":  # one sliding window for every layer, no layer_types
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=window))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8))
    elif kind == "gemma3_text":  # local/global rotary per layer type, sliding layers
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=window or 4096,
                                                         layer_types=["sliding_attention", "full_attention"]))
    elif kind == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, sliding_window=window, pad_token_id=0))
    else:
        raise ValueError(kind)
    return model.eval()


def groups_of_ids(seed: int = 1, ks=(3, 1, 4, 2), vocab: int = VOCAB):
    """Pairs of a few groups (prompts 1..9 tokens, responses 1..11), interleaved so that a group's pairs
    are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for k in ks:
        prompt = torch.randint(3, vocab, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k):
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=g)),),
                                           generator=g).tolist())
    order = torch.randperm(len(prompts), generator=g).tolist()
    return [prompts[i] for i in order], [responses[i] for i in order]


def naive_logps(model, prompts, responses) -> torch.Tensor:
    """Each pair alone, full logits, log-softmax over everything (independent of our code)."""
    out = []
    for p, r in zip(prompts, responses):
        logits = model(input_ids=torch.tensor([p + r]), use_cache=False).logits[0].float()
        out.append(torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(-1, torch.tensor(r)[:, None]).sum())
    return torch.stack(out)


# ---- the mask and the plan --------------------------------------------------------------------------


def visibility(plan: packing.Pieces, tokens: int, window=None) -> torch.Tensor:
    """[tokens, tokens] bool: which key token each query token attends to, read back from the pieces
    (their gathered indices and masks); a token in no piece sees nothing."""
    seen = torch.zeros(tokens, tokens, dtype=torch.bool)
    for b, bucket in enumerate(plan.buckets):
        mask = plan.mask(b, window, additive=False, dtype=torch.float32)[:, 0]
        for m in range(len(bucket.q_index)):
            for i in torch.nonzero(bucket.q_valid[m]).flatten():
                for j in torch.nonzero(mask[m, i]).flatten():
                    seen[bucket.q_index[m, i], bucket.k_index[m, j]] = True
    return seen


def test_pieces_prompt_shared_responses_blind_to_siblings():
    # one row: prompt (2 tokens), response 1 (2), response 2 (1), then a second segment (1 + 1), 1 pad
    prompts, responses = [[5, 6], [5, 6], [7]], [[8, 9], [10], [11]]
    rows = [[packing.Segment((0, 1), 5), packing.Segment((2,), 2)]]
    ids, position, pieces, _ = packing._layout(rows + [[packing.Segment((2,), 2)]], prompts, responses)
    assert ids[0].tolist() == [5, 6, 8, 9, 10, 7, 11]
    assert position[0].tolist() == [0, 1, 2, 3, 2, 0, 1]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # response 2 sees the prompt and itself, not response 1
        [0, 0, 0, 0, 0, 1, 0],  # another segment sees nothing of the first
        [0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    plan = packing.Pieces(pieces, position, config=None, device="cpu")
    seen = visibility(plan, 14)
    assert torch.equal(seen[:7, :7], expected)
    assert not seen[:7, 7:].any() and not seen[7:, :7].any()  # rows never see each other
    assert not seen[7 + 2:].any()  # the second row's pad columns are in no piece
    windowed = visibility(plan, 14, window=2)[:7, :7]
    assert windowed[3].tolist() == [0, 0, 1, 1, 0, 0, 0]  # positions 2..3
    assert windowed[4].tolist() == [0, 1, 0, 0, 1, 0, 0]  # positions 1..2
    # every real token is the query of exactly one piece
    assert sorted(plan.query_tokens.tolist()) == [*range(7), 7, 8]


def test_buckets_bound_padding_and_gathered_keys():
    """Pieces are batched so that a bucket's padded work stays within BUCKET_SLACK of its real work and
    its key slots within the pass's tokens; every real token is the query of exactly one piece."""
    prompts, responses = groups_of_ids(ks=(3, 1, 4, 2, 5))
    rows = plan_rows(prompts, responses, 24)
    ids, position, pieces, _ = packing._layout(rows, prompts, responses)
    plan = packing.Pieces(pieces, position, config=None, device="cpu")
    assert len(plan.buckets) > 1
    for bucket in plan.buckets:
        real = (bucket.q_valid.sum(1) * bucket.k_valid.sum(1)).sum().item()
        assert bucket.q_index.numel() * bucket.k_index.shape[1] <= packing.BUCKET_SLACK * real or len(bucket.q_index) == 1
        assert bucket.k_index.numel() <= position.numel() or len(bucket.q_index) == 1
    real_tokens = sum(len(prompts[s.pairs[0]]) + sum(len(responses[i]) for i in s.pairs) for row in rows for s in row)
    assert len(plan.query_tokens) == len(set(plan.query_tokens.tolist())) == real_tokens


def test_plan_computes_each_prompt_once_and_respects_the_budget():
    prompts, responses = groups_of_ids(ks=(3, 1, 4, 2, 5))
    separate = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    unique = {tuple(p) for p in prompts}
    once = sum(len(p) for p in unique) + sum(len(r) for r in responses)
    assert packing.row_tokens(plan_rows(prompts, responses)[0]) == once < separate  # no budget: one row
    for budget in (12, 25, 40):
        rows = plan_rows(prompts, responses, budget)
        pairs = sorted(i for row in rows for seg in row for i in seg.pairs)
        assert pairs == list(range(len(prompts)))  # every pair exactly once
        for row in rows:
            assert packing.row_tokens(row) <= budget or len(row) == 1  # only a lone long segment overflows
            for seg in row:
                assert len({tuple(prompts[i]) for i in seg.pairs}) == 1
                assert seg.tokens == len(prompts[seg.pairs[0]]) + sum(len(responses[i]) for i in seg.pairs)
        assert plan_rows(prompts, responses, budget) == rows  # deterministic
    pieces = split_pairs(prompts, responses, list(range(len(prompts))), 15)
    assert sorted(i for piece in pieces for i in piece) == list(range(len(prompts)))
    assert all(len(piece) == 1 or len(prompts[piece[0]]) + sum(len(responses[i]) for i in piece) <= 15
               for piece in pieces)


def test_unsupported_models_fall_back_with_a_note():
    from transformers import GPT2Config

    assert packing.resolve("auto", tiny("llama").config) == ("auto", None)
    assert packing.resolve("on", tiny("llama").config) == ("on", None)
    assert packing.resolve("off", tiny("llama").config) == ("off", None)
    mode, note = packing.resolve("auto", GPT2Config())
    assert mode == "off" and "gpt2" in note and "\n" not in note
    flash = tiny("llama").config
    flash._attn_implementation = "flash_attention_2"
    mode, note = packing.resolve("on", flash)
    assert mode == "off" and "flash_attention_2" in note
    with pytest.raises(ValueError):
        packing.resolve("sometimes", flash)


@pytest.mark.parametrize("settings", [{"target_modules": "lm_head"}, {"modules_to_save": ("lm_head",)}])
def test_a_wrapped_lm_head_falls_back_to_padded_rows(settings):
    """Packed rows need the LM head on the fast path; LoRA (or modules_to_save) on the head is not: padded
    rows with a note, and the padded path's log-probs are the model's own."""
    from gvpo_offline.model.adapters import LoraSettings, add_lora

    model = add_lora(tiny("llama"), LoraSettings(r=2, **settings))
    assert packing.resolve("on", model.config, add_lora(tiny("llama"), LoraSettings(r=2))) == ("on", None)
    mode, note = packing.resolve("on", model.config, model)
    assert mode == "off" and "LM head" in note and "\n" not in note
    prompts, responses = [[1, 2, 3]], [[4, 5]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits[0].float().log_softmax(-1)
        expected = logits[2, 4] + logits[3, 5]
        assert torch.allclose(sequence_logps(model, prompts, responses)[0], expected, atol=1e-5)


def test_auto_packs_only_when_sharing_the_prompt_saves_enough_tokens():
    long_prompt, short_prompt = list(range(1, 513)), [1, 2, 3]
    responses = [list(range(100, 228))] * 8
    # 8 responses of 128 tokens to one 512-token prompt: 7 of the 8 prompt copies are saved
    assert packing.shared_fraction([long_prompt] * 8, responses) == pytest.approx(7 * 512 / (8 * 640))
    assert packing.use_packing("auto", [long_prompt] * 8, responses)
    # a 3-token prompt saves ~2%: padded rows; 'on' and 'off' do not look at the data
    assert packing.shared_fraction([short_prompt] * 8, responses) == pytest.approx(7 * 3 / (8 * 131))
    assert not packing.use_packing("auto", [short_prompt] * 8, responses)
    assert packing.use_packing("on", [short_prompt] * 8, responses)
    assert not packing.use_packing("off", [long_prompt] * 8, responses)
    # distinct prompts share nothing
    assert packing.shared_fraction([[i, i + 1] for i in range(8)], responses) == 0.0


# ---- same log-probs and gradients as separate sequences -----------------------------------------


@pytest.mark.parametrize("kind", sorted(packing.SUPPORTED_MODEL_TYPES))
def test_packed_logps_equal_separate_sequences(kind):
    model = tiny(kind)
    prompts, responses = groups_of_ids()
    with torch.no_grad():
        naive = naive_logps(model, prompts, responses)
        padded = sequence_logps(model, prompts, responses)
        for row_tokens in (None, 30, 12):  # one row; several rows with padding; groups cut across rows
            packed = packed_logps(model, prompts, responses, chunk_tokens=7, row_tokens=row_tokens)
            torch.testing.assert_close(packed, naive, atol=1e-4, rtol=0)
        torch.testing.assert_close(padded, naive, atol=1e-4, rtol=0)
    if kind in ("qwen2", "mistral", "gemma2", "gemma3_text", "phi3"):  # the sliding window binds here
        unwindowed = tiny(kind, window=None if not kind.startswith("gemma") else 4096)
        with torch.no_grad():
            assert (naive_logps(unwindowed, prompts, responses) - naive).abs().max() > 1e-3


def test_stories260k_packed_batched_logps_equal_padded():
    model = load_model(STORIES, torch.device("cpu"))
    prompts, responses = groups_of_ids(seed=3, ks=(5, 2, 3, 4, 2), vocab=512)
    seen = []
    packed = batched_logps(model, prompts, responses, 48, on_batch=lambda n, t: seen.append(n), packed=True)
    padded = batched_logps(model, prompts, responses, 48)
    assert len(seen) > 1 and sum(seen) == len(prompts)
    assert abs(packed - padded).max() < 1e-4
    with torch.no_grad():
        naive = naive_logps(model, prompts, responses).double().numpy()
    assert abs(packed - naive).max() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_packed_gradient_equals_separate_sequences(kind):
    """All k responses' gradients reach the shared prompt's activations: ∇θ Σ w·log π is the same as
    with each pair computed on its own."""
    model = tiny(kind)
    prompts, responses = groups_of_ids()
    weights = torch.linspace(-1.5, 1.0, len(prompts))
    (weights * packed_logps(model, prompts, responses, chunk_tokens=5, row_tokens=30)).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (weights * naive_logps(model, prompts, responses)).sum().backward()
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (ours[name] - p.grad).abs().max().item() <= 1e-4 * scale, name


def test_packed_gradient_with_activation_checkpointing():
    """Checkpointed decoder layers re-run their forward in the backward pass: the recomputation must
    take the same pieces (the routing is permanent), so the gradient still equals separate sequences."""
    from gvpo_offline.stages.train.recipe import enable_gradient_checkpointing

    model = tiny("qwen2")
    prompts, responses = groups_of_ids()
    weights = torch.linspace(-1.0, 2.0, len(prompts))
    (weights * naive_logps(model, prompts, responses)).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_gradient_checkpointing(model)
    (weights * packed_logps(model, prompts, responses, row_tokens=30)).sum().backward()
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (expected[name] - p.grad).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("kind", ["llama", "gemma2"])  # sdpa, eager
def test_routed_attention_leaves_ordinary_calls_unchanged_and_is_not_saved(kind, tmp_path):
    import transformers as tf

    model = tiny(kind)
    backend = model.config._attn_implementation
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :4] = 0  # left padding: the ordinary mask still has to be built and used
    with torch.no_grad():
        before = model(ids, attention_mask=attention_mask).logits
        generated = model.generate(ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
        packed_logps(model, *groups_of_ids())
        assert model.config._attn_implementation == f"gvpo_{backend}"
        after = model(ids, attention_mask=attention_mask).logits
        assert torch.equal(before[attention_mask.bool()], after[attention_mask.bool()])
        assert torch.equal(generated, model.generate(ids, attention_mask=attention_mask, max_new_tokens=4,
                                                     do_sample=False))
    model.save_pretrained(tmp_path)
    assert "gvpo" not in (tmp_path / "config.json").read_text()
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == backend


def reference_varlen(bottom_right: bool = True):
    """A CPU stand-in for torch's flash varlen kernel, written from its documented semantics: sequence i
    is q[cu_q[i]:cu_q[i+1]] against k/v[cu_k[i]:cu_k[i+1]]; window (left, 0) is causal, aligned to the
    bottom-right corner (query a sees keys b ≤ a + n_k − n_q, and ≥ that − left when left ≥ 0).
    ``bottom_right=False``: the wrong (top-left) alignment, for the check."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        outs = []
        for i in range(len(cu_q) - 1):
            qi, ki, vi = (t[a:b].transpose(0, 1) for t, a, b in ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]),
                                                                (v, cu_k[i], cu_k[i + 1])))
            shift = ki.shape[1] - qi.shape[1] if bottom_right else 0
            a, b = torch.arange(qi.shape[1])[:, None] + shift, torch.arange(ki.shape[1])[None, :]
            allowed = b <= a
            if window_size[0] >= 0:
                allowed &= b >= a - window_size[0]
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(outs)

    return kernel


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])  # full attention, per-layer and global windows
def test_varlen_kernel_path_equals_separate_sequences(kind, monkeypatch, capsys):
    """The unpadded varlen layout of the pieces (one sequence per piece, cumulative lengths, window
    (W − 1, 0)) gives the same log-probs and gradients, given a kernel with flash's documented semantics
    (the real one is CUDA-only; on a GPU its first call is compared with the bucket path)."""
    calls = []
    kernel = reference_varlen()
    monkeypatch.setattr(packing, "_varlen_kernel", lambda: lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setattr(packing, "_varlen_usable", lambda query, kwargs: True)
    monkeypatch.setattr(packing, "_VARLEN_CHECK", {})
    model = tiny(kind, window=3)
    prompts, responses = groups_of_ids()
    weights = torch.linspace(-1.5, 1.0, len(prompts))
    ours = packed_logps(model, prompts, responses, row_tokens=30)
    (weights * ours).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = naive_logps(model, prompts, responses)
    (weights * expected).sum().backward()
    assert calls and packing._VARLEN_CHECK == {"ok": True}
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * (p.grad.abs().max().item() + 1e-12), name
    assert "varlen" not in capsys.readouterr().err


def test_a_wrong_varlen_kernel_is_caught_by_the_first_call_check(monkeypatch, capsys):
    """A kernel whose causal mask is aligned top-left (responses would not see their own last keys
    correctly) is found out on its first call: the bucket path is used from then on, with a note."""
    kernel = reference_varlen(bottom_right=False)
    monkeypatch.setattr(packing, "_varlen_kernel", lambda: kernel)
    real_usable = packing._varlen_usable
    monkeypatch.setattr(packing, "_varlen_usable", lambda q, kw: packing._VARLEN_CHECK.get("ok", True))
    monkeypatch.setattr(packing, "_VARLEN_CHECK", {})
    model = tiny("llama")
    prompts, responses = groups_of_ids()
    with torch.no_grad():
        ours = packed_logps(model, prompts, responses)
        expected = naive_logps(model, prompts, responses)
    assert packing._VARLEN_CHECK == {"ok": False}
    assert "flash varlen kernel differs" in capsys.readouterr().err
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4)
    assert not real_usable(torch.zeros(1, 1, 1, 8), {})  # CPU tensors never take the kernel


def step_batch(ks=(2, 3, 4)) -> StepBatch:
    prompts, responses, gids = [], [], []
    g = torch.Generator().manual_seed(5)
    for j, k in enumerate(ks):
        p, r = groups_of_ids(seed=10 + j, ks=(k,))
        prompts += p
        responses += r
        gids += [j] * k
    n = len(gids)
    return StepBatch(prompts, responses, rewards=torch.randn(n, generator=g, dtype=torch.float64),
                     ref_logps=-torch.rand(n, generator=g, dtype=torch.float64) * 30 - 10,
                     group_index=torch.tensor(gids), n_groups=len(ks))


def test_packed_train_step_keeps_the_exact_gradient():
    """Packed micro-batches: one pass, split groups and the padded path all give one gradient; with
    packing a budget that needs splitting when padded holds the whole step."""
    model, batch, beta = tiny("llama"), step_batch(), 0.3
    stats, grads = {}, {}
    for name, budget, packed in (("padded", 10_000, False), ("packed", 10_000, True), ("packed-split", 12, True)):
        stats[name] = gvpo_backward(model, batch, beta, micro_batch_tokens=budget, packed=packed)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    assert stats["packed"].micro_batches == 1 and stats["packed-split"].micro_batches > 3
    once = sum(len(p) for p in {tuple(p) for p in batch.prompt_ids}) + sum(len(r) for r in batch.response_ids)
    assert gvpo_backward(model, batch, beta, micro_batch_tokens=once, packed=True).micro_batches == 1
    assert gvpo_backward(model, batch, beta, micro_batch_tokens=once, packed=False).micro_batches > 1
    for name in ("packed", "packed-split"):
        assert stats[name].loss == pytest.approx(stats["padded"].loss, rel=1e-5)
        for n, g in grads["padded"].items():
            assert (grads[name][n] - g).abs().max().item() <= 1e-5 * (g.abs().max().item() + 1e-12), (name, n)


# ---- the pipeline ------------------------------------------------------------------------------------


def write_story_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n"
                            for p, r, w in STORY_GROUPS))
    return path


def run_precompute(data: Path, workdir: Path, packing_setting: str, model=STORIES) -> str:
    out = io.StringIO()
    precompute(PrecomputeConfig(
        data=DataConfig((str(data),), "grouped"), model=str(model), workdir=workdir, device="cpu",
        tokenize=TokenizeConfig(max_length=96, max_prompt_length=32), eval_fraction=0.0, progress=False,
        packing=packing_setting,
    ), Console(file=out, width=400))
    return out.getvalue()


def test_precompute_records_packing_and_train_follows_the_cache(tmp_path):
    data = write_story_data(tmp_path / "data.jsonl")
    run_precompute(data, tmp_path / "auto", "on")
    run_precompute(data, tmp_path / "off", "off")
    manifests = {m: json.loads((tmp_path / m / "manifest.json").read_text()) for m in ("auto", "off")}
    assert manifests["auto"]["inputs"]["packing"] == "on" and manifests["off"]["inputs"]["packing"] == "off"
    assert manifests["auto"]["key"] != manifests["off"]["key"]
    ref = {m: load_split(tmp_path / m, "train")["ref_logp"].to_numpy() for m in ("auto", "off")}
    assert abs(ref["auto"] - ref["off"]).max() < 1e-4
    assert "--packing changed ('off' -> 'on')" in run_precompute(data, tmp_path / "off", "on")

    # ℓ = 0 at step 0 to float rounding: the policy on the cache's path, and on the other path
    for packing_setting in (None, "off"):
        workdir = tmp_path / "auto"
        for leftover in ("model", "metrics.jsonl"):
            target = workdir / leftover
            if target.is_dir():
                shutil.rmtree(target)
            target.unlink(missing_ok=True)
        logs: list[str] = []
        train(TrainConfig(workdir=workdir, beta=1.0, lr=2e-5, groups_per_step=4, save_every=0, progress=False,
                          device="cpu", max_steps=1, packing=packing_setting), log=logs.append)
        first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
        assert first["log_ratio_absmax"] < 1e-4, packing_setting
        assert not any("--packing" in line for line in logs)


def test_unsupported_model_falls_back_in_precompute(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (STORIES / name).exists():
            shutil.copy(STORIES / name, model_dir / name)
    data = write_story_data(tmp_path / "data.jsonl")
    printed = run_precompute(data, tmp_path / "run", "auto", model=model_dir)
    notes = [line for line in printed.splitlines() if "--packing auto" in line]
    assert len(notes) == 1 and "gpt2" in notes[0] and "padded" in notes[0]
    table = load_split(tmp_path / "run", "train")
    model = load_model(model_dir, torch.device("cpu"))
    with torch.no_grad():
        expected = sequence_logps(model, table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist())
    assert abs(table["ref_logp"].to_numpy() - expected.double().numpy()).max() < 1e-4
