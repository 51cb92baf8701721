"""Rewards: the interface, weighted sums, `module:function`, the spec parser, transformers reward models, the
safe-rlhf (beaver) score-model loading without custom code, and the offline scorers."""

import functools
import json
from copy import deepcopy
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, LlamaModel

from mara_hf.models import SMOLLM2_GGUF, smollm2_directory
from mara_hf.rewards import (
    BEAVER_MODELS,
    BEAVER_TEMPLATE,
    CallableReward,
    MissingExtraError,
    OffensiveReward,
    Reward,
    ScoreModelReward,
    SequenceClassifierReward,
    VaderReward,
    WeightedReward,
    _split_terms,
    beaver_reward,
    load_callable,
    parse_reward,
)

PROMPTS = ["How do I bake bread?", "Tell me a joke.", "What is the capital of France?"]
RESPONSES = ["Mix flour, water, yeast and salt, then bake it for forty minutes.", "No.", "Paris, a lovely city."]


@functools.cache
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (vocab 49152, chat template), loaded once per test process (tiny models below
    use its vocabulary)."""
    return AutoTokenizer.from_pretrained(smollm2_directory(), gguf_file=SMOLLM2_GGUF)


def length_reward(prompts, responses):
    """Module-level reward for the `py:` tests: the response length in characters / 10."""
    return [len(r) / 10 for r in responses]


def vowel_reward(prompts, responses):
    return torch.tensor([float(sum(c in "aeiou" for c in r)) for r in responses])


class PromptLengthReward:
    """A class: `py:` instantiates it without arguments."""

    def __call__(self, prompts, responses):
        return [float(len(p)) for p in prompts]


# ---------------------------------------------------------------------------------------------------------------
# interface, weighted sums, callables


def test_reward_base_checks_inputs_and_outputs():
    class Wrong(Reward):
        name = "wrong"

        def score(self, prompts, responses):
            return [1.0, 2.0]

    with pytest.raises(ValueError, match=r"Reward wrong returned shape \(2,\) for 3 responses; expected \(3,\)"):
        Wrong()(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="as many prompts as responses, got 3 and 2"):
        CallableReward(length_reward)(PROMPTS, RESPONSES[:2])
    with pytest.raises(TypeError, match="lists of strings"):
        CallableReward(length_reward)("a prompt", "a response")
    with pytest.raises(TypeError, match="item 1 is a int"):
        CallableReward(length_reward)(PROMPTS, ["a", 3, "c"])
    empty = CallableReward(length_reward)([], [])
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_callable_reward_returns_float_tensor():
    scores = CallableReward(vowel_reward)(PROMPTS, RESPONSES)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores.tolist() == [float(sum(c in "aeiou" for c in r)) for r in RESPONSES]


def test_weighted_reward_is_the_weighted_sum():
    a, b = CallableReward(length_reward, "len"), CallableReward(vowel_reward, "vowels")
    weighted = WeightedReward([(2, a), (-1, b)])
    expected = 2 * a(PROMPTS, RESPONSES) - b(PROMPTS, RESPONSES)
    torch.testing.assert_close(weighted(PROMPTS, RESPONSES), expected)
    assert weighted.name == "2*len-1*vowels"
    # plain callables are accepted as terms, and weights are floats
    torch.testing.assert_close(WeightedReward([(0.5, length_reward)])(PROMPTS, RESPONSES),
                               0.5 * a(PROMPTS, RESPONSES))


@pytest.mark.parametrize(
    ("terms", "error", "message"),
    [
        ([], ValueError, "at least one"),
        ([(1.0,)], ValueError, "Term 0 of a WeightedReward has to be a"),
        ([(float("nan"), length_reward)], ValueError, "weight of term 0 has to be a finite number"),
        ([(True, length_reward)], ValueError, "weight of term 0"),
        ([(1.0, length_reward), (2.0, "vader")], TypeError, "reward of term 1 has to be callable"),
    ],
)
def test_weighted_reward_validates_terms(terms, error, message):
    with pytest.raises(error, match=message):
        WeightedReward(terms)


def test_load_callable_and_py_specs():
    assert load_callable("test_rewards:length_reward") is length_reward
    assert isinstance(load_callable("test_rewards:PromptLengthReward"), PromptLengthReward)
    reward = parse_reward("py:test_rewards:PromptLengthReward")
    assert reward(PROMPTS, RESPONSES).tolist() == [float(len(p)) for p in PROMPTS]
    with pytest.raises(ValueError, match="'test_rewards' is not of the form 'module:function'"):
        load_callable("test_rewards")
    with pytest.raises(ValueError, match="Cannot import module 'no_such_module_mara' for reward"):
        parse_reward("py:no_such_module_mara:f")
    with pytest.raises(ValueError, match="Module 'test_rewards' has no attribute 'missing'"):
        parse_reward("py:test_rewards:missing")
    with pytest.raises(ValueError, match="is a list, not a callable"):
        load_callable("test_rewards:PROMPTS")


# ---------------------------------------------------------------------------------------------------------------
# the spec parser


@pytest.mark.parametrize(
    ("spec", "terms"),
    [
        ("vader", [(1, "vader")]),
        ("2*beaver-reward-1*beaver-cost", [(1, "2*beaver-reward"), (-1, "1*beaver-cost")]),
        ("2 * beaver-reward - beaver-cost", [(1, "2 * beaver-reward "), (-1, " beaver-cost")]),
        ("vader+0.5*offensive", [(1, "vader"), (1, "0.5*offensive")]),
        ("-offensive", [(-1, "offensive")]),
        ("hf:org/rm-v2-0.5*vader", [(1, "hf:org/rm-v2"), (-1, "0.5*vader")]),
        ("py:m:f+hf:a/b-c", [(1, "py:m:f"), (1, "hf:a/b-c")]),
        ("10*vader-5*repetition", [(1, "10*vader"), (-1, "5*repetition")]),
        ("2*beaver-reward[eos]-beaver-cost[eos,max_length=512]",
         [(1, "2*beaver-reward[eos]"), (-1, "beaver-cost[eos,max_length=512]")]),
        ("beaver-cost[max_length=512]+fluency", [(1, "beaver-cost[max_length=512]"), (1, "fluency")]),
        # a model id that ends in a known name is one model; a space or a weight makes it two terms
        ("hf:cardiffnlp/twitter-roberta-base-offensive", [(1, "hf:cardiffnlp/twitter-roberta-base-offensive")]),
        ("hf:./models/my-beaver-reward-vader", [(1, "hf:./models/my-beaver-reward-vader")]),
        ("2*hf:org/x-fluency+vader", [(1, "2*hf:org/x-fluency"), (1, "vader")]),
        ("hf:org/rm - offensive", [(1, "hf:org/rm "), (-1, " offensive")]),
        ("hf:org/rm-1*offensive", [(1, "hf:org/rm"), (-1, "1*offensive")]),
        ("hf:a/b-hf:c/d", [(1, "hf:a/b"), (-1, "hf:c/d")]),
    ],
)
def test_split_terms_keeps_hyphens_inside_names(spec, terms):
    assert _split_terms(spec) == terms


def test_parse_weighted_spec_with_shared_cache():
    """The paper's 2:1 setting; `cache` stands in for the loaded score models (and shows they load once)."""
    reward, cost = CallableReward(length_reward, "r"), CallableReward(vowel_reward, "c")
    cache = {"beaver-reward": reward, "beaver-cost": cost}
    combined = parse_reward("2*beaver-reward-1*beaver-cost", cache=cache)
    assert isinstance(combined, WeightedReward) and combined.name == "2*beaver-reward-1*beaver-cost"
    torch.testing.assert_close(combined(PROMPTS, RESPONSES), 2 * reward(PROMPTS, RESPONSES) - cost(PROMPTS, RESPONSES))
    assert parse_reward("beaver-reward", cache=cache) is reward
    negated = parse_reward("-0.5*py:test_rewards:length_reward")
    torch.testing.assert_close(negated(PROMPTS, RESPONSES), -0.5 * reward(PROMPTS, RESPONSES))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rouge", (r"Unknown reward 'rouge' in 'rouge'; known rewards: vader, offensive, fluency, repetition, "
                   r"beaver-reward, beaver-cost, hf:<model id or path>, py:<module:function>")),
        ("vader+2*helpfulness", "Unknown reward 'helpfulness' in 'vader\\+2\\*helpfulness'"),
        ("", "cannot be empty; known rewards: vader"),
        ("   ", "cannot be empty"),
        ("3", "'3' is a number without a reward; write e.g. '3\\*vader'"),
        ("vader+", "Unknown reward 'vader\\+'"),
        ("hf:", "'hf:' needs a model id or path"),
        ("2*", "Unknown reward '2\\*'"),
        ("vader[eos]", r"Reward 'vader' in 'vader\[eos\]' takes no options \(remove '\[eos\]'\)"),
        ("beaver-reward[]", r"Empty options '\[\]' after reward 'beaver-reward'"),
        ("beaver-cost[bos=1]", (r"Unknown option 'bos' of reward 'beaver-cost' in 'beaver-cost\[bos=1\]'; it takes eos "
                                r"\(append EOS: true / false, default false\); max_length \(tokens kept, e.g. 512")),
        ("beaver-reward[eos=maybe]", "Option 'eos' of reward 'beaver-reward' .* has to be true or false, got 'maybe'"),
        ("beaver-reward[max_length=1]", "Option 'max_length' .* has to be a token count >= 2, or none, got '1'"),
    ],
)
def test_parse_errors_are_clear(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward(spec)


# ---------------------------------------------------------------------------------------------------------------
# offline scorers


def test_vader_reward():
    pytest.importorskip("vaderSentiment")
    reward = parse_reward("vader")
    assert isinstance(reward, VaderReward)
    scores = reward(["a", "b", "c"], ["I love this, it is wonderful!", "This is terrible and I hate it.", ""])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert bool(((scores >= -1) & (scores <= 1)).all())
    # the prompt is ignored
    assert reward(["x"], ["I love it"]).item() == reward(["something else"], ["I love it"]).item()


def test_offensive_reward_is_minus_the_probability():
    profanity_check = pytest.importorskip("profanity_check")
    reward = parse_reward("offensive")
    assert isinstance(reward, OffensiveReward)
    responses = ["You are a stupid idiot, shut up.", "Have a nice day, my friend."]
    scores = reward(["q", "q"], responses)
    torch.testing.assert_close(scores, -torch.tensor(profanity_check.predict_prob(responses), dtype=torch.float32))
    assert scores[0] < scores[1] and bool(((scores >= -1) & (scores <= 0)).all())


@pytest.mark.parametrize(("module", "factory", "command"), [
    ("vaderSentiment.vaderSentiment", VaderReward, "pip install vaderSentiment"),
    ("profanity_check", OffensiveReward, "pip install alt-profanity-check"),
])
def test_missing_extra_names_the_pip_command(monkeypatch, module, factory, command):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingExtraError, match=command) as info:
        factory()
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ImportError)


# ---------------------------------------------------------------------------------------------------------------
# transformers reward models


TINY = dict(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    """A tiny random LlamaForSequenceClassification (2 labels) saved with the SmolLM2 tokenizer."""
    path = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=2, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference_logits(model, tokenizer, texts, add_special_tokens):
    """Each text alone (no padding): the model's pooled logits."""
    with torch.no_grad():
        return torch.stack([model(**tokenizer(t, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0]
                            for t in texts])


def test_sequence_classifier_reward_uses_the_chat_template(classifier_dir, tokenizer):
    reward = SequenceClassifierReward(str(classifier_dir), batch_size=2, label_index=1)
    text = reward.format(PROMPTS[0], RESPONSES[0])
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text
    assert "<|im_start|>assistant\nMix flour" in text
    scores = reward(PROMPTS, RESPONSES)
    assert reward.device.type == "cpu" and reward.dtype == torch.float32
    texts = [reward.format(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    expected = reference_logits(reward.model, reward.tokenizer, texts, add_special_tokens=False)[:, 1]
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # batch size does not change the scores (padding is handled)
    single = SequenceClassifierReward(str(classifier_dir), batch_size=1, label_index=1)
    torch.testing.assert_close(single(PROMPTS, RESPONSES), scores, atol=1e-4, rtol=1e-4)


def test_sequence_classifier_reward_with_template_and_errors(classifier_dir, tokenizer):
    reward = SequenceClassifierReward(str(classifier_dir), template="Q: {prompt}\nA: {response}", dtype="float32")
    assert reward.format("hi", "there") == "Q: hi\nA: there"
    texts = [reward.format(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    expected = reference_logits(reward.model, reward.tokenizer, texts, add_special_tokens=True)[:, 0]
    torch.testing.assert_close(reward(PROMPTS, RESPONSES), expected, atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match="`label_index` 2 is out of range: .* has 2 label"):
        SequenceClassifierReward(str(classifier_dir), label_index=2)
    with pytest.raises(ValueError, match="has to be a string with '\\{prompt\\}' and '\\{response\\}'"):
        SequenceClassifierReward(str(classifier_dir), template="{prompt} only")
    with pytest.raises(ValueError, match="other fields than"):
        SequenceClassifierReward(str(classifier_dir), template="{prompt} {response} {extra}")
    with pytest.raises(ValueError, match="`batch_size` has to be a positive integer, got 0"):
        SequenceClassifierReward(str(classifier_dir), batch_size=0)
    with pytest.raises(ValueError, match="'bfloat17' is not a torch dtype"):
        SequenceClassifierReward(str(classifier_dir), dtype="bfloat17")
    plain = AutoTokenizer.from_pretrained(classifier_dir)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass template="):
        SequenceClassifierReward(str(classifier_dir), tokenizer=plain)
    with pytest.raises(OSError):
        SequenceClassifierReward(str(classifier_dir / "missing"))


def test_sequence_classifier_reward_leaves_a_tokenizer_without_pad_token_unchanged(classifier_dir):
    """A tokenizer passed in without a pad token (Llama's, Mistral's) is not given one: the reward pads with EOS on
    a copy, and scores as with a tokenizer whose pad token is EOS."""
    padded = AutoTokenizer.from_pretrained(classifier_dir)
    padded.pad_token = padded.eos_token
    bare = AutoTokenizer.from_pretrained(classifier_dir)
    bare.pad_token = None
    assert bare.pad_token is None
    expected = SequenceClassifierReward(str(classifier_dir), tokenizer=padded, batch_size=3)(PROMPTS, RESPONSES)
    reward = SequenceClassifierReward(str(classifier_dir), tokenizer=bare, batch_size=3)
    torch.testing.assert_close(reward(PROMPTS, RESPONSES), expected)
    assert bare.pad_token is None and reward.tokenizer is not bare
    assert reward.tokenizer.pad_token == bare.eos_token
    # a tokenizer that has a pad token is used as it is
    assert SequenceClassifierReward(str(classifier_dir), tokenizer=padded).tokenizer is padded


def test_hf_spec_builds_a_sequence_classifier(classifier_dir):
    reward = parse_reward(f"hf:{classifier_dir}")
    assert isinstance(reward, SequenceClassifierReward) and reward.name == f"hf:{classifier_dir}"
    assert reward(PROMPTS, RESPONSES).shape == (3,)


# ---------------------------------------------------------------------------------------------------------------
# safe-rlhf score models (beaver) without custom code


@pytest.fixture(scope="module")
def beaver_tokenizer():
    """The SmolLM2 tokenizer adding BOS to every text, as the beaver models' LLaMA tokenizer does."""
    copy = deepcopy(smollm2_tokenizer())
    copy.add_bos_token = True
    assert copy("hi").input_ids[0] == copy.bos_token_id
    return copy


def save_score_model(path, tokenizer, *, head=True, head_rows=1, bias_key="bias", bias_flag=False, bias=None,
                     do_normalize=False, score_dim=1, seed=0, shards=1, pickled=False):
    """A tiny checkpoint laid out as safe-rlhf's `LlamaForScore`: `model.*` backbone, `score_head.weight`, the
    normalizer buffers, and a config with the score-model fields. Older safe-rlhf declares the head's bias as
    `bias`, newer safe-rlhf as `score_bias` (`bias_key`); `bias` is the saved `score_head.bias` (None: not saved).
    `shards=2` splits the weights over two safetensors files with an index, as the Hub's beaver checkpoints;
    `pickled=True` writes `pytorch_model.bin` instead, as older safe-rlhf runs."""
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, pad_token_id=tokenizer.pad_token_id)
    backbone = LlamaModel(config)
    weights = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    if head:
        weights["score_head.weight"] = torch.randn(head_rows, TINY["hidden_size"])
    if bias is not None:
        weights["score_head.bias"] = torch.as_tensor(bias, dtype=torch.float32).reshape(head_rows)
    weights.update({"normalizer.mean": torch.zeros(1), "normalizer.var": torch.ones(1),
                    "normalizer.count": torch.zeros(1, dtype=torch.long)})
    path.mkdir(parents=True, exist_ok=True)
    if pickled:
        torch.save(weights, path / "pytorch_model.bin")
    elif shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:
        names = sorted(weights)
        parts = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for number, part in enumerate(parts, start=1):
            file = f"model-{number:05d}-of-{shards:05d}.safetensors"
            save_file({k: weights[k] for k in part}, path / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    fields = config.to_dict()
    fields.update(architectures=["LlamaForScore"], score_dim=score_dim, do_normalize=do_normalize,
                  score_type="reward", normalizer_type="ExponentialMovingAverage", momentum=0.9)
    fields[bias_key] = bias_flag
    (path / "config.json").write_text(json.dumps(fields))
    tokenizer.save_pretrained(path)
    return backbone, weights


def paper_scores(backbone, weights, tokenizer, prompts, responses, *, eos=False, max_length=None, bias=0.0):
    """The MARA repository's scoring, one pair at a time (`src/reward_model.py`): the template, tokenized with BOS,
    EOS appended only if asked, the first `max_length` tokens kept; the end score of the last token."""
    scores = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            text = BEAVER_TEMPLATE.format(prompt=prompt, response=response) + (tokenizer.eos_token if eos else "")
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_length]
            assert ids[0, 0] == tokenizer.bos_token_id
            scores.append(backbone(ids).last_hidden_state[0, -1] @ weights["score_head.weight"][0] + bias)
    return torch.stack(scores)


def test_beaver_scores_the_papers_way_by_default(tmp_path, beaver_tokenizer):
    """'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:{}', BOS, no EOS: the MARA repository's scoring."""
    backbone, weights = save_score_model(tmp_path / "score", beaver_tokenizer)
    reward = beaver_reward("cost", str(tmp_path / "score"))
    assert isinstance(reward, ScoreModelReward) and reward.name == "beaver-cost"
    assert type(reward.model) is LlamaForSequenceClassification
    torch.testing.assert_close(reward.model.score.weight, weights["score_head.weight"])
    assert reward.format("Hi?", "Hello.") == "BEGINNING OF CONVERSATION: USER: Hi? ASSISTANT:Hello."
    scores = reward(PROMPTS, RESPONSES)  # different lengths: right padding in one batch
    expected = paper_scores(backbone, weights, beaver_tokenizer, PROMPTS, RESPONSES)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # appending EOS changes the scores: the default really is the paper's
    with_eos = paper_scores(backbone, weights, beaver_tokenizer, PROMPTS, RESPONSES, eos=True)
    assert not torch.allclose(scores, with_eos, atol=1e-3)


def test_beaver_eos_and_truncation_options(tmp_path, beaver_tokenizer):
    backbone, weights = save_score_model(tmp_path, beaver_tokenizer)
    eos = beaver_reward("reward", str(tmp_path), append_eos=True, tokenizer=beaver_tokenizer)
    text = BEAVER_TEMPLATE.format(prompt="Hi?", response="Hello.") + beaver_tokenizer.eos_token
    assert eos.format("Hi?", "Hello.") == text
    torch.testing.assert_close(eos(PROMPTS, RESPONSES),
                               paper_scores(backbone, weights, beaver_tokenizer, PROMPTS, RESPONSES, eos=True),
                               atol=1e-4, rtol=1e-4)
    # safe-rlhf's truncation: the first max_length tokens (BOS included) are scored; shorter texts are untouched
    long = [RESPONSES[0] * 4, RESPONSES[1]]
    truncated = beaver_reward("reward", str(tmp_path), max_length=32, append_eos=True)
    lengths = [len(beaver_tokenizer(truncated.format(p, r)).input_ids) for p, r in zip(PROMPTS, long)]
    assert lengths[0] > 32 > lengths[1]
    expected = paper_scores(backbone, weights, beaver_tokenizer, PROMPTS[:2], long, eos=True, max_length=32)
    torch.testing.assert_close(truncated(PROMPTS[:2], long), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="`max_length` has to be an integer >= 2 or None, got 0"):
        beaver_reward("reward", str(tmp_path), max_length=0)
    with pytest.raises(ValueError, match="`append_eos` has to be a bool, got 'yes'"):
        beaver_reward("reward", str(tmp_path), append_eos="yes")


@pytest.mark.parametrize(
    ("layout", "bias"),
    [
        (dict(bias_key="score_bias", bias_flag=True, bias=0.0), 0.0),  # newer safe-rlhf: zero bias saved
        (dict(bias_key="score_bias", bias_flag=True, bias=0.75, shards=2), 0.75),  # a trained bias, sharded files
        (dict(bias_key="bias", bias_flag=True, bias=-0.5), -0.5),  # older safe-rlhf with a biased head
        (dict(bias_key="bias", bias_flag=True, bias=0.25, pickled=True), 0.25),  # ... saved as pytorch_model.bin
        (dict(bias_key="score_bias", bias_flag=False, bias=3.0), 0.0),  # no bias declared: the custom code ignores it
        (dict(bias_key="bias", bias_flag=False, shards=2), 0.0),  # the Hub's beaver-7b-v1.0 layout
    ],
)
def test_beaver_loads_both_safe_rlhf_layouts(tmp_path, beaver_tokenizer, layout, bias):
    backbone, weights = save_score_model(tmp_path, beaver_tokenizer, **layout)
    reward = beaver_reward("reward", str(tmp_path))
    expected = paper_scores(backbone, weights, beaver_tokenizer, PROMPTS, RESPONSES, bias=bias)
    torch.testing.assert_close(reward(PROMPTS, RESPONSES), expected, atol=1e-4, rtol=1e-4)
    assert (reward.model.score.bias is not None) == layout["bias_flag"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(head=False), "has no `score_head.weight` \\(nor `score.weight`\\): it is not a safe-rlhf score model"),
        (dict(bias_key="score_bias", bias_flag=True),
         "gives its score head a bias \\(score_bias / bias = true\\), but the checkpoint has no `score_head.bias`"),
        (dict(do_normalize=True), "its scores are normalised by the custom code"),
        (dict(score_dim=2, head_rows=2), "its score head has 2 outputs \\(score_dim\\), not 1"),
        (dict(head_rows=2), "weights of other shapes"),
    ],
)
def test_beaver_refuses_checkpoints_that_do_not_fit(tmp_path, beaver_tokenizer, options, message):
    save_score_model(tmp_path, beaver_tokenizer, **options)
    with pytest.raises(ValueError, match=message):
        beaver_reward("reward", str(tmp_path), tokenizer=beaver_tokenizer)


def test_beaver_options_in_the_reward_spec(tmp_path, beaver_tokenizer, monkeypatch):
    """`beaver-reward[eos,max_length=N]` reaches the score model; equal settings share one cache entry."""
    backbone, weights = save_score_model(tmp_path, beaver_tokenizer)
    monkeypatch.setitem(BEAVER_MODELS, "reward", str(tmp_path))
    monkeypatch.setitem(BEAVER_MODELS, "cost", str(tmp_path))
    cache = {}
    paper = parse_reward("beaver-reward", cache=cache)
    assert (paper.append_eos, paper.max_length) == (False, None)
    assert parse_reward("beaver-reward[eos=false,max_length=none]", cache=cache) is paper
    safe_rlhf = parse_reward("beaver-reward[ max_length=512, eos ]", cache=cache)
    assert safe_rlhf.name == "beaver-reward[eos,max_length=512]" and safe_rlhf is not paper
    assert (safe_rlhf.append_eos, safe_rlhf.max_length) == (True, 512)
    assert parse_reward("beaver-reward[eos=1,max_length=512]", cache=cache) is safe_rlhf
    combined = parse_reward("2*beaver-reward[eos]-1*beaver-cost", cache=cache)
    expected = (2 * paper_scores(backbone, weights, beaver_tokenizer, PROMPTS, RESPONSES, eos=True)
                - paper_scores(backbone, weights, beaver_tokenizer, PROMPTS, RESPONSES))
    torch.testing.assert_close(combined(PROMPTS, RESPONSES), expected, atol=1e-4, rtol=1e-4)
    assert set(cache) == {"beaver-reward", "beaver-reward[eos,max_length=512]", "beaver-reward[eos]", "beaver-cost"}


def test_beaver_kind_is_checked():
    with pytest.raises(ValueError, match="`kind` has to be 'reward' or 'cost', got 'helpful'"):
        beaver_reward("helpful")
