"""Evaluation: SGR/MSGR maths, tables, plots, utility rows, and the feature extractors' real loading path
(tiny random-weight CLIP/DINO saved locally, loaded through from_pretrained)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from mima_lib.evaluation import metrics as ev  # noqa: E402
from mima_lib.evaluation import features as fx  # noqa: E402
from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.method.diffusion import images_to_tensor  # noqa: E402
from mima_lib.toy.model import TOY_MODEL  # noqa: E402
from mima_lib.toy.oracle import TOY_ORACLE, OracleExtractor, oracle_scorer  # noqa: E402

HAVE_ORACLE = (TOY_ORACLE / "oracle.safetensors").exists()
HAVE_TOY = HAVE_ORACLE and (TOY_MODEL / "model_index.json").exists()


class PixelExtractor(fx.EmbeddingExtractor):
    """Test extractor whose similarity order is known: cosine of raw pixels."""

    name = "pixels"

    def embed(self, images):
        return torch.nn.functional.normalize(images_to_tensor(images).flatten(1).float(), dim=1)


def renders(concept, n=6, start=0):
    return images_to_tensor(toyworld.render_many(concept, n, start))


def noisy(x, level, seed):
    g = torch.Generator().manual_seed(seed)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def random_oracle(seed=0):
    from mima_lib.toy.oracle import OracleNet, ToyOracle

    torch.manual_seed(seed)
    cs = toyworld.all_concepts()
    return ToyOracle(OracleNet(len(cs), width=8, feature_dim=16), [c.name for c in cs], [c.kind for c in cs])


# ---------------------------------------------------------------- SGR maths
def test_sgr_of_identical_runs_is_zero():
    assert ev.sgr(0.7, 0.7) == 0.0
    curve = {"cat": {0: 0.8, 10: 0.9}, "dog": {0: 0.6, 10: 0.7}}
    runs = [{"no defense": curve, "MIMA": curve}, {"no defense": curve, "MIMA": curve}]
    rows = ev.sgr_table(runs)
    sgr_rows = [r for r in rows if r["metric"] in ("SGR", "MSGR")]
    assert len(sgr_rows) == 4 + 2 and all(r["mean"] == 0 and r["ci95"] == 0 for r in sgr_rows)
    # identical images through a real extractor path: M is the same, SGR exactly 0
    x = renders("cat")
    m = ev.mean_pairwise_similarity(x, x, PixelExtractor())
    assert ev.sgr(m, ev.mean_pairwise_similarity(x, x.clone(), PixelExtractor())) == 0.0


def test_sgr_sign_follows_similarity_order():
    ref, ext = renders("cat"), PixelExtractor()
    gen = renders("cat", start=100)
    ms = [ev.mean_pairwise_similarity(ref, noisy(gen, lvl, 1), ext) for lvl in (0.0, 0.5, 1.5)]
    assert ms[0] > ms[1] > ms[2] > 0
    assert 0 < ev.sgr(ms[0], ms[1]) < ev.sgr(ms[0], ms[2])  # less similar with immunization: positive SGR
    assert ev.sgr(ms[2], ms[0]) < 0  # more similar: negative
    assert ev.msgr({"a": 0.2, "b": 0.4}) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="undefined"):
        ev.sgr(0.0, 0.1)


def test_confidence_interval_is_student_t():
    mean, half = ev.confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ev.confidence_interval([5.0])[1])


def test_paired_difference_pairs_by_seed_and_has_the_right_sign():
    """Seeds move MIMA and the baseline alike (a hard draw is hard for both): the paired interval sees the
    constant gap of 0.1 with no width, the unpaired intervals overlap."""
    base = {0: 0.2, 1: 0.5, 2: 0.8}
    mima = {s: v + 0.1 for s, v in base.items()}
    mean, half = ev.paired_difference(mima, base)
    assert mean == pytest.approx(0.1) and half == pytest.approx(0.0, abs=1e-12)
    assert ev.confidence_interval(mima.values())[1] > 0.5  # unpaired: far too wide to tell them apart
    mean, half = ev.paired_difference({0: 0.3, 1: 0.1, 2: 0.2}, {0: 0.4, 1: 0.4, 2: 0.4})
    assert mean == pytest.approx(-0.2) and half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    with pytest.raises(ValueError, match="seeds differ"):
        ev.paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0})


def test_steps_to_relearn_on_synthetic_curves():
    assert ev.steps_to_relearn({0: 0.0, 20: 0.3, 40: 0.6, 60: 0.9}) == 40  # reaching the threshold counts
    assert ev.steps_to_relearn({60: 0.9, 0: 0.7, 20: 0.1}) == 0  # unordered snapshots: the earliest step
    assert ev.steps_to_relearn({0: 0.1, 40: 0.59, 400: 0.5}) is None  # protection held to the last step
    assert ev.steps_to_relearn({0: 0.1, 40: 0.5}, threshold=0.5) == 40
    with pytest.raises(ValueError, match="empty"):
        ev.steps_to_relearn({})


def test_sgr_table_msgr_and_ci_over_seeds():
    runs = {s: {"no defense": {"cat": {0: 0.8, 5: 0.9}, "dog": {0: 0.8, 5: 0.8}},
                "MIMA": {"cat": {0: 0.8, 5: 0.9 * (0.5 + 0.1 * s)}, "dog": {0: 0.8, 5: 0.8 * 0.9}}}
            for s in range(3)}
    rows = ev.sgr_table(runs, extractor="pixels")
    get = {(r["method"], r["concept"], r["step"], r["metric"]): r for r in rows}
    assert get[("MIMA", "cat", 5, "SGR")]["mean"] == pytest.approx(0.4)
    assert get[("MIMA", "dog", 5, "SGR")]["mean"] == pytest.approx(0.1)
    ms = get[("MIMA", "all", 5, "MSGR")]
    assert ms["mean"] == pytest.approx(0.25) and ms["n"] == 3 and ms["ci95"] > 0
    assert ("no defense", "cat", 5, "SGR") not in get and ("no defense", "cat", 5, "M") in get
    paper = ev.paper_table(rows, step=5)
    assert paper[-1]["concept"] == "MSGR" and paper[-1]["MIMA"].startswith("25.00 ±")
    with pytest.raises(KeyError, match="baseline"):
        ev.sgr_table([{"MIMA": {"cat": {0: 1.0}}}])


def test_write_table_csv_and_markdown(tmp_path):
    rows = [{"method": "MIMA", "step": 5, "mean": 0.123456789, "ci95": float("nan")}]
    csv_path, md_path = ev.write_table(rows, tmp_path / "out", "sgr")
    back = ev.read_table(csv_path)
    assert back[0]["method"] == "MIMA" and back[0]["step"] == 5 and back[0]["mean"] == pytest.approx(0.123456789)
    md = md_path.read_text().splitlines()
    assert md[0] == "| method | step | mean | ci95 |" and md[2] == "| MIMA | 5 | 0.1235 | nan |"


# ---------------------------------------------------------------- experiment flow on toy images
def fake_run(concept, seed, corrupt):
    imgs = renders(concept, 4, 100 + seed)
    return SimpleNamespace(snapshots={0: imgs, 10: noisy(imgs, corrupt, seed)},
                           snapshot_prompts=[toyworld.concept(concept).prompt] * 4, snapshot_seeds=list(range(4)))


def toy_curves(oracle, seeds=(0, 1)):
    ext = OracleExtractor(oracle)
    refs = {c: renders(c, 6) for c in ("cat", "van gogh")}
    return {s: ev.collect_curves(refs, {"no defense": {c: fake_run(c, s, 0.0) for c in refs},
                                        "MIMA": {c: fake_run(c, s, 0.8) for c in refs}}, ext) for s in seeds}


def test_toy_numbers_reproducible_and_step0_sgr_zero():
    rows_a = ev.sgr_table(toy_curves(random_oracle(0)), extractor="oracle")
    rows_b = ev.sgr_table(toy_curves(random_oracle(0)), extractor="oracle")  # rebuilt from scratch
    assert rows_a == rows_b
    step0 = [r for r in rows_a if r["step"] == 0 and r["metric"] != "M"]
    assert step0 and all(r["mean"] == 0 for r in step0)  # identical step-0 snapshots in both runs


def test_accuracy_bands_stay_inside_zero_and_one():
    """Three seeds' t-intervals of an accuracy reach past 0 and 1; the curve's band is drawn inside [0, 1]."""
    from mima_lib.evaluation.plots import plot_similarity_curves

    rows = [{"metric": "ACC", "method": "mima", "concept": "lora", "step": s, "mean": m, "ci95": 0.6}
            for s, m in ((0, 0.1), (20, 0.5), (40, 0.9))]
    fig = plot_similarity_curves(rows, metric="ACC", concepts=["lora"])
    ys = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == 0.0 and ys.max() == 1.0


def test_plots_write_pngs(tmp_path):
    from PIL import Image

    from mima_lib.evaluation.plots import method_step_grid, plot_similarity_curves, write_report

    rows = ev.sgr_table(toy_curves(random_oracle(0), seeds=(0,)), extractor="oracle")
    fig = plot_similarity_curves(rows, "M", path=tmp_path / "m.png")
    assert len([a for a in fig.axes if a.lines]) == 2 and (tmp_path / "m.png").stat().st_size > 1000
    plot_similarity_curves(rows, "MSGR", path=tmp_path / "msgr.png")
    runs = {"no defense": fake_run("cat", 0, 0.0), "IMMA": fake_run("cat", 0, 0.4), "MIMA": fake_run("cat", 0, 0.8)}
    grid = method_step_grid(runs, scale=2, path=tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == grid.size
    assert grid.height == 3 * 32 * 2 + 14 and grid.width >= 2 * 32 * 2
    written = write_report(tmp_path / "report", "relearn", rows, {"cat": runs})
    names = sorted(p.name for p in written)
    assert names == sorted(["relearn.csv", "relearn.md", "relearn_oracle_sgr_step10.csv",
                            "relearn_oracle_sgr_step10.md", "relearn_oracle_m.png", "relearn_oracle_sgr.png",
                            "relearn_oracle_msgr.png", "relearn_grid_cat.png"])
    assert all(p.stat().st_size > 0 for p in written)


def test_utility_rows():
    rows = ev.generation_utility({"cup": np.array([1, 1, 0, 1.0])}, {"cup": np.array([1, 0, 0, 1.0])}, "acc")
    assert rows[0]["base_mean"] == 0.75 and rows[0]["change"] == -0.25 and rows[0]["ratio"] == pytest.approx(2 / 3)
    base, imm = {"boat": fake_run("cat", 0, 0.0)}, {"boat": fake_run("cat", 0, 0.8)}
    scorer = lambda images, prompts, concept=None: images.mean((1, 2, 3)).numpy()  # noqa: E731
    rep = ev.utility_report({"cup": np.ones(3)}, {"cup": np.ones(3)}, base, imm, scorer)
    assert [r["check"] for r in rep] == ["generation", "finetune", "finetune"] and rep[1]["ratio"] == 1.0
    sc = oracle_scorer(random_oracle(0))(renders("cat", 3), [toyworld.concept("cat").prompt] * 3)
    assert sc.shape == (3,) and set(sc) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="concept="):
        oracle_scorer(random_oracle(0))(renders("cat", 1), ["a <new1> cat"])


# ---------------------------------------------------------------- extractors: real loading path, tiny weights
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    folder = tmp_path_factory.mktemp("tiny_dino")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                    patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)  # like facebook/dino-vits16: no pooler
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def check_embedding_extractor(ext, dim):
    x = renders("cat", 3)
    e = ext.embed(x)
    assert e.shape == (3, dim) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(ext.embed(toyworld.render_many("cat", 3)), e, atol=1e-5)  # PIL and tensor agree
    s = ext.similarity(x, renders("dog", 2))
    assert s.shape == (3, 2) and isinstance(ext, fx.FeatureExtractor)
    assert torch.allclose(ext.similarity(x, x).diagonal(), torch.ones(3), atol=1e-5)


def test_clip_extractor_tiny(tiny_clip):
    ext = fx.make_extractor("clip", tiny_clip)
    assert ext.name == "clip" and type(ext.model).__name__ == "CLIPModel"
    check_embedding_extractor(ext, 16)
    score = fx.clip_score(renders("cat", 2), ["a photo of a cat", "a dog"], ext)
    assert score.shape == (2,) and (score >= 0).all() and (score <= 100).all()
    assert ev.clip_scorer(ext)(renders("cat", 2), ["cat", "dog"]).shape == (2,)


def test_dino_extractor_tiny(tiny_dino):
    ext = fx.make_extractor("dino", str(tiny_dino))
    assert ext.name == "dino" and ext.model.pooler is None
    check_embedding_extractor(ext, 32)


def test_missing_weights_fail_clearly(tmp_path):
    for name, model_id in (("clip", fx.CLIP_DEFAULT), ("dino", fx.DINO_DEFAULT)):
        with pytest.raises(fx.MissingWeightsError) as err:
            fx.make_extractor(name)
        msg = str(err.value)
        assert model_id in msg and "HF_HUB_OFFLINE" in msg and f"hf download {model_id}" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fx.make_extractor("clip", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fx.MissingWeightsError, match="incomplete"):
        fx.make_extractor("dino", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        fx.make_extractor("inception")


def test_lpips_missing_says_how_to_install():
    try:
        import lpips  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="pip install lpips"):
            fx.make_extractor("lpips")
    else:
        pytest.skip("lpips is installed here")


# ---------------------------------------------------------------- the embedded toy world (when built)
@pytest.mark.skipif(not HAVE_ORACLE, reason="toy oracle not built yet (python -m mima_lib.toy.build)")
def test_trained_oracle_orders_similarity():
    ext = OracleExtractor()
    ref = renders("cat", 8)
    same = ev.mean_pairwise_similarity(ref, renders("cat", 8, 500), ext)
    other = ev.mean_pairwise_similarity(ref, renders("van gogh", 8, 500), ext)
    assert same > other and ev.sgr(same, other) > 0


@pytest.mark.skipif(not HAVE_TOY, reason="toy model not built yet (python -m mima_lib.toy.build)")
def test_toy_generation_utility_reproducible():
    from mima_lib.toy.model import load_toy_pipeline
    from mima_lib.toy.oracle import load_toy_oracle

    pipe, scorer = load_toy_pipeline(), oracle_scorer(load_toy_oracle())
    prompts = {c: toyworld.concept(c).prompt for c in toyworld.NEUTRAL_OBJECTS}
    a = ev.score_generations(pipe, prompts, [0, 1, 2, 3], scorer, steps=10)
    b = ev.score_generations(pipe, prompts, [0, 1, 2, 3], scorer, steps=10)
    assert all(np.array_equal(a[c], b[c]) for c in prompts)
    rows = ev.generation_utility(a, b, "oracle_accuracy")
    assert all(r["change"] == 0 for r in rows)


def test_labelled_grid_column_titles_fit_their_columns():
    """Long concept names ('katsushika hokusai #0') overlapped the next column's title in the utility grid."""
    from PIL import Image, ImageDraw

    from mima_lib.evaluation.plots import _fit, labelled_grid

    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert _fit(d, "cup #0", 92) == "cup #0"  # short titles are kept whole
    cut = _fit(d, "katsushika hokusai #0", 60)
    assert cut.startswith("..") and cut.endswith("#0") and d.textlength(cut) <= 60
    grid = labelled_grid(torch.zeros(4, 3, 16, 16), ["a", "b"], ["katsushika hokusai #0", "katsushika hokusai #1"],
                         cell=48)
    assert grid.height == 2 * 48 + 14
