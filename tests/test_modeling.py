"""sequence_logps against a naive full-logits computation; length batching; fingerprints."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gvpo_offline.model.logprobs import length_batches, sequence_logps


def tiny_llama(vocab=300, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def naive_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = model(ids).logits.float().log_softmax(-1)[0]
    return sum(logp[len(prompt) + j - 1, t] for j, t in enumerate(response))


def test_matches_naive_with_padding_and_chunking():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (1, 5, 9, 3)]
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (7, 1, 4, 12)]
    with torch.no_grad():
        batched = sequence_logps(model, prompts, responses, chunk_tokens=5)
        naive = torch.stack([naive_logp(model, p, r) for p, r in zip(prompts, responses)])
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, naive, atol=1e-4, rtol=0)


def test_gradient_matches_naive():
    model = tiny_llama()
    prompts, responses = [[5, 6, 7], [9]], [[10, 11], [12, 13, 14, 15]]
    weights = torch.tensor([0.7, -1.3])
    (weights * sequence_logps(model, prompts, responses, chunk_tokens=3)).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (weights * torch.stack([naive_logp(model, p, r) for p, r in zip(prompts, responses)])).sum().backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_length_batches_respect_budget_and_cover_everything():
    lengths = [5, 40, 12, 12, 3, 100, 7, 7, 7, 30]
    batches = length_batches(lengths, batch_tokens=48)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 48
    assert batches[0] == [5]  # longest first, alone when over budget
    assert length_batches(lengths, 48) == batches  # deterministic


def test_empty_prompt_or_response_is_refused():
    model = tiny_llama()
    for prompts, responses in (([[]], [[5, 6]]), ([[5]], [[]])):
        try:
            sequence_logps(model, prompts, responses)
        except ValueError as err:
            assert "at least one token" in str(err)
        else:
            raise AssertionError("an empty prompt/response must not be scored")
