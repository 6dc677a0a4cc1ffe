"""The interest model's parts: shapes and masks, each loss term, missing views, side data, config."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import tiny_config
from test_privacy import ALL_PARTS, ITEMS, _full_examples
from uirl.config import from_run_config
from uirl.data import UserData, validate_items
from uirl.data.views import BEHAVIOR_LABELS, attach_views, behavior_label
from uirl.errors import ConfigError, DataError
from uirl.model import Example, TextBank
from uirl.model.batching import eval_example, user_example
from uirl.model.build import build_model
from uirl.model.parts import FacetPooling, LevelHeads, TaskHeads, VaeHead, ViewFusion, masked_softmax

D = 8


def _history(b=3, h=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, h, D, generator=gen), dim=-1)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True] + [False] * 4])
    return x, mask


def test_levels_take_the_last_event_and_the_recent_window():
    x, mask = _history()
    heads = LevelHeads(D, ("event", "short", "long"), window=2)
    out = heads(x, mask)
    assert set(out) == {"event", "short"} and out["short"].shape == (3, D)
    torch.testing.assert_close(out["event"], torch.stack([x[0, 4], x[1, 1], x[2, 0]]))
    # Zero-initialised attention: the short level is the mean of the last `window` valid events.
    torch.testing.assert_close(out["short"], torch.stack([x[0, 3:5].mean(0), x[1, 0:2].mean(0), x[2, 0]]))
    assert float(heads.long_context(out).detach().abs().sum()) == 0.0  # starts as the plain model


def test_facets_ignore_padding_and_score_by_max_or_attention():
    x, mask = _history()
    pool = FacetPooling(D, 4, "max")
    facets, weights = pool(x, mask)
    assert facets.shape == (3, 4, D) and weights.shape == (3, 4, 5)
    assert float(weights.detach()[~mask.unsqueeze(1).expand_as(weights)].abs().sum()) == 0.0
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(facets[2], x[2, 0].expand(4, D))  # one event: every facet is that event
    items = torch.randn(3, 6, D)
    best = pool.score(facets, items, 0.1)
    cos = torch.einsum("bkd,bcd->bkc", facets, torch.nn.functional.normalize(items, dim=-1)) / 0.1
    torch.testing.assert_close(best, cos.max(1).values)
    pool.how = "attention"
    soft = pool.score(facets, items, 0.1)
    assert (soft <= best + 1e-6).all() and soft.shape == (3, 6)


def test_view_fusion_masks_missing_views_and_penalises_w():
    gen = torch.Generator().manual_seed(0)
    views = {v: torch.nn.functional.normalize(torch.randn(2, D, generator=gen), dim=-1) for v in ("behavior", "text")}
    present = {"behavior": torch.tensor([True, True]), "text": torch.tensor([True, False])}
    fusion = ViewFusion(D, ("behavior", "text"))
    with torch.no_grad():
        fused, align, frob = fusion(views, present, with_frob=True)
    # Equal gate weights at the start; a missing view gets none and no alignment term.
    torch.testing.assert_close(fused[0], torch.nn.functional.normalize(views["behavior"][0] + views["text"][0], dim=0))
    torch.testing.assert_close(fused[1], views["behavior"][1])
    assert float(align[1]) == pytest.approx(0.0, abs=1e-10) and float(align[0]) > 0
    torch.testing.assert_close(frob, torch.full((2,), 2.0 * D))  # two identity matrices
    assert masked_softmax(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), -1).abs().sum() == 0


def test_task_heads_ignore_unknown_labels():
    heads = TaskHeads(D, len(BEHAVIOR_LABELS))
    user, events = torch.randn(2, D), torch.randn(2, 3, D)
    labels = torch.tensor([[0, -1, 2], [-1, -1, -1]])
    loss = heads(user, events, labels)
    assert loss.shape == (2,) and float(loss[0]) > 0 and float(loss[1]) == 0.0
    changed = heads(user, events, torch.tensor([[0, 5, 2], [-1, -1, -1]]))
    assert float(changed[0]) != float(loss[0])


def test_vae_samples_per_user_seed_and_uses_the_mean_at_inference():
    vae = VaeHead(D)
    u = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    mean, kl = vae(u, None)
    torch.testing.assert_close(mean, u)  # zero-initialised residual mean
    assert (kl > 0).all()
    z1, _ = vae(u, torch.tensor([1, 2, 3]))
    z2, _ = vae(u[[2, 0]], torch.tensor([3, 1]))  # a user's sample ignores who else is in the batch
    torch.testing.assert_close(z1[[2, 0]], z2)
    assert 0.02 < float((z1 - u).norm(dim=-1).mean()) < 0.5  # noise about 0.1 of a unit vector


@pytest.fixture(scope="module")
def full_model(tiny_bert):
    cfg = tiny_config(tiny_bert, **ALL_PARTS, **{"train-mode": "lora"})
    model, encoder = build_model(cfg)
    gen = torch.Generator().manual_seed(3)
    images = {i: torch.randn(5, generator=gen).tolist() for i in list(ITEMS)[:8] if i != "i4"}
    categories = {i: ("sports" if k % 2 else "food") for k, i in enumerate(ITEMS)}
    bank = TextBank(ITEMS, encoder.tokenizer, cfg.model.max_tokens, category=categories, image=images)
    return model, bank


def test_every_loss_term_is_finite_non_negative_and_moves_its_part(full_model):
    model, bank = full_model
    model.train()
    batch = bank.make_batch(_full_examples())
    losses = model(batch)
    owners = {"levels": "levels.", "view-align": "fusion.align.", "vae-kl": "vae.", "facet-heads": "facet_heads.",
              "tasks": "tasks.", "rank": "encoder."}
    for name, value in losses.items():
        assert value.shape == (4,) and torch.isfinite(value).all() and (value >= 0).all(), name
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, prefix in owners.items():
        grads = torch.autograd.grad(losses[name].sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for (n, _), g in zip(named, grads)
                   if n.startswith(prefix)), name
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    losses["loss"].sum().backward()
    with_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert [not torch.equal(a, p.detach()) for a, p in zip(before, params)] == with_grad
    assert sum(with_grad) > 0.8 * len(params)  # only zero-initialised chains wait a step


def test_a_user_without_a_view_is_scored_as_if_the_view_were_off(tiny_bert):
    on = tiny_config(tiny_bert, views="behavior,text,social")
    model_on, encoder = build_model(on)
    model_off, _ = build_model(tiny_config(tiny_bert))
    model_off.load_adapter_state({k: v for k, v in model_on.adapter_state().items() if not k.startswith("fusion.")})
    bank = TextBank(ITEMS, encoder.tokenizer, on.model.max_tokens)
    plain = Example(("i0", "i1"), ("i5", "i2", "i3"))
    with_text = Example(("i4",), ("i8", "i0", "i11"), texts=("jazz",))
    model_on.eval()
    model_off.eval()
    with torch.no_grad():
        batch = bank.make_batch([plain, with_text])
        events = model_on.encode_texts(batch.input_ids, batch.attention_mask)
        rep_on, rep_off = model_on.represent(batch, events), model_off.represent(batch, events)
    assert rep_on.present["text"].tolist() == [False, True] and rep_on.present["social"].tolist() == [False, False]
    torch.testing.assert_close(rep_on.interest[0], rep_off.interest[0])
    assert not torch.allclose(rep_on.interest[1], rep_off.interest[1])


def test_default_model_has_no_parts_and_only_the_ranking_loss(tiny_bert):
    model, encoder = build_model(tiny_config(tiny_bert))
    assert all(getattr(model, part) is None for part in ("levels", "fusion", "vae", "facets", "facet_heads", "tasks"))
    bank = TextBank(ITEMS, encoder.tokenizer, 16)
    assert set(model(bank.make_batch(_full_examples()))) == {"rank", "loss"}


def _events():
    rows = [("u1", "a", 1, "click", None, None), ("u1", "b", 2, "review", None, "loved it"),
            ("u1", "c", 3, "search", None, "cheap flights"), ("u1", "d", 4, "rate", 5.0, None),
            ("u1", "e", 5, "like", None, None), ("u1", "f", 6, "purchase", None, None),
            ("u2", "a", 1, "like", None, None), ("u2", "b", 2, "click", None, None),
            ("u2", "g", 3, "click", None, None), ("u2", "h", 4, "click", None, None)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "behavior", "value", "user_text"])


def test_side_data_labels_texts_and_neighbours_without_looking_ahead():
    events = _events()
    u1 = UserData("u1", ("a", "b", "c", "d"), "e", "f", ("e", "x"), ("f", "x"))
    u2 = UserData("u2", ("a", "b"), "g", "h", ("g", "x"), ("h", "x"))
    social = pd.DataFrame({"user_id": ["u1"], "other_user_id": ["u2"]})
    v1, v2 = attach_views([u1, u2], events, social=social)
    assert v1.behaviors == ("click", "review", "search", "rate-5") and behavior_label("rate", 2.4) == "rate-2"
    assert v1.texts == ("loved it", "cheap flights") and v1.text_pos == (2, 3)
    assert v1.social_items == ("a", "b") and v2.social_items == ()
    parts = from_run_config({"views": "behavior,text,social", "task-heads": True}).interest
    # Predicting item b (position 1): the review of b is not visible yet; predicting c: it is.
    assert user_example(v1, 1, ("b", "x"), max_history=5, parts=parts).texts == ()
    ex = user_example(v1, 3, ("d", "x"), max_history=5, parts=parts)
    assert ex.history == ("a", "b", "c") and ex.texts == ("loved it", "cheap flights")
    assert [BEHAVIOR_LABELS[k] for k in ex.behaviors] == ["click", "review", "search"]
    test = eval_example(v1, "test", max_history=3, parts=parts)
    assert test.history == ("c", "d", "e") and test.candidates == ("f", "x") and test.social == ("a", "b")
    assert test.behaviors[-1] == -1  # the validation target has no training label
    assert eval_example(v1, "full", max_history=2, parts=parts).history == ("e", "f")
    assert user_example(v1, 1, ("b", "x"), max_history=5, parts=from_run_config({}).interest) == \
        Example(("a",), ("b", "x"))  # parts off: no side data travels


def test_items_image_column_is_validated():
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"], "image": [[0.1, 0.2], None, [1, 2]]})
    assert validate_items(items)["image"].tolist() == [(0.1, 0.2), None, (1.0, 2.0)]
    items.loc[2, "image"] = [1.0]
    with pytest.raises(DataError, match="row 2, field 'image'.*expected 2 numbers"):
        validate_items(items)
    items.at[2, "image"] = [float("nan"), 1.0]
    with pytest.raises(DataError, match="finite"):
        validate_items(items)


@pytest.mark.parametrize("overrides, field", [({"levels": "short"}, "levels"), ({"levels": "event,weekly,long"}, "levels"),
                                              ({"facet-heads": True}, "facet-heads"), ({"views": "text"}, "views"),
                                              ({"views": "behavior,image"}, "image-dim"), ({"facets": -1}, "facets"),
                                              ({"facet-score": "mean"}, "facet-score"), ({"vae-beta": -1.0}, "vae-beta")])
def test_bad_part_settings_name_the_key(overrides, field):
    with pytest.raises(ConfigError) as err:
        from_run_config(overrides)
    assert err.value.field == field


def test_encoder_dropout_off_makes_training_passes_deterministic(tiny_bert, tmp_path):
    """``encoder-dropout = false`` builds the base encoder with every dropout probability at 0: two
    forward passes in training mode agree, where with dropout on (p = 0.3 here) they do not."""
    import json
    import shutil

    from uirl.model.encoder import load_encoder

    model_dir = tmp_path / "tiny-with-dropout"
    shutil.copytree(tiny_bert, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    (model_dir / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    mask = torch.ones_like(ids)
    for dropout, differ in ((True, True), (False, False)):
        cfg = tiny_config(str(model_dir), **{"train-mode": "lora", "encoder-dropout": dropout})
        model = load_encoder(cfg.model).model.train()
        first, second = (model(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2))
        assert (not torch.equal(first, second)) == differ, dropout
