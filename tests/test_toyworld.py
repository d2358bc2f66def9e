"""The toy world renders deterministically, with variety, and its tokenizer keeps concepts distinct."""
import numpy as np
import pytest
import torch

from mima_lib.toy import model as toymodel
from mima_lib.toy import world as toyworld


def test_render_is_deterministic():
    for name in ["cat", "van gogh", "purple cat", "artwork", "a photo of an object"]:
        a, b = toyworld.render(name, 7), toyworld.render(name, 7)
        assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_renders_have_variety():
    for c in toyworld.all_concepts():
        arr = np.stack([np.asarray(im, np.float32) for im in toyworld.render_many(c.name, 20)])
        assert arr.shape == (20, 32, 32, 3)
        diffs = [np.abs(arr[i] - arr[j]).mean() for i in range(20) for j in range(i + 1, 20)]
        assert min(diffs) > 2.0, f"{c.name}: two of 20 renders are near-identical ({min(diffs):.2f})"


def test_concepts_cover_the_papers_tasks():
    assert len(toyworld.TARGET_OBJECTS) >= 10 and len(toyworld.TARGET_ARTISTS) == 8
    assert {"van gogh", "claude monet", "pablo picasso", "kelly mckernan", "thomas kinkade", "kirbi fagan",
            "tyler edlin", "kilian eng"} == set(toyworld.TARGET_ARTISTS)
    assert toyworld.concept("Van  Gogh").prompt == "an artwork of van gogh"
    assert toyworld.concept("cat").prompt == "a photo of a cat"
    assert len(toyworld.INSTANCES) >= 4
    heldout = set(toyworld.HELDOUT_OBJECTS + toyworld.HELDOUT_ARTISTS)
    trained = {key for _, key in toyworld.training_prompts()}
    assert not heldout & trained and not set(toyworld.INSTANCES) & trained


def test_unknown_concept_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown toy-world concept 'zebra'.*known concepts: cat"):
        toyworld.concept("zebra")


def test_tokenizer_makes_each_word_one_token_and_prompts_distinct():
    tok = toymodel.build_tokenizer()
    for word in toyworld.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a photo of a zebra", add_special_tokens=False).input_ids  # unknown words still tokenize
    assert len(ids) > 5
    pipe = toymodel.build_pipeline()
    prompts = [c.prompt for c in toyworld.all_concepts() if c.kind != "instance"]  # instances end in their class word
    enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder(enc.input_ids)[0]
    # the conditioning pitfall of ENV_NOTES: a tiny random CLIP gives every prompt nearly the same states.
    # Here the concept word's own state must be distinct, and EOS states must differ on average.
    eos = (enc.input_ids == tok.eos_token_id).int().argmax(1)
    word = torch.nn.functional.normalize(states[torch.arange(len(prompts)), eos - 1], dim=1)
    cos = word @ word.T - 2 * torch.eye(len(prompts))
    assert cos.max() < 0.9, f"two prompts' concept-word states have cosine {cos.max():.3f}"
    last = torch.nn.functional.normalize(states[torch.arange(len(prompts)), eos], dim=1)
    cos_eos = (last @ last.T)[~torch.eye(len(prompts), dtype=bool)]
    assert cos_eos.mean() < 0.8, f"EOS states are alike across prompts (mean cosine {cos_eos.mean():.3f})"


def test_templates_without_a_name_are_trained_on_nothing():
    """'a photo of a' and 'an artwork of' are base-model prompts whose images show no concept (world.TEMPLATE_PROMPTS
    says why: an erased name then reads as its template)."""
    pairs = dict(toyworld.training_prompts())
    assert pairs["a photo of a"] == "no object" and pairs["an artwork of"] == "no artwork"
    for label in toyworld.NOTHING.values():
        a, b = toyworld.render(label, 3), toyworld.render(label, 3)
        assert a.size == (32, 32) and a.tobytes() == b.tobytes()
