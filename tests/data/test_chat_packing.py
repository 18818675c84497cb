import numpy as np
import pytest
import torch

from llama2 import Tokenizer, encode_dialog_for_training
from llama2.data.chat_packing import collate_chat, pack_dialogs
from llama2.tokenizer.chat_format import IGNORE_INDEX
from llama2.training.losses import packed_chat_loss


def u(s):
    return {"role": "user", "content": s}


def a(s):
    return {"role": "assistant", "content": s}


DIALOGS = [
    [u("what is the capital of Varnland?"), a("The capital of Varnland is Olmhaven.")],
    [{"role": "system", "content": "Be brief."}, u("count to 3"), a("1, 2, 3"), u("and back?"), a("3, 2, 1")],
    [u("a story about owls"), a("The owls sang a song by the river.")],
    [u("what is 12 + 30?"), a("42")],
    [u("hi"), a("hello"), u("the cat sat"), a("the dog ran"), u("the bird sang"), a("a song")],
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return Tokenizer(tiny_tokenizer_path)


def test_packing_keeps_every_token_and_label_in_order(tok):
    packed = pack_dialogs(tok, DIALOGS, max_seq_len=256)
    assert packed.report.dialogs == 5 and packed.report.truncated == 0 and packed.report.rejected == 0
    stream_ids, stream_targets = [], []
    for w in range(len(packed)):
        tokens, labels, doc_ids = packed[w]
        for d in np.unique(doc_ids):
            span = np.flatnonzero(doc_ids == d)
            if d == doc_ids.max() and span[-1] == len(tokens) - 1 and (labels[span] == IGNORE_INDEX).all() \
                    and tokens[span[0]] == tok.eos_id:
                continue  # the padding block
            stream_ids.append(tokens[span].tolist())
            stream_targets.append(labels[span].tolist())
    assert len(stream_ids) == len(DIALOGS)
    for dialog, ids, targets in zip(DIALOGS, stream_ids, stream_targets, strict=True):
        ref_ids, ref_labels = encode_dialog_for_training(tok, dialog)
        assert ids == ref_ids
        assert targets == ref_labels[1:] + [IGNORE_INDEX]  # shifted within the dialog, never across
        assert ids[0] == tok.bos_id  # every dialog starts a turn


def test_too_long_dialogs_are_cut_between_turns_or_rejected(tok):
    long_dialog = [u("hi"), a("hello there"), u("tell me a very long story " * 6), a("ok " * 40)]
    ids, _ = encode_dialog_for_training(tok, long_dialog[:2])
    packed = pack_dialogs(tok, [long_dialog, [u("x " * 200), a("y")]], max_seq_len=len(ids) + 5)
    assert packed.report.truncated == 1 and packed.report.rejected == 1
    tokens = packed.tokens[0]
    assert tokens[: len(ids)].tolist() == ids  # the first whole turn survives
    assert "ok ok" not in tok.decode(tokens.tolist())


def test_untrainable_dialogs_are_reported_not_trained(tok):
    gatt_like = [u("rule: speak like a pirate. hi"), {**a("ahoy"), "weight": 0}, u("tell a long tale " * 10),
                 a("arr " * 30)]
    first_turn, _ = encode_dialog_for_training(tok, gatt_like[:2])
    packed = pack_dialogs(tok, [DIALOGS[0], gatt_like], max_seq_len=len(first_turn) + 4)
    assert packed.report.untrainable == [1]
    assert "no trained token" in packed.report.summary() and "first lines: 2" in packed.report.summary()


def test_block_diagonal_loss_equals_each_dialog_alone(tok):
    """With the block mask, a packed window's loss is exactly that of its dialogs trained separately."""
    from llama2 import ModelArgs, Transformer

    # A large init scale so that attention is far from uniform and cross-dialog attention shows.
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                  max_seq_len=256, init_std=0.3))
    model.init_weights(seed=0)
    packed = pack_dialogs(tok, DIALOGS[:3], max_seq_len=256)
    assert len(packed) == 1
    batch = collate_chat([packed[0]])
    with torch.no_grad():
        logits_packed = model(batch["tokens"], mask=None)
        loss, metrics = packed_chat_loss(model, batch, block_diagonal=True)
        per_dialog = []
        for dialog in DIALOGS[:3]:
            ids, labels = encode_dialog_for_training(tok, dialog)
            logits = model(torch.tensor([ids]))[0, :-1]
            per_dialog.append(torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum",
                                                                ignore_index=IGNORE_INDEX))
    trained = int(metrics["trained_tokens"])
    torch.testing.assert_close(loss * trained, sum(per_dialog), rtol=1e-5, atol=1e-4)
    plain, _ = packed_chat_loss(model, batch, block_diagonal=False)
    assert not torch.isclose(plain, loss)  # without the mask, later dialogs see earlier ones
    assert logits_packed.shape[1] == 256
