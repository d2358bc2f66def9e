"""The toy model's text side: a CLIPTokenizer that makes every toy-world word one token, and a small
CLIPTextModel pretrained once, before the UNet, the way CLIP comes pretrained to Stable Diffusion.

Why pretrain. The erasure of the paper (UCE's reference code) edits the rows of the bare concept text ("cat",
"van gogh"): its last token, EOS and the padding. That removes "a photo of a cat" from SD because CLIP's states
of a name hardly depend on the words before it. A random causal encoder mixes every earlier word into every
later state: the bare name's rows and the templated prompt's differ (cosine 0.52 on the first toy model), and
the erasure does not transfer (targets stayed at 69-100%, scripts/erase_sweep.py). Nor are prompts apart: the
concept rows of different concepts had cosine 0.32, their EOS rows 0.65, so any change aimed at one concept's
keys and values moved the others'.

The objective (:func:`pretrain_text_encoder`, token embeddings held at their init):
- invariance: the rows from a concept's last token onward are the same (cosine) in the bare name and in the
  name inside any of a few templates ("a photo of a cat", "my painting of van gogh", ...);
- identity: a linear probe tells the concept from its last-token row and from its EOS row;
- spread: the rows a concept owns (its name's tokens, EOS and the padding) are orthogonal to every other
  concept's, to the template rows (BOS, "a photo of a", ...) and to the rows of generic prompts ("" and
  "artwork" from EOS on). Without it, the mean cosine was near 0 but single pairs reached 0.3-0.35 (Hokusai's rows against
  Kelly McKernan's and against "a photo of a cat"'s). Immunization moves cross-attention K/V along the
  targets' rows, so a non-target concept changes in proportion to that cosine: on that model, an ascent
  strong enough to protect the targets erased Hokusai (measured 100% -> 12%). Template rows that were not
  orthogonal to the names moved 30-150% in K/V when UCE erased six names, and "a photo of a house" was lost.
The spread with ``span_weight`` > 0 (v4, issue #14's bar 4) is judged by what MIMA's selective projector sees
(:func:`span_share`). The batch spread sees only the pairs among 16 drawn concepts, and through the mean of
squared cosines: many small cosines with the 16 rows of "" add up inside their span, the projector is deflated
against that span, and what the deflation leaves of one concept's rows overlaps another's. v3 (256-d, batch
spread 300): an untargeted concept kept up to 0.17-0.22 of its rows in six targets' span (three target sets).
The v4 spread (every concept at every step, rows kept out of the generic prompts' span, cosines of what is
left, a hinge on the largest) gave at most 0.008-0.010, and 0.001-0.004 with the projector's rtol at 0.1
(scripts/text_overlap.py --three-sets). It does not see the bare names' rows, which UCE edits: on v4 the
template words' rows lie half inside their span, and UCE's reference settings move them (README, issue #14).
Measured after pretraining, `toy.build` reports these statistics (text_statistics).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..method.selective import target_row_projector
from ..method.training import TrainConfig, train
from . import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# other contexts a name appears in during pretraining, besides its own prompt (all words of world.vocabulary)
TEMPLATES = ("{}", "the {}", "a picture of {}", "my painting of {}", "art in the style of {}", "a new {}",
             "a photo of a {}", "an artwork of {}")


def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: the 256 symbols a byte-level BPE starts from."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(words: list[str] | None = None, max_tokens: int = 16) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges build each word of the toy world into one token.

    BPE applies its lowest-ranked merge first, so one word's chain of merges can split another word.
    The merges are therefore grown by repair: tokenize every word, and where a word still comes out in
    several pieces, append the merge of its first two pieces (appended merges rank last, so they cannot
    split a word that is already whole). Any other text still tokenizes, into characters, as with SD's.
    """
    words = sorted(set(words or world.vocabulary()))
    vocab: dict[str, int] = {}
    for sym in (a + end for end in ("", "</w>") for a in byte_level_alphabet()):
        vocab.setdefault(sym, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    merges: list[tuple[str, str]] = []
    while True:
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_tokens)
        split = [tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids) for w in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tok
        for pieces in split:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))


def build_text_encoder(tok: CLIPTokenizer, cfg, seed: int = 0) -> CLIPTextModel:
    """The encoder at its random initialisation (``cfg``: a ToyModelConfig); :func:`pretrain_text_encoder`
    then trains it once, the way CLIP comes pretrained."""
    torch.manual_seed(seed)
    conf = CLIPTextConfig(vocab_size=len(tok), hidden_size=cfg.text_dim, intermediate_size=cfg.text_dim * 2,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=4,
                          max_position_embeddings=cfg.max_tokens, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=cfg.text_dim)
    model = CLIPTextModel(conf)
    # With CLIP's default 0.02 init every prompt gives nearly the same states (the conditioning pitfall of
    # ENV_NOTES): large token embeddings keep each word's state distinct, large mixing weights let the
    # pretraining carry the concept into the later states.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, cfg.token_init_std)
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("self_attn" in name or "mlp" in name):
                p.normal_(0.0, cfg.mixing_init_std)
    return model


def _rows(tok, encoder, prompts: list[str]):
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    states = encoder(ids)[0]
    eos = (ids == tok.eos_token_id).int().argmax(1)  # the first EOS (BOS differs from EOS here)
    return states, eos


def text_statistics(tok, encoder) -> dict[str, float]:
    """What the pretraining is for, measured on every concept's own prompt: cosine of the bare name's and the
    templated prompt's last-token rows (mean, min) and aligned rows from there on; mean cosine between
    different concepts' last-token rows and EOS rows."""
    concepts = world.all_concepts()
    with torch.no_grad():
        tm, te = _rows(tok, encoder, [c.prompt for c in concepts])
        br, be = _rows(tok, encoder, [c.name for c in concepts])
    last, aligned = [], []
    for i in range(len(concepts)):
        length = tm.shape[1] - int(max(te[i], be[i])) + 1
        a = F.normalize(tm[i, te[i] - 1:te[i] - 1 + length], dim=1)
        b = F.normalize(br[i, be[i] - 1:be[i] - 1 + length], dim=1)
        last.append(float((a[0] * b[0]).sum()))
        aligned.append(float((a * b).sum(1).mean()))
    lr = F.normalize(torch.stack([tm[i, te[i] - 1] for i in range(len(concepts))]), dim=1)
    eo = F.normalize(torch.stack([tm[i, te[i]] for i in range(len(concepts))]), dim=1)
    off = ~torch.eye(len(concepts), dtype=torch.bool)
    rows, owner = _labelled_rows(tok, tm, te, [c.name for c in concepts], list(range(len(concepts))))
    cos = (rows @ rows.T).abs()
    other = owner[:, None] != owner[None, :]
    worst = torch.stack([cos[owner == i][:, other[owner == i][0]].max() for i in range(len(concepts))])
    template = cos[owner == TEMPLATE][:, owner != TEMPLATE]
    return {"bare_vs_templated_last": sum(last) / len(last), "bare_vs_templated_last_min": min(last),
            "bare_vs_templated_aligned": sum(aligned) / len(aligned),
            "concept_rows_across_concepts": float((lr @ lr.T)[off].mean()),
            "eos_rows_across_concepts": float((eo @ eo.T)[off].mean()),
            # per concept, the largest |cosine| of a row it owns with a row another concept owns; then the
            # mean and the worst over concepts (what bounds immunization's side effects)
            "owned_rows_max_cos_mean": float(worst.mean()), "owned_rows_max_cos_worst": float(worst.max()),
            # the largest |cosine| of a template row (BOS, "a photo of a", ...) with a row a concept owns:
            # UCE and immunization edit along concept rows, and every prompt reads the template's
            "template_vs_owned_max_cos": float(template.max())}


def span_share(tok, encoder, targets: list[str], others: list[str], rtol: float = 1e-3) -> dict[str, float]:
    """For each concept of ``others``: the part of its owned rows' norm (name, EOS, padding, in its own prompt)
    that the selective projector of MIMA keeps for the ``targets`` (method/selective.target_row_projector, with
    its ``rtol``; deflated against "" and the shared template rows, as immunize() builds it). The update may move
    K/V only inside that span, so this is how much of it leaks onto an untargeted concept: what it loses grows
    with the targets' K/V change times this share (issue #14's bar 4). A text encoder can be judged by it before
    any UNet is trained on it (scripts/text_overlap.py)."""
    pipe = SimpleNamespace(tokenizer=tok, text_encoder=encoder)
    with torch.no_grad():
        P = target_row_projector(pipe, [world.concept(c).prompt for c in targets], [], rtol=rtol).double()
        h, e = _rows(tok, encoder, [world.concept(c).prompt for c in others])
    out = {}
    for k, c in enumerate(others):
        r = h[k, int(e[k]) - len(tok(world.concept(c).name, add_special_tokens=False).input_ids):].double()
        out[c] = float((r @ P).norm() / r.norm())
    return out


TEMPLATE = -1  # the label of the rows before a concept's name: BOS and the template's words, shared by prompts
# prompts without a concept, whose rows from EOS on are their own: what the spread keeps apart from concepts too
GENERIC = ("", "artwork", "a photo of an object", "a photo of a", "an artwork of")


def _labelled_rows(tok, states, eos, names: list[str], labels: list[int]):
    """Every row of every prompt, L2-normalised, with a label: the rows before the name (BOS and the
    template's words) are TEMPLATE, the rows from the name on (its tokens, EOS, the padding) are the
    concept's own. A name of "" owns the rows from EOS on."""
    rows, owner = [], []
    for k, name in enumerate(names):
        start = int(eos[k]) - len(tok(name, add_special_tokens=False).input_ids)
        rows.append(F.normalize(states[k], dim=1))
        owner += [TEMPLATE] * start + [labels[k]] * (states.shape[1] - start)
    return torch.cat(rows), torch.tensor(owner)


def pretrain_text_encoder(tok, encoder, steps: int = 1500, batch: int = 16, lr: float = 1e-3, seed: int = 0,
                          checkpoint_dir=None, progress: bool = True, spread_weight: float = 10.0,
                          span_weight: float = 0.0, hinge_weight: float = 0.0) -> dict[str, float]:
    """Train the encoder (not its token embeddings) with the objective of the module docstring; returns
    :func:`text_statistics` after training.

    ``span_weight`` > 0 switches the spread to what the selective projector sees (v4): every concept's own prompt
    at every step (not only the batch's), each owned row's share in the span of the generic prompts' rows
    (weight ``span_weight``: the projector is deflated against "" and the template rows, and a concept that
    shares many small cosines with those rows leaks through what the deflation leaves), the squared cosines
    of different concepts' rows once that span is projected out (weight ``spread_weight``), and a hinge on each
    row's largest such cosine above 0.1 (``hinge_weight``)."""
    concepts = world.all_concepts()
    probe = torch.nn.Linear(encoder.config.hidden_size, len(concepts))
    encoder.train()
    params = {n: p for n, p in encoder.named_parameters() if "token_embedding" not in n}
    params.update({f"probe.{n}": p for n, p in probe.named_parameters()})

    def step_fn(step, gen):
        which = torch.randint(0, len(concepts), (batch,), generator=gen).tolist()
        templates = torch.randint(0, len(TEMPLATES) + 1, (batch,), generator=gen).tolist()
        prompts = [concepts[i].prompt if t == len(TEMPLATES) else TEMPLATES[t].format(concepts[i].name)
                   for i, t in zip(which, templates)]
        h, e = _rows(tok, encoder, prompts)
        hb, eb = _rows(tok, encoder, [concepts[i].name for i in which])
        invariance = 0.0
        for k in range(batch):
            length = h.shape[1] - int(max(e[k], eb[k])) + 1
            a = F.normalize(h[k, e[k] - 1:e[k] - 1 + length], dim=1)
            b = F.normalize(hb[k, eb[k] - 1:eb[k] - 1 + length], dim=1)
            invariance = invariance + (1 - (a * b).sum(1)).mean() / batch
        labels = torch.tensor(which)
        last = torch.stack([h[k, e[k] - 1] for k in range(batch)])
        eos = torch.stack([h[k, e[k]] for k in range(batch)])
        identity = F.cross_entropy(10 * probe(F.normalize(last, dim=1)), labels) + \
            F.cross_entropy(10 * probe(F.normalize(eos, dim=1)), labels)
        if span_weight > 0:
            return _span_spread(tok, encoder, concepts, invariance + identity, spread_weight, span_weight,
                                hinge_weight)
        hg, eg = _rows(tok, encoder, list(GENERIC))
        rows, owner = _labelled_rows(tok, torch.cat([h, hg]), torch.cat([e, eg]),
                                     [concepts[i].name for i in which] + [""] * len(GENERIC),
                                     which + [len(concepts) + g for g in range(len(GENERIC))])
        spread = _cross_cos2(rows, owner)
        return invariance + identity + spread_weight * spread, {
            "invariance": invariance.detach(), "identity": identity.detach(), "spread": spread.detach()}

    train(step_fn, params, TrainConfig(steps=steps, lr=lr, optimizer="adamw", seed=seed, checkpoint_every=250,
                                       desc="text encoder"), checkpoint_dir=checkpoint_dir, progress=progress)
    encoder.eval().requires_grad_(False)
    return text_statistics(tok, encoder)


def _cross_cos2(rows, owner, per_pair: bool = False):
    """Mean squared cosine of the (unit) rows of different owners; with per_pair also the masked matrix."""
    other = (owner[:, None] != owner[None, :]).float()
    cos2 = (rows @ rows.T).pow(2) * other
    mean = cos2.sum() / other.sum().clamp(min=1)
    return (mean, cos2) if per_pair else mean


def _span_spread(tok, encoder, concepts, base, spread_weight: float, span_weight: float, hinge_weight: float):
    """The v4 spread of :func:`pretrain_text_encoder` on every concept's own prompt; returns (loss, extras)."""
    h, e = _rows(tok, encoder, [c.prompt for c in concepts] + list(GENERIC))
    n = len(concepts)
    rows, owner = _labelled_rows(tok, h, e, [c.name for c in concepts] + [""] * len(GENERIC),
                                 list(range(n)) + [n + g for g in range(len(GENERIC))])
    spread = _cross_cos2(rows, owner)
    # the generic prompts' rows, every position: the span the selective projector is deflated against
    S = F.normalize(h[n:].reshape(-1, h.shape[-1]), dim=1)
    G = S @ S.T
    G = G + 1e-3 * G.diagonal().mean() * torch.eye(len(G))
    mine = owner[:n * h.shape[1]]
    own, lab = rows[:n * h.shape[1]][mine >= 0], mine[mine >= 0]
    inside = (own @ S.T) @ torch.linalg.solve(G, S)
    out = (inside * own).sum(1).mean()  # mean squared share of an owned row in that span
    resid, cos2 = _cross_cos2(F.normalize(own - inside, dim=1), lab, per_pair=True)
    hinge = F.relu(cos2.max(1).values - 0.01).mean()  # each row's worst pair above cosine 0.1
    loss = base + spread_weight * (spread + resid) + span_weight * out + hinge_weight * hinge
    return loss, {"spread": spread.detach(), "in_generic_span": out.detach(), "resid": resid.detach(),
                  "hinge": hinge.detach()}
