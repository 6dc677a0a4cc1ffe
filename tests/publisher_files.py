"""Writers of small datasets in their publishers' exact file formats (for the data tests).

Hand-made rows copy the real files (separators, encodings, quoting, headers, field order); the
bulk rows come from the synthetic generator so that a tiny encoder finds some signal in them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from uirl.data import SyntheticSpec, generate

ML100K_ITEM_ROWS = [
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?GoldenEye%20(1995)|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "3|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Mis%E9rables,%20Les%20(1995)|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0",
    "4|Get Shorty (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Get%20Shorty%20(1995)|0|1|0|0|0|1|0|0|1|0|0|0|0|0|0|0|0|0|0",
    "5|Copycat (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Copycat%20(1995)|0|0|0|0|0|0|1|0|1|0|0|0|0|0|0|0|1|0|0",
    "6|Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)|01-Jan-1995||http://us.imdb.com/Title?Yao+a+yao+yao+dao+waipo+qiao+(1995)|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
    "7|Twelve Monkeys (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Twelve%20Monkeys%20(1995)|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|1|0|0|0",
    "8|Babe (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Babe%20(1995)|0|0|0|0|1|1|0|0|1|0|0|0|0|0|0|0|0|0|0",
    "9|Dead Man Walking (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Dead%20Man%20Walking%20(1995)|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
    "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
]
# (user, item, rating, timestamp): user 196 has 5 positives (>= 4), user 186 only 2.
ML100K_RATINGS = [(196, 1, 5, 881250949), (196, 2, 4, 881250950), (196, 3, 5, 881250951), (196, 4, 3, 881250952),
                  (196, 5, 4, 881250953), (196, 6, 5, 881250954), (186, 1, 4, 891717742), (186, 3, 5, 891717743),
                  (186, 2, 1, 891717744)]
ML100K_USERS = ["196|49|M|writer|55105", "186|39|F|executive|00000"]


def write_ml100k(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.item").write_bytes(("\n".join(ML100K_ITEM_ROWS) + "\n").encode("latin-1"))
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML100K_RATINGS), encoding="ascii")
    (root / "u.user").write_bytes(("\n".join(ML100K_USERS) + "\n").encode("latin-1"))
    return root


def write_ml1m(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    movies = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure|Children's|Fantasy",
              "3::Misérables, Les (1995)::Drama|Musical", "4::Waiting to Exhale (1995)::Comedy|Drama",
              "5::Father of the Bride Part II (1995)::Comedy", "6::Heat (1995)::Action|Crime|Thriller",
              "7::Sabrina (1995)::Comedy|Romance", "8::Tom and Huck (1995)::Adventure|Children's",
              "9::Sudden Death (1995)::Action"]
    (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    ratings = [(1, m, r, 978300760 + m) for m, r in ((1, 5), (2, 4), (3, 5), (4, 4), (5, 2), (6, 5))]
    (root / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings), encoding="ascii")
    (root / "users.dat").write_text("1::F::1::10::48067\n", encoding="ascii")
    return root


def write_ml_latest(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n73,"Misérables, Les (1995)",Drama|War\n'
        "110,Braveheart (1995),Action|Drama|War\n260,Star Wars: Episode IV - A New Hope (1977),Action|Adventure|Sci-Fi\n"
        "193609,Andrew Dice Clay: Dice Rules (1991),(no genres listed)\n2,Jumanji (1995),Adventure|Children|Fantasy\n"
        "3,Grumpier Old Men (1995),Comedy|Romance\n4,Waiting to Exhale (1995),Comedy|Drama|Romance\n", encoding="utf-8")
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,4.5,964982704\n1,73,5.0,964982705\n"
        "1,110,0.5,964982706\n1,260,4.0,964982707\n1,193609,5.0,964982708\n2,1,3.5,1445714994\n", encoding="utf-8")
    (root / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,73,musical,1445714994\n"
                                   '1,73,"based on a book, sort of",1445714995\n2,1,pixar,1445714996\n',
                                   encoding="utf-8")
    return root


def _gz_lines(path: Path, records: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_amazon2018(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    asins = ["0000092878", "B0000530HU", "B00006L9LC", "B00008MOQA", "B0000CNS2A"]
    reviews = [{"overall": 5.0, "verified": True, "reviewTime": "09 1, 2016", "reviewerID": "A3CIUOJXQ5VDQ2",
                "asin": a, "style": {"Size:": " 7.0 oz"}, "reviewerName": "Shelly F",
                "reviewText": f"As advertised. Reasonably priced {k}", "summary": "Five Stars",
                "unixReviewTime": 1472688000 + k} for k, a in enumerate(asins)]
    reviews.append({"overall": 2.0, "reviewerID": "A1V6B6TNIC10QE", "asin": asins[0], "reviewText": "meh",
                    "summary": "Two Stars", "unixReviewTime": 1472688100})
    others = ["B00012C5OI", "B0001ZFBMA", "B0002IQHBU"]
    reviews += [{"overall": 4.0, "reviewerID": "A1V6B6TNIC10QE", "asin": a, "reviewText": "fine",
                 "summary": "Four Stars", "unixReviewTime": 1472688200 + k} for k, a in enumerate(others)]
    asins += others
    _gz_lines(root / "Books_5.json.gz", reviews)
    meta = [{"category": ["Books", "Children's Books"], "tech1": "", "description": [f"A story number {k}."],
             "fit": "", "title": f"Slime Time Fall Fest {k}", "also_buy": [], "brand": "", "feature": [], "rank": [],
             "main_cat": "Books", "similar_item": "", "date": "", "price": "", "asin": a, "imageURL": []}
            for k, a in enumerate(asins)]
    _gz_lines(root / "meta_Books.json.gz", meta)
    return root


def write_amazon2023(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    parents = ["B01CUPMQZE", "B076WQZGPM", "B000B658RI", "B088SZDGXG", "B07NGFDN6G", "B08BBQ29N5", "B00R8DXL44"]
    reviews = [{"rating": 5.0, "title": "Such a lovely scent but not overpowering.",
                "text": f"This spray is really nice {k}", "images": [], "asin": p, "parent_asin": p,
                "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ", "timestamp": 1588687728923 + 1000 * k,
                "helpful_vote": 0, "verified_purchase": True} for k, p in enumerate(parents[:5])]
    reviews += [{"rating": 3.0, "title": "ok", "text": "", "images": [], "asin": p, "parent_asin": p,
                 "user_id": "AFQLNQNQYFWQZPJQZS6V3NZU4QBQ", "timestamp": 1600000000000 + k, "helpful_vote": 1,
                 "verified_purchase": False} for k, p in enumerate(parents[3:])]
    _gz_lines(root / "All_Beauty.jsonl.gz", reviews)
    meta = [{"main_category": "All Beauty", "title": f"Howard LC0008 Leather Conditioner, 8-Ounce ({k}-Pack)",
             "average_rating": 4.8, "rating_number": 10, "features": [], "description": [], "price": None,
             "images": [], "videos": [], "store": "Howard Products", "categories": [], "details": {},
             "parent_asin": p, "bought_together": None} for k, p in enumerate(parents)]
    _gz_lines(root / "meta_All_Beauty.jsonl.gz", meta)
    return root


MIND_NEWS = [
    ("N55528", "lifestyle", "lifestyleroyals", "The Brands Queen Elizabeth, Prince Charles, and Prince Philip Swear By",
     "Shop the notebooks, jackets, and more that the royals can't live without."),
    ("N19639", "health", "weightloss", "50 Worst Habits For Belly Fat", "These seemingly harmless habits are holding you back."),
    ("N61837", "news", "newsworld", "The Cost of Trump's Aid Freeze in the Trenches of Ukraine's War", ""),
    ("N53526", "health", "voices", "I Was An NBA Wife. Here's How It Affected My Mental Health.", "I felt like I was a fraud."),
    ("N38324", "health", "medical", "How to Get Rid of Skin Tags, According to a Dermatologist", "They seem harmless."),
    ("N2073", "sports", "football_nfl", "Should NFL be able to fine players for criticizing officiating?", "Several fines came down."),
    ("N49186", "weather", "weathertopstories", "It's been Orlando's hottest October ever so far", "There won't be a cool down."),
    ("N59295", "news", "newsus", "Chili's apologizes for ad", "The restaurant chain apologized."),
]
MIND_BEHAVIORS = [
    "1\tU13740\t11/11/2019 9:05:58 AM\tN55528 N19639 N61837\tN53526-1 N38324-0 N2073-0",
    "2\tU91836\t11/12/2019 6:11:30 PM\tN2073\tN49186-0 N59295-1",
    "3\tU13740\t11/13/2019 10:05:58 PM\tN55528 N19639 N61837\tN2073-1 N49186-0 N59295-0 N38324-1",
]


def write_mind(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "news.tsv").write_text("".join(f"{n}\t{c}\t{s}\t{t}\t{a}\thttps://assets.msn.com/labs/mind/AAGH0ET.html"
                                           f"\t[]\t[]\n" for n, c, s, t, a in MIND_NEWS), encoding="utf-8")
    (root / "behaviors.tsv").write_text("\n".join(MIND_BEHAVIORS) + "\n", encoding="utf-8")
    return root


def write_ml100k_synthetic(root: Path, *, num_users: int = 60, num_items: int = 300, seed: int = 0) -> Path:
    """The synthetic generator's data in ml-100k's format: positive behaviours as ratings 4-5,
    views as 1-2; each user's generated silo becomes their occupation (for natural silos)."""
    data = generate(SyntheticSpec(num_users=num_users, num_items=num_items, num_silos=2, seed=seed))
    root.mkdir(parents=True, exist_ok=True)
    index = {item: k + 1 for k, item in enumerate(data.items["item_id"])}
    flags = "|".join(["0"] * 19)
    (root / "u.item").write_bytes("".join(f"{index[i]}|{t}|01-Jan-1995||http://us.imdb.com/x|{flags}\n"
                                          for i, t in zip(data.items["item_id"], data.items["text"])).encode("latin-1"))
    users = {u: k + 1 for k, u in enumerate(sorted(set(data.events["user_id"])))}
    lines = []
    for u, i, t, b in zip(data.events["user_id"], data.events["item_id"], data.events["timestamp"],
                          data.events["behavior"]):
        rating = 2 if b == "view" else (5 if b in ("like", "purchase") else 4)
        lines.append(f"{users[u]}\t{index[i]}\t{rating}\t{t}\n")
    (root / "u.data").write_text("".join(lines), encoding="ascii")
    silo = dict(zip(data.events["user_id"], data.events["silo"]))
    (root / "u.user").write_text("".join(f"{k}|30|M|{'writer' if silo[u] == '0' else 'engineer'}|5510{k % 10}\n"
                                         for u, k in users.items()), encoding="latin-1")
    return root
