"""A TextArea prompt is an ad-hoc query for every method: the text reaches the model, and the
masks get the project label nearest to it by the method's own text embedder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from label_studio_sdk.label_interface.interface import LabelInterface
from PIL import Image

from ovss_label.backend.models.blip import BlipTextEmbedder
from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app
from ovss_label.backend.server.interactive import label_for_text
from ovss_label.methods import METHODS
from ovss_label.ontologies import Vocabulary

LABELS = ("Cat", "Dog", "Cup")


def _config(method: str) -> str:
    labels = "".join(f'<Label value="{n}"/>' for n in LABELS)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image" ovss_method="{method}">{labels}</BrushLabels>'
        '<TextArea name="prompt" toName="image"/></View>'
    )


class HandMade:
    """An embedder with chosen vectors: label i is axis i; a query is whatever it is told."""

    def __init__(self, queries: dict[str, list[float]]) -> None:
        self.queries = queries

    def query_features(self, vocabulary):
        queries, idx = vocabulary.queries()
        eye = torch.eye(3)
        rows = [torch.tensor(self.queries[q]) if q in self.queries else eye[k]
                for q, k in zip(queries, idx, strict=True)]  # fmt: skip
        return torch.stack(rows).float(), idx


def test_label_for_text_takes_the_nearest_label_not_the_first():
    vocab = Vocabulary(LABELS, (("cat", "kitten"), ("hound", "Puppy"), ("cup",)))
    # A label or a synonym, in any case, wins by rule (no embedder needed) ...
    assert label_for_text("PUPPY", vocab, None) == "Dog"
    assert label_for_text("dOG", vocab, None) == "Dog"
    assert label_for_text("KITTEN", vocab, None) == "Cat"
    assert label_for_text("giraffe", vocab, None) == "Cat"  # ... else the first without one
    embedder = HandMade({"giraffe": [0.1, 0.2, 0.9], "puppy": [0.2, 0.9, 0.1]})
    assert label_for_text("giraffe", vocab, embedder) == "Cup"
    assert label_for_text("wolf", vocab, HandMade({"wolf": [0.2, 0.9, 0.1]})) == "Dog"


def test_label_for_text_embeds_the_query_with_the_projects_templates():
    seen = []

    class Recording(HandMade):
        def query_features(self, vocabulary):
            seen.append(vocabulary.templates)
            return super().query_features(vocabulary)

    templates = ("a photo of a {}.", "a drawing of a {}.")
    vocab = Vocabulary(LABELS, (("cat",), ("dog",), ("cup",)), templates)
    assert label_for_text("giraffe", vocab, Recording({"giraffe": [0, 0, 1.0]})) == "Cup"
    assert seen == [templates, templates]  # the labels' and the query's embeddings alike


@pytest.mark.parametrize("method", METHODS)
def test_a_text_prompt_works_for_every_method(method, tmp_path):
    (tmp_path / "files").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "files" / "a.png")
    settings = ServerSettings(tiny=True, data_dir=tmp_path / "data",
                              media=MediaPolicy(local_root=tmp_path / "files"))  # fmt: skip
    engine = Engine(settings)
    proposer = engine.proposer(method)
    embedder = proposer.text_embedder()
    assert embedder is not None  # the capability is explicit, also through `+sam`
    if method.startswith("pnp_ovss"):
        assert isinstance(embedder, BlipTextEmbedder)  # no CLIP in the default PnP-OVSS
    vocab = Vocabulary.from_labels(", ".join(LABELS))
    features, _ = embedder.query_features(vocab)
    query, _ = embedder.query_features(Vocabulary(("q",), (("a striped giraffe",),)))
    expected = LABELS[int(torch.argmax(features @ query[0]))]  # nearest by cosine
    seen = []
    real_score = proposer.score
    proposer.score = lambda features, vocabulary: (
        seen.append(vocabulary)
        or real_score(  # type: ignore[method-assign]
            features, vocabulary
        )
    )
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                           "value": {"text": [" a striped giraffe "]}}]}  # fmt: skip
    body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}],
            "label_config": _config(method), "params": {"context": context}}  # fmt: skip
    (prediction,) = TestClient(create_app(engine)).post("/predict", json=body).json()["results"]
    assert [v.names for v in seen] == [("a striped giraffe",)]  # the text itself was queried
    assert prediction["model_version"] == engine.model_version(method)
    labels = [r["value"]["brushlabels"] for r in prediction["result"]]
    assert labels and all(label == [expected] for label in labels)
    assert LabelInterface(_config(method)).validate_prediction(prediction)
