"""The embedded default dataset: synthetic users, items and events, deterministic by seed.

Structure that makes learning possible and measurable:

* 12 latent topics with 25 distinct English words each, grouped in 4 clusters of correlated topics
  (:data:`CLUSTERS`). A text encoder sees word similarity within a topic; which *different* topics
  go together (e.g. cycling with nutrition with hotels) has to be learned from behaviour.
* A second facet, the *style* (:data:`STYLES`: beginner, expert, budget, luxury, quick, family),
  is independent of the topic: every item has exactly one, balanced over items and topics, and its
  title carries one or two of that style's markers ("easy", "for beginners"; "premium", "in
  style"; ...). Interests are topic x style: a user mostly wants one style across all topics.
* An item has a primary topic (its ``category``) and, with probability 0.4, one word of a
  secondary topic. Its text is a 7-12 word title of 3-4 topic words, 1-2 style markers (two in
  one title of eight) and 1-2 generic words ("The easy guide for cycling, yoga and hotels").
  Popularity is Zipf-like (exponent 0.8).
* A user's topic mixture favours one or two clusters, spread over the cluster's topics, plus 10 %
  uniform background. It drifts: event j of n uses ``(1 - j/(n-1)) * start + j/(n-1) * end``,
  where ``end`` re-draws the within-cluster weights, so recent events predict the next best.
* A user's style weights put ``style_strength`` on one main style (uniform over styles) and spread
  the rest evenly (``1/6`` = no preference). An event draws a topic from the mixture, then an
  item of that topic with weight popularity x the user's weight of the item's style.
* Silos are non-IID: silo s draws cluster preferences ``Dirichlet(silo_skew)``; its users pick
  their clusters from those. A large ``silo_skew`` (say 100) gives nearly IID silos.
* Behaviour depends on affinity ``a = mixture[topic] / max(mixture) * (0.5 + 0.5 * style[s] /
  max(style))`` in [0, 1]: views (not positive) are likelier at low affinity, likes and purchases
  at high affinity, ratings grow with affinity. A user never gets the same item twice.

``generate(SyntheticSpec())`` (600 users, 800 items, ~11k events) takes well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from uirl.errors import ConfigError

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "basketball", "tennis", "marathon", "cycling", "swimming", "soccer", "baseball",
               "hockey", "golf", "rugby", "cricket", "volleyball", "boxing", "sprinting", "stadium", "athletes",
               "coaching", "playoffs", "league", "tournament", "referee", "racing", "skiing", "rowing"),
    "health": ("fitness", "nutrition", "yoga", "sleep", "meditation", "vitamins", "cardio", "stretching",
               "wellness", "hydration", "posture", "immunity", "protein", "recovery", "therapy", "stress",
               "diet", "workouts", "pilates", "breathing", "hygiene", "metabolism", "mindfulness", "checkups",
               "injuries"),
    "travel": ("flights", "hotels", "beaches", "backpacking", "passports", "islands", "airports", "luggage",
               "cruises", "resorts", "hiking", "camping", "itineraries", "tourism", "sightseeing", "hostels",
               "destinations", "visas", "souvenirs", "railways", "mountains", "villages", "coastlines", "maps",
               "adventures"),
    "technology": ("smartphones", "laptops", "software", "processors", "internet", "cloud", "cybersecurity",
                   "gadgets", "startups", "robotics", "databases", "programming", "algorithms", "networks",
                   "chips", "encryption", "browsers", "servers", "tablets", "wearables", "batteries", "apps",
                   "automation", "coding", "firmware"),
    "gaming": ("consoles", "esports", "controllers", "multiplayer", "quests", "arcade", "speedruns",
               "leaderboards", "dungeons", "platformers", "shooters", "avatars", "achievements", "puzzles",
               "roguelikes", "simulators", "levels", "raids", "guilds", "headsets", "joysticks", "cartridges",
               "sandbox", "mods", "gamers"),
    "science": ("physics", "chemistry", "biology", "astronomy", "telescopes", "molecules", "genetics",
                "experiments", "fossils", "galaxies", "quantum", "neurons", "ecology", "climate", "volcanoes",
                "microscopes", "atoms", "evolution", "laboratories", "particles", "planets", "cells", "geology",
                "research", "theories"),
    "cooking": ("recipes", "baking", "pasta", "bread", "soups", "spices", "grilling", "desserts", "sauces",
                "salads", "noodles", "curry", "pastry", "cookies", "roasting", "kitchens", "knives", "casseroles",
                "dumplings", "breakfast", "sourdough", "stews", "marinades", "vegetables", "chocolate"),
    "gardening": ("roses", "tomatoes", "compost", "seedlings", "pruning", "soil", "herbs", "orchids",
                  "succulents", "greenhouses", "mulch", "bulbs", "perennials", "lawns", "hedges", "watering",
                  "weeds", "fertilizer", "shrubs", "tulips", "planters", "ferns", "trellises", "orchards",
                  "sunflowers"),
    "fashion": ("dresses", "sneakers", "jackets", "denim", "handbags", "jewelry", "runway", "designers",
                "boutiques", "scarves", "boots", "accessories", "tailoring", "knitwear", "sunglasses",
                "wardrobe", "hats", "fabrics", "silk", "cotton", "makeup", "perfume", "streetwear", "suits",
                "watches"),
    "music": ("guitar", "piano", "concerts", "albums", "jazz", "drums", "orchestra", "singers", "lyrics",
              "vinyl", "bands", "melodies", "hiphop", "symphony", "violin", "playlists", "festivals", "chords",
              "rock", "opera", "choir", "songwriting", "rhythm", "bass", "studios"),
    "film": ("movies", "cinema", "directors", "actors", "screenplays", "documentaries", "trailers", "sequels",
             "animation", "thrillers", "comedies", "westerns", "premieres", "blockbusters", "cinematography",
             "oscars", "horror", "dramas", "casting", "screenings", "franchises", "subtitles", "villains",
             "hollywood", "filmmakers"),
    "books": ("novels", "poetry", "authors", "libraries", "bestsellers", "memoirs", "fiction", "publishers",
              "chapters", "mysteries", "biographies", "bookstores", "paperbacks", "fantasy", "classics",
              "literature", "essays", "storytelling", "manuscripts", "anthologies", "editors", "readers",
              "romance", "sagas", "librarians"),
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
#: Groups of correlated topics: a user's interests spread over one or two of these.
CLUSTERS: tuple[tuple[str, ...], ...] = (("sports", "health", "travel"), ("technology", "gaming", "science"),
                                        ("cooking", "gardening", "fashion"), ("music", "film", "books"))
#: Style facet: style name -> its markers, 6 modifiers (stand before a noun) then 6 phrases (end a
#: title part). Every marker belongs to one style and appears in no topic or generic word list.
STYLES: dict[str, tuple[str, ...]] = {
    "beginner": ("easy", "beginner", "starter", "introductory", "gentle", "entry-level",
                 "for beginners", "from scratch", "for first-timers", "for newcomers", "step by step",
                 "made simple"),
    "expert": ("advanced", "in-depth", "masterclass", "expert", "professional", "technical",
               "for experts", "for professionals", "for specialists", "in detail", "for serious enthusiasts",
               "for the pros"),
    "budget": ("cheap", "budget", "affordable", "low-cost", "thrifty", "bargain",
               "on a budget", "for less", "on a shoestring", "without breaking the bank", "for pennies",
               "at half price"),
    "luxury": ("premium", "luxury", "exclusive", "high-end", "deluxe", "lavish",
               "in style", "for connoisseurs", "at its finest", "the five-star way", "for the discerning",
               "first class"),
    "quick": ("quick", "five-minute", "fast", "speedy", "rapid", "last-minute",
              "in minutes", "on the go", "in a hurry", "in no time", "at a glance", "for busy people"),
    "family": ("family", "kid-friendly", "all-ages", "household", "shared", "parent-approved",
               "for everyone", "for the whole family", "together", "for all ages", "for young and old",
               "for little ones"),
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
_STYLE_MODIFIERS = 6
GENERIC_ADJECTIVES = ("new", "best", "essential", "top", "weekly", "complete", "practical", "modern",
                      "ultimate", "everyday", "popular", "trusted")
GENERIC_NOUNS = ("guide", "review", "report", "update", "notes", "tips", "handbook", "basics", "ideas",
                 "digest", "overview", "insights", "primer", "roundup")
# {0}..{3}: topic words; {a}: generic adjective; {n}: generic noun; {m}: style modifier; {p}: style
# phrase (1-4 words). 7-12 words each; 7 templates carry one style marker, 1 carries two.
_TEMPLATES = (("the {m} {n} for {0}, {1} and {2}", 3), ("{a} {n}: {0} and {1} with {2} {p}", 3),
              ("{m} {0} and {1} {n} with {a} {2}", 3), ("{0} {n}: {a} {1}, {2} and {3} {p}", 4),
              ("why {0} and {1} matter: {m} {n} on {2}", 3), ("{a} {n} on {0}, {1} and {2} {p}", 3),
              ("{0}, {1} and {2} {p}: the {a} {n}", 3), ("{a} {m} {n} for {0}, {1} and {2} {p}", 3))

_BASE_TIME = 1_700_000_000  # seconds; user timelines start within 180 days after it
_ZIPF_EXPONENT = 0.8
_SECONDARY_P = 0.40
_BACKGROUND = 0.10
_STYLE_FLOOR = 1e-6  # an off-style item stays possible when style_strength = 1 exhausts the main style


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and shape of the synthetic dataset. ``silo_skew`` is the Dirichlet concentration of
    each silo's cluster preferences: smaller = more non-IID. ``style_strength`` is the weight of a
    user's main style (the other styles share the rest evenly): 1/6 = no style preference."""

    num_users: int = 600
    num_items: int = 800
    num_silos: int = 3
    min_events: int = 8
    max_events: int = 30
    silo_skew: float = 0.3
    style_strength: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"expected {expected}", field=name, value=getattr(self, name))

        for name in ("num_users", "num_items", "num_silos", "min_events", "max_events", "seed"):
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and not isinstance(value, bool), name, "an integer")
        need(self.num_users >= 1, "num_users", "an integer >= 1")
        need(1 <= self.num_silos <= self.num_users, "num_silos", "an integer in [1, num_users]")
        need(self.min_events >= 1, "min_events", "an integer >= 1")
        need(self.max_events >= self.min_events, "max_events", "an integer >= min_events")
        need(self.num_items >= max(len(TOPICS), self.max_events), "num_items",
             f"an integer >= max({len(TOPICS)} topics, max_events)")
        need(isinstance(self.silo_skew, (int, float)) and math.isfinite(self.silo_skew) and self.silo_skew > 0,
             "silo_skew", "a finite number > 0")
        need(isinstance(self.style_strength, (int, float, np.integer, np.floating))
             and not isinstance(self.style_strength, bool) and 0.0 <= self.style_strength <= 1.0,
             "style_strength", "a number in [0, 1]")
        need(self.seed >= 0, "seed", "an integer >= 0")


@dataclass(frozen=True)
class SyntheticData:
    """``items`` and ``events`` in the schema of :mod:`uirl.data.schema`; events carry ``silo``
    ("0".."num_silos-1") and are ordered by timestamp (ties: by user)."""

    items: pd.DataFrame
    events: pd.DataFrame


def _ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _pick(weights: np.ndarray, u: float) -> int:
    """Index drawn with probability proportional to ``weights`` (not all zero), from u ~ U[0, 1)."""
    cum = np.cumsum(weights)
    i = int(np.searchsorted(cum, u * cum[-1], side="right"))
    # u * total can round up to total: fall back to the last index with weight, never a zero one.
    return i if i < len(weights) else int(np.flatnonzero(weights)[-1])


def _make_items(spec: SyntheticSpec, rng: np.random.Generator
                ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Items table, primary topic index, style index and popularity weight per item."""
    n, num_topics, num_styles = spec.num_items, len(TOPIC_NAMES), len(STYLE_NAMES)
    primary = rng.permutation(np.arange(n) % num_topics)  # balanced: every topic has items
    # Styles cycle through each topic's items in turn: balanced overall and within every topic.
    style = np.empty(n, dtype=np.int64)
    style[np.argsort(primary, kind="stable")] = rng.permutation(num_styles)[np.arange(n) % num_styles]
    popularity = 1.0 / (rng.permutation(n) + 1.0) ** _ZIPF_EXPONENT
    texts = []
    for t, st in zip(primary, style):
        template, k = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        words = list(rng.choice(TOPICS[TOPIC_NAMES[t]], size=k, replace=False))
        if rng.random() < _SECONDARY_P:
            other = (t + 1 + rng.integers(num_topics - 1)) % num_topics
            words[-1] = str(rng.choice(TOPICS[TOPIC_NAMES[other]]))
        markers = STYLES[STYLE_NAMES[st]]
        title = template.format(*words, a=rng.choice(GENERIC_ADJECTIVES), n=rng.choice(GENERIC_NOUNS),
                                m=markers[rng.integers(_STYLE_MODIFIERS)],
                                p=markers[_STYLE_MODIFIERS + rng.integers(len(markers) - _STYLE_MODIFIERS)])
        texts.append(title[0].upper() + title[1:])
    items = pd.DataFrame({"item_id": pd.Series(_ids("i", n), dtype="string"),
                          "text": pd.Series(texts, dtype="string"),
                          "category": pd.Series([TOPIC_NAMES[t] for t in primary], dtype="string")})
    return items, primary, style, popularity


def _style_weights(strength: float, rng: np.random.Generator) -> np.ndarray:
    """One user's weights over styles: ``strength`` on a uniformly drawn main style, the rest even."""
    num_styles = len(STYLE_NAMES)
    weights = np.full(num_styles, (1.0 - strength) / (num_styles - 1))
    weights[rng.integers(num_styles)] = strength
    return weights


def _user_mixtures(cluster_pref: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) topic mixtures of one user, each (num_topics,) summing to 1."""
    num_clusters = len(CLUSTERS)
    first = _pick(cluster_pref, rng.random())
    cluster_w = np.zeros(num_clusters)
    cluster_w[first] = 1.0
    if rng.random() < 0.5:
        rest = cluster_pref.copy()
        rest[first] = 0.0
        rest = rest if rest.sum() > 1e-9 else np.ones(num_clusters) - cluster_w
        cluster_w[first], cluster_w[_pick(rest, rng.random())] = 0.7, 0.3
    mixtures = []
    for _ in range(2):  # end re-draws only the within-cluster weights: a slow drift, same clusters
        mix = np.full(len(TOPIC_NAMES), _BACKGROUND / len(TOPIC_NAMES))
        for c, topics in enumerate(CLUSTERS):
            if cluster_w[c] > 0:
                within = rng.dirichlet(np.full(len(topics), 1.5))
                for name, w in zip(topics, within):
                    mix[TOPIC_NAMES.index(name)] += (1 - _BACKGROUND) * cluster_w[c] * w
        mixtures.append(mix)
    return mixtures[0], mixtures[1]


def _behavior(a: float, u: float) -> str:
    """Behaviour for affinity ``a`` in [0, 1] from u ~ U[0, 1): likes/purchases grow with a, views shrink."""
    probs = (("view", 0.30 * (1 - a)), ("like", 0.08 + 0.30 * a), ("purchase", 0.02 + 0.15 * a),
             ("rate", 0.08), ("share", 0.01 + 0.04 * a), ("review", 0.02), ("search", 0.03))
    for name, p in probs:
        if u < p:
            return name
        u -= p
    return "click"  # the remainder (0.27 at a = 1, 0.46 at a = 0)


def generate(spec: SyntheticSpec = SyntheticSpec()) -> SyntheticData:
    """Build the dataset described in the module docstring; identical for identical specs."""
    items_seq, users_seq = np.random.SeedSequence(spec.seed).spawn(2)
    items, primary, style, popularity = _make_items(spec, np.random.default_rng(items_seq))
    rng = np.random.default_rng(users_seq)
    by_topic = [np.flatnonzero(primary == t) for t in range(len(TOPIC_NAMES))]
    silo_pref = rng.dirichlet(np.full(len(CLUSTERS), float(spec.silo_skew)), size=spec.num_silos)
    # Tiny concentrations can underflow to all-zero rows; such a silo then prefers one cluster.
    silo_pref = np.where(np.isfinite(silo_pref), silo_pref, 0.0) + 1e-12
    silo_of = rng.permutation(np.arange(spec.num_users) % spec.num_silos)
    item_ids, user_ids = items["item_id"].tolist(), _ids("u", spec.num_users)
    seen = np.zeros(spec.num_items, dtype=bool)
    cols: dict[str, list] = {k: [] for k in ("user_id", "item_id", "timestamp", "behavior", "value",
                                             "user_text", "silo")}
    for u, user in enumerate(user_ids):
        start, end = _user_mixtures(silo_pref[silo_of[u]], rng)
        style_w = _style_weights(float(spec.style_strength), rng)
        style_aff = style_w / style_w.max()
        item_w = popularity * np.maximum(style_w[style], _STYLE_FLOOR)
        n = int(rng.integers(spec.min_events, spec.max_events + 1))
        times = _BASE_TIME + int(rng.integers(0, 180 * 86400)) + np.cumsum(
            60 + rng.exponential(1.5 * 86400, size=n).astype(np.int64))
        draws = rng.random((n, 5))
        chosen = []
        for j in range(n):
            lam = j / (n - 1) if n > 1 else 0.0
            mix = (1 - lam) * start + lam * end
            topic_w = mix.copy()
            while True:  # a topic the user has exhausted is skipped; num_items >= max_events
                t = _pick(topic_w, draws[j, 0])
                pool = by_topic[t]
                w = item_w[pool] * ~seen[pool]
                if w.sum() > 0:
                    break
                topic_w[t] = 0.0
            item = int(pool[_pick(w, draws[j, 1])])
            seen[item] = True
            chosen.append(item)
            affinity = float(mix[t] / mix.max() * (0.5 + 0.5 * style_aff[style[item]]))
            behavior = _behavior(affinity, draws[j, 2])
            value = float(np.clip(round(2 + 3 * affinity + 1.4 * (draws[j, 3] - 0.5)), 1, 5)) \
                if behavior == "rate" else math.nan
            words = TOPICS[TOPIC_NAMES[t]]
            text = None
            if behavior == "search":
                text = f"{words[int(draws[j, 4] * len(words))]} {GENERIC_NOUNS[j % len(GENERIC_NOUNS)]}"
            elif behavior == "review":
                text = "great read, more like this" if affinity >= 0.5 else "not really for me"
            for key, val in (("user_id", user), ("item_id", item_ids[item]), ("timestamp", int(times[j])),
                             ("behavior", behavior), ("value", value), ("user_text", text),
                             ("silo", str(silo_of[u]))):
                cols[key].append(val)
        seen[chosen] = False
    events = pd.DataFrame({
        "user_id": pd.Series(cols["user_id"], dtype="string"),
        "item_id": pd.Series(cols["item_id"], dtype="string"),
        "timestamp": pd.Series(cols["timestamp"], dtype=np.int64),
        "behavior": pd.Series(cols["behavior"], dtype="string"),
        "value": pd.Series(cols["value"], dtype=np.float64),
        "user_text": pd.Series(cols["user_text"], dtype="string"),
        "silo": pd.Series(cols["silo"], dtype="string"),
    })
    # A log ordered by time; the stable sort keeps each user's events in generation order.
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return SyntheticData(items=items, events=events)
