"""Reward models: the frozen HF classifier wrapper, rule rewards, score validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DistilBertForSequenceClassification

from textenv import (
    EndsWithReward,
    HFRewardModel,
    KeywordReward,
    LengthReward,
    RewardModel,
    TextEnv,
    char_tokenizer,
)
from textenv.rewards import check_scores
from tiny import tiny_classifier

TOK = char_tokenizer("abcdefghijklmnopqrstuvwxyz !.")


def classifier(num_labels: int = 2, vocab: int = len(TOK)) -> DistilBertForSequenceClassification:
    """`tiny_classifier` 32 wide, labels L0, L1, ... and dropout 0.5, which a frozen reward model must turn off."""
    return tiny_classifier(vocab, num_labels, width=32, pad_token_id=TOK.pad_token_id, dropout=0.5,
                           id2label={i: f"L{i}" for i in range(num_labels)},
                           label2id={f"L{i}": i for i in range(num_labels)})


def manual_logits(model, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**TOK(t, return_tensors="pt")).logits for t in texts])


def test_hf_reward_model_from_pretrained(tmp_path):
    model = classifier()
    model.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    rm = HFRewardModel.from_pretrained(str(tmp_path), batch_size=2, max_length=64)
    assert isinstance(rm, RewardModel)
    texts = ["a good film.", "bad", "it was fine i guess", "!"]
    expected = manual_logits(rm.model, texts)[:, 1]
    scores = rm(texts)  # batches of 2 with padding; same as one text at a time
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    assert rm(texts) == scores  # frozen: dropout=0.5 would make repeated calls differ in train mode
    assert not rm.model.training and not any(p.requires_grad for p in rm.model.parameters())
    probs = HFRewardModel.from_pretrained(str(tmp_path), output="prob", label="L0")(texts)
    np.testing.assert_allclose(
        probs, torch.softmax(manual_logits(rm.model, texts), -1)[:, 0].numpy(), atol=1e-5
    )
    assert rm([]) == []


def test_hf_reward_model_single_output_and_errors():
    model = classifier(num_labels=1)
    texts = ["abc", "zz top"]
    probs = HFRewardModel(model, TOK, output="prob")(texts)
    np.testing.assert_allclose(probs, torch.sigmoid(manual_logits(model, texts)[:, 0]).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="'logit' or 'prob'"):
        HFRewardModel(classifier(), TOK, output="softmax")
    with pytest.raises(ValueError, match="not one of the classifier's labels"):
        HFRewardModel(classifier(), TOK, label="POSITIVE")
    with pytest.raises(ValueError, match="out of range"):
        HFRewardModel(classifier(), TOK, label=5)
    with pytest.raises(ValueError, match="embeds only 10.*tokenizer the classifier was trained with"):
        HFRewardModel(classifier(vocab=10), TOK)


def test_hf_reward_model_in_env():
    rm = HFRewardModel(classifier(), TOK)
    env = TextEnv(TOK, rm, prompts=["the film was"], max_prompt_tokens=12, max_new_tokens=2)
    env.reset(seed=0)
    env.step(TOK.convert_tokens_to_ids(" "))
    _, reward, _, truncated, info = env.step(TOK.convert_tokens_to_ids("a"))
    assert truncated and info["text"] == "the film was a"
    assert reward == pytest.approx(manual_logits(rm.model, ["the film was a"])[0, 1].item(), abs=1e-5)


def test_rule_rewards():
    texts = ["good good bad", "ends with b", "Good."]
    assert EndsWithReward("b")(texts) == [0.0, 1.0, 0.0]
    assert KeywordReward(["good"], weight=0.5)(texts) == [1.0, 0.0, 0.5]
    assert KeywordReward("bad")(texts) == [1.0, 0.0, 0.0]
    assert LengthReward(0.1)(["abc", ""]) == pytest.approx([0.3, 0.0])


def test_check_scores():
    np.testing.assert_array_equal(check_scores((1, 2.5), 2, "rm"), [1.0, 2.5])
    assert check_scores(torch.tensor([0.5]), 1, "rm").dtype == np.float64
    with pytest.raises(ValueError, match="shape \\(2, 1\\) for 2 texts"):
        check_scores([[1.0], [2.0]], 2, LengthReward())
    with pytest.raises(ValueError, match="LengthReward returned a non-finite score"):
        check_scores([1.0, float("inf")], 2, LengthReward())


def test_stale_phrase_penalty_costs_word_pairs_the_latest_texts_used():
    from textenv.rewards import StalePhrasePenalty, word_pairs

    assert word_pairs("It is a GREAT movie!") == [("it", "is"), ("is", "a"), ("a", "great"), ("great", "movie")]
    penalty = StalePhrasePenalty(LengthReward(0.0), coef=2.0, window=2)
    # the first call has nothing to compare with; a call's texts are not compared with each other
    assert penalty(["It is a great movie", "It is a great movie"]) == [0.0, 0.0]
    # (it is) (is a) (a great) used, (great film) not: 3/4 stale; "a bad day": (a bad) (bad day) new
    assert penalty(["It is a great film", "a bad day"]) == pytest.approx([-2.0 * 0.75, 0.0])
    # the window holds the last 2 texts: the first call's fell out, so (great movie) is new again
    assert penalty(["a great movie", "bad day", "one"]) == pytest.approx([-2.0 * 0.5, -2.0, 0.0])
    assert StalePhrasePenalty(KeywordReward("great"), 0.0)(["great great"]) == [2.0]
    with pytest.raises(ValueError, match="coef=-1.0 must be >= 0"):
        StalePhrasePenalty(LengthReward(), -1.0)
    with pytest.raises(ValueError, match="window=0 must be a positive number of texts"):
        StalePhrasePenalty(LengthReward(), 1.0, window=0)


def test_stale_phrase_window_survives_a_checkpoint(tmp_path):
    from agents.checkpoint import save_checkpoint
    from textenv.rewards import StalePhrasePenalty

    batches = [["It is a great movie", "a bad day"], ["a great film", "It is a bad film"], ["bad day", "It is"],
               ["a great movie indeed", "one"]]
    whole = StalePhrasePenalty(LengthReward(0.0), coef=1.0, window=3)
    expected = [whole(b) for b in batches]
    first = StalePhrasePenalty(LengthReward(0.0), coef=1.0, window=3)
    assert [first(b) for b in batches[:2]] == expected[:2]
    save_checkpoint(tmp_path / "c.pt", {"reward": first.state_dict()})  # as the RLHF logger's state in a run's
    resumed = StalePhrasePenalty(LengthReward(0.0), coef=1.0, window=3)
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["reward"])  # as a resume loads it
    assert [resumed(b) for b in batches[2:]] == expected[2:] and expected[2] != [0.0, 0.0]
    assert StalePhrasePenalty(LengthReward(0.0), 1.0, window=3)(batches[2]) == [0.0, 0.0]  # not an empty window
    with pytest.raises(ValueError, match="window holds 3 texts, this run's 4; resume with --stale-phrase-window 3"):
        StalePhrasePenalty(LengthReward(), 1.0, window=4).load_state_dict(first.state_dict())


def test_repetition_penalty_costs_repeated_words_only():
    from textenv.rewards import RepetitionPenalty, repeated_word_share

    assert repeated_word_share("It is a great movie. It is a great movie") == 0.5  # great, movie, great, movie
    assert repeated_word_share("A film I loved, a FILM!") == pytest.approx(1 / 3)  # film loved film; "a" is short
    assert repeated_word_share("it is so so good") == 0.0 and repeated_word_share("") == 0.0
    texts = ["great great great great", "a fine film", "so so so"]
    scored = RepetitionPenalty(LengthReward(0.0), coef=2.0)(texts)
    assert scored == pytest.approx([-2.0 * 0.75, 0.0, 0.0])
    assert RepetitionPenalty(KeywordReward("great"), 0.0)(texts) == [4.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="coef=-1.0 must be >= 0"):
        RepetitionPenalty(LengthReward(), -1.0)
