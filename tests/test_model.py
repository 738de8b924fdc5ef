"""The VideoBERT Transformer: head shapes, masked-only MLM, parity with transformers' BERT, HF export."""

from __future__ import annotations

import pytest
import torch
import transformers

from videobert.model import (
    MODEL_SIZES,
    JointVocab,
    VideoBert,
    VideoBertConfig,
    build_model,
    export_hf,
    hf_to_videobert,
    init_from_bert,
    init_from_videobert,
    load_pretrained,
    save_pretrained,
)
from videobert.model_sizes import ModelSize

VOCAB = JointVocab(["a", "b", "c", "d", "e", "f", "g", "h"], 12)


def hf_config(model: VideoBert) -> transformers.BertConfig:
    c = model.config
    return transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.intermediate,
        max_position_embeddings=c.max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def test_vocab_layout():
    assert VOCAB.size == 6 + 8 + 12
    assert VOCAB.text_ids(0) == 6 and VOCAB.video_ids(0) == 14
    tokens = VOCAB.tokens()
    assert tokens[:6] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[>]"]
    assert tokens[6] == "a" and tokens[14] == "[V00000]" and len(tokens) == VOCAB.size
    assert JointVocab.from_dict(VOCAB.to_dict()).tokens() == tokens


def test_sizes_registry():
    assert MODEL_SIZES["large"] == ModelSize(hidden=1024, layers=24, heads=16, intermediate=4096)
    assert VideoBertConfig.from_size("large", 10).intermediate == 4096
    with pytest.raises(ValueError, match="unknown model size"):
        VideoBertConfig.from_size("huge", 10)


def test_head_shapes_and_masked_only_mlm():
    model = build_model("debug", VOCAB, max_positions=32).eval()
    ids = torch.randint(0, VOCAB.size, (3, 20))
    types = torch.randint(0, 2, (3, 20))
    positions = torch.tensor([0, 5, 21, 59])
    out = model(ids, types, mlm_positions=positions, cls_positions=torch.tensor([0, 20, 40]))
    assert out["hidden"].shape == (3, 20, 64)
    assert out["mlm_logits"].shape == (4, VOCAB.size)  # only the masked positions
    assert out["alignment_logits"].shape == (3,)
    # Equal to the dense head at those positions: gathering first changes cost, not results.
    dense = model.mlm_head(out["hidden"]).reshape(60, -1)
    torch.testing.assert_close(out["mlm_logits"], dense[positions])
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.zeros(1, 40, dtype=torch.long), torch.zeros(1, 40, dtype=torch.long))


def test_packed_rows_equal_separate_rows():
    model = build_model("debug", VOCAB, max_positions=32).eval()
    a, b = torch.randint(0, VOCAB.size, (7,)), torch.randint(0, VOCAB.size, (5,))
    packed = torch.cat([a, b]).unsqueeze(0)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    seq_ids = torch.tensor([[1] * 7 + [2] * 5])
    hidden = model.encode(packed, torch.zeros_like(packed), positions, seq_ids)
    alone_a = model.encode(a.unsqueeze(0), torch.zeros(1, 7, dtype=torch.long))
    alone_b = model.encode(b.unsqueeze(0), torch.zeros(1, 5, dtype=torch.long))
    torch.testing.assert_close(hidden[0, :7], alone_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[0, 7:], alone_b[0], atol=1e-5, rtol=1e-4)


def test_parity_with_transformers_bert_model():
    model = build_model("debug", VOCAB, max_positions=32).eval()
    bert = transformers.BertModel(hf_config(model), add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(hf_to_videobert(bert.state_dict(), 2), strict=False)
    assert not unexpected and all(k.startswith(("mlm_head", "pooler", "alignment")) for k in missing)
    ids = torch.randint(0, VOCAB.size, (2, 16))
    types = torch.randint(0, 2, (2, 16))
    attention = torch.ones(2, 16, dtype=torch.long)
    attention[1, 11:] = 0
    expected = bert(input_ids=ids, token_type_ids=types, attention_mask=attention).last_hidden_state
    got = model.encode(ids, types, seq_ids=attention)
    real = attention.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def test_export_hf_loads_with_transformers_and_matches(tmp_path):
    torch.manual_seed(1)
    model = build_model("debug", VOCAB, max_positions=32).eval()
    export_hf(model, VOCAB, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "vocab.txt").read_text().splitlines() == VOCAB.tokens()
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB.size, (2, 12))
    types = torch.randint(0, 2, (2, 12))
    logits = hf(input_ids=ids, token_type_ids=types).logits
    ours = model(ids, types, mlm_positions=torch.arange(24))["mlm_logits"]
    torch.testing.assert_close(ours, logits.reshape(24, -1), atol=1e-4, rtol=1e-4)

    # And the export initialises a fresh model again (init_from_bert from a local path).


def test_init_from_bert_checkpoint_directory(tmp_path):
    # A BERT checkpoint whose WordPiece vocabulary is our text vocabulary (specials first, as BERT's).
    text_vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
    vocab = JointVocab(text_vocab, 12)
    model = build_model("debug", vocab, max_positions=32, seed=7).eval()
    config = hf_config(model)
    config.vocab_size = len(text_vocab)
    bert = transformers.BertForMaskedLM(config).eval()
    bert.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(text_vocab) + "\n")
    init_from_bert(model, str(tmp_path), vocab)
    # A text-only input gives BERT's hidden states: tokenizer id t is joint id 6 + t, [CLS] is shared.
    text = torch.tensor([[2, 5, 6, 7, 3]])
    joint = vocab.text_ids(text)
    joint[0, 0], joint[0, -1] = 2, 3  # our own [CLS] / [SEP], initialised from BERT's rows
    expected = bert.bert(input_ids=text).last_hidden_state
    torch.testing.assert_close(model.encode(joint, torch.zeros_like(joint)), expected, atol=1e-5, rtol=1e-4)


def test_init_from_bert_offline_error_is_clear():
    model = build_model("debug", VOCAB, max_positions=32)
    with pytest.raises(RuntimeError, match="Offline, pass a local directory"):
        init_from_bert(model, "no-such-org/no-such-bert-model")


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = build_model("debug", VOCAB, max_positions=32, seed=4).eval()
    save_pretrained(model, VOCAB, tmp_path)
    loaded, vocab = load_pretrained(tmp_path)
    assert vocab.tokens() == VOCAB.tokens()
    ids = torch.randint(0, VOCAB.size, (1, 9))
    torch.testing.assert_close(loaded.encode(ids, ids * 0), model.encode(ids, ids * 0))
    assert loaded.mlm_head.decoder.weight is loaded.embeddings.word_embeddings.weight


def test_init_from_videobert_moves_rows_by_meaning():
    source = build_model("debug", VOCAB, max_positions=32, seed=1)
    # A newer tokenizer: "b" dropped, "zz" new, "a" moved; same codebook, 12 visual words.
    vocab = JointVocab(["zz", "c", "a", "d", "e", "f", "g", "h"], 12)
    target = build_model("debug", vocab, max_positions=48, seed=2)
    fresh_zz = target.embeddings.word_embeddings.weight[vocab.text_ids(0)].clone()
    copied = init_from_videobert(target, vocab, source, VOCAB, same_codebook=True)
    assert copied == {"text_rows": 7, "visual_rows": 12}

    src, dst = source.embeddings.word_embeddings.weight, target.embeddings.word_embeddings.weight
    assert torch.equal(dst[:6], src[:6])  # specials by id
    assert torch.equal(dst[vocab.text_ids(2)], src[VOCAB.text_ids(0)])  # "a" follows its string
    assert torch.equal(dst[vocab.text_ids(0)], fresh_zz)  # a new token keeps its fresh row
    assert torch.equal(dst[vocab.video_ids(5)], src[VOCAB.video_ids(5)])
    bias_src, bias_dst = source.mlm_head.decoder.bias, target.mlm_head.decoder.bias
    assert torch.equal(bias_dst[vocab.text_ids(2)], bias_src[VOCAB.text_ids(0)])
    assert torch.equal(target.layers[1].attention.qkv.weight, source.layers[1].attention.qkv.weight)
    assert torch.equal(
        target.embeddings.position_embeddings.weight[:32], source.embeddings.position_embeddings.weight
    )
    assert target.mlm_head.decoder.weight is target.embeddings.word_embeddings.weight  # still tied

    # Another codebook: its word 5 is another cluster, so visual rows stay fresh.
    other = build_model("debug", vocab, max_positions=48, seed=3)
    before = other.embeddings.word_embeddings.weight[vocab.video_offset :].clone()
    assert init_from_videobert(other, vocab, source, VOCAB, same_codebook=False)["visual_rows"] == 0
    assert torch.equal(other.embeddings.word_embeddings.weight[vocab.video_offset :], before)

    with pytest.raises(ValueError, match="model.size differs"):
        init_from_videobert(build_model("base", vocab), vocab, source, VOCAB, same_codebook=True)
