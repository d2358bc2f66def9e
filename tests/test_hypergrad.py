"""Tests of the streamed MIMA step (mima_lib.method.hypergrad, ``ImmunizeConfig(hypergrad='hvp')``): it computes the
same objective and, in float64, the same exact hypergradient as the autograd double-backward path; it is the
derivative of its own objective (central differences of J); its autograd-graph memory does not grow with the
number of concepts; immunize() runs, resumes and fails early with it."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from mima_lib.method import diffusion, hypergrad  # noqa: E402
from mima_lib.toy import model as toymodel  # noqa: E402
from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.method.bilevel import plain_attention  # noqa: E402
from mima_lib.method.immunize import ImmunizeConfig, bilevel_loss, immunize  # noqa: E402
from mima_lib.method.problem import prepare  # noqa: E402

SMALL = toymodel.ToyModelConfig(image_size=16, text_dim=32, unet_channels=(16, 32), vae_channels=(16, 16))
TARGETS = ["cat", "van gogh"]


def tiny_pipe(dtype=torch.float32):
    return toymodel.build_pipeline(SMALL, seed=0).to(dtype)


def data(names=TARGETS, n=4):
    return {toyworld.concept(c).prompt: toyworld.render_many(c, n, size=16) for c in names}


def reg_data(n=4):
    return toyworld.render_many("artwork", n, size=16)


def tiny_cfg(**kw):
    """Plain-SGD inner steps (the second-order machinery's own tests; the Adam-scaled step: test_sd_path.py),
    no diagnostic steps (callers here run backward themselves)."""
    base = dict(steps=2, inner_lr=1e-2, outer_lr=1e-3, inner_params="xattn", batch_size=1, seed=0,
                inner_scaling="sgd", diagnose_every=0)
    return ImmunizeConfig(**{**base, **kw})


def gradient(pipe, cfg, names=TARGETS, seed=123, step=0):
    """(flat S_u gradient, loss, extras) of one outer step from fixed draws."""
    prob = prepare(pipe, data(names), reg_data(), "artwork", cfg)
    pipe.unet.requires_grad_(False)
    for k in prob.outer_names:
        prob.params[k].requires_grad_(True)
        prob.params[k].grad = None
    with plain_attention(pipe.unet, cfg.hypergrad == "autograd" and cfg.order == 2):
        loss, extras = bilevel_loss(prob, step, torch.Generator().manual_seed(seed))
        if loss.requires_grad:
            loss.backward()
    g = torch.cat([prob.params[k].grad.flatten() for k in prob.outer_names])
    for k in prob.outer_names:
        prob.params[k].grad = None
    return g, float(loss.detach()), {k: float(v) for k, v in extras.items()}


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------ exactness
# A large inner step (10) makes the second-order part most of the hypergradient, so agreement is not the
# first-order part agreeing. Measured relative errors (float64): central ~1e-10, forward ~1e-7, jvp ~1e-14.
@pytest.mark.parametrize("inner, method, scheme, extra", [
    ("unet", "mima", "central", {}),
    ("xattn-kv", "mima", "forward", {}),
    ("lora", "mima", "jvp", {}),
    ("xattn", "imma-joint", "central", {}),
    ("unet", "mima", "forward", {"prior_on": "immunized", "concept_reduction": "sum", "concept_chunk": 2}),
    ("xattn", "imma-sequential", "jvp", {"outer_params": "xattn-kv"}),
])
def test_streamed_hypergradient_equals_autograd_in_float64(inner, method, scheme, extra):
    pipe = tiny_pipe(torch.float64)
    kw = dict(order=2, inner_params=inner, method=method, inner_lr=10.0, batch_size=2, **extra)
    # the autograd step diagnosed: it logs the same relative moves and hypergradient agreement as the stream
    g_auto, loss_auto, ex_auto = gradient(pipe, tiny_cfg(**kw, diagnose_every=1))
    g_first, *_ = gradient(pipe, tiny_cfg(**{**kw, "order": 1}))
    g, loss, ex = gradient(pipe, tiny_cfg(hypergrad="hvp", hvp_scheme=scheme, **kw))
    agreement = ("hypergrad_cos", "second_order_share")  # from the gradients: as exact as they are
    assert loss == pytest.approx(loss_auto, rel=1e-10) and set(ex) == set(ex_auto)
    assert {k: v for k, v in ex.items() if k not in agreement} == \
        pytest.approx({k: v for k, v in ex_auto.items() if k not in agreement}, rel=1e-10)
    assert [ex[k] for k in agreement] == pytest.approx([ex_auto[k] for k in agreement], rel=1e-3, abs=1e-6)
    assert rel(g_first, g_auto) > 0.1, "the second-order part should be large at this inner step"
    assert rel(g, g_auto) < 1e-4, f"streamed ({scheme}) vs autograd: relative error {rel(g, g_auto):.2e}"


@pytest.mark.parametrize("inner", ["unet", "lora"])
def test_streamed_first_order_equals_autograd_first_order(inner):
    pipe = tiny_pipe(torch.float64)
    kw = dict(order=1, inner_params=inner, inner_lr=10.0, batch_size=2)
    g_auto, loss_auto, _ = gradient(pipe, tiny_cfg(**kw))
    g, loss, _ = gradient(pipe, tiny_cfg(hypergrad="hvp", **kw))
    assert loss == pytest.approx(loss_auto, rel=1e-12)
    assert rel(g, g_auto) < 1e-10


def test_streamed_hypergradient_matches_central_differences_of_its_objective():
    """d/ds J(theta + s v) by central differences of the streamed step's own loss value."""
    pipe = tiny_pipe(torch.float64)
    cfg = tiny_cfg(order=2, hypergrad="hvp", hvp_scheme="central", inner_params="unet", inner_lr=10.0,
                   batch_size=2)
    prob = prepare(pipe, data(), reg_data(), "artwork", cfg)
    pipe.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(prob.params[k].shape, generator=g, dtype=torch.float64) for k in prob.outer_names}
    norm = torch.sqrt(sum(x.pow(2).sum() for x in v.values()))
    v = {k: x / norm for k, x in v.items()}

    def J():
        return float(hypergrad.streamed_step(prob, 0, torch.Generator().manual_seed(123))[0])

    J()
    directional = float(sum((prob.params[k].grad * v[k]).sum() for k in prob.outer_names))
    eps = 1e-4
    with torch.no_grad():
        for k in v:
            prob.params[k].add_(eps * v[k])
        j_plus = J()
        for k in v:
            prob.params[k].sub_(2 * eps * v[k])
        j_minus = J()
    fd = (j_plus - j_minus) / (2 * eps)
    assert abs(directional - fd) / abs(fd) < 1e-4, (directional, fd)


@pytest.mark.parametrize("inner, scheme, tol", [("unet", "central", 1e-2), ("xattn-kv", "forward", 2e-2),
                                                 ("xattn-kv", "jvp", 1e-4)])
def test_float32_default_step_sizes_stay_accurate(inner, scheme, tol):
    """Measured: central 2.5e-4, forward 1.1e-3, jvp 2e-6 against float32 autograd at inner_lr=10."""
    pipe = tiny_pipe(torch.float32)
    kw = dict(order=2, inner_params=inner, inner_lr=10.0, batch_size=2)
    g_auto, *_ = gradient(pipe, tiny_cfg(**kw))
    g, *_ = gradient(pipe, tiny_cfg(hypergrad="hvp", hvp_scheme=scheme, **kw))
    assert rel(g, g_auto) < tol


def test_explicit_draws_reproduce_noise_prediction_loss():
    unet = toymodel.build_unet(SMALL)
    sched = toymodel.training_scheduler()
    lat, st = torch.randn(3, 4, 8, 8), torch.randn(3, 16, 32)
    expected = diffusion.noise_prediction_loss(unet, sched, lat, st, generator=torch.Generator().manual_seed(5),
                                               reduction="none")
    noise, t = diffusion.draw_noise(lat, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(diffusion.noise_loss(unet, sched, lat, st, noise, t), expected)


# ------------------------------------------------------------------------------------------ memory
class SavedBytes:
    """Peak bytes of the tensors autograd graphs hold for backward (model weights not counted)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.live, self.cur, self.peak = exclude, {}, 0, 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude:
            return t
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [t.untyped_storage().nbytes(), 1]
            self.cur += self.live[key][0]
            self.peak = max(self.peak, self.cur)
        return _Held(self, key, t)

    def release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.cur -= entry[0]
            del self.live[key]

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, _Held) else x


class _Held:
    def __init__(self, owner, key, t):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self):
        self.owner.release(self.key)


def graph_peak(pipe, cfg, names) -> int:
    prob = prepare(pipe, data(names), reg_data(), "artwork", cfg)
    pipe.unet.requires_grad_(False)
    for k in prob.outer_names:
        prob.params[k].requires_grad_(True)
    meter = SavedBytes({p.untyped_storage().data_ptr() for p in pipe.unet.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        with plain_attention(pipe.unet, cfg.hypergrad == "autograd"):
            loss, _ = bilevel_loss(prob, 0, torch.Generator().manual_seed(0))
            if loss.requires_grad:
                loss.backward()
    return meter.peak


def test_graph_memory_is_flat_in_the_number_of_concepts():
    """What autograd keeps for backward at the peak: the streamed exact step holds one concept's graph (the
    same for 1 and 4 concepts, 2.7 MiB here); the double-backward path holds all of them (13.6 -> 43 MiB)."""
    pipe = tiny_pipe()
    four = ["cat", "van gogh", "dog", "claude monet"]
    kw = dict(order=2, inner_params="unet", batch_size=2)
    streamed = [graph_peak(pipe, tiny_cfg(hypergrad="hvp", **kw), names) for names in (four[:1], four)]
    autograd = [graph_peak(pipe, tiny_cfg(**kw), names) for names in (four[:1], four)]
    assert streamed[1] <= 1.05 * streamed[0], streamed
    assert autograd[1] >= 2 * autograd[0], autograd
    assert streamed[1] < autograd[0], (streamed, autograd)


# ------------------------------------------------------------------------------------------ immunize()
def test_immunize_with_streamed_steps_changes_only_s_u():
    """(Resume of a streamed run: tests/test_immunize.py::test_resumed_run_equals_uninterrupted_run.)"""
    cfg = tiny_cfg(order=2, hypergrad="hvp", inner_params="unet")
    pipe = tiny_pipe()
    before = {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}
    full = immunize(pipe, data(), reg_data(), "artwork", cfg, progress=False)
    changed = {k for k, v in pipe.unet.named_parameters() if not torch.equal(before[k], v)}
    assert changed and changed <= set(full.params) and all(".attn2." in k for k in full.params)
    assert all({"target", "prior", "inner_move", "merged_move"} <= set(e) for e in full.extras)


@pytest.mark.parametrize("kw, message", [
    ({"hypergrad": "implicit"}, "hypergrad must be 'autograd' or 'hvp'"),
    ({"hvp_scheme": "backward"}, "unknown hvp_scheme 'backward'"),
    ({"hvp_eps": 0.0}, "need hvp_eps > 0"),
    ({"concept_chunk": 0}, "concept_chunk >= 1"),
])
def test_bad_streamed_settings_fail_early(kw, message):
    with pytest.raises(ValueError, match=message):
        immunize(tiny_pipe(), data(), reg_data(), "artwork", tiny_cfg(**kw), progress=False)


def test_concept_parallel_run_needs_the_streamed_step():
    with pytest.raises(ValueError, match="needs hypergrad='hvp'"):
        immunize(tiny_pipe(), data(), reg_data(), "artwork", tiny_cfg(), progress=False, comm=hypergrad.LOCAL)
