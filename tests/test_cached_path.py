"""The cached-vector training path and the private popularity prior: exactness, accounting, speed-free.

Cached mode keeps the encoder (LoRA included) frozen, so a row's vector is a constant of the step;
per-user gradients of the heads above it must still equal a per-user loop, and the update must
carry only the heads. The popularity release is one Gaussian mechanism, and its epsilon must be
what an independent computation of that mechanism gives.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis

from helpers import tiny_config
from test_privacy import ALL_PARTS, EXAMPLES, ITEMS, _full_examples, check_several_examples
import uirl.train
from uirl.config import AUTO_CACHED_EXAMPLES, SiloConfig
from uirl.engine import popularity_prior, run_federated
from uirl.federated import _worker, local_release, local_train
from uirl.train import sampling_plan
from uirl.model import TextBank
from uirl.model.build import build_model
from uirl.model.vector_cache import cache_dir, load_catalogue_vectors
from uirl.privacy import PerUserGradients, PrivacyError, PrivacyLedger
from uirl.privacy.accountant import RDP_ORDERS
from uirl.privacy.popularity import (composed_epsilon, plan_sgd_noise_after_release, prior_from_counts,
                                     release_noise, user_normalised_counts)
from uirl.train import encode_texts, row_vectors

CACHED = {"train-mode": "cached", "user-proj-rank": 4, "item-proj-rank": 3, "popularity-prior": True}


def _cached_model(model_path, **overrides):
    cfg = tiny_config(model_path, **{**CACHED, **overrides})
    model, encoder = build_model(cfg)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    bank = TextBank(ITEMS, encoder.tokenizer, cfg.model.max_tokens)
    bank.vectors = {}
    bank.set_prior(list(ITEMS), np.linspace(0.0, 2.0, len(ITEMS)))
    return cfg, model, bank


def test_cached_mode_trains_only_the_heads(tiny_bert):
    cfg, model, _ = _cached_model(tiny_bert)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not any(n.startswith("encoder.") for n in names)
    assert {"user_proj.down.weight", "user_proj.up.weight", "item_proj.down.weight", "prior_weight.weight"} <= set(names)
    full, _ = build_model(tiny_config(tiny_bert))
    travelling = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert travelling < sum(p.numel() for p in full.parameters() if p.requires_grad)


@pytest.mark.parametrize("parts", [{}, ALL_PARTS], ids=["plain", "every-part"])
def test_cached_per_user_gradients_equal_a_per_user_loop(tiny_model, parts):
    cfg, model, bank = _cached_model(tiny_model, **parts)
    if parts:
        gen = torch.Generator().manual_seed(3)
        images = {i: torch.randn(5, generator=gen).tolist() for i in list(ITEMS)[:8] if i != "i4"}
        categories = {i: ("sports" if k % 2 else "food") for k, i in enumerate(ITEMS)}
        bank = TextBank(ITEMS, bank._tokenizer, cfg.model.max_tokens, category=categories, image=images)
        bank.vectors = {}
        bank.set_prior(list(ITEMS), np.linspace(0.0, 2.0, len(ITEMS)))
        examples = _full_examples()
    else:
        examples = list(EXAMPLES)
    model.train()
    expected = []
    for ex in examples:  # the reference: each user alone, plain autograd
        model.zero_grad(set_to_none=True)
        one = bank.make_batch([ex], tokens=False)
        model.batch_loss(one, row_vectors(model, bank, one.row_keys).double()).sum().backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    batch = bank.make_batch(examples, tokens=False)
    assert batch.input_ids.numel() == 0 and batch.candidate_prior.shape == (len(examples), 3)
    pug = PerUserGradients(model)
    try:
        pug.backward(pug.loss(batch, row_vectors(model, bank, batch.row_keys).double()), batch)
        checked = 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad_sample.shape == (len(examples), *p.shape), name
            for b in range(len(examples)):
                torch.testing.assert_close(p.grad_sample[b], expected[b][name], rtol=1e-7, atol=1e-10, msg=name)
            checked += 1
        assert checked >= 6
    finally:
        pug.close()


def test_cached_per_user_gradients_of_several_examples_equal_a_per_user_loop(tiny_model):
    cfg, model, bank = _cached_model(tiny_model)
    check_several_examples(model, bank, lambda batch: row_vectors(model, bank, batch.row_keys).double())


def test_cached_vectors_equal_fresh_encoding_and_come_back_from_disk(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("UIRL_CACHE", str(tmp_path))
    cfg, model, bank = _cached_model(tiny_bert)
    model.float()
    calls = []

    def encode(m, b, ids):
        calls.append(len(ids))
        return encode_texts(m, b, ids)

    load_catalogue_vectors(model, bank, identity="tiny", encode=encode)
    assert calls == [len(ITEMS)] and len(list(cache_dir().glob("*.npy"))) == 1
    ids, mask = bank.tokens(list(ITEMS))
    with torch.no_grad():
        fresh = model.encode_texts(ids, mask)
    torch.testing.assert_close(torch.stack([bank.vectors[i] for i in ITEMS]), fresh, rtol=1e-5, atol=1e-6)
    again = TextBank(ITEMS, bank._tokenizer, cfg.model.max_tokens)
    load_catalogue_vectors(model, again, identity="tiny", encode=encode)
    assert calls == [len(ITEMS)]  # read from disk, not encoded again
    torch.testing.assert_close(torch.stack([again.vectors[i] for i in ITEMS]), fresh, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # another adapter is another cache entry
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    load_catalogue_vectors(model, TextBank(ITEMS, bank._tokenizer, cfg.model.max_tokens), identity="tiny",
                           encode=encode)
    assert calls == [len(ITEMS), len(ITEMS)]


def test_user_normalised_counts_bound_one_users_influence():
    index = {f"i{k}": k for k in range(6)}
    users = [["i0", "i1", "i1", "i2", "i3"], ["i0"], ["i5", "i9"]]  # i9 is not in the catalogue
    counts = user_normalised_counts(users, index)
    np.testing.assert_allclose(counts, [0.5 + 1, 0.5, 0.5, 0.5, 0, 1])
    for k in range(len(users)):  # removing any one user moves the vector by at most 1 in L2
        without = user_normalised_counts(users[:k] + users[k + 1:], index)
        assert np.linalg.norm(counts - without) <= 1 + 1e-12
    assert np.all(np.isfinite(prior_from_counts(np.array([-3.0, 0.0, 5.0])))) and prior_from_counts(np.array([-3.0]))[0] == 0


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """Independent: RDP of the Gaussian mechanism (sensitivity 1) is alpha / (2 sigma^2); convert
    with Opacus's own conversion over the same orders."""
    orders = np.array(RDP_ORDERS)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=orders / (2 * sigma ** 2), delta=delta)
    return float(eps)


def test_the_release_spends_what_the_gaussian_mechanism_costs(tiny_bert):
    ledger = PrivacyLedger(accountant="rdp", noise_multiplier=1.3, sample_rate=0.5, target_epsilon=8.0,
                           target_delta=1e-5)
    ledger.record_release(2.0)
    assert ledger.epsilon() == pytest.approx(_gaussian_epsilon(2.0, 1e-5), rel=1e-9)
    with pytest.raises(PrivacyError):
        ledger.record_release(2.0)  # once per run
    ledger.record(10)  # DP-SGD steps compose with it in the same accountant
    orders = np.array(RDP_ORDERS)
    sgd = rdp_analysis.compute_rdp(q=0.5, noise_multiplier=1.3, steps=10, orders=orders)
    independent, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=sgd + orders / (2 * 2.0 ** 2), delta=1e-5)
    assert ledger.epsilon() == pytest.approx(float(independent), rel=1e-9)
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon() == pytest.approx(ledger.epsilon(), rel=1e-12)


def test_budget_split_plans_the_release_and_the_steps_within_the_target():
    sigma_release = release_noise(target_epsilon=8.0, target_delta=1e-5, budget=0.25, accountant="rdp")
    alone = _gaussian_epsilon(sigma_release, 1e-5)
    assert alone <= 2.0 and alone > 1.9  # the smallest noise within the share (Opacus's 0.01 tolerance)
    sigma = plan_sgd_noise_after_release(release_noise_multiplier=sigma_release, target_epsilon=8.0,
                                         target_delta=1e-5, sample_rate=0.3, steps=40, accountant="rdp")
    total = composed_epsilon([(sigma_release, 1.0, 1), (sigma, 0.3, 40)], delta=1e-5, accountant="rdp")
    assert 7.98 <= total <= 8.0
    assert composed_epsilon([(sigma_release, 1.0, 1), (sigma * 0.97, 0.3, 40)], delta=1e-5, accountant="rdp") > 8.0


def test_a_silo_releases_once_and_its_ledger_ends_within_the_target(tiny_bert):
    cfg = tiny_config(tiny_bert, **CACHED, **{"num-server-rounds": 2})
    silo = SiloConfig(0, 2)
    counts, metrics, ledger_json = local_release(cfg, silo, ledger_json=None)
    ledger = PrivacyLedger.from_json(ledger_json)
    assert ledger.popularity_released and metrics["epsilon"] == pytest.approx(ledger.epsilon())
    assert metrics["epsilon"] == pytest.approx(_gaussian_epsilon(metrics["release-noise"], cfg.privacy.target_delta),
                                               rel=1e-9)
    again, refused, _ = local_release(cfg, silo, ledger_json=ledger_json)
    assert again is None and refused["status"] != 0
    # Planned so that release + every round's steps land at the target, never above.
    _, silo_data = _worker(cfg, silo)
    _, per_round = sampling_plan(len(silo_data.users), cfg)
    assert ledger.can_afford(per_round * 2) and not ledger.can_afford(per_round * 2 + 3)
    assert counts.shape == (len(silo_data.item_text),)


def test_federated_cached_run_with_prior_learns_and_stays_within_budget(tiny_bert):
    cfg = tiny_config(tiny_bert, **CACHED, **{"num-server-rounds": 3, "lr": 0.01, "target-epsilon": 50.0,
                                              "batch-users": 30})
    result = run_federated(cfg, 2)
    rows = result.rounds
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(k in rows[0] for k in ("full/recall@20", "full/ndcg@10", "auc"))
    assert rows[-1]["epsilon"] <= 50.0 and result.privacy["steps"] == result.privacy["steps"]
    changed = [k for k in result.state if not np.array_equal(result.state[k], result.initial[k])]
    assert changed and all(not k.startswith("encoder.") for k in changed)
    # The prior's weight learns. Checked on one silo's update: with Adam's first step of exactly
    # +-lr per value, two silos' averaged updates of one scalar can cancel exactly.
    silo = SiloConfig(0, 2)
    counts, release, ledger = local_release(cfg, silo, ledger_json=None)
    prior = popularity_prior([counts], [release["release-noise"]])
    arrays, _, _ = local_train(cfg, silo, result.initial, ledger_json=ledger, server_round=1, prior=prior)
    assert not np.array_equal(arrays["prior_weight.weight"], result.initial["prior_weight.weight"])
    assert popularity_prior([]) is None
    with pytest.raises(Exception):
        popularity_prior([np.zeros(3), np.zeros(4)])
    assert math.isfinite(rows[-1]["auc"])


def test_several_examples_per_user_train_at_the_same_privacy_cost(tiny_bert):
    # A user's examples make one clipped gradient: the round's steps, noise and epsilon are those
    # of one example per user, and the examples reach training (the update differs).
    out = {}
    for each in (1, 4):
        cfg = tiny_config(tiny_bert, **CACHED, **{"user-examples": each, "batch-users": 30, "lr": 0.01})
        silo = SiloConfig(0, 2)
        initial = {k: v.numpy().copy() for k, v in _worker(cfg, silo)[0].model.trainable_state().items()}
        counts, release, ledger = local_release(cfg, silo, ledger_json=None)
        prior = popularity_prior([counts], [release["release-noise"]])
        arrays, metrics, ledger = local_train(cfg, silo, initial, ledger_json=ledger, server_round=1, prior=prior)
        out[each] = arrays, metrics, PrivacyLedger.from_json(ledger)
    (one, m1, l1), (four, m4, l4) = out[1], out[4]
    assert (l1.steps, l1.noise_multiplier, l1.sample_rate) == (l4.steps, l4.noise_multiplier, l4.sample_rate)
    assert m1["epsilon"] == m4["epsilon"] and math.isfinite(m4["epsilon"])
    assert all(np.all(np.isfinite(v)) for v in four.values())
    assert any(not np.array_equal(one[k], four[k]) for k in one)


@pytest.mark.parametrize("mode, setting, expected", [("cached", 0, AUTO_CACHED_EXAMPLES), ("lora", 0, 1),
                                                     ("cached", 3, 3), ("lora", 2, 2)])
def test_automatic_examples_per_user_follow_the_training_path(tiny_bert, monkeypatch, mode, setting, expected):
    # user-examples = 0 resolves by the path; what reaches train_step is that many examples per
    # sampled user, owned by that user.
    cfg = tiny_config(tiny_bert, **{**CACHED, "train-mode": mode, "user-examples": setting, "batch-users": 30,
                                    "length-buckets": 3})
    assert cfg.examples_per_user == expected
    seen = []

    def record(model, bank, examples, optimizer, *, owners=None, buckets=1, **kwargs):
        assert buckets == 3  # length-buckets reaches the step (the lora path uses it)
        seen.append((len(examples), owners))
        return 0.0

    monkeypatch.setattr(uirl.train, "train_step", record)
    silo = SiloConfig(0, 2)
    initial = {k: v.numpy().copy() for k, v in _worker(cfg, silo)[0].model.trainable_state().items()}
    local_train(cfg, silo, initial, ledger_json=None, server_round=1, prior=None)
    assert seen and all(n > 0 for n, _ in seen)
    for n, owners in seen:
        users = n // expected
        assert n == users * expected
        assert owners == (None if expected == 1 else [k for k in range(users) for _ in range(expected)])


def test_the_noisy_prior_shrinks_noise_made_hits_towards_zero():
    rng = np.random.default_rng(0)
    true = np.concatenate([np.zeros(900), rng.uniform(5, 30, 100)])  # most items near zero, a popular head
    noisy = true + rng.normal(0, 2.0, true.shape)
    plain, shrunk = prior_from_counts(noisy), prior_from_counts(noisy, 2.0)
    target = np.log1p(true)
    assert np.mean((shrunk - target) ** 2) < 0.5 * np.mean((plain - target) ** 2)
    assert np.all(np.diff(shrunk[np.argsort(noisy)]) >= -1e-6)  # monotone in the released count
    np.testing.assert_allclose(prior_from_counts(true), target.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("facets", [0, 3])
def test_scores_are_cosines_over_temperature_without_a_normalised_copy(tiny_bert, facets):
    """``score`` / the facet score divide dot products by the item norms instead of normalising
    the items first (a catalogue-sized copy per user): the logits must be the cosines all the same."""
    cfg = tiny_config(tiny_bert, **CACHED, facets=facets)
    model, encoder = build_model(cfg)
    dim = encoder.hidden_size
    torch.manual_seed(0)
    users, items = torch.randn(2, dim), torch.randn(2, 7, dim) * 3.0
    unit_users = torch.nn.functional.normalize(users, dim=-1)
    cos = torch.einsum("bd,bcd->bc", unit_users, torch.nn.functional.normalize(items, dim=-1))
    if facets:
        stacked = torch.stack([users, -users, users * 2], dim=1)  # (B, K, d): facet 0 and 2 align with users
        got = model.facets.score(stacked, items, model.temperature)
        every = torch.einsum("bkd,bcd->bkc", torch.nn.functional.normalize(stacked, dim=-1),
                             torch.nn.functional.normalize(items, dim=-1)) / model.temperature
        want = every.max(dim=1).values if model.facets.how == "max" else (torch.softmax(every, 1) * every).sum(1)
    else:
        got, want = model.score(unit_users, items), cos / model.temperature
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
