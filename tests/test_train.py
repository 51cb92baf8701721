"""Training: the MDP's events and transitions, reward placement, rollouts against a naive serial reference,
checkpoints and exact resume, an end-to-end run that raises a scripted reward, and `mara-hf train`."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import constant_agent, decisive_agent, left_padded, random_prompts, tiny_model, assert_model_untouched
from mara_hf import MaraAgent, mara_generate
from mara_hf.candidates import build_candidates
from mara_hf.train import Rollout, SACConfig, Trainer, TrainConfig, build_transitions, rollout
from mara_hf.stats import MaraStats
from mara_hf.train.checkpoint import flatten, latest_checkpoint, load_checkpoint, save_checkpoint, unflatten
from mara_hf.data import encode_chat_prompts
from mara_hf.train.probe import PROBE_METRICS, SCORED_METRICS, greedy_probe
from mara_hf.train.rollout import step_events
from mara_hf.train.trainer import prompt_indices
from reference import naive_candidates, naive_mara_greedy, naive_next_logits, naive_repeated, naive_states

VOCAB = 96


# ---------------------------------------------------------------------------------------------- step events
def test_step_events_scripted_rows():
    # rows: 0 rejects t1 and accepts t2; 1 accepts t1; 2 rejects all with "last" (t3 forced); 3 lone candidate
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]))
    counts = torch.tensor([3, 2, 3, 1])
    accepted = torch.tensor([[False, True, True], [True, False, False], [False, False, True], [True, False, False]])
    index = torch.tensor([1, 0, 2, 0])
    asked = counts > 1
    events, actions, chooser, forced, penalty = step_events(logprobs, accepted, counts, index, asked, "last")
    assert events.tolist() == [[True, True, False], [True, False, False], [True, True, False], [False] * 3]
    assert actions.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert chooser.tolist() == [[False, True, False], [True, False, False], [False, True, False], [False] * 3]
    assert forced.tolist() == [False, False, True, False]
    torch.testing.assert_close(penalty, torch.tensor([math.log(0.5 / 0.3), 0.0, math.log(0.5 / 0.2), 0.0]))


def test_step_events_first_fallback_asks_every_candidate():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    accepted = torch.zeros(1, 3, dtype=torch.bool)  # all three rejected: the top-1 is taken
    events, actions, chooser, forced, penalty = step_events(
        logprobs, accepted, torch.tensor([3]), torch.tensor([0]), torch.tensor([True]), "first")
    assert events.tolist() == [[True, True, True]] and actions.sum() == 0
    assert chooser.tolist() == [[False, False, True]] and forced.tolist() == [True]
    assert penalty.tolist() == [0.0]
    # With "last", accepting only t_n is no decision: t_n is forced after t_1..t_{n-1} were rejected.
    events, actions, _, forced, _ = step_events(
        logprobs, torch.tensor([[False, False, True]]), torch.tensor([3]), torch.tensor([2]), torch.tensor([True]),
        "last")
    assert events.tolist() == [[True, True, False]] and actions.sum() == 0 and forced.tolist() == [True]


# ---------------------------------------------------------------------------------------------- transitions
def scripted_rollout(finite=(True, True)) -> Rollout:
    """Row 0: position 0 reject+accept (penalty 0.7), position 1 lone (no event), position 2 accept top-1.
    Row 1: position 0 reject, reject -> forced (penalty 1.5)."""
    states = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 4)
    return Rollout(
        states=states,
        rows=torch.tensor([0, 0, 0, 1, 1]),
        positions=torch.tensor([0, 0, 2, 0, 0]),
        candidates=torch.tensor([0, 1, 0, 0, 1]),
        actions=torch.tensor([0, 1, 1, 0, 0]),
        penalties=torch.tensor([0.0, 0.7, 0.0, 0.0, 1.5]),
        tokens=torch.zeros(2, 3, dtype=torch.long),
        lengths=torch.tensor([3, 1]),
        kl=torch.tensor([[0.7, 0.0, 0.0], [1.5, 0.0, 0.0]]),
        taken_index=torch.tensor([[1, 0, 0], [2, 0, 0]]),
        asked=torch.tensor([[True, False, True], [True, False, False]]),
        forced=torch.tensor([[False, False, False], [True, False, False]]),
        finite=torch.tensor(finite),
    )


def test_transitions_terminal_reward_once_and_kl_on_the_choosing_event():
    batch = build_transitions(scripted_rollout(), torch.tensor([2.0, -1.0]), kl_coef=0.1)
    assert batch.actions.tolist() == [0, 1, 1, 0, 0]
    torch.testing.assert_close(batch.rewards, torch.tensor([0.0, -0.07, 2.0, 0.0, -1.0 - 0.15]))
    assert batch.dones.tolist() == [False, False, True, False, True]
    # s' is the row's next decision (across the lone position); the last decision has no successor
    assert batch.next_states[:, 0].tolist() == [1.0, 2.0, 0.0, 4.0, 0.0]
    # the sum of rewards of an episode is the terminal reward minus the KL penalties: nothing counted twice
    assert batch.rewards[:3].sum().item() == pytest.approx(2.0 - 0.07)
    # a token is taken across an accept, the last reject before a forced token, and at the end; not across a
    # reject that moves on to the next candidate
    assert batch.advances.tolist() == [False, True, True, False, True]


def test_transitions_mark_a_fallback_token_as_taken():
    """Row 1 rejects both candidates of position 0 (fallback "first": the top-1 is taken), then accepts at 1."""
    episodes = dataclasses.replace(scripted_rollout(), rows=torch.tensor([0, 1, 1, 1, 1]),
                                   positions=torch.tensor([0, 0, 0, 1, 1]), actions=torch.tensor([1, 0, 0, 0, 1]))
    batch = build_transitions(episodes, torch.tensor([2.0, -1.0]), kl_coef=0.1)
    assert batch.dones.tolist() == [True, False, False, False, True]
    assert batch.advances.tolist() == [True, False, True, False, True]


def test_transitions_drop_a_row_with_nan_states_whole():
    episodes = scripted_rollout(finite=(False, True))
    batch = build_transitions(episodes, torch.tensor([2.0, -1.0]), kl_coef=0.1)
    assert batch.states[:, 0].tolist() == [3.0, 4.0]
    torch.testing.assert_close(batch.rewards, torch.tensor([0.0, -1.15]))
    assert batch.dones.tolist() == [False, True]


# ---------------------------------------------------------------------------------------------- rollouts
def naive_rollout(model, agent, prompts, max_new_tokens, generator, eos, fallback, top_k=40, top_p=0.95, min_p=0.0):
    """The MDP walked serially: one full forward per candidate, thresholds drawn as the batched rollout draws."""
    tokens = [[] for _ in prompts]
    events = []  # (row, position, candidate, action, state)
    done = [False] * len(prompts)
    for position in range(max_new_tokens):
        thresholds = torch.rand((len(prompts), top_k), generator=generator)
        for row, prompt in enumerate(prompts):
            if done[row]:
                continue
            context = prompt + tokens[row]
            candidates = naive_candidates(naive_next_logits(model, context), top_k, top_p, min_p)
            taken = 0
            if len(candidates) > 1:
                refusable = len(candidates) - 1 if fallback == "last" else len(candidates)
                states = naive_states(model, context, candidates)
                p = agent.accept_probability(states)
                taken = len(candidates) - 1 if fallback == "last" else 0
                for j in range(refusable):
                    accept = bool(p[j] > thresholds[row, j])
                    events.append((row, position, j, int(accept), states[j]))
                    if accept:
                        taken = j
                        break
            tokens[row].append(candidates[taken])
            done[row] = candidates[taken] == eos
        if all(done):
            break
    return tokens, events


@pytest.mark.parametrize("arch,fallback,min_p", [("llama", "last", 0.0), ("mistral", "first", 0.0),
                                                 ("qwen2", "last", 0.0), ("llama", "first", 0.3)])
def test_rollout_matches_naive_serial_mdp(arch, fallback, min_p):
    model = tiny_model(arch)
    if min_p:
        with torch.no_grad():  # sharper next-token distributions, so that min-p cuts candidates
            model.model.norm.weight.mul_(8.0)
    out = assert_rollout_is_the_naive_serial_mdp(model, random_prompts(3), fallback, min_p)
    assert out.actions.sum() > 0 and (out.actions == 0).sum() > 0  # both actions occur
    assert_model_untouched(model)


def assert_rollout_is_the_naive_serial_mdp(model, prompts, fallback: str, min_p: float = 0.0):
    """A rollout of `prompts` (left-padded) with a sampling agent has the naive serial MDP's tokens, decisions and
    states; returns it."""
    hidden = model.get_output_embeddings().weight.shape[-1]
    agent = decisive_agent(hidden, seed=3, sharpness=3.0)  # p(accept) spread over (0, 1): real sampling
    ids, mask = left_padded(prompts)
    out = rollout(model, agent, ids, mask, max_new_tokens=6, eos_token_ids=[2], pad_token_id=0,
                  generator=torch.Generator().manual_seed(5), fallback=fallback, min_p=min_p)
    tokens, events = naive_rollout(model, agent, prompts, 6, torch.Generator().manual_seed(5), 2, fallback,
                                   min_p=min_p)
    for row in range(len(prompts)):
        assert out.tokens[row, : out.lengths[row]].tolist() == tokens[row]
    events = sorted(events, key=lambda e: e[:3])  # the rollout orders events by (row, position, candidate)
    assert [(r, p, c, a) for r, p, c, a, _ in events] == list(zip(
        out.rows.tolist(), out.positions.tolist(), out.candidates.tolist(), out.actions.tolist()))
    torch.testing.assert_close(out.states, torch.stack([s for *_, s in events]), atol=1e-4, rtol=1e-4)
    return out


def test_rollout_accept_all_is_greedy_and_reject_all_forces_the_last_candidate():
    model = tiny_model()
    ids, mask = left_padded(random_prompts(2))
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                           pad_token_id=0)[:, ids.shape[1]:]
    gen = torch.Generator().manual_seed(0)
    accept = rollout(model, constant_agent(accept=True), ids, mask, max_new_tokens=5, eos_token_ids=[],
                     pad_token_id=0, generator=gen)
    assert torch.equal(accept.tokens, plain)
    assert accept.actions.tolist() == [1] * len(accept.actions) and accept.kl.abs().max() == 0
    assert (accept.candidates == 0).all() and not accept.forced.any()

    reject = rollout(model, constant_agent(accept=False), ids, mask, max_new_tokens=1, eos_token_ids=[],
                     pad_token_id=0, generator=gen)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    cands = build_candidates(logits, 40, 0.95)
    last = cands.tokens.gather(1, (cands.counts - 1)[:, None]).squeeze(1)
    assert torch.equal(reject.tokens[:, 0], last) and reject.forced[:, 0].all()
    assert (reject.actions == 0).all()
    assert reject.rows.bincount().tolist() == (cands.counts - 1).tolist()  # t_1 .. t_{n-1} rejected, t_n forced


def test_rollout_episode_ends_at_eos():
    model = tiny_model()
    ids, mask = left_padded(random_prompts(2))
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           pad_token_id=0)[:, ids.shape[1]:]
    eos = int(plain[0, 2])  # row 0's third greedy token plays EOS
    out = rollout(model, constant_agent(accept=True), ids, mask, max_new_tokens=6, eos_token_ids=[eos],
                  pad_token_id=0, generator=torch.Generator())
    assert out.lengths[0] == 3 and out.tokens[0, :3].tolist() == plain[0, :3].tolist()
    assert (out.positions[out.rows == 0] < 3).all()  # no decision after the end
    assert (out.tokens[0, 3:] == 0).all()


# ---------------------------------------------------------------------------------------------- trainer
def word_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer: token i is the word `t{i}`; t0 pads, t2 ends."""
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t2")


def word_prompts(count: int, seed: int = 1):
    return [" ".join(f"t{i}" for i in p) for p in random_prompts(count, seed=seed)]


def even_token_rate(prompts, responses):
    """Scripted reward: the fraction of response tokens with an even id."""
    return [sum(int(w[1:]) % 2 == 0 for w in r.split()) / max(len(r.split()), 1) for r in responses]


def small_config(**overrides) -> TrainConfig:
    values = dict(iterations=4, rollout_batch_size=4, max_new_tokens=6, kl_coef=0.1, learning_starts=16,
                  updates_per_rollout=2, checkpoint_every=2, hidden_sizes=(32, 16), sac=SACConfig(batch_size=32))
    values.update(overrides)
    return TrainConfig(**values)


def test_a_tokenizer_without_a_pad_token_rolls_out_alike_and_is_left_as_it_was(tmp_path):
    """Llama's and Mistral's tokenizers have no pad token: rollouts pad with EOS (any id would do: padding is masked
    or cut off), give the same transitions, and neither the trainer nor the rollout gives the tokenizer one."""
    from mara_hf.train.rollout import row_generators
    from mara_hf.train.trainer import rollout_transitions

    model, prompts, config = tiny_model(), word_prompts(4), small_config(max_new_tokens=8)
    padded = word_tokenizer()
    bare = PreTrainedTokenizerFast(tokenizer_object=padded.backend_tokenizer, eos_token="t2")
    assert bare.pad_token_id is None
    Trainer(model, bare, prompts, even_token_rate, tmp_path / "run", config, progress=False)
    actor = decisive_agent(reject_bias=1.0)
    got, totals = rollout_transitions(model, bare, even_token_rate, actor, prompts, config,
                                      row_generators(0, 0, range(4)))
    expected, expected_totals = rollout_transitions(model, padded, even_token_rate, actor, prompts, config,
                                                    row_generators(0, 0, range(4)))
    assert bare.pad_token is None
    assert totals == expected_totals and len(got.states) > 0
    for name, value in got._asdict().items():
        assert torch.equal(value, getattr(expected, name)), name


def test_checkpoint_tree_round_trip(tmp_path):
    tree = {"a": torch.arange(3), "b": [1, 2.5, None, "x", {"c": torch.ones(2, 2)}], 0: {"d": True}}
    skeleton, tensors = flatten(tree)
    json.dumps(skeleton)
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert back[0] == {"d": True} and back["b"][:4] == [1, 2.5, None, "x"]
    assert torch.equal(back["a"], tree["a"]) and torch.equal(back["b"][4]["c"], tree["b"][4]["c"])
    with pytest.raises(TypeError, match="Cannot checkpoint a object"):
        flatten({"x": object()})


def test_checkpoint_is_atomic_and_keeps_the_newest(tmp_path):
    agent = MaraAgent(state_dim=4, hidden_sizes=(8, 8))
    for step in range(3):
        save_checkpoint(tmp_path, f"step-{step:07d}", agent, {"step": step, "t": torch.full((2,), step)})
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    loaded, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 2 and state["t"].tolist() == [2, 2]
    assert torch.equal(loaded.linear1.weight, agent.linear1.weight)
    # a half-written checkpoint (killed before the rename) is invisible: `latest` still names the complete one
    (tmp_path / ".step-0000003.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-0000002"


def make_trainer(out_dir, config, reward=even_token_rate, prompts=12):
    return Trainer(tiny_model(), word_tokenizer(), word_prompts(prompts), reward, out_dir, config, progress=False)


def test_killed_run_resumes_to_the_same_agent(tmp_path):
    config = small_config(iterations=6)
    whole = make_trainer(tmp_path / "whole", config).train()

    calls = {"n": 0}

    def dies_in_iteration_5(prompts, responses):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed after the checkpoint of iteration 4
        return even_token_rate(prompts, responses)

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "killed", config, dies_in_iteration_5).train()
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step-0000004"
    resumed = make_trainer(tmp_path / "killed", config).train()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = lambda run: [{k: v for k, v in json.loads(l).items() if "seconds" not in k}  # noqa: E731
                         for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert lines("whole") == lines("killed")
    assert MaraAgent.from_pretrained(tmp_path / "killed" / "agent").fallback == "last"


def test_time_limit_stops_with_a_checkpoint_and_resume_goes_on(tmp_path):
    config = small_config(iterations=6, checkpoint_every=5)
    trainer = make_trainer(tmp_path, config)
    trainer.train(time_limit=1e-9)  # past the limit after the first iteration
    assert trainer.iteration == 1
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000001"
    assert MaraAgent.from_pretrained(tmp_path / "agent").fallback == "last"
    resumed = make_trainer(tmp_path, config)
    resumed.train()
    assert resumed.iteration == 6
    assert [json.loads(l)["iteration"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="`time_limit` has to be positive"):
        make_trainer(tmp_path / "other", config).train(time_limit=0)


def test_resume_refuses_other_settings(tmp_path):
    make_trainer(tmp_path, small_config(iterations=2)).train()
    with pytest.raises(ValueError, match=r"other settings \(kl_coef\)"):
        make_trainer(tmp_path, small_config(iterations=4, kl_coef=0.5)).train()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        make_trainer(tmp_path, small_config(iterations=4)).train(resume=False)


def test_greedy_probe_reports_what_inference_costs():
    """The probe decodes greedily through the fused loop: an agent that rejects everything falls back on every
    decision (a sampled walk would force the last candidate instead), one that accepts everything takes the top-1
    at one forward per token; the numbers equal `mara_generate`'s own statistics."""
    model, tokenizer, prompts = tiny_model(), word_tokenizer(), word_prompts(5)
    config = small_config(rollout_batch_size=2, max_new_tokens=5, fallback="first")
    reject = greedy_probe(model, tokenizer, constant_agent(accept=False), prompts, config, [2])
    assert reject["fallback_rate"] == 1.0 and reject["top1_accept_rate"] == 0.0 and reject["prompts"] == 5
    low = greedy_probe(model, tokenizer, constant_agent(accept=False), prompts, config, [2], threshold=1e-9)
    assert low["fallback_rate"] == 0.0 and low["top1_accept_rate"] == 1.0  # p(accept) ~2e-9 passes 1e-9
    accept = greedy_probe(model, tokenizer, constant_agent(accept=True), prompts, config, [2])
    assert accept["fallback_rate"] == 0.0 and accept["top1_accept_rate"] == 1.0
    assert accept["mean_search_length"] <= 1.0 < reject["mean_search_length"]

    agent = decisive_agent(reject_bias=10.0).train()  # falls back on some decisions only
    probe = greedy_probe(model, tokenizer, agent, prompts, config, [2])
    assert agent.training  # the actor's mode is restored
    stats = MaraStats(config.top_k)
    for start in (0, 2, 4):
        encoded = tokenizer(prompts[start:start + 2], return_tensors="pt", padding=True, padding_side="left")
        model.generate(**encoded, max_new_tokens=5, do_sample=False, eos_token_id=[2], pad_token_id=0,
                       custom_generate=mara_generate, mara_agent=agent.eval(), mara_fallback="first", mara_stats=stats)
    expected = stats.to_dict()
    assert 0 < probe["fallback_rate"] < 1
    # forwards aside: the auto schedule remembers what it learned of this agent and model, so a second decoding of
    # the same prompts may plan other chunks (the same decisions, fewer forwards)
    assert probe == {**{name: expected[name] for name in PROBE_METRICS}, "prompts": 5,
                     "forwards_per_token": probe["forwards_per_token"]}
    with pytest.raises(ValueError, match="`prompts` is empty"):
        greedy_probe(model, tokenizer, agent, [], config, [2])


def test_greedy_probe_scores_the_greedy_return_as_the_mdp_counts_it():
    """With the training reward the probe scores its greedy answers: reward - kl_coef * KL penalties - reject_cost
    * rejects - repeat_cost * repeated 4-gram tokens a decision took (as `build_transitions` charges them: a lone
    candidate is taken without one), equal to a serial reference (one unpadded prompt at a time, teacher-forced KL,
    rejects counted from the walk over candidates, repeats by a naive n-gram search)."""
    model, tokenizer, prompts = tiny_model(), word_tokenizer(), word_prompts(5)
    config = small_config(rollout_batch_size=2, max_new_tokens=12, fallback="first", kl_coef=0.3, reject_cost=0.05,
                          repeat_cost=0.5)
    accept = greedy_probe(model, tokenizer, constant_agent(accept=True), prompts, config, [2], reward=even_token_rate)
    assert accept["kl_per_token"] == 0.0 and accept["rejects_per_answer"] == 0.0
    assert accept["return"] == pytest.approx(accept["reward"] - 0.5 * 12 * accept["repeat_rate"], abs=1e-5)

    agent = decisive_agent(reject_bias=10.0)
    probe = greedy_probe(model, tokenizer, agent, prompts, config, [2], reward=even_token_rate)
    returns, rewards, penalties, rejects, repeats, tokens = [], [], 0.0, 0, 0, 0
    for prompt in prompts:
        ids = encode_chat_prompts(tokenizer, [prompt], "cpu")["input_ids"][0].tolist()
        answer, records = naive_mara_greedy(model, agent, ids, 12, fallback="first", eos_token_id=2)
        kl = sum(float(torch.log_softmax(naive_next_logits(model, ids + answer[:i]), -1).max()
                       - torch.log_softmax(naive_next_logits(model, ids + answer[:i]), -1)[token])
                 for i, token in enumerate(answer))
        walked = sum(len(r["candidates"]) if r["fallback"] else r["index"] for r in records if r["asked"])
        marks = naive_repeated(answer, len(answer), 4)
        charged = sum(mark and record["asked"] for mark, record in zip(marks, records, strict=True))
        reward = even_token_rate([prompt], [tokenizer.decode(answer, skip_special_tokens=True)])[0]
        returns.append(reward - 0.3 * kl - 0.05 * walked - 0.5 * charged)
        rewards.append(reward)
        penalties, rejects, tokens = penalties + kl, rejects + walked, tokens + len(answer)
        repeats += sum(marks)
    assert rejects > 0 and penalties > 0  # the agent rejects some candidates and takes some non-top-1 tokens
    assert repeats > 0  # and some answers loop
    assert probe["return"] == pytest.approx(sum(returns) / 5, abs=1e-5)
    assert probe["reward"] == pytest.approx(sum(rewards) / 5)
    assert probe["kl_per_token"] == pytest.approx(penalties / tokens, abs=1e-5)
    assert probe["rejects_per_answer"] == pytest.approx(rejects / 5)
    assert probe["repeat_rate"] == pytest.approx(repeats / tokens)
    assert set(probe) == set(PROBE_METRICS) | set(SCORED_METRICS) | {"prompts"}


def test_the_probe_charges_the_repeats_a_decision_took_and_counts_every_repeat():
    """A repeated token at a lone-candidate position is taken without a decision: `build_transitions` charges it to
    no transition, so the probe's return does not either; `repeat_rate` counts it."""
    from types import SimpleNamespace

    from mara_hf.train.probe import _score

    answer = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # positions 7, 8 and 9 repeat a 4-gram
    asked = torch.ones(1, 10, dtype=torch.bool)
    asked[0, 8] = False  # a lone candidate
    zeros = torch.zeros(1, 10, dtype=torch.long)
    out = SimpleNamespace(sequences=torch.cat([torch.tensor([[9, 9]]), answer], dim=1),
                          mara_steps=dict(index=zeros, num_candidates=zeros + 3, fallback=zeros.bool(), asked=asked),
                          logits=tuple(torch.zeros(1, 96) for _ in range(10)))
    tokens, kl, rejects, repeats, charged, rewards = _score(
        out, 2, ["p"], word_tokenizer(), lambda prompts, responses: torch.zeros(len(prompts)), [2],
        small_config(repeat_cost=0.5)).tolist()
    assert (tokens, kl, rejects, repeats, charged) == (10, 0, 0, 3, 2)


def test_trainer_keeps_the_probed_actors_and_the_one_with_the_best_greedy_return(tmp_path):
    """probed/step-N/ holds every probed actor, best_agent/ the one whose probe had the highest greedy return (the tiny run's greedy answers do not
    change in 6 rollouts, so the returns are scripted on top of the real probes: 1, 3, 2)."""
    trainer = make_trainer(tmp_path, small_config(iterations=6, greedy_probe=3))
    probe, scripted, actors = trainer.probe, iter([1.0, 3.0, 2.0]), {}

    def scripted_probe():
        actors[trainer.iteration] = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
        return {**probe(), "return": next(scripted)}

    trainer.probe = scripted_probe
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["iteration"], line["greedy"]["return"]) for line in lines if "greedy" in line] == [
        (2, 1.0), (4, 3.0), (6, 2.0)]
    best = trainer.best_probe()
    assert best["iteration"] == 4 and best["return"] == 3.0 and best["prompts"] == 3
    kept = MaraAgent.from_pretrained(tmp_path / "best_agent")
    assert not torch.equal(actors[4]["linear1.weight"], actors[6]["linear1.weight"])  # the actor moved on
    for name, value in kept.state_dict().items():
        assert torch.equal(value, actors[4][name]), name
    for iteration, value in zip((2, 4, 6), (1.0, 3.0, 2.0)):  # every probed actor is kept, with its probe
        folder = tmp_path / "probed" / f"step-{iteration:07d}"
        assert json.loads((folder / "probe.json").read_text())["return"] == value
        for name, weights in MaraAgent.from_pretrained(folder).state_dict().items():
            assert torch.equal(weights, actors[iteration][name]), name
    # a resumed run that probes an equal or worse actor keeps it; a better one replaces it
    assert not trainer.keep_best({**best, "return": 3.0})
    assert trainer.keep_best({**best, "return": 3.5}) and trainer.best_probe()["iteration"] == 6


def test_greedy_probe_is_logged_at_checkpoints_and_changes_nothing_learned(tmp_path):
    plain = make_trainer(tmp_path / "plain", small_config(iterations=4)).train()
    trainer = make_trainer(tmp_path / "probed", small_config(iterations=4, greedy_probe=3))
    probed = trainer.train()
    for (name, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = [json.loads(l) for l in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    assert ["greedy" in line for line in lines] == [False, True, False, True]  # checkpoint_every=2
    again = greedy_probe(trainer.model, trainer.tokenizer, probed, trainer.prompts[:3], trainer.config,
                         trainer.eos_ids, reward=trainer.reward)
    assert {**lines[-1]["greedy"], "forwards_per_token": None} == {**again, "forwards_per_token": None}
    # the probe does not change what a run learns, so a resumed run may switch it
    make_trainer(tmp_path / "plain", small_config(iterations=6, greedy_probe=2)).train()
    with pytest.raises(ValueError, match="`greedy_probe` has to be a non-negative integer"):
        small_config(greedy_probe=-1)


def test_probe_decodes_at_probe_threshold_and_saves_the_probed_actors_with_it(tmp_path):
    """`probe_threshold` is the threshold the probe decodes with (not the training actor's 0.5), and the probed and
    best actors carry it, ready to be used as they were probed; the last actor keeps the greedy rule's 0.5."""
    # a fresh actor accepts with about 0.4: every top-1 at 0.3, none at 0.5
    trainer = make_trainer(tmp_path / "run", small_config(iterations=2, greedy_probe=3, probe_threshold=0.3,
                                                          initial_accept=0.4))
    agent = trainer.train()
    assert agent.accept_threshold == 0.5
    assert MaraAgent.from_pretrained(tmp_path / "run" / "agent").accept_threshold == 0.5
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]["greedy"]
    at = {threshold: greedy_probe(trainer.model, trainer.tokenizer, agent, trainer.prompts[:3], trainer.config,
                                  trainer.eos_ids, threshold, reward=trainer.reward) for threshold in (0.3, 0.5)}
    assert {**logged, "forwards_per_token": None} == {**at[0.3], "forwards_per_token": None}
    assert at[0.3]["top1_accept_rate"] > at[0.5]["top1_accept_rate"]  # the threshold made a difference here
    for folder in ("probed/step-0000002", "best_agent"):
        probed = MaraAgent.from_pretrained(tmp_path / "run" / folder)
        assert probed.accept_threshold == 0.3
        assert all(torch.equal(a, b) for a, b in zip(probed.state_dict().values(), agent.state_dict().values()))
    # a resumed run may change it, like the probe's size
    make_trainer(tmp_path / "run", small_config(iterations=4, greedy_probe=3, probe_threshold=0.2,
                                                initial_accept=0.4)).train()
    assert MaraAgent.from_pretrained(tmp_path / "run" / "probed" / "step-0000004").accept_threshold == 0.2
    for bad in (0, 1.0, "0.2", True):
        message = f"`probe_threshold` has to be a float in (0, 1), but is {bad!r}."
        with pytest.raises(ValueError, match=re.escape(message)):
            small_config(probe_threshold=bad)


def test_prompt_order_is_a_seeded_shuffle_per_epoch():
    seen = [i for it in range(3) for i in prompt_indices(12, it, 4, seed=0)]
    assert sorted(seen) == list(range(12))
    assert prompt_indices(12, 1, 4, seed=0) == prompt_indices(12, 1, 4, seed=0) != prompt_indices(12, 1, 4, seed=1)


def greedy_even_rate(model, tokenizer, agent, prompts):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**encoded, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                         custom_generate=mara_generate, mara_agent=agent)
    responses = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:])
    return sum(even_token_rate(prompts, responses)) / len(prompts)


def test_training_raises_a_scripted_reward(tmp_path):
    """End to end on a tiny random model: reward = share of even token ids; greedy MARA with the trained agent
    produces clearly more of them than with the initial agent. 120 iterations: after 50 this seed's gain was +0.15 to
    +0.27 depending on float rounding (transformers 5.15 against 5.25), too near the bar; after 120 it is +0.30 / +0.29,
    and seeds 1-3 gain +0.27 to +0.64 (5.15)."""
    config = small_config(iterations=120, rollout_batch_size=16, max_new_tokens=4, kl_coef=0.0, learning_starts=256,
                          updates_per_rollout=16, checkpoint_every=120, hidden_sizes=(64, 64), initial_accept=None,
                          sac=SACConfig(batch_size=256, actor_lr=1e-3, critic_lr=1e-3, tau=0.05))
    trainer = make_trainer(tmp_path, config, prompts=64)
    prompts = word_prompts(32, seed=7)  # held out
    before = greedy_even_rate(trainer.model, trainer.tokenizer, trainer.agent, prompts)
    agent = trainer.train()
    after = greedy_even_rate(trainer.model, trainer.tokenizer, agent, prompts)
    assert after > before + 0.15, (before, after)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[:5], metrics[-5:]
    assert sum(m["reward"] for m in last) > sum(m["reward"] for m in first)
    assert {"reward", "kl_per_token", "alpha", "critic_loss", "actor_loss", "accept_rate"} <= set(metrics[-1])


# ---------------------------------------------------------------------------------------------- command line
def test_cli_train_runs_resumes_and_records_the_command(tmp_path, capsys):
    from mara_hf.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": p} for p in word_prompts(6)]))
    out = tmp_path / "run"
    args = ["train", "--prompts", str(prompts), "--reward", "py:test_train:even_token_rate", "--model", str(model_dir),
            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", "--learning-starts", "1",
            "--updates-per-rollout", "1", "--sac-batch-size", "4", "--hidden-sizes", "8", "8",
            "--checkpoint-every", "1", "--no-progress", "--device", "cpu", "--min-p", "0.2"]
    assert main(args + ["--iterations", "2"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    agent = MaraAgent.from_pretrained(out / "agent")
    assert agent.fallback == "last" and agent.base_model == str(model_dir) and agent.min_p == 0.2
    assert "mara-hf train --prompts" in agent.training_info and "even_token_rate" in agent.training_info
    assert main(args + ["--iterations", "3"]) == 0  # resumes from step 2
    assert [json.loads(l)["iteration"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert main(args + ["--iterations", "3", "--kl-coef", "0.5"]) == 2
    assert "other settings (kl_coef)" in capsys.readouterr().err


def test_cli_train_bad_input_is_one_line(tmp_path, capsys):
    from mara_hf.cli import main

    assert main(["train", "--prompts", str(tmp_path / "missing.json"), "--reward", "vader", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mara-hf train: error:") and "missing.json" in err and "\n" not in err
    assert main(["train", "--prompts", "x.json", "--reward", "nonsense", "--out", str(tmp_path / "run")]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["train", "--prompts", "x.json", "--reward", "vader", "--out", str(tmp_path / "run"),
                 "--time-limit", "0"]) == 2
    assert "--time-limit has to be positive (minutes)." in capsys.readouterr().err


def test_training_and_evaluation_do_not_import_each_other():
    """Both build on the data layer and the core: importing one (with everything its command loads) leaves the
    other unimported. Above them `mara_hf.distributed`, which neither imports, and on top the command layer
    (`mara_hf.commands`): training, evaluation and the distributed package (all its modules) never import it."""
    import subprocess
    import sys

    check = ("import sys, {modules}; "
             "assert not [m for m in sys.modules if m.startswith('{other}')], '{other} imported'")
    distributed = ("mara_hf.distributed, mara_hf.distributed.config, mara_hf.distributed.worker, "
                   "mara_hf.distributed.pool, mara_hf.distributed.training, mara_hf.distributed.evaluation")
    for modules, other in (("mara_hf.train, mara_hf.commands.train, mara_hf.models, mara_hf.rewards, mara_hf.data",
                            "mara_hf.evaluation"),
                           ("mara_hf.evaluation, mara_hf.models, mara_hf.rewards", "mara_hf.train"),
                           ("mara_hf.train, mara_hf.evaluation, mara_hf.models, mara_hf.rewards, mara_hf.data",
                            "mara_hf.distributed"),
                           ("mara_hf.train, mara_hf.evaluation, " + distributed, "mara_hf.commands")):
        run = subprocess.run([sys.executable, "-c", check.format(modules=modules, other=other)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


def test_an_agent_to_start_from_is_trained_for_this_base_model_with_its_own_layer_sizes(tmp_path):
    """`--init-agent`: the trained agent records the base model it is now trained for (not the one the agent to start
    from named), and a config asking for other layer sizes than the agent has is refused, not ignored."""
    start = MaraAgent(state_dim=32, hidden_sizes=(32, 16), base_model="some/other-model")
    trainer = Trainer(tiny_model(), word_tokenizer(), word_prompts(4), even_token_rate, tmp_path / "run",
                      small_config(), agent=start, base_model_name="tiny/llama", progress=False)
    assert trainer.agent.base_model == "tiny/llama"
    with pytest.raises(ValueError, match=r"has hidden layers \(32, 16\), but the training config asks for "
                                         r"\(1024, 256\) \(`hidden_sizes`, `--hidden-sizes`\)"):
        Trainer(tiny_model(), word_tokenizer(), word_prompts(4), even_token_rate, tmp_path / "other",
                small_config(hidden_sizes=(1024, 256)), agent=MaraAgent(state_dim=32, hidden_sizes=(32, 16)),
                progress=False)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, caplog):
    import logging

    make_trainer(tmp_path / "run", small_config(iterations=2)).train()
    again = make_trainer(tmp_path / "run", small_config(iterations=2))
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        again.train()
    assert again.iteration == 2
    assert any("already holds 2 rollouts (iterations: 2): nothing to train" in r.getMessage() for r in caplog.records)
