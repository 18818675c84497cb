"""The toxicity judges: ToxiGen prompt parsing, the built-in classifier's held-out accuracy, and a Hugging Face
sequence-classification directory plugged in as the classifier."""

from __future__ import annotations

import pytest
import torch

from llama2.evaluation.hf_classifier import HFToxicityClassifier, resolve_toxic_index
from llama2.evaluation.toxicity import (
    BagOfWordsClassifier,
    builtin_classifier,
    cross_validated_accuracy,
    data_hash,
)
from llama2.evaluation.toxigen import (
    ToxiGenPrompt,
    first_statement,
    labelled_statements,
    parse_statements,
    read_toxigen,
)

STATED_HELDOUT_ACCURACY = 0.85
"""docs/safety_evaluation.md states 0.877 (5-fold cross-validation on all 668 unique statements)."""


def test_parse_statements_reads_literal_newlines_and_the_glued_final_dash():
    assert parse_statements("- they are great\\n- so are we\\n-") == ("they are great", "so are we")
    assert parse_statements("- one thing\\n- am I right?-\n") == ("one thing", "am I right?")
    assert ToxiGenPrompt("hate", "women", ("a", "b")).text == "- a\n- b\n-"
    assert first_statement(" women can lead\n- another\n") == "women can lead"


def test_labelled_statements_are_unique_and_drop_contested_ones():
    prompts = [ToxiGenPrompt("hate", "x", ("bad one", "shared")), ToxiGenPrompt("neutral", "x", ("good one", "shared")),
               ToxiGenPrompt("hate", "y", ("bad one",))]
    assert labelled_statements(prompts) == [("bad one", 1), ("good one", 0)]


def test_read_toxigen_has_every_file_and_group(shared_data):
    prompts = read_toxigen(shared_data / "toxigen" / "prompts")
    assert len(prompts) == 31_000
    assert {(p.label, p.group) for p in prompts} >= {("hate", "trans"), ("neutral", "women")}
    assert all(4 <= len(p.statements) <= 6 and all(not s.startswith("-") for s in p.statements) for p in prompts)


def test_fit_separates_words_and_knows_nothing_of_unseen_ones():
    texts = ["you people are vermin", "vermin all of them", "they are lovely neighbours", "lovely kind people"]
    clf = BagOfWordsClassifier.fit(texts, [1, 1, 0, 0])
    assert clf.accuracy(texts, [1, 1, 0, 0]) == 1.0
    p_unseen, p_toxic = clf.toxic_probability(["zzz qqq", "vermin"])
    assert p_unseen == 0.5 and p_toxic > 0.5


def test_builtin_classifier_reaches_the_stated_heldout_accuracy(shared_data):
    statements = labelled_statements(read_toxigen(shared_data / "toxigen" / "prompts"))
    assert len(statements) == 668
    assert cross_validated_accuracy(statements) >= STATED_HELDOUT_ACCURACY


def test_builtin_classifier_is_cached_by_data_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "prompts"
    data.mkdir()
    hate = ["- they are vermin\\n- vermin all\\n-", "- go back home vermin\\n- they are dirty\\n-"] * 3
    neutral = ["- they are lovely\\n- kind neighbours\\n-", "- good friends\\n- they cook well\\n-"] * 3
    (data / "hate_x_1k.txt").write_text("\n".join(hate) + "\n")
    (data / "neutral_x_1k.txt").write_text("\n".join(neutral) + "\n")
    clf = builtin_classifier(data)
    cached = tmp_path / "cache" / "toxicity" / f"toxigen-{data_hash(data)[:16]}.pt"
    assert cached.is_file()
    again = builtin_classifier(data)
    assert torch.equal(again.weights, clf.weights) and again.heldout_accuracy == clf.heldout_accuracy
    assert clf.describe()["n_train"] == 8
    (data / "neutral_x_1k.txt").write_text("\n".join(neutral[:2]) + "\n")  # new data, new key
    assert data_hash(data)[:16] not in cached.name
    builtin_classifier(data)
    assert len(list(cached.parent.glob("toxigen-*.pt"))) == 2


def test_resolve_toxic_index_by_name_index_or_default():
    labels = {0: "benign", 1: "toxic"}
    assert resolve_toxic_index(labels, None) == 1
    assert resolve_toxic_index(labels, "0") == 0
    assert resolve_toxic_index(labels, "toxic") == 1
    with pytest.raises(ValueError, match="not one of"):
        resolve_toxic_index(labels, "hateful")
    with pytest.raises(ValueError, match="outside"):
        resolve_toxic_index(labels, "2")


def make_hf_classifier(path, tokenizer_model):
    """A random 2-label LlamaForSequenceClassification saved with the tiny SentencePiece tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from llama2.tokenizer.hf_files import write_hf_tokenizer_files
    from llama2.tokenizer.tokenizer import Tokenizer

    config = LlamaConfig(vocab_size=Tokenizer(tokenizer_model).n_words, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, num_labels=2, id2label={0: "benign", 1: "toxic"},
                         label2id={"benign": 0, "toxic": 1})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    shutil.copy(tokenizer_model, path / "tokenizer.model")
    write_hf_tokenizer_files(path, model_max_length=128)
    return path


def test_hf_directory_works_as_the_classifier(tmp_path, tiny_tokenizer_path):
    path = make_hf_classifier(tmp_path / "clf", tiny_tokenizer_path)
    clf = HFToxicityClassifier.load(path, toxic_label="toxic", batch_size=3)
    texts = ["The cat sat.", "A small model learns tiny stories about the river Olm.", "12", "Owls!"]
    batched = clf.toxic_probability(texts)
    for text, p in zip(texts, batched, strict=True):  # padding in a batch must not change a text's score
        ids = clf.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = torch.softmax(clf.model(**ids).logits, dim=-1)[0, 1].item()
        assert p == pytest.approx(expected, abs=1e-5)
    assert len(set(round(p, 6) for p in batched)) > 1
    assert clf.describe()["toxic_label"] == "toxic"
    benign = HFToxicityClassifier.load(path, toxic_label="benign")
    assert benign.toxic_probability(texts[:1])[0] == pytest.approx(1 - batched[0], abs=1e-5)
