"""`deployed_share`: a share of the rollouts' episodes decide as the agent will at inference (accept where
p(accept) > the probe's threshold) instead of sampling it. Those episodes decode exactly as `mara_generate` does;
the sampled ones are the episodes a run without the option plays; rows are drawn per row, whatever the batch split;
the option is validated, reaches the rollouts and is kept on resume together with the threshold it decides by."""

import json

import pytest
import torch

from conftest import decisive_agent, left_padded, random_prompts, tiny_model
from mara_hf import mara_generate
from mara_hf.train import TrainConfig, rollout
from mara_hf.train.rollout import row_generators
from test_train import make_trainer, small_config

THRESHOLD = 0.3


def episodes(model, agent, prompts, rows, share, **kwargs):
    ids, mask = left_padded(prompts)
    return rollout(model, agent, ids, mask, max_new_tokens=6, eos_token_ids=[2], pad_token_id=0,
                   generator=row_generators(0, 3, rows), fallback="first", deployed_share=share,
                   deployed_threshold=THRESHOLD, **kwargs)


def inference(model, agent, prompts):
    """The tokens `mara_generate` decodes at the deployed threshold, one unpadded prompt at a time."""
    answers = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                             pad_token_id=0, custom_generate=mara_generate, mara_agent=agent,
                             mara_accept_threshold=THRESHOLD, mara_fallback="first")
        answers.append(out[0, len(prompt):].tolist())
    return answers


def answers(out):
    return [out.tokens[row, : out.lengths[row]].tolist() for row in range(out.tokens.shape[0])]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_deployed_episodes_decode_as_inference_does(arch):
    model = tiny_model(arch)
    agent = decisive_agent(32, seed=3, sharpness=3.0)  # p(accept) spread over (0, 1): sampling differs from it
    prompts = random_prompts(3, seed=2)
    out = episodes(model, agent, prompts, range(3), share=1.0)
    assert out.deployed.all() and out.totals()["deployed_rows"] == 3.0
    assert answers(out) == [a[: len(b)] for a, b in zip(inference(model, agent, prompts), answers(out))]
    # every decision is the threshold's: accept exactly where p(accept) > 0.3
    assert torch.equal(out.actions.bool(), agent.accept_probability(out.states) > THRESHOLD)
    sampled = episodes(model, agent, prompts, range(3), share=0.0)
    assert not torch.equal(sampled.actions.bool()[: len(out.actions)],
                           agent.accept_probability(sampled.states)[: len(out.actions)] > THRESHOLD)


def test_a_share_mixes_deployed_and_sampled_rows_drawn_per_row():
    model, agent = tiny_model(), decisive_agent(32, seed=3, sharpness=3.0)
    prompts = random_prompts(8, seed=4)
    mixed = episodes(model, agent, prompts, range(8), share=0.5)
    deployed = mixed.deployed.tolist()
    assert 0 < sum(deployed) < 8
    sampled = episodes(model, agent, prompts, range(8), share=0.0)  # the episodes of a run without the option
    thresholded = inference(model, agent, prompts)
    for row in range(8):
        expected = thresholded[row] if deployed[row] else answers(sampled)[row]
        assert answers(mixed)[row] == expected[: len(answers(mixed)[row])], row
    # rows 5-7 rolled out alone (a shard on another worker) draw the same and play the same episodes
    shard = episodes(model, agent, prompts[5:], [5, 6, 7], share=0.5)
    assert shard.deployed.tolist() == deployed[5:] and answers(shard) == answers(mixed)[5:]


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5"])
def test_deployed_share_is_validated(value):
    with pytest.raises(ValueError, match=f"`deployed_share` has to be a number in \\[0, 1\\], but is {value!r}"):
        TrainConfig(deployed_share=value)


def test_the_trainer_rolls_out_deployed_episodes_and_resumes_only_at_their_threshold(tmp_path):
    config = small_config(iterations=2, deployed_share=1.0, probe_threshold=THRESHOLD, fallback="first")
    make_trainer(tmp_path, config).train()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["deployed_rows"] for line in logged] == [4.0, 4.0]
    with pytest.raises(ValueError, match=r"other settings \(probe_threshold\)"):
        make_trainer(tmp_path, small_config(iterations=4, deployed_share=1.0, probe_threshold=0.4,
                                            fallback="first")).train()
    # without deployed episodes the probe's threshold changes nothing learned: a resumed run may change it
    make_trainer(tmp_path / "sampled", small_config(iterations=2, probe_threshold=THRESHOLD)).train()
    make_trainer(tmp_path / "sampled", small_config(iterations=4, probe_threshold=0.4)).train()
