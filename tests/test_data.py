"""The data layer (`mara_hf.data`): prompt files, chat encoding, EOS ids and answer lengths, and the one rule that
marks the tokens where MARA did not take the base model's top-1 (used by `mara-hf generate --compare` and by
`mara-hf eval`'s `responses.jsonl`)."""

import copy
import doctest
import json

import pytest
import torch

import mara_hf.data
from mara_hf.data import answer_lengths, encode_chat_prompts, eos_token_ids, load_prompts, mark_changes
from test_rewards import smollm2_tokenizer

PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea.", "Say hello."]


def test_docstring_example_runs():
    result = doctest.testmod(mara_hf.data)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# prompt files


def test_load_prompts_json_and_jsonl(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"instruction": p, "category": "x"} for p in PROMPTS]))
    assert load_prompts(path) == PROMPTS
    assert load_prompts(str(path), limit=2) == PROMPTS[:2]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(f'{{"instruction": "{PROMPTS[0]}"}}\n\n{{"prompt": "{PROMPTS[1]}"}}\n')
    assert load_prompts(lines) == PROMPTS[:2]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "Prompt file '.*' does not exist"),
        ('[{"instruction": "a"},', ValueError, "Prompt file '.*' is not valid JSON \\(.*line 1, column"),
        ('[{"instruction": "a"}, {"input": "b"}]', ValueError,
         "Item 2 of prompt file '.*' has no 'instruction' \\(or 'prompt'\\) string field"),
        ('["a", 3]', ValueError, "Item 2 of prompt file '.*' is a int, not a prompt"),
        ("[]", ValueError, "holds no prompts"),
        ('{"instruction": "a"}\nnot json\n', ValueError, "neither a JSON list nor JSON Lines: line 2 is not valid"),
    ],
)
def test_load_prompts_errors(tmp_path, content, error, message):
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        load_prompts(path)


def test_load_prompts_lists_of_strings_text_csv_and_a_named_field(tmp_path):
    listed = tmp_path / "strings.json"
    listed.write_text(json.dumps(PROMPTS))
    assert load_prompts(listed) == PROMPTS
    text = tmp_path / "prompts.txt"
    text.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\r\n  \n{PROMPTS[2]}")
    assert load_prompts(text) == PROMPTS[:3]
    # AdvBench's layout (goal,target), with a quoted comma and a quoted line break; a spreadsheet's byte-order mark
    table = tmp_path / "harmful.csv"
    table.write_text('\ufeffgoal,target\nHow do I pick a lock?,Sure\n"Write a scam, please","Sure,\nhere"\n',
                     encoding="utf-8")
    assert load_prompts(table, field="goal") == ["How do I pick a lock?", "Write a scam, please"]
    assert load_prompts(table, limit=1, field="goal") == ["How do I pick a lock?"]
    tabs = tmp_path / "prompts.tsv"
    tabs.write_text("id\tprompt\n1\tWhy, though?\n")
    assert load_prompts(tabs) == ["Why, though?"]  # 'prompt', found without naming it
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps({"question": p, "instruction": "ignored"}) for p in PROMPTS))
    assert load_prompts(lines, field="question") == PROMPTS


@pytest.mark.parametrize(
    ("name", "content", "field", "message"),
    [
        ("harmful.csv", "goal,target\nx,y\n", None,
         "Item 1 of prompt file '.*harmful.csv' has no 'instruction' \\(or 'prompt'\\) string field \\(its fields: "
         "'goal', 'target'\\); name the field that holds the prompt \\(`--prompt-field NAME`"),
        ("harmful.csv", "goal,target\nx,y\n", "Goal", "has no 'Goal' string field \\(its fields: 'goal', 'target'\\)"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": null}\n', None, "Item 2 of .* has no 'instruction' \\(or 'prompt'\\)"),
        ("p.txt", "a\n", "goal", "is plain text \\(one prompt per line\\) and has no fields: drop the prompt field"),
        ("p.csv", 'goal\n"unclosed\n', "goal", "is not valid CSV: unexpected end of data"),
        ("p.csv", "goal\n", "goal", "holds no prompts"),
    ],
)
def test_load_prompts_field_errors_name_the_fields_and_the_fix(tmp_path, name, content, field, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(path, field=field)


def test_load_prompts_limit_is_checked(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"instruction": "a"}]')
    with pytest.raises(ValueError, match="The prompt limit has to be a positive integer, got 0"):
        load_prompts(path, limit=0)


# ---------------------------------------------------------------------------------------------------------------
# encoding, EOS, lengths


def test_chat_encoding_is_left_padded_and_equals_each_prompt_alone(tokenizer):
    encoded = encode_chat_prompts(tokenizer, PROMPTS, "cpu")
    for row, prompt in enumerate(PROMPTS):
        alone = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
        mask = encoded["attention_mask"][row].bool()
        assert encoded["input_ids"][row][mask].tolist() == list(alone)
        assert not mask[:mask.long().argmax()].any() and mask[-1]  # padding on the left only


def test_chat_encoding_pads_with_eos_where_the_tokenizer_has_no_pad_token_and_leaves_it_as_it_was(tokenizer):
    """Llama's and Mistral's tokenizers have no pad token (nor has SmolLM2's GGUF one as transformers 5.17 loads it):
    the prompts are padded with EOS, under the same mask, and the tokenizer keeps no pad token."""
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    assert bare.pad_token_id is None
    encoded = encode_chat_prompts(bare, PROMPTS, "cpu")
    expected = encode_chat_prompts(tokenizer, PROMPTS, "cpu")
    assert torch.equal(encoded["attention_mask"], expected["attention_mask"])
    mask = encoded["attention_mask"].bool()
    assert (~mask).any() and torch.equal(encoded["input_ids"][mask], expected["input_ids"][mask])
    assert (encoded["input_ids"][~mask] == bare.eos_token_id).all()
    assert bare.pad_token is None


def test_raw_prompts_without_a_chat_template_keep_special_tokens(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    encoded = encode_chat_prompts(tokenizer, PROMPTS[:1], "cpu")
    assert encoded["input_ids"][0].tolist() == tokenizer(PROMPTS[0])["input_ids"]


def test_eos_ids_join_the_generation_config_and_the_tokenizer(tokenizer):
    class Model:
        class generation_config:
            eos_token_id = [7, tokenizer.eos_token_id, 3]

    assert eos_token_ids(Model, tokenizer) == sorted({7, 3, tokenizer.eos_token_id})
    Model.generation_config.eos_token_id = None
    assert eos_token_ids(Model, tokenizer) == [tokenizer.eos_token_id]


def naive_lengths(rows, eos_ids):
    lengths = []
    for row in rows:
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


def test_answer_lengths_match_a_naive_scan():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (50, 9), generator=generator)
    for eos_ids in ([2], [2, 5], [], [9]):
        assert answer_lengths(tokens, eos_ids).tolist() == naive_lengths(tokens.tolist(), eos_ids)
    assert answer_lengths(tokens[:, :0], [2]).tolist() == [0] * 50


# ---------------------------------------------------------------------------------------------------------------
# marking what MARA changed


def test_changed_tokens_are_marked_with_both_tokens(tokenizer):
    words = [tokenizer.convert_tokens_to_ids(t) for t in ("Hello", "Ġworld", "Ġthere", "!")]
    eos = tokenizer.eos_token_id
    tokens = [words[0], words[1], words[3], eos]
    top1 = [words[0], words[2], words[3], words[3]]
    marked = mark_changes(tokenizer, tokens, top1)
    assert marked.text == "Hello⟦ there→ world⟧!⟦!→⟧"  # the taken EOS shows as nothing, a refused top-1 shows
    assert marked.changed == [{"position": 1, "top1": " there", "taken": " world"},
                              {"position": 3, "top1": "!", "taken": ""}]
    unchanged = mark_changes(tokenizer, tokens, tokens)
    assert unchanged.changed == [] and unchanged.text == tokenizer.decode(tokens, skip_special_tokens=True)
