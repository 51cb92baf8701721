"""Chunk schedules: explicit boundaries are checked, `"auto"` picks the cheapest boundaries for its cost model, and no
schedule changes a decision."""

import itertools

import pytest
import torch

from conftest import decisive_agent, random_prompts, tiny_model
from mara_hf import AutoSchedule, MaraLogitsProcessor, MaraStats, mara_generate
from mara_hf.schedule import compiled_menu, make_schedule, validate_schedule
from reference import naive_mara_greedy


@pytest.mark.parametrize("bad", [(), (0, 8), (8, 2), (1, 1), (1.0, 8), "1,8", None, (True, 8)])
def test_bad_boundaries_are_refused(bad):
    with pytest.raises(ValueError, match="`schedule` is \"auto\" or increasing chunk boundaries"):
        validate_schedule(bad)


def test_good_boundaries_pass():
    assert validate_schedule([1, 8]) == (1, 8) and validate_schedule((40,)) == (40,)


def all_schedules(width):
    for size in range(1, width + 1):
        for inner in itertools.combinations(range(1, width), size - 1):
            yield tuple(inner) + (width,)


@pytest.mark.parametrize("tokens_per_forward", [2, 16, 1000])
@pytest.mark.parametrize("batch_size", [1, 4, 32])
@pytest.mark.parametrize("narrows", [True, False])
@pytest.mark.parametrize("first_for_all", [True, False])
def test_plan_is_the_cheapest_schedule(tokens_per_forward, batch_size, narrows, first_for_all):
    width = 6
    schedule = AutoSchedule(tokens_per_forward, batch_size=batch_size, width=width, narrows=narrows,
                            first_for_all=first_for_all)
    counts = [3.0, 5.0, 1.0, 0.0, 2.0, 1.0, 4.0]  # search lengths 0 .. 6
    plan = schedule.plan(counts)
    best = min(schedule.expected_cost(s, counts) for s in all_schedules(width))
    assert schedule.expected_cost(plan, counts) == pytest.approx(best, abs=1e-9)


def test_plan_follows_the_device_and_the_agent():
    accepts = [0.0, 100.0] + [0.0] * 39  # every row takes its top-1
    rejects = [0.0] * 40 + [100.0]  # every row rejects all 40
    cpu = AutoSchedule(16, batch_size=1, width=40)
    gpu = AutoSchedule(1024, batch_size=1, width=40)
    assert cpu.plan(accepts)[0] == 1 and gpu.plan(accepts)[0] == 1  # the decode step alone
    assert gpu.plan(rejects) == (40,)  # one forward for everything when tokens are nearly free
    assert cpu.plan(rejects) == (40,)  # every candidate is needed anyway: one forward is the cheapest
    mixed = [0.0, 60.0, 10.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0] + [0.0] * 31 + [20.0]
    assert cpu.plan(mixed)[0] < 8 and gpu.plan(mixed) == (40,)


def test_compiled_schedules_choose_from_a_menu():
    schedule = make_schedule("auto", device="cpu", batch_size=4, width=40, compiled=True, static=True)
    assert schedule.menu == compiled_menu(40) == ((1, 8, 40), (1, 40), (8, 40), (40,))
    for counts in ([0.0, 100.0] + [0.0] * 39, [0.0] * 40 + [100.0]):
        assert schedule.plan(counts) in schedule.menu


class FakeStats:
    """Search-length counts as MaraStats keeps them: `[l][n]` (every asked decision with 40 candidates here)."""

    def __init__(self, histogram):
        self.search_count_histogram = [[0] * 41 for _ in range(41)]
        for length, count in enumerate(histogram):
            self.search_count_histogram[length][40 if length else 1] = count


def test_replans_as_the_decisions_grow_by_half_and_rarely_for_a_well_known_agent():
    """A re-plan (one host read) is due once the decisions since the last plan reach half of those it rested on:
    often while the counts are few, rarely once they are many (earlier calls' memory), at least every 64 steps."""
    for batch_size, memory, expected in ((16, None, [1, 2, 4, 7, 11]), (1, None, [4, 10]),
                                         (16, 2000.0, []), (1, 10_000.0, [])):
        remembered = None
        if memory is not None:
            remembered = [[0.0] * 41 for _ in range(41)]
            remembered[1][40] = memory
        schedule = AutoSchedule(1024, batch_size=batch_size, width=40, memory=remembered)
        if memory is None and batch_size == 16:
            assert schedule.current() == (40,)  # the prior: at batch 16 some row rejects at every step
        reads = []

        class Counting:  # every row of every step took its top-1
            @property
            def search_count_histogram(self):
                reads.append(schedule.steps)
                return FakeStats([0, batch_size * schedule.steps] + [0] * 39).search_count_histogram

        schedule.start(None)
        for _ in range(16):
            schedule.observe(Counting())
        assert reads == expected, (batch_size, memory)
        if batch_size == 16 and expected:
            assert schedule.current()[0] == 1  # every row took its top-1: the decode step alone first
    many = AutoSchedule(1024, batch_size=1, width=40, memory=[[0.0] * 41 for _ in range(40)] + [[0.0] * 40 + [1e6]])
    many.start(None)
    for _ in range(64):
        many.observe(FakeStats([0, 1] + [0] * 39))
    assert many.next_plan == 128  # read once, at step 64 (the longest spacing), not at every step


def test_auto_schedule_refuses_a_replan_growth_that_is_not_positive():
    with pytest.raises(ValueError, match="`replan_growth` has to be positive, but is 0"):
        AutoSchedule(1024, batch_size=1, width=40, replan_growth=0)


def test_auto_schedule_remembers_an_agent_on_a_model_across_calls():
    model, agent, other = torch.nn.Linear(1, 1), object.__new__(type("Agent", (), {})), torch.nn.Linear(1, 1)
    first = make_schedule("auto", device="cuda", batch_size=1, width=40, agent=agent, model=model)
    first.start(None)
    first.observe(FakeStats([0, 500] + [0] * 39))  # no re-plan due at step 1 of batch 1: nothing read yet
    assert first.read_at == 0
    first.finish(FakeStats([0, 500] + [0] * 39))  # the end of the call: read once, into the memory
    again = make_schedule("auto", device="cuda", batch_size=1, width=40, agent=agent, model=model)
    assert again.current()[0] == 1 and again.counts[1].sum() > 500
    fresh = make_schedule("auto", device="cuda", batch_size=1, width=40, agent=agent, model=other)
    assert torch.equal(fresh.counts, fresh.prior)  # another model: nothing learned yet


def test_make_schedule_refuses_unknown_names():
    with pytest.raises(ValueError, match="`schedule` is \"auto\" or a tuple of chunk boundaries, but is 'fast'"):
        make_schedule("fast", device="cpu", batch_size=1, width=40)


@pytest.mark.parametrize("schedule", ["auto", (40,), (8, 40), (1, 3), (2,)])
@pytest.mark.parametrize("fallback", ["first", "last"])
def test_no_schedule_changes_a_decision(schedule, fallback):
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    expected, _ = naive_mara_greedy(model, agent, prompt, 10, fallback=fallback, eos_token_id=2)
    stats = MaraStats(40)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    fused = model.generate(torch.tensor([prompt]), **kwargs, custom_generate=mara_generate, mara_agent=agent,
                           mara_schedule=schedule, mara_fallback=fallback, mara_stats=stats)
    processor = MaraLogitsProcessor(agent, model, schedule=schedule, fallback=fallback)
    dropin = model.generate(torch.tensor([prompt]), **kwargs, logits_processor=[processor])
    assert fused[0, len(prompt):].tolist()[: len(expected)] == expected
    assert torch.equal(fused, dropin)
    if schedule == (40,):
        assert stats.forwards == stats.tokens  # one-shot: one forward per step, whatever the agent does
