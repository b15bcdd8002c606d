"""Data loading (IMDb layouts, errors) and the embedded corpus."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from textenv.build.corpus import corpus_split, generate, lexicon, prompts
from textenv.build.data import DataError, MissingDataError, Texts, clean, load_texts, source_fingerprint

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"


def _write_jsonl(path: Path, records: list, raw_lines: list[str] | None = None) -> None:
    lines = [json.dumps(r) for r in records] + (raw_lines or [])
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def jsonl_dir(tmp_path: Path) -> Path:
    recs = [{"text": f"bad film {i}.<br /><br />Really bad.", "label": 0} for i in range(10)]
    recs += [{"text": f"good film {i}.<br />Loved it.", "label": 1} for i in range(10)]
    _write_jsonl(tmp_path / "train.jsonl.gz", recs)
    _write_jsonl(tmp_path / "unsup.jsonl.gz", [{"text": "no label here"}] * 3)
    return tmp_path


def test_jsonl_loading_strips_br_and_shuffles_with_seed(jsonl_dir: Path) -> None:
    ordered = load_texts(jsonl_dir, "train", seed=None)
    assert ordered.texts[0] == "bad film 0. Really bad." and ordered.labels[:10] == [0] * 10
    assert not any("<br" in t for t in ordered.texts)
    a, b, c = (load_texts(jsonl_dir, "train", seed=s) for s in (0, 0, 1))
    assert a.texts == b.texts and a.texts != c.texts and a.texts != ordered.texts
    assert sorted(a.texts) == sorted(ordered.texts)
    assert all(ordered.texts.index(t) < 10 for t, y in zip(a.texts, a.labels, strict=True) if y == 0)  # labels follow
    assert len(load_texts(jsonl_dir, "train", limit=7)) == 7
    unsup = load_texts(jsonl_dir, "unsup")
    assert unsup.labels is None and len(unsup) == 3


def test_halves_are_disjoint_and_balanced() -> None:
    data = Texts([f"t{i}" for i in range(40)], [i % 2 for i in range(40)])
    a, b = data.halves()
    assert set(a.texts).isdisjoint(b.texts) and len(a) + len(b) == 40
    assert sum(a.labels) == sum(b.labels) == 10


def test_acl_imdb_layout(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for sub, word in (("pos", "great"), ("neg", "awful")):
            d = tmp_path / "aclImdb" / split / sub
            d.mkdir(parents=True)
            for i in (10, 2, 1):
                (d / f"{i}_{8 if sub == 'pos' else 2}.txt").write_text(f"{word} {i}<br />end", encoding="utf-8")
    for root in (tmp_path, tmp_path / "aclImdb"):
        data = load_texts(root, "test", seed=None)
        assert data.texts == ["awful 1 end", "awful 2 end", "awful 10 end", "great 1 end", "great 2 end", "great 10 end"]
        assert data.labels == [0, 0, 0, 1, 1, 1]


def test_missing_directory_error(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="does not exist.*--data-dir"):
        load_texts(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError):  # also a ValueError subclass: DataError
        load_texts(tmp_path / "nope", "train")
    with pytest.raises(MissingDataError, match="no 'test' split"):
        load_texts(tmp_path, "test")


def test_unreadable_line_names_file_and_line(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl.gz", [{"text": "ok", "label": 1}, {"text": "fine", "label": 0}], ["{not json"])
    with pytest.raises(DataError, match=r"train\.jsonl\.gz:3: unreadable record"):
        load_texts(tmp_path, "train")
    _write_jsonl(tmp_path / "train.jsonl.gz", [{"text": "ok", "label": 1}, {"txt": "no text key"}])
    with pytest.raises(DataError, match=r":2: unreadable record \(KeyError"):
        load_texts(tmp_path, "train")
    (tmp_path / "train.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_texts(tmp_path, "train")


def test_empty_split_and_bad_labels(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl.gz", [])
    with pytest.raises(DataError, match="'train'.*is empty"):
        load_texts(tmp_path, "train")
    _write_jsonl(tmp_path / "train.jsonl.gz", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    with pytest.raises(DataError, match=r"must be 0 \(negative\) or 1 \(positive\), got \[2\]"):
        load_texts(tmp_path, "train")
    _write_jsonl(tmp_path / "train.jsonl.gz", [{"text": "a", "label": "pos"}])
    with pytest.raises(DataError, match="'pos'"):
        load_texts(tmp_path, "train")
    with pytest.raises(DataError, match="unknown split"):
        load_texts(tmp_path, "validation")


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_texts("hf:imdb", "train")


def test_fingerprint_names_the_data_not_the_path(jsonl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    before = source_fingerprint(jsonl_dir)
    copy = shutil.copytree(jsonl_dir, tmp_path_factory.mktemp("elsewhere") / "data", copy_function=shutil.copy)
    for p in copy.iterdir():  # a plain copy or a re-provisioned folder: new mtimes, the same data
        os.utime(p, (0, 0))
    assert source_fingerprint(copy) == before
    assert re.fullmatch(r"[0-9a-f]{16}", before) and source_fingerprint("embedded") != before
    data = bytearray((copy / "train.jsonl.gz").read_bytes())
    data[-5] ^= 0xFF  # same size, same name, other bytes
    (copy / "train.jsonl.gz").write_bytes(bytes(data))
    assert source_fingerprint(copy) != before


def test_embedded_corpus_is_varied_balanced_and_deterministic() -> None:
    data = generate()
    assert len(data) == 8000 and len(set(data.texts)) == 8000
    assert sum(data.labels) == 4000
    sentences = {s for t in data.texts for s in re.split(r"(?<=[.!?])\s+", t)}
    assert len(sentences) > 5000, "thousands of distinct sentences"
    assert generate().texts == data.texts  # seeded
    train, test = corpus_split("train"), corpus_split("test")
    assert len(train) == 6400 and len(test) == 1600 and set(train.texts).isdisjoint(test.texts)
    assert 0.4 < sum(test.labels) / len(test) < 0.6
    assert load_texts("embedded", "test", seed=None).texts == test.texts
    assert all(p and not any(w in p.lower() for w in lexicon()["positive"]["adj"]) for p in prompts())


def test_embedded_corpus_words_carry_the_label() -> None:
    lex = lexicon()
    pos, neg = set(lex["positive"]["adj"]), set(lex["negative"]["adj"])
    assert pos.isdisjoint(neg)
    data = corpus_split("train")
    for text, y in list(zip(data.texts, data.labels, strict=True))[:500]:
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not (words & (neg if y == 1 else pos)), text  # no adjective of the other label


@pytest.mark.skipif(not IMDB.is_dir(), reason=f"IMDb copy not found at {IMDB}")
def test_real_imdb_and_corpus_is_not_imdb_text() -> None:
    test = load_texts(IMDB, "test")
    assert len(test) == 25000 and sum(test.labels) == 12500
    assert not any("<br" in t for t in test.texts[:2000])
    assert test.labels[:20] != sorted(test.labels[:20])  # shuffled, not neg-then-pos
    imdb_sentences = {clean(s).lower() for t in test.texts for s in re.split(r"(?<=[.!?])\s+", t)}
    ours = {s.lower() for t in generate().texts for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= 6}
    shared = ours & imdb_sentences
    assert len(ours) > 3000 and len(shared) <= 0.005 * len(ours), sorted(shared)[:10]
