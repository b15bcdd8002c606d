"""The KV-cached step equals a full recompute, through resets, mixed prompt lengths and padding."""

import pytest
import torch
from transformers import CacheLayerMixin, GPT2LMHeadModel

from textenv.lm import BufferLayer, CachedLM, LMError, check_lm_vocab, forward_full
from tiny import tiny_gpt

PAD = 0


def tiny_lm(seed: int = 0) -> GPT2LMHeadModel:
    return tiny_gpt(50, seed=seed, width=32, layers=2, positions=64).eval()


def random_prompt(length: int, max_prompt: int, g: torch.Generator) -> torch.Tensor:
    n = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
    row = torch.full((length,), PAD)
    row[length - n :] = torch.randint(2, 50, (n,), generator=g)
    return row


def test_cached_step_matches_full_recompute_through_resets():
    model, g = tiny_lm(), torch.Generator().manual_seed(1)
    batch, max_prompt, max_new = 6, 5, 7
    window = max_prompt + max_new
    obs = torch.stack([random_prompt(window, max_prompt, g) for _ in range(batch)])
    steps = [0] * batch
    lm = CachedLM(model, PAD)
    restarts = 0
    for _ in range(50):
        logits, hidden = lm.step(obs)
        ref_logits, ref_hidden = forward_full(model, obs, PAD)
        torch.testing.assert_close(logits, ref_logits[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, ref_hidden[:, -1], atol=1e-5, rtol=1e-5)
        assert lm.width <= window  # bounded: never wider than the longest live row
        actions = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
        for i in range(batch):
            steps[i] += 1
            if steps[i] >= max_new or torch.rand(1, generator=g) < 0.15:
                obs[i], steps[i] = random_prompt(window, max_prompt, g), 0
                restarts += 1
            else:
                obs[i] = torch.cat([obs[i, 1:], actions[i : i + 1]])
    assert restarts > 10  # the test really exercised row re-prefill


def test_whole_batch_reprefill_in_length_groups_matches_one_padded_forward():
    # After a policy update every row is mid-episode: re-encoding them in groups of similar length must give the
    # same logits, hidden states and later cached steps as a full recompute, in fewer padded positions.
    model, g = tiny_lm(), torch.Generator().manual_seed(3)
    lengths = [2, 2, 3, 3, 11, 12, 12, 2]
    obs = torch.stack([random_prompt(14, 1, g) for _ in lengths])  # room for the decode steps
    for i, n in enumerate(lengths):
        obs[i, : 14 - n], obs[i, 14 - n :] = PAD, torch.randint(2, 50, (n,), generator=g)
    lm = CachedLM(model, PAD)
    shapes = []
    real_forward = lm._forward
    lm._forward = lambda ids, embeds, **kw: (shapes.append(tuple(ids.shape)), real_forward(ids, embeds, **kw))[1]
    for _ in range(3):
        logits, hidden = lm.step(obs)
        ref_logits, ref_hidden = forward_full(model, obs, PAD)
        torch.testing.assert_close(logits, ref_logits[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, ref_hidden[:, -1], atol=1e-5, rtol=1e-5)
        obs = torch.cat([obs[:, 1:], logits.argmax(-1, keepdim=True)], dim=1)
    assert lm.prefill_states is None  # the last step continued every row
    prefill = shapes[:-2]  # the first step's forwards; then two one-token decode steps
    assert len(prefill) > 1 and sum(b * w for b, w in prefill) < len(lengths) * max(lengths)
    assert shapes[-2:] == [(len(lengths), 1)] * 2


def test_left_padding_does_not_change_logits():
    model = tiny_lm()
    tokens = torch.tensor([[5, 6, 7, 8]])
    short, _ = forward_full(model, tokens, PAD)
    padded, _ = forward_full(model, torch.cat([torch.full((1, 3), PAD), tokens], dim=1), PAD)
    torch.testing.assert_close(short[:, -1], padded[:, -1], atol=1e-5, rtol=1e-5)


def test_reset_forgets_rows_and_detects_continuation():
    model = tiny_lm()
    lm = CachedLM(model, PAD)
    obs = torch.tensor([[PAD, PAD, 3, 4], [PAD, 5, 6, 7]])
    lm.step(obs)
    nxt = torch.tensor([[PAD, 3, 4, 9], [9, 9, 9, 9]])
    assert lm.continuing_rows(nxt).tolist() == [True, False]
    lm.reset()
    assert not lm.continuing_rows(nxt).any()


def test_buffer_layer_speaks_the_cache_layer_protocol_and_writes_in_place():
    # The one library extension point used: a transformers cache layer. A new abstract method (or a protocol
    # the model stops calling) fails here and in the recompute test above, not silently in training.
    assert issubclass(BufferLayer, CacheLayerMixin) and not BufferLayer.__abstractmethods__
    lm = CachedLM(tiny_lm(), PAD)
    obs = torch.tensor([[PAD, PAD, 3, 4], [PAD, 5, 6, 7]])
    lm.step(obs)
    buffer, end = lm.kbuf[0].data_ptr(), lm.end
    lm.step(torch.cat([obs[:, 1:], torch.tensor([[8], [9]])], dim=1))
    assert lm.kbuf[0].data_ptr() == buffer and lm.end == end + 1  # the model wrote one column in place
    assert lm.kbuf[0][:, :, end].abs().sum() > 0


def test_check_lm_vocab():
    assert check_lm_vocab(tiny_lm(), 40) == 50  # a larger (padded) vocabulary is fine
    with pytest.raises(LMError, match="the policy .* vocabulary of 50 tokens, smaller than its tokenizer's 64"):
        check_lm_vocab(tiny_lm(), 64, "the policy")
    with pytest.raises(ValueError, match="not a transformers causal LM"):
        check_lm_vocab(torch.nn.Linear(2, 2), 10)
    assert LMError.user_error  # the CLIs print it as one line
