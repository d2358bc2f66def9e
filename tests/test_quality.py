"""The embedded default meets its quality bar: the oracle is accurate, generations are recognisable,
and a never-seen concept can be learned by LoRA (else immunization could not be demonstrated)."""
import numpy as np
import pytest

from mima_lib.toy import world as toyworld
from mima_lib.toy.oracle import held_out_accuracy
from mima_lib.toy.quality import adaptability, recognition, summarize


def test_oracle_recognises_held_out_renders(toy_oracle):
    acc = held_out_accuracy(toy_oracle, per_concept=20)
    assert np.mean(list(acc.values())) >= 0.95, acc
    assert min(acc.values()) >= 0.8, acc


def test_generations_are_recognised_reduced_sample(toy_pipe_factory, toy_oracle):
    # issue #14's bar (each concept >= 80%, objects and artists each >= 95%) on 4 generations per concept
    # instead of 16 (the README's table: 100% everywhere); lowered by sampling noise only
    acc, images = recognition(toy_pipe_factory(), toy_oracle, toyworld.BASE_OBJECTS + toyworld.BASE_ARTISTS, n=4)
    s = summarize(acc)
    assert min(acc.values()) >= 0.75, acc  # at most one of 4 generations missed, for every concept
    assert s["objects_mean"] >= 0.90, acc
    assert s["artists_mean"] >= 0.90, acc


def test_heldout_concept_is_learnable_with_lora(toy_pipe_factory, toy_oracle):
    result = adaptability(toy_pipe_factory(), toy_oracle, "boat", n_eval=12)
    assert result["before"] <= 0.25, result
    assert result["after"] >= 0.6, result


def test_oracle_answers_noise_for_noise_and_never_for_renders(toy_oracle):
    """The "noise" label (toy.oracle.render_noise) is what keeps a broken model's output from being read as
    the nearest concept (van gogh for blue noise). It must not swallow real pictures: no render of any
    concept is read as noise, within its kind, where "noise" is always a candidate."""
    from mima_lib.toy.oracle import NOISE, render_noise

    noise = toy_oracle.predict([render_noise(60_000 + j) for j in range(40)], "artist")
    assert np.mean([p == NOISE for p in noise]) >= 0.9, noise
    for c in toyworld.BASE_OBJECTS + toyworld.BASE_ARTISTS:
        pred = toy_oracle.predict(toyworld.render_many(c, 10, 60_000), toyworld.concept(c).kind)
        assert NOISE not in pred, (c, pred)
