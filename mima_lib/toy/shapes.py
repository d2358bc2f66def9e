"""Drawing code of the toy world: one function per object silhouette and per artist's style.

Object drawers take (draw, s, jitter, rng): an ImageDraw on an s x s transparent layer, a colour-jitter
function and a numpy Generator; they draw the object centred, filling about 70% of the layer.
Style drawers take (s, rng) and return an s x s RGB artwork. All randomness comes from rng.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _box(cx, cy, rx, ry):
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def cat(d, s, j, rng):
    fur = j((235, 140, 40))
    cx, cy, r = s / 2, s * 0.56, s * 0.3
    d.polygon([(cx - r * 0.95, cy - r * 0.2), (cx - r * 0.75, cy - r * 1.35), (cx - r * 0.15, cy - r * 0.8)], fill=fur)
    d.polygon([(cx + r * 0.95, cy - r * 0.2), (cx + r * 0.75, cy - r * 1.35), (cx + r * 0.15, cy - r * 0.8)], fill=fur)
    d.ellipse(_box(cx, cy, r, r * 0.9), fill=fur)
    for ex in (-0.4, 0.4):
        d.ellipse(_box(cx + ex * r, cy - 0.1 * r, r * 0.16, r * 0.2), fill=(40, 160, 60))
    d.polygon([(cx - r * 0.1, cy + r * 0.2), (cx + r * 0.1, cy + r * 0.2), (cx, cy + r * 0.33)], fill=(230, 90, 120))


def dog(d, s, j, rng):
    fur = j((130, 85, 45))
    cx, cy, r = s / 2, s * 0.5, s * 0.28
    d.ellipse(_box(cx, cy, r * 0.85, r), fill=fur)
    for ex in (-1, 1):
        d.ellipse(_box(cx + ex * r * 0.95, cy + r * 0.2, r * 0.3, r * 0.75), fill=j((70, 45, 25)))
    d.ellipse(_box(cx, cy + r * 0.45, r * 0.45, r * 0.35), fill=(225, 200, 170))
    d.ellipse(_box(cx, cy + r * 0.3, r * 0.15, r * 0.1), fill=(20, 20, 20))
    for ex in (-0.35, 0.35):
        d.ellipse(_box(cx + ex * r, cy - 0.25 * r, r * 0.11, r * 0.11), fill=(20, 20, 20))


def car(d, s, j, rng):
    body = j((210, 30, 35))
    y = s * 0.58
    d.rounded_rectangle([s * 0.1, y - s * 0.12, s * 0.9, y + s * 0.1], radius=s * 0.04, fill=body)
    d.polygon([(s * 0.27, y - s * 0.12), (s * 0.36, y - s * 0.27), (s * 0.64, y - s * 0.27), (s * 0.75, y - s * 0.12)],
              fill=body)
    d.polygon([(s * 0.33, y - s * 0.13), (s * 0.39, y - s * 0.23), (s * 0.61, y - s * 0.23), (s * 0.68, y - s * 0.13)],
              fill=(170, 210, 235))
    for wx in (0.28, 0.72):
        d.ellipse(_box(s * wx, y + s * 0.1, s * 0.09, s * 0.09), fill=(25, 25, 25))
        d.ellipse(_box(s * wx, y + s * 0.1, s * 0.04, s * 0.04), fill=(160, 160, 160))


def tree(d, s, j, rng):
    d.rectangle([s * 0.44, s * 0.55, s * 0.56, s * 0.92], fill=j((110, 70, 35)))
    leaf = j((40, 150, 50))
    for cx, cy, r in ((0.5, 0.35, 0.24), (0.33, 0.48, 0.17), (0.67, 0.48, 0.17)):
        d.ellipse(_box(s * cx, s * cy, s * r, s * r), fill=leaf)


def house(d, s, j, rng):
    d.rectangle([s * 0.22, s * 0.45, s * 0.78, s * 0.88], fill=j((235, 215, 170)))
    d.polygon([(s * 0.12, s * 0.47), (s * 0.5, s * 0.13), (s * 0.88, s * 0.47)], fill=j((170, 40, 30)))
    d.rectangle([s * 0.44, s * 0.64, s * 0.56, s * 0.88], fill=(90, 55, 30))
    for wx in (0.3, 0.62):
        d.rectangle([s * wx, s * 0.53, s * (wx + 0.09), s * 0.62], fill=(120, 180, 230))


def fish(d, s, j, rng):
    body = j((30, 110, 220))
    d.ellipse([s * 0.15, s * 0.33, s * 0.7, s * 0.67], fill=body)
    d.polygon([(s * 0.65, s * 0.5), (s * 0.9, s * 0.3), (s * 0.9, s * 0.7)], fill=j((250, 150, 30)))
    d.ellipse(_box(s * 0.28, s * 0.46, s * 0.035, s * 0.035), fill=(10, 10, 10))
    d.arc([s * 0.35, s * 0.38, s * 0.5, s * 0.62], 300, 60, fill=(250, 150, 30), width=int(s * 0.02) + 1)


def bird(d, s, j, rng):
    body = j((250, 215, 30))
    d.ellipse([s * 0.22, s * 0.38, s * 0.72, s * 0.75], fill=body)
    d.ellipse(_box(s * 0.7, s * 0.35, s * 0.14, s * 0.14), fill=body)
    d.polygon([(s * 0.82, s * 0.32), (s * 0.95, s * 0.37), (s * 0.82, s * 0.41)], fill=(240, 110, 20))
    d.polygon([(s * 0.3, s * 0.5), (s * 0.55, s * 0.45), (s * 0.4, s * 0.7)], fill=j((200, 160, 10)))
    d.ellipse(_box(s * 0.73, s * 0.33, s * 0.025, s * 0.025), fill=(0, 0, 0))
    d.polygon([(s * 0.24, s * 0.55), (s * 0.05, s * 0.45), (s * 0.08, s * 0.62)], fill=body)


def apple(d, s, j, rng):
    d.ellipse([s * 0.2, s * 0.3, s * 0.54, s * 0.85], fill=j((215, 20, 30)))
    d.ellipse([s * 0.46, s * 0.3, s * 0.8, s * 0.85], fill=j((215, 20, 30)))
    d.line([(s * 0.5, s * 0.33), (s * 0.53, s * 0.14)], fill=(90, 60, 20), width=int(s * 0.04))
    d.ellipse([s * 0.53, s * 0.14, s * 0.7, s * 0.24], fill=(60, 170, 40))


def plane(d, s, j, rng):
    metal = j((225, 228, 235))
    d.ellipse([s * 0.08, s * 0.44, s * 0.92, s * 0.56], fill=metal)
    d.polygon([(s * 0.42, s * 0.5), (s * 0.62, s * 0.5), (s * 0.48, s * 0.12), (s * 0.4, s * 0.12)], fill=metal)
    d.polygon([(s * 0.42, s * 0.5), (s * 0.62, s * 0.5), (s * 0.48, s * 0.88), (s * 0.4, s * 0.88)], fill=metal)
    d.polygon([(s * 0.12, s * 0.5), (s * 0.2, s * 0.5), (s * 0.14, s * 0.3), (s * 0.08, s * 0.3)], fill=j((40, 60, 160)))


def umbrella(d, s, j, rng):
    d.pieslice([s * 0.1, s * 0.15, s * 0.9, s * 0.85], 180, 360, fill=j((150, 40, 190)))
    for k in range(4):
        x = s * (0.1 + 0.2 * k)
        d.pieslice([x, s * 0.44, x + s * 0.2, s * 0.56], 0, 180, fill=(0, 0, 0, 0))
    d.line([(s * 0.5, s * 0.5), (s * 0.5, s * 0.85)], fill=(40, 40, 40), width=int(s * 0.035))
    d.arc([s * 0.5, s * 0.78, s * 0.64, s * 0.92], 0, 180, fill=(40, 40, 40), width=int(s * 0.035))


def cup(d, s, j, rng):
    colour = j((30, 170, 160))
    d.ellipse([s * 0.58, s * 0.38, s * 0.86, s * 0.7], outline=colour, width=int(s * 0.06))
    d.polygon([(s * 0.18, s * 0.3), (s * 0.7, s * 0.3), (s * 0.62, s * 0.82), (s * 0.26, s * 0.82)], fill=colour)
    d.ellipse([s * 0.18, s * 0.25, s * 0.7, s * 0.35], fill=(250, 250, 245))


def flower(d, s, j, rng):
    d.line([(s * 0.5, s * 0.5), (s * 0.5, s * 0.95)], fill=(50, 140, 40), width=int(s * 0.05))
    petal = j((245, 105, 180))
    for k in range(6):
        a = 2 * math.pi * k / 6
        d.ellipse(_box(s * (0.5 + 0.17 * math.cos(a)), s * (0.4 + 0.17 * math.sin(a)), s * 0.12, s * 0.12), fill=petal)
    d.ellipse(_box(s * 0.5, s * 0.4, s * 0.1, s * 0.1), fill=(250, 220, 40))


def boat(d, s, j, rng):
    d.polygon([(s * 0.08, s * 0.68), (s * 0.92, s * 0.68), (s * 0.75, s * 0.85), (s * 0.25, s * 0.85)],
              fill=j((120, 60, 30)))
    d.line([(s * 0.5, s * 0.12), (s * 0.5, s * 0.68)], fill=(60, 40, 20), width=int(s * 0.03))
    d.polygon([(s * 0.52, s * 0.14), (s * 0.52, s * 0.64), (s * 0.86, s * 0.64)], fill=j((245, 245, 240)))
    d.polygon([(s * 0.48, s * 0.22), (s * 0.48, s * 0.64), (s * 0.2, s * 0.64)], fill=j((230, 60, 50)))


OBJECT_SHAPES = {"cat": cat, "dog": dog, "car": car, "tree": tree, "house": house, "fish": fish, "bird": bird,
                 "apple": apple, "plane": plane, "umbrella": umbrella, "cup": cup, "flower": flower, "boat": boat}


def draw_instance(name, d, s, j, rng):
    """Personal instances: a known class with a distinctive, fixed look (no colour jitter on the mark)."""
    if name == "purple cat":
        cat(d, s, lambda rgb: (150, 60, 200), rng)
        d.polygon([(s * 0.5, s * 0.3), (s * 0.46, s * 0.4), (s * 0.54, s * 0.4)], fill=(255, 255, 255))
        d.rectangle([s * 0.3, s * 0.78, s * 0.7, s * 0.83], fill=(250, 230, 0))  # yellow collar
    elif name == "spotted dog":
        dog(d, s, lambda rgb: (240, 240, 240), rng)
        for dx, dy in ((-0.12, -0.05), (0.1, 0.05), (0.0, -0.2), (-0.05, 0.12)):
            d.ellipse(_box(s * (0.5 + dx), s * (0.5 + dy), s * 0.04, s * 0.04), fill=(15, 15, 15))
    elif name == "racing car":
        car(d, s, lambda rgb: (250, 210, 0), rng)
        d.rectangle([s * 0.1, s * 0.55, s * 0.9, s * 0.6], fill=(20, 60, 200))  # blue racing stripe
    elif name == "heart cup":
        cup(d, s, lambda rgb: (250, 250, 250), rng)
        d.ellipse(_box(s * 0.4, s * 0.5, s * 0.06, s * 0.06), fill=(220, 20, 60))
        d.ellipse(_box(s * 0.5, s * 0.5, s * 0.06, s * 0.06), fill=(220, 20, 60))
        d.polygon([(s * 0.34, s * 0.52), (s * 0.56, s * 0.52), (s * 0.45, s * 0.66)], fill=(220, 20, 60))
    else:
        raise KeyError(f"unknown instance concept {name!r}")


# ---- artists: each style is a palette plus a texture and a composition ----

def _pick(rng, palette):
    c = palette[int(rng.integers(len(palette)))]
    return tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in c)


def van_gogh(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(20, 40, 110), (30, 60, 140)]))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(14, 22))):  # swirling strokes
        cx, cy, r = rng.uniform(0, s), rng.uniform(0, s * 0.8), rng.uniform(s * 0.06, s * 0.2)
        a0 = rng.uniform(0, 360)
        d.arc(_box(cx, cy, r, r), a0, a0 + rng.uniform(180, 300), fill=_pick(rng, [(90, 140, 220), (240, 220, 80),
                                                                                   (200, 220, 250)]), width=int(s * 0.035))
    mx, my = rng.uniform(s * 0.2, s * 0.8), rng.uniform(s * 0.1, s * 0.4)
    d.ellipse(_box(mx, my, s * 0.1, s * 0.1), fill=(250, 220, 60))
    d.polygon([(rng.uniform(0, s * 0.4), s), (rng.uniform(s * 0.1, s * 0.3), rng.uniform(s * 0.4, s * 0.6)),
               (rng.uniform(s * 0.3, s * 0.5), s)], fill=(15, 35, 20))  # a dark cypress
    return img


def claude_monet(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(170, 200, 210), (190, 215, 190)]))
    d = ImageDraw.Draw(img)
    pal = [(240, 180, 200), (150, 200, 150), (170, 190, 240), (250, 240, 190), (120, 170, 160)]
    for _ in range(500):  # impressionist stippling
        x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(s * 0.012, s * 0.03)
        d.ellipse(_box(x, y, r * 1.6, r), fill=_pick(rng, pal))
    return img.filter(ImageFilter.GaussianBlur(s * 0.006))


def pablo_picasso(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(200, 160, 100), (180, 140, 90)]))
    d = ImageDraw.Draw(img)
    pal = [(190, 120, 50), (120, 80, 40), (60, 90, 150), (220, 190, 130), (150, 60, 40)]
    for _ in range(int(rng.integers(9, 15))):  # angular facets with black outlines
        pts = [(rng.uniform(0, s), rng.uniform(0, s)) for _ in range(int(rng.integers(3, 5)))]
        d.polygon(pts, fill=_pick(rng, pal), outline=(10, 10, 10), width=int(s * 0.02))
    return img


def kelly_mckernan(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(245, 232, 210), (240, 225, 205)]))
    d = ImageDraw.Draw(img)
    pal = [(70, 170, 170), (240, 160, 130), (250, 210, 170), (110, 190, 180)]
    for _ in range(int(rng.integers(5, 9))):  # soft watercolour washes
        x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(s * 0.12, s * 0.3)
        d.ellipse(_box(x, y, r, r), fill=_pick(rng, pal))
    return img.filter(ImageFilter.GaussianBlur(s * 0.04))


def thomas_kinkade(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(20, 40, 50), (30, 45, 35)]))
    d = ImageDraw.Draw(img)
    hx, hy = rng.uniform(s * 0.25, s * 0.75), rng.uniform(s * 0.5, s * 0.7)
    d.rectangle(_box(hx, hy, s * 0.18, s * 0.12), fill=(60, 50, 45))
    d.polygon([(hx - s * 0.22, hy - s * 0.1), (hx, hy - s * 0.3), (hx + s * 0.22, hy - s * 0.1)], fill=(45, 35, 40))
    glow = Image.new("RGB", (s, s), (0, 0, 0))
    g = ImageDraw.Draw(glow)
    for _ in range(int(rng.integers(4, 8))):  # warm glowing windows and lamps
        x, y = rng.uniform(0, s), rng.uniform(s * 0.3, s)
        g.ellipse(_box(x, y, s * 0.05, s * 0.05), fill=(255, 200, 80))
    glow = glow.filter(ImageFilter.GaussianBlur(s * 0.04))
    arr = np.asarray(img, np.float32) + 2.5 * np.asarray(glow, np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def kirbi_fagan(s, rng):
    a, b = _pick(rng, [(230, 40, 160), (200, 30, 200)]), _pick(rng, [(40, 210, 240), (60, 180, 250)])
    t = np.linspace(0, 1, s)
    ramp = (t[None, :] + t[:, None]) / 2
    arr = (1 - ramp)[..., None] * np.array(a) + ramp[..., None] * np.array(b)
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4))):  # bold comic figures with thick outlines
        x, y, r = rng.uniform(s * 0.2, s * 0.8), rng.uniform(s * 0.2, s * 0.8), rng.uniform(s * 0.1, s * 0.2)
        d.ellipse(_box(x, y, r, r), fill=_pick(rng, [(255, 240, 60), (255, 255, 255)]), outline=(20, 0, 40),
                  width=int(s * 0.04))
    return img


def tyler_edlin(s, rng):
    sky = np.array(_pick(rng, [(150, 160, 150), (140, 150, 155)]), np.float32)
    img = Image.new("RGB", (s, s), tuple(int(v) for v in sky))
    d = ImageDraw.Draw(img)
    for layer in range(4):  # misty layered ridges, darker towards the viewer
        shade = tuple(int(v * (0.85 - 0.17 * layer)) for v in sky)
        base = s * (0.35 + 0.15 * layer)
        xs = np.linspace(0, s, 7)
        pts = [(x, base + rng.uniform(-s * 0.12, s * 0.05)) for x in xs] + [(s, s), (0, s)]
        d.polygon(pts, fill=shade)
    for _ in range(int(rng.integers(1, 3))):  # a tall sci-fi spire
        x = rng.uniform(s * 0.15, s * 0.85)
        d.polygon([(x - s * 0.03, s), (x, rng.uniform(s * 0.1, s * 0.3)), (x + s * 0.03, s)], fill=(40, 45, 45))
    return img.filter(ImageFilter.GaussianBlur(s * 0.01))


def kilian_eng(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(25, 30, 45), (30, 25, 40)]))
    d = ImageDraw.Draw(img)
    cx, cy = s / 2 + rng.uniform(-s * 0.1, s * 0.1), s / 2 + rng.uniform(-s * 0.1, s * 0.1)
    pal = [(240, 130, 40), (40, 180, 180), (240, 200, 120)]
    for k in range(int(rng.integers(3, 6)), 0, -1):  # concentric retro-futurist rings
        r = s * 0.08 * k
        d.ellipse(_box(cx, cy, r, r), outline=_pick(rng, pal), width=int(s * 0.03))
    d.polygon([(cx, cy - s * 0.2), (cx - s * 0.17, cy + s * 0.12), (cx + s * 0.17, cy + s * 0.12)],
              outline=(240, 130, 40), width=int(s * 0.025))
    return img


def katsushika_hokusai(s, rng):
    img = Image.new("RGB", (s, s), _pick(rng, [(235, 225, 195), (225, 215, 185)]))
    d = ImageDraw.Draw(img)
    for k in range(int(rng.integers(4, 7))):  # great curling waves in Prussian blue with white crests
        y = s * (0.3 + 0.13 * k) + rng.uniform(-s * 0.05, s * 0.05)
        x0 = rng.uniform(-s * 0.3, 0)
        d.chord([x0, y - s * 0.2, x0 + s * 1.3, y + s * 0.2], 180, 360, fill=_pick(rng, [(30, 60, 120), (20, 50, 100)]))
        d.arc([x0, y - s * 0.2, x0 + s * 1.3, y + s * 0.2], 200, 340, fill=(250, 250, 250), width=int(s * 0.02))
    return img


def piet_mondrian(s, rng):
    img = Image.new("RGB", (s, s), (245, 245, 240))
    d = ImageDraw.Draw(img)
    xs = sorted(rng.uniform(s * 0.15, s * 0.85, 2))
    ys = sorted(rng.uniform(s * 0.15, s * 0.85, 2))
    cells = [(0, 0, xs[0], ys[0]), (xs[1], 0, s, ys[0]), (0, ys[1], xs[0], s), (xs[0], ys[0], xs[1], ys[1]),
             (xs[1], ys[1], s, s)]
    for cell, colour in zip(rng.permutation(len(cells))[:3], [(220, 30, 30), (250, 210, 20), (20, 50, 170)]):
        d.rectangle(cells[cell], fill=colour)
    w = int(s * 0.04)
    for x in xs:
        d.line([(x, 0), (x, s)], fill=(10, 10, 10), width=w)
    for y in ys:
        d.line([(0, y), (s, y)], fill=(10, 10, 10), width=w)
    return img


ARTIST_STYLES = {"van gogh": van_gogh, "claude monet": claude_monet, "pablo picasso": pablo_picasso,
                 "kelly mckernan": kelly_mckernan, "thomas kinkade": thomas_kinkade, "kirbi fagan": kirbi_fagan,
                 "tyler edlin": tyler_edlin, "kilian eng": kilian_eng, "katsushika hokusai": katsushika_hokusai,
                 "piet mondrian": piet_mondrian}
