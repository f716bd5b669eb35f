"""Text side: trimmed encoding equals encode_text, NACLIP query formula, the disk cache."""

from __future__ import annotations

import torch

from ovss_label.backend.models.clip import clip_tokenizer
from ovss_label.backend.models.clip_text import TextEncoder, encode_tokens_trimmed
from ovss_label.ontologies import Vocabulary

PROMPTS = [
    "a photo of a cat.",
    "a bad photo of the person in jeans.",
    "a low resolution photo of a television monitor on a wooden desk next to a lamp.",
    "x",
]


def test_trimmed_context_equals_encode_text(tiny_clip):
    tokens = clip_tokenizer()(PROMPTS)
    assert int(tokens.argmax(-1).max()) + 1 < 77  # the trim really cuts something
    with torch.no_grad():
        full = tiny_clip.model.encode_text(tokens)
    trimmed = encode_tokens_trimmed(tiny_clip.model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_sorted_batches_return_prompts_in_order(tiny_clip):
    encoder = TextEncoder(tiny_clip, cache=False, batch_size=2)
    with torch.no_grad():
        full = tiny_clip.model.encode_text(clip_tokenizer()(PROMPTS))
    torch.testing.assert_close(encoder.prompt_embeddings(PROMPTS), full, atol=1e-5, rtol=1e-5)


def test_query_features_follow_naclip_formula(tiny_clip):
    templates = ("a photo of a {}.", "a bad photo of the {}.", "art of the {}.")
    vocab = Vocabulary(("cat", "tv"), (("cat",), ("television", "screen")), templates)
    feats, query_idx = TextEncoder(tiny_clip, cache=False).query_features(vocab)
    assert query_idx == [0, 1, 1] and feats.shape == (3, 32)
    for row, query in zip(feats, ["cat", "television", "screen"], strict=True):
        with torch.no_grad():
            emb = tiny_clip.model.encode_text(
                clip_tokenizer()([t.format(query) for t in templates])
            )
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        torch.testing.assert_close(row, mean / mean.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_disk_cache_serves_a_new_encoder(tiny_clip, tmp_path, monkeypatch):
    first = TextEncoder(tiny_clip, cache=tmp_path).prompt_embeddings(PROMPTS)
    second = TextEncoder(tiny_clip, cache=tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("cached prompts must not be encoded again")

    monkeypatch.setattr(second, "_encode", fail)
    assert torch.equal(second.prompt_embeddings(PROMPTS[::-1]), first.flip(0))
    assert (tmp_path / "text" / f"{tiny_clip.text_fingerprint}.sqlite").is_file()


def test_fingerprint_follows_text_weights_only(tiny_model):
    import copy

    from ovss_label.backend.models.clip import text_fingerprint

    base = text_fingerprint(tiny_model)
    vision_changed, text_changed = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    with torch.no_grad():
        vision_changed.visual.proj.add_(1.0)
        text_changed.text_projection.add_(1e-3)
    assert text_fingerprint(vision_changed) == base
    assert text_fingerprint(text_changed) != base
