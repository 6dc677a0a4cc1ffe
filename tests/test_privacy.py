"""The user-level DP mechanism itself: per-user gradients, sensitivity, noise, accounting."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from helpers import tiny_config
from uirl.model import TextBank
from uirl.model.build import build_model
from uirl.privacy import PerUserGradients, PrivacyError, PrivacyLedger, make_dp_optimizer, plan_noise_multiplier
from uirl.privacy.accountant import RDP_ORDERS

ITEMS = {f"i{k}": text for k, text in enumerate([
    "best marathon running shoes guide", "weekly football match report", "new pasta recipe with basil",
    "top laptop review for gamers", "jazz album of the year notes", "budget travel tips for rome",
    "stock market weekly update", "essential yoga routine for beginners", "indie film festival review",
    "garden tomato growing guide", "quantum physics explained simply", "street fashion trends report",
])}

# Users with different history lengths, so padding and per-user regrouping are both exercised.
EXAMPLES = [
    (("i0", "i1", "i7"), ("i5", "i2", "i3")),
    (("i4",), ("i8", "i0", "i11")),
    (("i2", "i9"), ("i9", "i6", "i10")),
    (("i3", "i10", "i6", "i8"), ("i1", "i4", "i2")),
]


#: The end-to-end path, where per-user gradients run through the encoder's LoRA adapters (the
#: cached path has its own exactness tests in test_cached_path.py).
LORA = {"train-mode": "lora"}


def _setup(model_path, *, double=False, **overrides):
    cfg = tiny_config(model_path, **{**LORA, **overrides})
    model, encoder = build_model(cfg)
    if double:
        model.double()  # float64: exactness can be checked far below float32 round-off
    # Move the heads off their zero init so every parameter has a non-trivial gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, TextBank(ITEMS, encoder.tokenizer, cfg.model.max_tokens)


def _per_user_loop(model, bank, examples):
    """The reference: each user alone, plain autograd."""
    grads = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        model.batch_loss(bank.make_batch([ex])).sum().backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return grads


def per_user_loss(pug, batch, buckets=1):
    """The losses a DP step backpropagates: texts encoded in one call, or in ``buckets`` calls of
    similar length (``length-buckets``)."""
    return pug.loss(batch) if buckets == 1 else pug.loss_in_buckets(batch, buckets)


@pytest.mark.parametrize("ffa, buckets", [(True, 1), (False, 1), (True, 3), (False, 2)])
def test_per_user_gradients_equal_per_user_loop(tiny_model, ffa, buckets):
    model, bank = _setup(tiny_model, double=True, **{"ffa-lora": ffa})
    model.train()
    expected = _per_user_loop(model, bank, EXAMPLES)
    batch = bank.make_batch(EXAMPLES)
    pug = PerUserGradients(model)
    try:
        pug.backward(per_user_loss(pug, batch, buckets), batch)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("lora_B" in n for n in names) and any("history_pool" in n for n in names)
        assert any("lora_A" in n for n in names) == (not ffa)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad_sample.shape == (len(EXAMPLES), *p.shape), name
            for b in range(len(EXAMPLES)):
                ref = expected[b][name]
                assert ref.abs().max() > 0 or "lora" not in name
                torch.testing.assert_close(p.grad_sample[b], ref, rtol=1e-7, atol=1e-10, msg=name)
    finally:
        pug.close()


#: Three users with 2, 1 and 3 examples each (``user-examples`` gives every user the same number;
#: uneven counts check the per-user mean harder).
OWNERS = [0, 0, 1, 2, 2, 2]
SEVERAL = [EXAMPLES[0], EXAMPLES[1], EXAMPLES[2], EXAMPLES[3], EXAMPLES[1], EXAMPLES[0]]


def user_mean_loop(model, bank, examples, owners, vectors=None):
    """The reference for several examples per user: each user alone, plain autograd on the mean of
    the user's examples' losses. ``vectors(batch)``: the rows' cached vectors (cached mode)."""
    grads = []
    for user in sorted(set(owners)):
        mine = [e for e, o in zip(examples, owners) if o == user]
        model.zero_grad(set_to_none=True)
        batch = bank.make_batch(mine, tokens=vectors is None)
        model.batch_loss(batch, None if vectors is None else vectors(batch)).mean().backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return grads


def check_several_examples(model, bank, vectors=None, buckets=1):
    """Per-user gradients of :data:`SEVERAL` (owned by :data:`OWNERS`) equal :func:`user_mean_loop`'s
    (``buckets``: the LoRA path's texts encoded in that many calls)."""
    model.train()
    expected = user_mean_loop(model, bank, SEVERAL, OWNERS, vectors)
    batch = bank.make_batch(SEVERAL, tokens=vectors is None, owners=OWNERS)
    assert (batch.num_users, batch.num_examples) == (3, 6)
    pug = PerUserGradients(model)
    try:
        losses = per_user_loss(pug, batch, buckets) if vectors is None else pug.loss(batch, vectors(batch))
        pug.backward(losses * batch.example_weight(), batch)
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad_sample.shape == (3, *p.shape), name
                for u in range(3):
                    torch.testing.assert_close(p.grad_sample[u], expected[u][name], rtol=1e-7, atol=1e-10, msg=name)
    finally:
        pug.close()


@pytest.mark.parametrize("buckets", [1, 4])
def test_several_examples_per_user_give_the_gradient_of_the_users_mean_loss(tiny_model, buckets):
    # LoRA path: per-row gradients are summed into examples, then examples into users.
    model, bank = _setup(tiny_model, double=True)
    check_several_examples(model, bank, buckets=buckets)


def test_length_buckets_cut_padding_and_give_the_one_call_vectors(tiny_model):
    model, bank = _setup(tiny_model, double=True)
    model.eval()
    batch = bank.make_batch(EXAMPLES)
    with torch.no_grad():
        one = model.encode_texts(batch.input_ids, batch.attention_mask)
        vectors, calls = model.encode_in_buckets(batch.input_ids, batch.attention_mask, 3)
    torch.testing.assert_close(vectors, one, rtol=1e-9, atol=1e-12)
    lengths = batch.attention_mask.sum(1)
    rows = torch.cat([r for r, _ in calls])
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row once
    widths = [int(lengths[r].max()) for r, _ in calls]
    assert widths == sorted(widths) and widths[0] < batch.input_ids.shape[1]  # short calls are cut
    for r, v in calls:
        torch.testing.assert_close(v, one[r], rtol=1e-9, atol=1e-12)


def test_owners_must_number_users_in_order(tiny_bert):
    _, bank = _setup(tiny_bert)
    for bad in ([1, 1, 2, 3, 3, 3], [0, 2, 2, 3, 3, 3], [0, 1, 0, 1, 2, 2], [0, 0, 1]):
        with pytest.raises(ValueError, match="owners"):
            bank.make_batch(SEVERAL, owners=bad)


def _summed_clipped(model, bank, examples, clip, owners=None):
    """The DP optimizer's privatised sum with noise 0 (expected batch 1: no averaging)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, clip_norm=clip,
                            expected_batch_users=1.0)
    pug = PerUserGradients(model)
    try:
        opt.zero_grad(set_to_none=True)
        batch = bank.make_batch(examples, owners=owners)
        losses = pug.loss(batch)
        pug.backward(losses if owners is None else losses * batch.example_weight(), batch)
        opt.pre_step()
        return torch.cat([p.grad.flatten() for p in params])
    finally:
        pug.close()


def test_one_user_changes_the_update_by_at_most_the_clip_norm(tiny_bert):
    model, bank = _setup(tiny_bert)
    model.train()
    clip = 0.01  # small enough to bite: every user is clipped
    norms = [float(torch.cat([g.flatten() for g in grads.values()]).norm())
             for grads in _per_user_loop(model, bank, EXAMPLES)]
    assert max(norms) > clip  # the clip bites for at least one user
    with_all = _summed_clipped(model, bank, EXAMPLES, clip)
    for drop in range(len(EXAMPLES)):
        without = _summed_clipped(model, bank, EXAMPLES[:drop] + EXAMPLES[drop + 1:], clip)
        diff = float((with_all - without).norm())
        assert diff <= clip * (1 + 1e-4)
        # Exactly the user's own gradient, clipped: norm min(C, ||g_u||).
        assert diff == pytest.approx(min(clip, norms[drop]), rel=1e-3, abs=1e-7)


def test_one_user_with_several_examples_changes_the_update_by_at_most_the_clip_norm(tiny_bert):
    model, bank = _setup(tiny_bert)
    model.train()
    clip = 0.01
    with_all = _summed_clipped(model, bank, SEVERAL, clip, OWNERS)
    norms = [float(torch.cat([g.flatten() for g in grads.values()]).norm())
             for grads in user_mean_loop(model, bank, SEVERAL, OWNERS)]
    assert min(norms) > clip
    for drop in range(3):  # remove every example of one user
        keep = [(e, o) for e, o in zip(SEVERAL, OWNERS) if o != drop]
        owners = [o - (o > drop) for _, o in keep]
        without = _summed_clipped(model, bank, [e for e, _ in keep], clip, owners)
        assert float((with_all - without).norm()) == pytest.approx(clip, rel=1e-3)


def test_dp_step_without_noise_and_clipping_equals_plain_step(tiny_bert):
    # Opacus's oracle: noise 0 and a clip norm too large to bite must reproduce plain training.
    model, bank = _setup(tiny_bert)
    model.train()
    batch = bank.make_batch(EXAMPLES)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model.batch_loss(batch).sum().backward()
    plain = torch.cat([p.grad.flatten() for p in params]) / 4.0
    model.zero_grad(set_to_none=True)
    opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, clip_norm=1e6,
                            expected_batch_users=4.0)
    pug = PerUserGradients(model)
    try:
        pug.backward(pug.loss(batch), batch)
        opt.pre_step()
    finally:
        pug.close()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), plain, rtol=1e-4, atol=1e-7)


def test_empty_poisson_batch_is_a_noise_only_step_with_the_right_scale(tiny_bert):
    model, _ = _setup(tiny_bert)
    params = [p for p in model.parameters() if p.requires_grad]
    sigma, clip, expected = 1.3, 0.5, 4.0
    opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, clip_norm=clip,
                            expected_batch_users=expected)
    pug = PerUserGradients(model)
    try:
        opt.zero_grad(set_to_none=True)
        pug.empty()
        opt.pre_step()
    finally:
        pug.close()
    noise = torch.cat([p.grad.flatten() for p in params])
    assert noise.numel() > 2000
    assert abs(float(noise.std()) / (sigma * clip / expected) - 1) < 0.1
    assert abs(float(noise.mean())) < 0.1 * sigma * clip / expected


def test_regroup_refuses_a_wrong_row_count(tiny_bert):
    model, bank = _setup(tiny_bert)
    model.train()
    batch = bank.make_batch(EXAMPLES)
    pug = PerUserGradients(model)
    try:
        pug.loss(batch).sum().backward()
        p = pug.params[0]
        p.grad_sample = p.grad_sample[:-1]  # one row short: neither users nor texts
        with pytest.raises(PrivacyError, match="expected 4 users"):
            pug.regroup(batch)
    finally:
        pug.close()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_an_independent_accountant_and_grows(accountant):
    sigma, q, steps = 1.1, 0.1, 20
    ledger = PrivacyLedger(accountant=accountant, noise_multiplier=sigma, sample_rate=q,
                           target_epsilon=100.0, target_delta=1e-5)
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    previous = 0.0
    for _ in range(3):
        ledger.record(steps)
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        eps = ledger.epsilon()
        extra = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
        assert eps == pytest.approx(reference.get_epsilon(delta=1e-5, **extra), rel=1e-9)
        assert eps > previous
        previous = eps
    # Survives a round trip through JSON (node state, checkpoints).
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon() == pytest.approx(previous, rel=1e-12)
    if accountant == "rdp":
        # And equals the RDP analysis computed by hand from the closed-form orders.
        orders = list(RDP_ORDERS)
        rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=3 * steps, orders=orders)
        eps_by_hand, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert previous == pytest.approx(eps_by_hand, rel=1e-9)
        # The extra orders only ever tighten Opacus's default conversion.
        assert previous <= reference.get_epsilon(delta=1e-5) + 1e-12


def test_large_epsilon_uses_orders_beyond_opacus_defaults():
    # Much noise, few steps (small epsilon, and the high-noise end of the noise planner's search):
    # the optimal RDP order lies above Opacus's largest default (63), so the extended orders give
    # a strictly tighter, still valid epsilon.
    sigma, q, steps = 4.0, 0.05, 10
    ledger = PrivacyLedger(accountant="rdp", noise_multiplier=sigma, sample_rate=q,
                           target_epsilon=100.0, target_delta=1e-5)
    ledger.record(steps)
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS))
    eps_by_hand, best_order = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=1e-5)
    assert best_order > 63
    assert ledger.epsilon() == pytest.approx(eps_by_hand, rel=1e-9)
    assert ledger.epsilon() < reference.get_epsilon(delta=1e-5)


def test_budget_refusal_happens_exactly_when_the_next_round_would_exceed_it():
    q, steps_per_round, rounds, target = 0.2, 5, 4, 2.0
    sigma = plan_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q,
                                  steps=steps_per_round * rounds)
    ledger = PrivacyLedger(accountant="rdp", noise_multiplier=sigma, sample_rate=q,
                           target_epsilon=target, target_delta=1e-5)
    for _ in range(rounds):
        assert ledger.can_afford(steps_per_round)
        ledger.record(steps_per_round)
        assert ledger.epsilon() <= target
    assert ledger.epsilon() > target - 0.05  # the plan uses (almost) all of the budget
    assert not ledger.can_afford(steps_per_round)
    assert not ledger.can_afford(1)


def test_corrupt_ledger_fails_closed():
    with pytest.raises(PrivacyError, match="corrupt"):
        PrivacyLedger.from_json("{not json")
    with pytest.raises(PrivacyError):
        PrivacyLedger.from_json('{"accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.1, '
                                '"target_epsilon": 1.0, "target_delta": 1e-5, "history": [[1.0, 0.1, "x"]]}')
    assert math.isinf(PrivacyLedger(accountant="rdp", noise_multiplier=0.0, sample_rate=0.1, target_epsilon=1,
                                    target_delta=1e-5, history=[[0.0, 0.1, 1]]).epsilon())


ALL_PARTS = {"levels": "event,short,long", "short-window": 2, "facets": 3, "facet-score": "attention",
             "facet-heads": True, "views": "behavior,text,social,image", "image-dim": 5, "task-heads": True,
             "vae": True}


def _full_examples():
    """EXAMPLES with every kind of side data; user 1 has no texts, no neighbours and no images."""
    from uirl.model import Example

    side = [dict(texts=("great read, more like this", "yoga tips"), social=("i6", "i9"), behaviors=(0, 1, -1)),
            dict(behaviors=(2,)),
            dict(texts=("pasta",), social=("i3",), behaviors=(1, 0)),
            dict(texts=("laptop review",), behaviors=(0, 0, 2, 1))]
    return [Example(history=h, candidates=c, seed=100 + b, **side[b]) for b, (h, c) in enumerate(EXAMPLES)]


@pytest.mark.parametrize("buckets", [1, 3])
def test_per_user_gradients_are_exact_with_every_part_on(tiny_model, buckets):
    cfg = tiny_config(tiny_model, **LORA, **ALL_PARTS)
    model, encoder = build_model(cfg)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(3)
    images = {i: torch.randn(5, generator=gen).tolist() for i in list(ITEMS)[:8] if i != "i4"}  # user 1: none
    categories = {i: ("sports" if k % 2 else "food") for k, i in enumerate(ITEMS)}
    bank = TextBank(ITEMS, encoder.tokenizer, cfg.model.max_tokens, category=categories, image=images)
    examples = _full_examples()
    model.train()
    batch = bank.make_batch(examples)
    losses = model(batch)
    assert set(losses) == {"rank", "levels", "view-align", "vae-kl", "facet-heads", "tasks", "loss"}
    expected = _per_user_loop(model, bank, examples)
    pug = PerUserGradients(model)
    try:
        pug.backward(per_user_loss(pug, batch, buckets), batch)
        checked = 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad_sample.shape == (len(examples), *p.shape), name
            for b in range(len(examples)):
                torch.testing.assert_close(p.grad_sample[b], expected[b][name], rtol=1e-7, atol=1e-10, msg=name)
            checked += 1
        parts = ("levels.", "fusion.align.text", "fusion.align.social", "fusion.image_proj", "fusion.gate", "vae.",
                 "facets.", "facet_heads.", "tasks.")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(any(n.startswith(part) for n in names) for part in parts)
        assert checked == len(names)
    finally:
        pug.close()
