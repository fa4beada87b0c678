"""The LM-head path: target_logps against today's log-softmax path (values and gradients); every fast-path
family against its own forward logits; every installed causal-LM family right or refused; the fused kernel's
selection."""

import sys
import types

import pytest
import torch
import transformers
from tiny_models import tiny_model
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gvpo_offline.model import lm_head, packing
from gvpo_offline.model.lm_head import LogitTransform, chunk_rows_for, target_logps
from gvpo_offline.model.logprobs import (
    FAST_PATH_FAMILIES,
    head_transform,
    sequence_logps,
)
from gvpo_offline.runtime.errors import GvpoError

PROMPTS = [[5, 6, 7, 8], [9, 10], [11]]
RESPONSES = [[11, 12, 13], [14, 15, 16, 17, 18], [19, 20]]


def todays_token_logps(hidden, weight, bias, targets, transform):
    """The path this replaces: full log-softmax of the post-processed logits, then the target's entry."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() * transform.scale
    if transform.softcap:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.7, softcap=3.0)], ids=["plain", "softcap"])
def test_values_and_gradients_equal_todays_path(tied, transform):
    g = torch.Generator().manual_seed(0)
    vocab, d, m = 301, 24, 37
    embed = torch.randn(vocab, d, generator=g).requires_grad_()
    head = embed if tied else torch.randn(vocab, d, generator=g).requires_grad_()
    bias = (0.1 * torch.randn(vocab, generator=g)).requires_grad_()
    ids, targets = torch.randint(0, vocab, (m,), generator=g), torch.randint(0, vocab, (m,), generator=g)
    weights = torch.randn(m, generator=g)  # per-token upstream gradients, as Σ w·log π gives

    def run(fn):
        hidden = torch.tanh(embed[ids] * 0.5) * 3  # a function of the embedding: tied grads flow both ways
        logps = fn(hidden, head, bias, targets, transform)
        inputs = [hidden, embed, bias] + ([] if tied else [head])
        return logps, torch.autograd.grad((weights * logps).sum(), inputs)

    new, new_grads = run(lambda *a: target_logps(*a, chunk=5))  # 37 rows: 7 full chunks and a short one
    old, old_grads = run(todays_token_logps)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_grads, old_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_chunks", [0, 3, 8], ids=["recompute", "part-kept", "all-kept"])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.7)], ids=["plain", "scaled"])
def test_kept_softmax_gives_the_recompute_paths_values_and_gradients(monkeypatch, keep_chunks, transform):
    """Backward from the forward's kept exp(z − max) chunks (all, the first few within the byte budget, or
    none) = the recomputing backward = today's log-softmax path; the kept chunks are left unchanged, so a
    retained graph's second backward gives the same gradients."""
    g = torch.Generator().manual_seed(2)
    vocab, d, m, chunk = 301, 24, 37, 5  # 37 rows: 7 full chunks and a short one
    hidden = torch.randn(m, d, generator=g).requires_grad_()
    weight, bias = torch.randn(vocab, d, generator=g).requires_grad_(), (0.1 * torch.randn(vocab, generator=g)).requires_grad_()
    targets, weights = torch.randint(0, vocab, (m,), generator=g), torch.randn(m, generator=g)
    inputs = [hidden, weight, bias]

    def run(fn):
        logps = fn(hidden, weight, bias, targets, transform)
        return logps, torch.autograd.grad((weights * logps).sum(), inputs)

    monkeypatch.setenv(lm_head.KEEP_ENV, str(keep_chunks * chunk * vocab * 4 / (1 << 20)))
    kept_bytes = []
    real_save = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", lambda ctx, *ts: (
        kept_bytes.append(sum(t.numel() * 4 for t in ts[6:] if t is not None)), real_save(ctx, *ts))[1])
    new, new_grads = run(lambda *a: target_logps(*a, chunk=chunk))
    assert kept_bytes == [min(keep_chunks * chunk, m) * vocab * 4]  # the budget, in whole chunks
    old, old_grads = run(todays_token_logps)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_grads, old_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    kept = []  # the kept chunks: unchanged by a retained graph's backward, the gradient after the last one
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", lambda ctx, *ts: (
        kept.extend(t.clone() for t in ts[6:] if t is not None), kept.extend(t for t in ts[6:] if t is not None),
        real_save(ctx, *ts))[2])
    logps = target_logps(hidden, weight, bias, targets, transform, chunk=chunk)
    first = torch.autograd.grad((weights * logps).sum(), inputs, retain_graph=True)
    copies, chunks = kept[: len(kept) // 2], kept[len(kept) // 2 :]
    assert all(torch.equal(a, b) for a, b in zip(copies, chunks))
    second = torch.autograd.grad((weights * logps).sum(), inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(not torch.equal(a, b) for a, b in zip(copies, chunks))  # consumed in place: no extra buffer


def test_nothing_is_kept_without_gradients_or_with_a_softcap(monkeypatch):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 8, generator=g), torch.randn(50, 8, generator=g).requires_grad_()
    targets = torch.randint(0, 50, (12,), generator=g)
    saved = []
    real_save = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", lambda ctx, *ts: (
        saved.append([t for t in ts[6:] if t is not None]), real_save(ctx, *ts))[1])
    with torch.no_grad():
        target_logps(hidden, weight, None, targets, chunk=4)
    target_logps(hidden, weight, None, targets, LogitTransform(softcap=5.0), chunk=4)
    target_logps(hidden, weight, None, targets, chunk=4)
    assert [len(s) for s in saved] == [0, 0, 3]


def test_bf16_autocast_matches_todays_path_under_autocast():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(20, 16, generator=g), torch.randn(200, 16, generator=g)
    targets = torch.randint(0, 200, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = target_logps(hidden, weight, None, targets, LogitTransform(softcap=5.0), chunk=6)
        old = todays_token_logps(hidden, weight, None, targets, LogitTransform(softcap=5.0))
    assert new.dtype == torch.float32
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)  # the same bf16 logits, then fp32


def test_chunk_rows_fit_the_byte_budget(monkeypatch):
    from gvpo_offline.runtime import memory

    for kept, budget in ((True, lm_head.CPU_CHUNK_BYTES), (False, lm_head.CPU_MMAP_CHUNK_BYTES)):
        monkeypatch.setattr(memory, "freed_memory_kept", lambda kept=kept: kept)
        for vocab in (1000, 32000, 151936, 262144):
            rows = chunk_rows_for(vocab)
            assert rows * vocab * 4 <= budget < (rows + 1) * vocab * 4 or rows in (1, 4096)
            if not kept:  # glibc's default settings: under its mmap threshold, so freed chunks are reused
                assert rows * vocab * 4 < 32 << 20
        assert chunk_rows_for(32000, "cuda") > chunk_rows_for(32000, "cpu")
        assert chunk_rows_for(32000, heap_keeps_freed=not kept) != chunk_rows_for(32000)  # told, not asked
    assert lm_head.CPU_CHUNK_BYTES <= memory.MMAP_THRESHOLD  # kept heap blocks, never a fresh mapping


# ---- families ------------------------------------------------------------------------------------

# Non-default post-processing values, so that a wrong transform shows (1 would hide a × / ÷ mix-up).
FAMILY_EXTRA = {
    "granite": {"logits_scaling": 3.0},
    "cohere": {"logit_scale": 0.25},
    "cohere2": {"logit_scale": 0.25},
    "hyperclovax": {"logits_scaling": 2.5},  # multiplied (the old code divided: 0.46 relative error)
    "gemma2": {"final_logit_softcapping": 2.0},
    "gemma3_text": {"final_logit_softcapping": 2.0},
    "falcon_h1": {"lm_head_multiplier": 0.5, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8},
}


def build(name, **extra):
    config_cls, model_cls = CONFIG_MAPPING[name], getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name])
    return tiny_model(config_cls, model_cls, **{**FAMILY_EXTRA.get(name, {}), **extra})


def own_forward_logps(model, prompts=PROMPTS, responses=RESPONSES, **forward_kwargs):
    """Σ log_softmax(model(prompt + response).logits) over the response, one sequence at a time (no padding)."""
    out = []
    for p, r in zip(prompts, responses):
        logp = model(torch.tensor([p + r]), **forward_kwargs).logits.float().log_softmax(-1)[0]
        out.append(sum(logp[len(p) + j - 1, t] for j, t in enumerate(r)))
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(FAST_PATH_FAMILIES))
def test_fast_path_family_equals_its_own_forward(name):
    model = build(name)
    assert head_transform(model) is not None  # really on the fast path
    weights = torch.tensor([0.7, -1.3, 0.4])
    ours = sequence_logps(model, PROMPTS, RESPONSES, chunk_tokens=3)
    (weights * ours).sum().backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = own_forward_logps(model)
    (weights * theirs).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    for a, p in zip(our_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["falcon_h1", "gpt2"])
def test_other_families_go_through_their_own_forward(name):
    """falcon_h1 multiplies its logits by lm_head_multiplier, which the old fast path ignored."""
    model = build(name)
    assert head_transform(model) is None
    with torch.no_grad():
        ours = sequence_logps(model, PROMPTS, RESPONSES)
        torch.testing.assert_close(ours, own_forward_logps(model), rtol=1e-5, atol=0)


def test_a_lora_wrapped_head_goes_through_the_forward():
    model = build("llama")
    head = model.lm_head
    model.lm_head = types.new_class("WrappedLinear", (torch.nn.Linear,))(head.in_features, head.out_features, bias=False)
    model.lm_head.weight = head.weight
    assert head_transform(model) is None


def test_an_encoder_is_refused_in_one_line():
    model = build("bert")  # BertLMHeadModel without is_decoder: bidirectional, no log π(y|x)
    with pytest.raises(GvpoError, match="is_decoder"):
        sequence_logps(model, PROMPTS, RESPONSES)


def test_packed_families_are_all_on_the_fast_path():
    assert packing.SUPPORTED_MODEL_TYPES <= set(FAST_PATH_FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_every_installed_causal_lm_is_right_or_refused(name):
    """Each causal-LM class of the installed transformers, built small: our log-probs equal log_softmax of the
    model's own logits to 1e-5 relative, or a one-line refusal. Skipped, with the reason: those that need
    an extra package, or that this generic shrinking cannot build small or run (their own forward fails)."""
    try:
        model = build(name)
    except ImportError as err:
        pytest.skip(f"needs an extra package: {str(err).strip().splitlines()[0]}")
    except Exception as err:  # noqa: BLE001 - TooLarge, config validation, ...: the reason goes into the skip
        pytest.skip(f"not built small from its default config: {type(err).__name__}: {str(err)[:120]}")
    with torch.no_grad():
        try:
            # use_cache=False, as ours: dory's logits differ by 7e-4 between use_cache True and False
            theirs = own_forward_logps(model, PROMPTS[:2], RESPONSES[:2], use_cache=False)
        except Exception as err:  # noqa: BLE001 - the reason goes into the skip
            pytest.skip(f"its own forward fails at this size: {type(err).__name__}: {str(err)[:120]}")
        try:
            ours = sequence_logps(model, PROMPTS[:2], RESPONSES[:2], chunk_tokens=5)
        except GvpoError as err:
            assert "\n" not in str(err) and "cannot compute log-probs" in str(err)
            return
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)


def test_fused_kernel_is_chosen_only_where_it_can_run(monkeypatch):
    """cut-cross-entropy: CUDA and no bias and installed and not switched off. Its call convention (loss =
    lse − target logit, scale folded into the hidden states) is checked against the chunked path with a CPU
    stand-in; the kernel itself has not run here (no GPU)."""

    def stand_in(e, c, targets, softcap=None, reduction="mean", filter_eps="high"):
        assert reduction == "none" and filter_eps is None
        return -todays_token_logps(e, c, None, targets, LogitTransform(softcap=softcap))

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", types.SimpleNamespace(linear_cross_entropy=stand_in))
    cpu = torch.zeros(2, 3)
    assert lm_head.fused_kernel(cpu, None) is None  # CPU: never
    cuda = types.SimpleNamespace(is_cuda=True)
    assert lm_head.fused_kernel(cuda, None) is stand_in
    assert lm_head.fused_kernel(cuda, torch.zeros(3)) is None  # a bias: the chunked path
    monkeypatch.setenv(lm_head.KERNEL_ENV, "chunked")
    assert lm_head.fused_kernel(cuda, None) is None
    monkeypatch.delenv(lm_head.KERNEL_ENV)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # not installed
    assert lm_head.fused_kernel(cuda, None) is None

    monkeypatch.setattr(lm_head, "fused_kernel", lambda hidden, bias: stand_in)
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (9,), generator=g)
    transform = LogitTransform(scale=0.5, softcap=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel is used in half precision only
        fused = target_logps(hidden, weight, None, targets, transform)
        chunked = lm_head.TargetLogprob.apply(hidden, weight, None, targets, transform, 4)
    torch.testing.assert_close(fused, chunked, rtol=2e-2, atol=2e-2)  # bf16 (s·h)·Wᵀ vs s·(h·Wᵀ)
    called = []
    monkeypatch.setattr(lm_head, "fused_kernel", lambda hidden, bias: called.append(1) or stand_in)
    target_logps(hidden, weight, None, targets, transform)  # float32: the chunked path
    assert not called
