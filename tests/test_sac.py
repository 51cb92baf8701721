"""Discrete SAC core (mara_hf.train): the math by hand on tiny tensors, the learner's behaviour, the replay buffer."""

import io
import math
import re

import pytest
import torch

from mara_hf import MaraAgent
from mara_hf.train import (
    Batch,
    Critic,
    DiscreteSAC,
    ReplayBuffer,
    SACConfig,
    actor_loss,
    alpha_loss,
    critic_loss,
    critic_target,
    soft_update,
)

D, H = 8, (16, 8)
LOG2, LOG3 = math.log(2), math.log(3)


def make_sac(seed=0, **config):
    torch.manual_seed(seed)
    return DiscreteSAC(MaraAgent(D, H), SACConfig(**config))


def make_batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, D, generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(n, generator=g),
        torch.randn(n, D, generator=g),
        torch.rand(n, generator=g) < 0.2,
    )


# ------------------------------------------------------------------ the math, by hand
def test_critic_target_by_hand():
    next_logits = torch.tensor([[0.0, 0.0], [0.0, LOG3], [0.0, LOG3]])  # pi = (.5, .5), (.25, .75), (.25, .75)
    q1 = torch.tensor([[1.0, 3.0], [0.0, 4.0], [0.0, 4.0]])
    q2 = torch.tensor([[2.0, 2.0], [1.0, 2.0], [1.0, 2.0]])  # min: (1, 2), (0, 2), (0, 2)
    rewards = torch.tensor([1.0, -1.0, 0.0])
    dones = torch.tensor([False, True, False])
    alpha, gamma = 0.5, 0.9
    v0 = 0.5 * (1 + alpha * LOG2) + 0.5 * (2 + alpha * LOG2)
    v1 = 0.25 * (0 - alpha * math.log(0.25)) + 0.75 * (2 - alpha * math.log(0.75))
    expected = torch.tensor([1 + gamma * v0, -1.0, gamma * v1])  # done cuts the bootstrap: just the reward
    got = critic_target(next_logits, q1, q2, rewards, dones, alpha, gamma)
    torch.testing.assert_close(got, expected)


def test_critic_loss_by_hand():
    q1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q2 = torch.tensor([[0.0, 5.0], [1.0, 1.0]])
    actions = torch.tensor([1, 0])
    target = torch.tensor([1.0, 1.0])
    l1, l2 = critic_loss(q1, q2, actions, target)
    assert l1.item() == pytest.approx(((2 - 1) ** 2 + (3 - 1) ** 2) / 2)
    assert l2.item() == pytest.approx(((5 - 1) ** 2 + (1 - 1) ** 2) / 2)


def test_actor_loss_by_hand_and_q_detached():
    logits = torch.tensor([[0.0, 0.0], [0.0, LOG3]], requires_grad=True)
    q1 = torch.tensor([[1.0, 3.0], [0.0, 4.0]], requires_grad=True)
    q2 = torch.tensor([[2.0, 2.0], [1.0, 2.0]], requires_grad=True)
    alpha = 0.1
    row0 = 0.5 * (alpha * -LOG2 - 1) + 0.5 * (alpha * -LOG2 - 2)
    row1 = 0.25 * (alpha * math.log(0.25) - 0) + 0.75 * (alpha * math.log(0.75) - 2)
    loss = actor_loss(logits, q1, q2, alpha)
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    loss.backward()
    assert logits.grad is not None and q1.grad is None and q2.grad is None


def test_alpha_loss_by_hand_and_gradient_sign():
    logits = torch.tensor([[0.0, 0.0], [0.0, LOG3]])
    h0 = LOG2
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    te = 0.6 * LOG2
    log_alpha = torch.tensor(math.log(0.1), requires_grad=True)
    loss = alpha_loss(logits, log_alpha, te)
    expected = ((-math.log(0.1)) * (-h0 + te) + (-math.log(0.1)) * (-h1 + te)) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d loss / d log_alpha = mean entropy - target: positive here (entropy above target), so descent lowers alpha
    assert log_alpha.grad.item() == pytest.approx((h0 + h1) / 2 - te)
    assert log_alpha.grad.item() > 0


def test_soft_update_math():
    torch.manual_seed(0)
    source, target = Critic(D, H), Critic(D, H)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    soft_update(target, source, 0.25)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, 0.25 * source.state_dict()[name] + 0.75 * before[name])
    soft_update(target, source, 1.0)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name])


def test_critic_shape_and_validation():
    assert Critic(D, H)(torch.zeros(3, 4, D, dtype=torch.float16)).shape == (3, 4, 2)
    with pytest.raises(ValueError, match=re.escape("`hidden_sizes` has to be two positive integers, but is [4].")):
        Critic(D, (4,))


# ------------------------------------------------------------------ the learner
def test_learner_setup():
    sac = make_sac()
    assert sac.alpha == pytest.approx(0.01)
    assert all(not p.requires_grad for p in [*sac.q1_target.parameters(), *sac.q2_target.parameters()])
    for a, b in zip(sac.q1.parameters(), sac.q1_target.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert not torch.equal(sac.q1.net.linear1.weight, sac.q2.net.linear1.weight)  # twin critics start apart
    c = SACConfig()
    assert (c.actor_lr, c.critic_lr, c.alpha_lr, c.batch_size, c.gamma, c.tau, c.buffer_size) == (
        3e-4, 3e-4, 3e-4, 1024, 0.99, 0.005, 1_000_000,
    )
    assert (c.initial_alpha, c.target_entropy, c.max_grad_norm) == (0.01, pytest.approx(0.6 * LOG2), 1.0)


def test_update_reduces_critic_loss_on_fixed_batch():
    sac = make_sac(critic_lr=1e-2)
    batch = make_batch()
    losses = [sac.update(batch)["critic_loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    out = sac.update(batch)
    assert set(out) >= {"critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "q_mean"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert sac.num_updates == 31


def test_update_soft_updates_targets():
    sac = make_sac(tau=0.5)
    old = sac.q1_target.net.linear1.weight.clone()
    sac.update(make_batch())
    torch.testing.assert_close(sac.q1_target.net.linear1.weight, 0.5 * old + 0.5 * sac.q1.net.linear1.weight)


def test_alpha_moves_towards_target_entropy():
    sac = make_sac()  # fresh actor: nearly uniform, entropy ~ log 2 > 0.6 log 2
    out = sac.update(make_batch())
    assert out["entropy"] > 0.6 * LOG2 and out["alpha"] < 0.01

    sac = make_sac()  # a near-deterministic actor: entropy ~ 0 < target
    with torch.no_grad():
        sac.actor.output_linear.weight.zero_()
        sac.actor.output_linear.bias.copy_(torch.tensor([8.0, -8.0]))
    out = sac.update(make_batch())
    assert out["entropy"] < 0.6 * LOG2 and out["alpha"] > 0.01

    sac = make_sac(autotune=False)
    assert sac.update(make_batch())["alpha"] == pytest.approx(0.01)


def test_gradient_clipping_caps_the_norm():
    sac = make_sac(max_grad_norm=1e-3)
    out = sac.update(make_batch())
    assert out["critic_grad_norm"] > 1e-3 and out["actor_grad_norm"] > 1e-3  # clipping actually happened

    def norm(module):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()])).item()

    assert norm(sac.actor) <= 1e-3 * (1 + 1e-4)
    critic_norm = math.hypot(norm(sac.q1), norm(sac.q2))
    assert critic_norm <= 1e-3 * (1 + 1e-4)


def test_state_dict_round_trip_gives_identical_updates():
    a = make_sac(seed=0, critic_lr=1e-2)
    for i in range(3):
        a.update(make_batch(seed=i))
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = make_sac(seed=123, critic_lr=1e-2)
    b.load_state_dict(torch.load(saved))
    assert b.alpha == a.alpha and b.num_updates == 3
    for i in range(3, 6):
        assert a.update(make_batch(seed=i)) == b.update(make_batch(seed=i))
    for x, y in zip(a.state_dict()["actor"].values(), b.state_dict()["actor"].values()):
        assert torch.equal(x, y)
    for x, y in zip(a.q2_target.parameters(), b.q2_target.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(actor_lr=0), "`actor_lr` has to be a positive float, but is 0."),
        (dict(batch_size=0), "`batch_size` has to be a positive integer, but is 0."),
        (dict(gamma=1.5), "`gamma` has to be a float in [0, 1], but is 1.5."),
        (dict(tau=0.0), "`tau` has to be a float in (0, 1], but is 0.0."),
        (dict(initial_alpha=-1.0), "`initial_alpha` has to be a positive float, but is -1.0."),
        (dict(target_entropy=1.0), "`target_entropy` has to be a float in [0, log(2)] (two actions), but is 1.0."),
        (dict(max_grad_norm=0), "`max_grad_norm` has to be a positive float or None, but is 0."),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SACConfig(**kwargs)


def test_learner_validation():
    with pytest.raises(TypeError, match=re.escape("`actor` has to be a MaraAgent, but is Critic.")):
        DiscreteSAC(Critic(D, H))


# ------------------------------------------------------------------ replay buffer
def transitions(start, n):
    values = torch.arange(start, start + n, dtype=torch.float32)
    return (
        values[:, None].expand(n, D),
        values.long() % 2,
        values,
        -values[:, None].expand(n, D),
        values.long() % 3 == 0,
    )


def test_buffer_wraps_around():
    buf = ReplayBuffer(5, D)
    buf.add(*transitions(0, 3))
    assert len(buf) == 3 and buf.pos == 3
    buf.add(*transitions(3, 4))  # 3, 4 fill the end, 5, 6 overwrite slots 0, 1
    assert len(buf) == 5 and buf.pos == 2
    assert buf.rewards.tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert buf.states[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert buf.next_states[:, -1].tolist() == [-5.0, -6.0, -2.0, -3.0, -4.0]
    assert buf.actions.tolist() == [1, 0, 0, 1, 0]
    assert buf.dones.tolist() == [False, True, False, True, False]
    buf.add(*transitions(10, 7))  # more than the capacity: the last 5 survive, in ring order
    assert len(buf) == 5 and buf.pos == 4
    assert sorted(buf.rewards.tolist()) == [12.0, 13.0, 14.0, 15.0, 16.0]
    assert buf.rewards[(buf.pos - 1) % 5].item() == 16.0  # the newest sits just before `pos`


def test_buffer_storage_sampling_and_nbytes():
    buf = ReplayBuffer(16, D)
    assert buf.states.dtype == buf.next_states.dtype == torch.float16
    assert buf.nbytes == 16 * D * 2 * 2 + 16 * 8 + 16 * 4 + 16 * 1 + 16 * 1  # ..., dones, advances
    assert ReplayBuffer(16, D, state_dtype=torch.float32).nbytes == 16 * D * 4 * 2 + 16 * 14
    buf.add(*transitions(0, 10))
    batch = buf.sample(7, generator=torch.Generator().manual_seed(0))
    states, actions, rewards, next_states, dones, advances = batch
    assert advances.dtype == torch.bool
    assert states.shape == next_states.shape == (7, D) and actions.shape == rewards.shape == dones.shape == (7,)
    assert states.dtype == next_states.dtype == rewards.dtype == torch.float32
    assert actions.dtype == torch.int64 and dones.dtype == torch.bool
    assert torch.equal(states[:, 0], rewards) and torch.equal(actions, rewards.long() % 2)  # rows stay aligned
    assert rewards.max().item() < 10  # only filled slots are drawn
    again = buf.sample(7, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(batch, again))


def test_buffer_state_dict_round_trip():
    buf = ReplayBuffer(6, D)
    buf.add(*transitions(0, 8))
    other = ReplayBuffer(6, D)
    other.load_state_dict(buf.state_dict())
    assert (len(other), other.pos) == (len(buf), buf.pos)
    for name in ("states", "actions", "rewards", "next_states", "dones", "advances"):
        assert torch.equal(getattr(other, name), getattr(buf, name))
    a = buf.sample(5, generator=torch.Generator().manual_seed(3))
    b = other.sample(5, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="capacity 6 and state size 8, but this buffer has capacity 7"):
        ReplayBuffer(7, D).load_state_dict(buf.state_dict())


def test_buffer_keeps_advances_and_reads_checkpoints_without_them():
    buf = ReplayBuffer(6, D)
    s, a, r, ns, d = transitions(0, 4)
    buf.add(s, a, r, ns, d, torch.tensor([False, True, False, True]))
    assert buf.advances[:4].tolist() == [False, True, False, True]
    buf.add(*transitions(4, 2))  # no advances given: every transition took a token
    assert buf.advances[4:6].tolist() == [True, True]
    old = {k: v for k, v in buf.state_dict().items() if k != "advances"}  # written before the field existed
    other = ReplayBuffer(6, D)
    other.load_state_dict(old)
    assert bool(other.advances.all()) and torch.equal(other.dones, buf.dones)


def test_buffer_validation():
    with pytest.raises(ValueError, match=re.escape("`capacity` has to be a positive integer, but is 0.")):
        ReplayBuffer(0, D)
    with pytest.raises(ValueError, match=re.escape("`state_dim` has to be a positive integer, but is -1.")):
        ReplayBuffer(4, -1)
    with pytest.raises(ValueError, match=re.escape("`state_dtype` has to be a floating point torch dtype")):
        ReplayBuffer(4, D, state_dtype=torch.int8)
    buf = ReplayBuffer(4, D)
    with pytest.raises(ValueError, match=re.escape("Cannot sample from an empty replay buffer")):
        buf.sample(2)
    s, a, r, ns, d = transitions(0, 3)
    with pytest.raises(ValueError, match=re.escape("`states` has to have shape [n, 8], but has [3, 4].")):
        buf.add(s[:, :4], a, r, ns, d)
    with pytest.raises(ValueError, match=re.escape("`rewards` has to have shape [3], but has [2].")):
        buf.add(s, a, r[:2], ns, d)
    with pytest.raises(ValueError, match=re.escape("`actions` has to hold only 0 (reject) and 1 (accept).")):
        buf.add(s, a + 1, r, ns, d)
    with pytest.raises(ValueError, match=re.escape("`batch_size` has to be a positive integer, but is 0.")):
        buf.sample(0)
    assert len(buf) == 0


def test_fresh_critics_are_indifferent_and_actor_delay_holds_the_policy():
    sac = make_sac(actor_delay=2, batch_size=32)
    states = make_batch()[0]
    assert sac.q1(states).abs().max() == 0 and sac.q2(states).abs().max() == 0  # Q = 0 until data arrives
    actor = {k: v.clone() for k, v in sac.actor.state_dict().items()}
    log_alpha = sac.log_alpha.item()
    for _ in range(2):
        sac.update(make_batch())
    assert all(torch.equal(actor[k], v) for k, v in sac.actor.state_dict().items())
    assert sac.log_alpha.item() == log_alpha and sac.q1(states).abs().max() > 0
    sac.update(make_batch())
    assert not torch.equal(actor["output_linear.bias"], sac.actor.output_linear.bias)
    assert sac.log_alpha.item() != log_alpha


# ------------------------------------------------------------------ what gamma discounts
@pytest.mark.parametrize("discount", ["decision", "token"])
def test_update_discounts_per_decision_or_per_token_taken(discount):
    """`discount="token"`: gamma only where a token was taken (`advances`); `"decision"`: every transition."""
    sac = make_sac(discount=discount, gamma=0.5, actor_delay=10)
    states, actions, rewards, next_states, dones = make_batch()
    advances = dones | (torch.arange(len(dones)) % 3 == 0)
    with torch.no_grad():
        v_next = critic_target(sac.actor.logits(next_states), sac.q1_target(next_states),
                               sac.q2_target(next_states), torch.zeros(len(rewards)), dones, sac.alpha, 1.0)
    gammas = torch.where(advances, 0.5, 1.0) if discount == "token" else torch.full_like(rewards, 0.5)
    expected = rewards + gammas * v_next
    out = sac.update(Batch(states, actions, rewards, next_states, dones, advances))
    assert out["target_mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert (~advances).any() and not bool(dones.all())  # some transitions bootstrap without a token taken


def test_token_discount_without_advances_discounts_every_transition():
    batch = make_batch()
    a, b = make_sac(discount="token", gamma=0.5), make_sac(discount="decision", gamma=0.5)
    assert a.update(batch)["target_mean"] == pytest.approx(b.update(batch)["target_mean"])


def test_discount_is_validated():
    with pytest.raises(ValueError, match=re.escape("`discount` has to be 'decision' or 'token', but is 'step'.")):
        SACConfig(discount="step")
