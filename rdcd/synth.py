"""A labelled copy-detection benchmark from any set of images, shaped like DISC2021.

The originals are shuffled under the seed and split into four disjoint roles:

- copied references: in references/, and edited into queries that must find them;
- distractor references: in references/ with no copy (they make retrieval hard);
- distractor sources: never in references/; edited into distractor queries, which must find
  nothing (they make calibration matter, as in DISC's 80% of queries without a match);
- fillers: never in either folder; only used as "another image" by the compositing edits
  (the copy pasted onto it, or it pasted onto the copy), so no query contains two references.

A query is an original passed through an edit chain of `min_edits`..`max_edits` distinct edits
drawn by weight (EDIT_KINDS; weights are configurable) and applied in a fixed stage order:
geometry and colour first, then overlays, then frames and composites, then resizing and
re-encoding, as a picture travels through an app and a re-upload. Every random draw comes from
a generator seeded by (seed, role, index), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from rdcd import edits

WORDS = (
    "when the code finally works sunday vibes no filter best day ever cannot believe this "
    "weekend mood look at this breaking news like and share trust me original photo goals "
    "throwback my favourite so true wait for it plot twist mondays"
).split()


@dataclass(frozen=True)
class EditKind:
    """One kind of edit: its stage in the chain, whether it needs a filler image, and how its
    parameters are drawn."""

    name: str
    stage: int
    needs_filler: bool
    sample: Callable[[np.random.Generator], dict[str, Any]]
    apply: Callable[[Image.Image, dict[str, Any], Image.Image | None], Image.Image]
    description: str


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return round(float(rng.uniform(low, high)), 4)


def _colour(rng: np.random.Generator) -> list[int]:
    return [int(c) for c in rng.integers(0, 256, 3)]


def _text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))).tolist())


def _sample_crop(rng):
    area = _u(rng, 0.25, 0.85)
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    w = min(1.0, float(np.sqrt(area * aspect)))
    h = min(1.0, float(np.sqrt(area / aspect)))
    left, top = _u(rng, 0, 1 - w), _u(rng, 0, 1 - h)
    return {"box_frac": [left, top, round(min(1.0, left + w), 4), round(min(1.0, top + h), 4)]}


def _sample_colour(rng):
    which = str(rng.choice(["brightness", "contrast", "saturation", "hue"]))
    if which == "hue":
        return {"filter": which, "value": _u(rng, -0.4, 0.4)}
    return {"filter": which, "value": _u(rng, 0.45, 1.7)}


def _apply_colour(img, p, _):
    functions = {
        "brightness": edits.brightness,
        "contrast": edits.contrast,
        "saturation": edits.saturation,
        "hue": edits.hue_shift,
    }
    return functions[p["filter"]](img, p["value"])


def _sample_rotate(rng):
    if rng.random() < 0.4:
        return {"angle": int(rng.choice([90, 180, 270])), "fill": [0, 0, 0]}
    angle = _u(rng, 4, 30) * (1 if rng.random() < 0.5 else -1)
    return {"angle": angle, "fill": _colour(rng) if rng.random() < 0.3 else [0, 0, 0]}


def _sample_flip(rng):
    return {"direction": "horizontal" if rng.random() < 0.8 else "vertical"}


def _sample_text(rng):
    return {
        "text": _text(rng),
        "font_size_frac": _u(rng, 0.06, 0.16),
        "opacity": _u(rng, 0.6, 1.0),
        "colour": _colour(rng),
        "position": [_u(rng, 0, 1), _u(rng, 0, 1)],
    }


def _sample_emoji(rng):
    return {
        "mood": str(rng.choice(edits.EMOJI_MOODS)),
        "hue": _u(rng, 0, 1),
        "size_frac": _u(rng, 0.15, 0.45),
        "opacity": _u(rng, 0.7, 1.0),
        "position": [_u(rng, 0, 1), _u(rng, 0, 1)],
    }


def _apply_emoji(img, p, _):
    sticker = edits.make_emoji(256, hue=p["hue"], mood=p["mood"])
    return edits.overlay_image(img, sticker, p["size_frac"], p["opacity"], tuple(p["position"]))


def _sample_paste_onto(rng):
    return {"size_frac": _u(rng, 0.5, 0.9), "position": [_u(rng, 0, 1), _u(rng, 0, 1)]}


def _sample_overlay_image(rng):
    return {
        "size_frac": _u(rng, 0.2, 0.5),
        "opacity": _u(rng, 0.8, 1.0),
        "position": [_u(rng, 0, 1), _u(rng, 0, 1)],
    }


def _sample_screenshot(rng):
    theme = [250, 250, 250] if rng.random() < 0.6 else [18, 18, 18]
    return {"title": "@" + str(rng.choice(WORDS)), "theme": theme, "width_frac": _u(rng, 0.8, 1)}


def _sample_meme(rng):
    return {
        "top_text": _text(rng).upper(),
        "bottom_text": _text(rng).upper() if rng.random() < 0.4 else "",
        "bar_frac": _u(rng, 0.12, 0.25),
    }


def _sample_border(rng):
    return {"width_frac": _u(rng, 0.03, 0.15), "colour": _colour(rng)}


def _sample_pad(rng):
    return {"aspect": float(rng.choice([1.0, 16 / 9, 9 / 16, 4 / 5])), "colour": _colour(rng)}


def _sample_resize(rng):
    scale = _u(rng, 0.3, 0.9)
    stretch = _u(rng, 0.8, 1.25) if rng.random() < 0.3 else 1.0
    return {"scale_x": scale, "scale_y": round(scale * stretch, 4)}


EDIT_KINDS: dict[str, EditKind] = {
    kind.name: kind
    for kind in (
        EditKind(
            "crop",
            0,
            False,
            _sample_crop,
            lambda img, p, _: edits.crop(img, tuple(p["box_frac"])),
            "keep 25-85% of the area, aspect 0.6-1.6",
        ),
        EditKind(
            "rotate",
            0,
            False,
            _sample_rotate,
            lambda img, p, _: edits.rotate(img, p["angle"], tuple(p["fill"])),
            "40%: 90/180/270 degrees; else 4-30 degrees either way, canvas expanded",
        ),
        EditKind(
            "flip",
            0,
            False,
            _sample_flip,
            lambda img, p, _: (
                edits.hflip(img) if p["direction"] == "horizontal" else edits.vflip(img)
            ),
            "80% horizontal, 20% vertical mirror",
        ),
        EditKind(
            "colour",
            0,
            False,
            _sample_colour,
            _apply_colour,
            "one of brightness/contrast/saturation x0.45-1.7 or hue shift +-0.4 turn",
        ),
        EditKind(
            "grayscale",
            0,
            False,
            lambda rng: {},
            lambda img, p, _: edits.grayscale(img),
            "luma only",
        ),
        EditKind(
            "blur",
            0,
            False,
            lambda rng: {"radius_frac": _u(rng, 0.003, 0.012)},
            lambda img, p, _: edits.blur(img, p["radius_frac"] * min(img.size)),
            "Gaussian, radius 0.3-1.2% of the shorter side",
        ),
        EditKind(
            "noise",
            0,
            False,
            lambda rng: {"sigma": _u(rng, 5, 25), "seed": int(rng.integers(0, 2**31))},
            lambda img, p, _: edits.noise(img, p["sigma"], p["seed"]),
            "additive Gaussian pixel noise, sigma 5-25",
        ),
        EditKind(
            "pixelate",
            0,
            False,
            lambda rng: {"block_frac": _u(rng, 0.01, 0.025)},
            lambda img, p, _: edits.pixelate(img, p["block_frac"]),
            "mosaic blocks of 1-2.5% of the shorter side",
        ),
        EditKind(
            "text",
            1,
            False,
            _sample_text,
            lambda img, p, _: edits.overlay_text(
                img,
                p["text"],
                p["font_size_frac"],
                p["opacity"],
                tuple(p["colour"]),
                tuple(p["position"]),
            ),
            "1-4 words, font 6-16% of the height, any colour and place",
        ),
        EditKind(
            "emoji",
            1,
            False,
            _sample_emoji,
            _apply_emoji,
            "a drawn emoji sticker, 15-45% of the shorter side",
        ),
        EditKind(
            "overlay_image",
            1,
            True,
            _sample_overlay_image,
            lambda img, p, other: edits.overlay_image(
                img, other, p["size_frac"], p["opacity"], tuple(p["position"])
            ),
            "a filler image, 20-50% of the shorter side, pasted onto the copy",
        ),
        EditKind(
            "border",
            2,
            False,
            _sample_border,
            lambda img, p, _: edits.add_border(img, p["width_frac"], tuple(p["colour"])),
            "a uniform frame 3-15% of the shorter side",
        ),
        EditKind(
            "pad",
            2,
            False,
            _sample_pad,
            lambda img, p, _: edits.pad_to_aspect(img, p["aspect"], tuple(p["colour"])),
            "letterbox to 1:1, 16:9, 9:16 or 4:5",
        ),
        EditKind(
            "meme",
            2,
            False,
            _sample_meme,
            lambda img, p, _: edits.meme_frame(img, p["top_text"], p["bottom_text"], p["bar_frac"]),
            "caption bar above (and 40%: below) with upper-case text",
        ),
        EditKind(
            "screenshot",
            2,
            False,
            _sample_screenshot,
            lambda img, p, _: edits.screenshot(img, p["title"], tuple(p["theme"]), p["width_frac"]),
            "inside a phone screenshot of a social app, light or dark theme",
        ),
        EditKind(
            "paste_onto",
            2,
            True,
            _sample_paste_onto,
            lambda img, p, other: edits.paste_onto(
                other, img, p["size_frac"], tuple(p["position"])
            ),
            "the copy, 50-90% of the filler's shorter side, pasted into a filler image",
        ),
        EditKind(
            "resize",
            3,
            False,
            _sample_resize,
            lambda img, p, _: edits.resize(img, p["scale_x"], p["scale_y"]),
            "x0.3-0.9, 30% with the aspect stretched 0.8-1.25",
        ),
        EditKind(
            "jpeg",
            3,
            False,
            lambda rng: {"quality": int(rng.integers(8, 60))},
            lambda img, p, _: edits.jpeg(img, p["quality"]),
            "re-encoded at quality 8-59",
        ),
    )
}


@dataclass(frozen=True)
class SynthSettings:
    """How a benchmark is drawn; mirrors the `synth:` config section."""

    copied_fraction: float = 0.3
    distractor_reference_fraction: float = 0.3
    distractor_source_fraction: float = 0.3
    copies_per_reference: int = 2
    queries_per_distractor: int = 2
    min_edits: int = 1
    max_edits: int = 3
    max_side: int = 1024
    jpeg_quality: int = 90
    edit_weights: dict[str, float] | None = None

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> SynthSettings:
        settings = cls(**{k: v for k, v in section.items() if k != "seed"})
        settings.validate()
        return settings

    def weights(self) -> dict[str, float]:
        weights = dict(DEFAULT_WEIGHTS)
        weights.update(self.edit_weights or {})
        return weights

    def validate(self) -> None:
        fractions = (
            self.copied_fraction,
            self.distractor_reference_fraction,
            self.distractor_source_fraction,
        )
        if any(f < 0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
            raise ValueError("synth fractions must be >= 0 and sum to at most 1")
        if self.copied_fraction <= 0:
            raise ValueError("synth.copied_fraction must be > 0: a benchmark needs copies")
        if not 1 <= self.min_edits <= self.max_edits:
            raise ValueError("synth edits need 1 <= min_edits <= max_edits")
        unknown = sorted(set(self.edit_weights or {}) - set(EDIT_KINDS))
        if unknown:
            raise ValueError(f"unknown edits in synth.edit_weights: {unknown}; known: {EDIT_KINDS}")
        if any(w < 0 for w in self.weights().values()):
            raise ValueError("synth.edit_weights must be >= 0")
        if sum(1 for w in self.weights().values() if w > 0) < self.max_edits:
            raise ValueError("synth.max_edits exceeds the number of edits with a weight > 0")
        if self.copies_per_reference < 1 or self.queries_per_distractor < 0:
            raise ValueError("synth needs copies_per_reference >= 1, queries_per_distractor >= 0")


DEFAULT_WEIGHTS: dict[str, float] = {
    "crop": 3.0,
    "resize": 2.0,
    "jpeg": 2.0,
    "rotate": 1.0,
    "flip": 1.0,
    "colour": 2.0,
    "grayscale": 0.5,
    "blur": 1.0,
    "noise": 0.5,
    "pixelate": 0.3,
    "text": 1.5,
    "emoji": 1.5,
    "overlay_image": 1.0,
    "border": 1.0,
    "pad": 0.5,
    "meme": 0.7,
    "screenshot": 0.7,
    "paste_onto": 1.0,
}


@dataclass(frozen=True)
class Roles:
    """Which original plays which part (lists of indices into the sorted originals)."""

    copied: list[int]
    distractor_references: list[int]
    distractor_sources: list[int]
    fillers: list[int]


def assign_roles(n: int, settings: SynthSettings, seed: int) -> Roles:
    """Shuffle n originals under the seed and cut them by the configured fractions."""
    order = np.random.default_rng([seed, 0]).permutation(n).tolist()
    n_copied = max(1, round(n * settings.copied_fraction))
    n_distractor_refs = round(n * settings.distractor_reference_fraction)
    n_sources = round(n * settings.distractor_source_fraction)
    if n_copied + n_distractor_refs + n_sources > n:
        n_sources = max(0, n - n_copied - n_distractor_refs)
    cuts = np.cumsum([n_copied, n_distractor_refs, n_sources]).tolist()
    return Roles(
        copied=order[: cuts[0]],
        distractor_references=order[cuts[0] : cuts[1]],
        distractor_sources=order[cuts[1] : cuts[2]],
        fillers=order[cuts[2] :],
    )


def draw_chain(
    rng: np.random.Generator, settings: SynthSettings, have_fillers: bool
) -> list[dict[str, Any]]:
    """An edit chain: distinct edits drawn by weight, in stage order, with their parameters.

    At most one compositing edit per chain: both would use the same filler image.
    """
    weights = {
        name: w
        for name, w in settings.weights().items()
        if w > 0 and (have_fillers or not EDIT_KINDS[name].needs_filler)
    }
    n_edits = int(rng.integers(settings.min_edits, settings.max_edits + 1))
    chosen: list[str] = []
    while len(chosen) < n_edits and weights:
        names = sorted(weights)
        p = np.array([weights[name] for name in names])
        name = str(rng.choice(names, p=p / p.sum()))
        chosen.append(name)
        weights = {
            other: w
            for other, w in weights.items()
            if other != name
            and not (EDIT_KINDS[name].needs_filler and EDIT_KINDS[other].needs_filler)
        }
    chosen.sort(key=lambda name: EDIT_KINDS[name].stage)
    return [{"edit": name, "params": EDIT_KINDS[name].sample(rng)} for name in chosen]


def apply_chain(
    img: Image.Image, chain: list[dict[str, Any]], filler: Image.Image | None
) -> Image.Image:
    """Apply a drawn chain; `filler` is the other image for compositing edits."""
    for step in chain:
        kind = EDIT_KINDS[step["edit"]]
        if kind.needs_filler and filler is None:
            raise ValueError(f"edit {kind.name} needs a filler image")
        img = kind.apply(img, step["params"], filler)
    return img


def limit_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is at most max_side (never upscale)."""
    if max(img.size) <= max_side:
        return img
    ratio = max_side / max(img.size)
    return edits.resize_to(img, (round(img.width * ratio), round(img.height * ratio)))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG without metadata: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=False)
    return buffer.getvalue()


def edit_table() -> list[dict[str, Any]]:
    """Every edit with its stage and description, for the manifest and the docs."""
    return [
        {"edit": k.name, "stage": k.stage, "needs_filler": k.needs_filler, "what": k.description}
        for k in EDIT_KINDS.values()
    ]


@dataclass(frozen=True)
class QueryPlan:
    """One query to render: its source original, the reference it copies (None for a
    distractor), its edit chain and the filler used by compositing edits."""

    query_id: str
    source: int
    reference_id: str | None
    chain: list[dict[str, Any]]
    filler: int | None


@dataclass(frozen=True)
class Plan:
    """Everything `rdcd synth` writes, decided before any pixel is touched."""

    roles: Roles
    reference_ids: dict[int, str]  # original index -> reference id
    queries: list[QueryPlan]


def _ids(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def plan_benchmark(n_originals: int, settings: SynthSettings, seed: int) -> Plan:
    """Roles, reference ids, and every query with its chain, deterministically from the seed."""
    if n_originals < 2:
        raise ValueError("synth needs at least 2 readable original images")
    roles = assign_roles(n_originals, settings, seed)
    references = roles.copied + roles.distractor_references
    shuffled = np.random.default_rng([seed, 1]).permutation(len(references)).tolist()
    reference_ids = dict(
        zip([references[i] for i in shuffled], _ids("R", len(references)), strict=True)
    )
    jobs = [(source, True) for source in roles.copied for _ in range(settings.copies_per_reference)]
    jobs += [
        (source, False)
        for source in roles.distractor_sources
        for _ in range(settings.queries_per_distractor)
    ]
    query_order = np.random.default_rng([seed, 2]).permutation(len(jobs)).tolist()
    fillers = [
        roles.fillers[i] for i in np.random.default_rng([seed, 3]).permutation(len(roles.fillers))
    ]
    queries = []
    used_fillers = 0
    for query_id, job in zip(_ids("Q", len(jobs)), query_order, strict=True):
        source, copied = jobs[job]
        chain = draw_chain(np.random.default_rng([seed, 4, job]), settings, bool(fillers))
        filler = None
        if any(EDIT_KINDS[step["edit"]].needs_filler for step in chain):
            filler = fillers[used_fillers % len(fillers)]
            used_fillers += 1
        queries.append(
            QueryPlan(query_id, source, reference_ids[source] if copied else None, chain, filler)
        )
    return Plan(roles, reference_ids, queries)


def render_query(
    original: Image.Image,
    chain: list[dict[str, Any]],
    filler: Image.Image | None,
    max_side: int,
) -> Image.Image:
    """The query image: the chain applied to the original, then capped at max_side."""
    return limit_side(apply_chain(original, chain, filler), max_side)
