"""Tests for dapo_jax.model.tokenizer: parity with transformers on a Qwen2-style tokenizer, and sentencepiece.

No tokenizer can be downloaded here, so the module trains its own: a byte-level BPE with Qwen2's pipeline
(transformers' `Qwen2Tokenizer` builds the normalizer, split regex and byte-level stages from a trained vocabulary
and merges) carrying Qwen2.5's special tokens and real chat template, and a small sentencepiece model.
"""

import json
import os
import pathlib
import shutil

import jinja2.exceptions
import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import pre_tokenizers
from tokenizers import trainers
import transformers

from dapo_jax.model import tokenizer as tokenizer_lib

# The chat template of Qwen2.5 (tokenizer_config.json of Qwen/Qwen2.5-32B, shared by the other Qwen2.5 sizes and
# their -Instruct versions): a default system prompt, and tool-call support.
QWEN2_5_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Training text for the BPE: enough repeated English, code, numbers and non-ASCII text that merges form, so the
# parity checks exercise multi-byte tokens and not only the byte alphabet.
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's the dog's day; they're sure we'll see.",
    "Solve for x: 3x + 7 = 22, so x = 5. The answer is \\boxed{5}.",
    "def add(a, b):\n    return a + b\n\nprint(add(12345, 678))\n",
    "Héllo wörld, ça va? Ünïcödé façade naïve café. Привет, мир! 你好，世界。こんにちは",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2,718 -42",
    "Emoji 🙂🚀🎉 and 👩‍👩‍👧 family; tabs\tand  double  spaces.\n\n\nnewlines",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
]

# Strings the parity tests encode: ASCII, unicode, emoji, numbers, whitespace runs, newlines, special tokens.
PARITY_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's we'll they're I'M YOU'LL",
    "Héllo wörld, ça va? naïve café",
    "Привет, мир! 你好，世界。こんにちは 안녕하세요",
    "Emoji: 🙂🚀🎉 👩‍👩‍👧 🏳️‍🌈",
    "1234567890 3.14159 -42 1e-10 2,718,281",
    "a    b\t\tc   \t d     ",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "\n",
    "def f(x):\n    return x ** 2  # square\n",
    "e\u0301 composed by NFC: \u00e9",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_start <|im_end| |im_end|> <|unknown|>",
    "\\boxed{\\frac{1}{2}} $x^2 + y^2 = z^2$",
]

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 2+2?"}],
    "with_system": [
        {"role": "system", "content": "Please reason step by step."},
        {"role": "user", "content": "Solve x + 1 = 3."},
    ],
    "multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Añade 12345 + 678, por favor.\nThanks!"},
    ],
    "user_then_assistant": [
        {"role": "user", "content": "Say <|im_end|> literally."},
        {"role": "assistant", "content": "<|im_end|>"},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city, e.g. Zürich <north> & \"quoted\"",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Zürich", "unit": "C"}}}]},
    {"role": "tool", "content": "{\"temperature\": 21}"},
    {"role": "tool", "content": "{\"humidity\": 0.4}"},
    {"role": "assistant", "content": "21 °C & dry."},
]


def _train_qwen_like_tokenizer() -> transformers.PreTrainedTokenizerBase:
  """A Qwen2Tokenizer over a small trained BPE, with Qwen2.5-Instruct's special tokens and chat template."""
  # The BPE is trained with Qwen2's pre-tokenization so that its merges are the kind Qwen2 has; transformers'
  # Qwen2Tokenizer then rebuilds the whole pipeline (NFC, Qwen's split regex, byte level) from vocab and merges.
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.normalizer = tokenizers.normalizers.NFC()
  qwen_split = tokenizers.Regex(transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(qwen_split, behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  bpe.train_from_iterator(
      _TRAINING_TEXT * 20,
      trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                          show_progress=False))
  model = json.loads(bpe.to_str())["model"]
  # Qwen2Tokenizer adds its default <|endoftext|> first and then the extra tokens, which gives Qwen's order
  # (<|endoftext|> < <|im_start|> < <|im_end|>, all after the BPE vocabulary); eos and unk are then set as in
  # Qwen2.5-Instruct's tokenizer_config.json.
  hf_tokenizer = transformers.Qwen2Tokenizer(
      vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]],
      extra_special_tokens=["<|im_start|>", "<|im_end|>"])
  hf_tokenizer.eos_token = "<|im_end|>"
  hf_tokenizer.unk_token = None
  hf_tokenizer.chat_template = QWEN2_5_CHAT_TEMPLATE
  return hf_tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> pathlib.Path:
  """A transformers-5 checkpoint directory (chat_template.jinja) with Qwen2.5-Instruct's generation config."""
  directory = tmp_path_factory.mktemp("qwen_like")
  hf_tokenizer = _train_qwen_like_tokenizer()
  hf_tokenizer.save_pretrained(directory)
  endoftext, im_end = hf_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
  (directory / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}))
  return directory


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_dir):
  return transformers.AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
  return tokenizer_lib.load_tokenizer(qwen_dir)


def _copy_dir(source: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
  shutil.copytree(source, destination)
  return destination


def test_template_in_this_file_is_qwen2_5s():
  # A transcription slip in the template would make every parity check below compare the wrong thing; pin the
  # parts that identify Qwen2.5's template.
  assert QWEN2_5_CHAT_TEMPLATE.count("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") == 2
  assert "{{- tool_call.arguments | tojson }}" in QWEN2_5_CHAT_TEMPLATE
  assert len(QWEN2_5_CHAT_TEMPLATE) == 2507


def test_fixture_is_a_transformers_5_layout_with_qwen_special_tokens(qwen_dir, hf_tokenizer):
  assert sorted(os.listdir(qwen_dir)) == [
      "chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
  assert "chat_template" not in json.loads((qwen_dir / "tokenizer_config.json").read_text())
  assert hf_tokenizer.bos_token_id is None
  assert hf_tokenizer.convert_ids_to_tokens([len(hf_tokenizer) - 3, len(hf_tokenizer) - 1]) == [
      "<|endoftext|>", "<|im_end|>"]


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text):
  expected = hf_tokenizer.encode(text, add_special_tokens=False)
  assert tokenizer.encode(text) == expected
  # Qwen has no BOS and its post-processor adds nothing, so added special tokens change nothing.
  assert tokenizer.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text) == expected


def test_special_tokens_in_text_are_single_special_ids(tokenizer, hf_tokenizer):
  im_start, im_end = hf_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
  ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
  assert ids[0] == im_start and ids[-1] == im_end
  assert ids.count(im_start) == 1 and ids.count(im_end) == 1
  # Almost-special text is ordinary text.
  assert im_start not in tokenizer.encode("<|im_start")


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_decode_matches_transformers(tokenizer, hf_tokenizer, text, skip_special_tokens):
  ids = hf_tokenizer.encode(text, add_special_tokens=False)
  expected = hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
  assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected
  assert tokenizer.decode(np.asarray(ids, np.int32), skip_special_tokens=skip_special_tokens) == expected


def test_decode_round_trips_and_skips_special_tokens(tokenizer):
  text = "<|im_start|>assistant\nx = 12345 🙂<|im_end|><|endoftext|>"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nx = 12345 🙂"


def test_decode_drops_ids_beyond_the_vocabulary(tokenizer):
  # The model's embedding is padded past the tokenizer's vocabulary; a sampled padded id must not crash decode.
  ids = tokenizer.encode("abc")
  assert tokenizer.decode(ids + [tokenizer.vocab_size + 5]) == "abc"


def test_special_ids_match_transformers(tokenizer, hf_tokenizer):
  im_end, endoftext = hf_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
  assert tokenizer.eos_id == hf_tokenizer.eos_token_id == im_end
  assert tokenizer.pad_id == hf_tokenizer.pad_token_id == endoftext
  assert tokenizer.bos_id is None and hf_tokenizer.bos_token_id is None
  assert tokenizer.vocab_size == len(hf_tokenizer)
  assert tokenizer.token_to_id("<|im_start|>") == hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
  assert tokenizer.token_to_id("<|no such token|>") is None


def test_eos_ids_add_the_generation_config_list(tokenizer, hf_tokenizer):
  im_end, endoftext = hf_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
  assert tokenizer.eos_ids == (im_end, endoftext)


def test_eos_ids_from_a_single_generation_config_id(qwen_dir, hf_tokenizer, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "base")
  endoftext, im_end = hf_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
  # Qwen2.5 base models: eos <|endoftext|> in the tokenizer, one integer in generation_config.json.
  config = json.loads((directory / "tokenizer_config.json").read_text())
  config["eos_token"] = "<|endoftext|>"
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}))
  loaded = tokenizer_lib.load_tokenizer(directory)
  assert loaded.eos_id == endoftext
  assert loaded.eos_ids == (endoftext, im_end)


def test_eos_ids_without_generation_config(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "no_generation_config")
  (directory / "generation_config.json").unlink()
  loaded = tokenizer_lib.load_tokenizer(directory)
  assert loaded.eos_ids == (loaded.eos_id,)


def test_pad_falls_back_to_eos(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "no_pad")
  config = json.loads((directory / "tokenizer_config.json").read_text())
  config["pad_token"] = None
  # Older checkpoints write special tokens as AddedToken objects.
  config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  loaded = tokenizer_lib.load_tokenizer(directory)
  assert loaded.eos_id == loaded.token_to_id("<|im_end|>")
  assert loaded.pad_id == loaded.eos_id


def test_special_tokens_map_fills_what_tokenizer_config_leaves_out(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "special_tokens_map")
  config = json.loads((directory / "tokenizer_config.json").read_text())
  del config["eos_token"]
  config["unk_token"] = "<unk>"  # Not in the vocabulary: only a template variable, so loading still works.
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  (directory / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False}, "pad_token": "<|im_end|>"}))
  loaded = tokenizer_lib.load_tokenizer(directory)
  hf_loaded = transformers.AutoTokenizer.from_pretrained(directory)
  assert loaded.eos_id == hf_loaded.eos_token_id == loaded.token_to_id("<|endoftext|>")
  # tokenizer_config.json's pad_token wins over the map's.
  assert loaded.pad_id == loaded.token_to_id("<|endoftext|>")
  assert loaded.special_tokens["unk_token"] == "<unk>"


def _hf_chat(hf_tokenizer, messages, **kwargs):
  return hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, name, add_generation_prompt):
  messages = CONVERSATIONS[name]
  expected_text = _hf_chat(hf_tokenizer, messages, add_generation_prompt=add_generation_prompt)
  expected_ids = hf_tokenizer.apply_chat_template(
      messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
  assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_text
  assert tokenizer.apply_chat_template(
      messages, add_generation_prompt=add_generation_prompt, tokenize=True) == expected_ids


def test_chat_template_renders_qwen_prompt(tokenizer):
  # The text itself, so that a template both sides render wrongly in the same way would still be caught.
  assert tokenizer.apply_chat_template(CONVERSATIONS["user_only"]) == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_with_tools_matches_transformers(tokenizer, hf_tokenizer):
  # Tool schemas and arguments go through the overridden tojson (no HTML escaping, non-ASCII kept), and the
  # assistant's content=None is dropped before rendering.
  for add_generation_prompt in (True, False):
    expected = _hf_chat(hf_tokenizer, TOOL_CONVERSATION, tools=[WEATHER_TOOL],
                        add_generation_prompt=add_generation_prompt)
    rendered = tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL],
                                             add_generation_prompt=add_generation_prompt)
    assert rendered == expected
  assert 'e.g. Zürich <north> & \\"quoted\\""' in rendered
  assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}\n</tool_call>' in rendered


def test_template_environment_matches_transformers(tokenizer, hf_tokenizer):
  # Loop controls, namespace(), dict(), the special-token variables, extra variables and {% generation %}.
  template = (
      "{% set state = namespace(count=0) %}\n"
      "  {% for message in messages %}\n"
      "{% if loop.index > 2 %}{% break %}{% endif %}"
      "{% if message.role == 'system' %}{% continue %}{% endif %}"
      "{% set state.count = state.count + 1 %}"
      "{% generation %}[{{ message.role }}]{{ message.content | trim }}{{ eos_token }}{% endgeneration %}\n"
      "{% endfor %}"
      "{{ dict(a=1) | tojson }} {{ pad_token }} {{ bos_token is defined }} {{ greeting }} {{ state.count }}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  messages = CONVERSATIONS["multi_turn"]
  expected = _hf_chat(hf_tokenizer, messages, chat_template=template, add_generation_prompt=True, greeting="hi")
  assert tokenizer.apply_chat_template(messages, chat_template=template, greeting="hi") == expected
  # trim_blocks eats the newline after {% endgeneration %}.
  assert expected == "[user]Hi there 🙂<|im_end|>{\"a\": 1} <|endoftext|> False hi 1<|im_start|>assistant\n"


def test_messages_drop_none_values_as_in_transformers(tokenizer, hf_tokenizer):
  template = "{% for message in messages %}{{ message.name is defined }},{{ message.reasoning_content }};{% endfor %}"
  messages = [{"role": "user", "content": "x", "name": None},
              {"role": "assistant", "content": "y", "reasoning": "because"}]
  expected = _hf_chat(hf_tokenizer, messages, chat_template=template)
  assert tokenizer.apply_chat_template(messages, chat_template=template) == expected == "False,;False,because;"


def test_template_raise_exception(tokenizer, hf_tokenizer):
  template = ("{% if messages[0].role != 'user' %}"
              "{{ raise_exception('first message must be from the user') }}{% endif %}")
  messages = [{"role": "assistant", "content": "hi"}]
  with pytest.raises(jinja2.exceptions.TemplateError, match="first message must be from the user"):
    _hf_chat(hf_tokenizer, messages, chat_template=template)
  with pytest.raises(jinja2.exceptions.TemplateError, match="first message must be from the user"):
    tokenizer.apply_chat_template(messages, chat_template=template)


def test_template_sandbox_refuses_internals(tokenizer):
  with pytest.raises(jinja2.exceptions.SecurityError):
    tokenizer.apply_chat_template(
        CONVERSATIONS["user_only"], chat_template="{{ messages.__class__.__mro__ }}{{ ''.__class__.mro() }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    tokenizer.apply_chat_template(
        CONVERSATIONS["user_only"], chat_template="{% set ns = namespace(_private=1) %}")


def test_template_strftime_now(tokenizer):
  rendered = tokenizer.apply_chat_template(
      CONVERSATIONS["user_only"], chat_template="{{ strftime_now('%Y') }}")
  assert rendered.isdigit() and len(rendered) == 4


def test_empty_conversation_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="empty conversation"):
    tokenizer.apply_chat_template([])


def test_transformers_4_layout_template_in_tokenizer_config(hf_tokenizer, tmp_path):
  directory = tmp_path / "transformers_4"
  hf_tokenizer.save_pretrained(directory, save_jinja_files=False)
  assert not (directory / "chat_template.jinja").exists()
  assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"] == QWEN2_5_CHAT_TEMPLATE
  loaded = tokenizer_lib.load_tokenizer(directory)
  hf_loaded = transformers.AutoTokenizer.from_pretrained(directory)
  for messages in CONVERSATIONS.values():
    assert loaded.apply_chat_template(messages) == _hf_chat(hf_loaded, messages, add_generation_prompt=True)
  # No generation_config.json here: the tokenizer's eos is the only stop id.
  assert loaded.eos_ids == (hf_loaded.eos_token_id,)


def test_chat_template_jinja_wins_over_tokenizer_config(hf_tokenizer, tmp_path):
  directory = tmp_path / "both"
  hf_tokenizer.save_pretrained(directory)
  config = json.loads((directory / "tokenizer_config.json").read_text())
  config["chat_template"] = "{{ 'from the config' }}"
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  hf_loaded = transformers.AutoTokenizer.from_pretrained(directory)
  messages = CONVERSATIONS["user_only"]
  expected = _hf_chat(hf_loaded, messages, add_generation_prompt=True)
  assert "from the config" not in expected
  assert tokenizer_lib.load_tokenizer(directory).apply_chat_template(messages) == expected


def test_named_templates_in_tokenizer_config_use_default(hf_tokenizer, tmp_path):
  directory = tmp_path / "named"
  hf_tokenizer.save_pretrained(directory, save_jinja_files=False)
  config = json.loads((directory / "tokenizer_config.json").read_text())
  config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                             {"name": "default", "template": QWEN2_5_CHAT_TEMPLATE}]
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  assert tokenizer_lib.load_tokenizer(directory).chat_template == QWEN2_5_CHAT_TEMPLATE


def test_missing_chat_template_is_a_clear_error(hf_tokenizer, tmp_path):
  directory = tmp_path / "no_template"
  hf_tokenizer.save_pretrained(directory)
  (directory / "chat_template.jinja").unlink()
  loaded = tokenizer_lib.load_tokenizer(directory)
  assert loaded.chat_template is None
  with pytest.raises(ValueError, match="No chat_template was found") as error:
    loaded.apply_chat_template(CONVERSATIONS["user_only"])
  assert str(directory) in str(error.value)
  # A simple default, when asked for by name, renders as transformers renders it.
  messages = CONVERSATIONS["multi_turn"]
  expected = _hf_chat(hf_tokenizer, messages, chat_template=tokenizer_lib.CHATML_CHAT_TEMPLATE,
                      add_generation_prompt=True)
  assert loaded.apply_chat_template(messages, chat_template=tokenizer_lib.CHATML_CHAT_TEMPLATE) == expected
  assert expected.endswith("<|im_start|>assistant\n")


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "truncating")
  serialized = json.loads((directory / "tokenizer.json").read_text())
  serialized["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
  serialized["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
  (directory / "tokenizer.json").write_text(json.dumps(serialized))
  text = PARITY_TEXTS[2]
  expected = transformers.AutoTokenizer.from_pretrained(directory).encode(text, add_special_tokens=False)
  assert 3 < len(expected) < 64
  assert tokenizer_lib.load_tokenizer(directory).encode(text) == expected


def test_load_from_the_tokenizer_json_path(qwen_dir, tokenizer):
  loaded = tokenizer_lib.load_tokenizer(qwen_dir / "tokenizer.json")
  # The companion files beside the file are read too.
  assert loaded.eos_ids == tokenizer.eos_ids
  assert loaded.chat_template == QWEN2_5_CHAT_TEMPLATE
  assert loaded.encode(PARITY_TEXTS[5]) == tokenizer.encode(PARITY_TEXTS[5])


def test_save_round_trip(tokenizer, hf_tokenizer, tmp_path):
  directory = tmp_path / "saved" / "tokenizer"
  tokenizer.save(directory)
  assert sorted(os.listdir(directory)) == [
      "chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
  reloaded = tokenizer_lib.load_tokenizer(directory)
  assert (reloaded.eos_ids, reloaded.pad_id, reloaded.bos_id, reloaded.vocab_size) == (
      tokenizer.eos_ids, tokenizer.pad_id, tokenizer.bos_id, tokenizer.vocab_size)
  assert reloaded.chat_template == tokenizer.chat_template
  # transformers loads our copy as it loaded the original.
  hf_reloaded = transformers.AutoTokenizer.from_pretrained(directory)
  for text in PARITY_TEXTS:
    assert reloaded.encode(text) == tokenizer.encode(text) == hf_reloaded.encode(text, add_special_tokens=False)
  messages = CONVERSATIONS["multi_turn"]
  assert reloaded.apply_chat_template(messages) == _hf_chat(hf_reloaded, messages, add_generation_prompt=True)


def test_missing_path_is_an_error(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="does not exist") as error:
    tokenizer_lib.load_tokenizer(missing)
  assert str(missing) in str(error.value)


def test_directory_without_a_tokenizer_is_an_error(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="holds no tokenizer") as error:
    tokenizer_lib.load_tokenizer(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message and "tokenizer.json" in message and "config.json" in message


def test_corrupt_tokenizer_json_is_an_error(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "corrupt")
  (directory / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="not a valid tokenizer.json") as error:
    tokenizer_lib.load_tokenizer(directory)
  assert str(directory / "tokenizer.json") in str(error.value)
  (directory / "tokenizer.json").write_bytes(b"\xff\xfe\x00binary")
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="not a valid tokenizer.json"):
    tokenizer_lib.load_tokenizer(directory)


def test_corrupt_tokenizer_config_is_an_error(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "bad_config")
  (directory / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="not valid JSON") as error:
    tokenizer_lib.load_tokenizer(directory)
  assert str(directory / "tokenizer_config.json") in str(error.value)


def test_eos_token_outside_the_vocabulary_is_an_error(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "bad_eos")
  config = json.loads((directory / "tokenizer_config.json").read_text())
  config["eos_token"] = "</s>"
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="eos_token '</s>' is not a token"):
    tokenizer_lib.load_tokenizer(directory)


def test_bad_generation_config_eos_is_an_error(qwen_dir, tmp_path):
  directory = _copy_dir(qwen_dir, tmp_path / "bad_generation_config")
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="generation_config.json: eos_token_id"):
    tokenizer_lib.load_tokenizer(directory)
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**7]}))
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="outside the tokenizer's vocabulary"):
    tokenizer_lib.load_tokenizer(directory)


def test_unknown_tokenizer_file_kind_is_an_error(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("a\nb\n")
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="cannot tell the tokenizer kind"):
    tokenizer_lib.load_tokenizer(path)


# Sentencepiece.

_SENTENCEPIECE_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "what is 12 + 30? the answer is 42.",
    "  indented line\n\nafter a blank line",
    "héllo wörld, ça va?",
]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> pathlib.Path:
  """A small sentencepiece model with Qwen-style chat markers and an <|endoftext|> eos, trained on the fly."""
  directory = tmp_path_factory.mktemp("sentencepiece")
  corpus = directory / "corpus.txt"
  corpus.write_text("\n".join(f"{line} {index}" for index in range(200) for line in _SENTENCEPIECE_TEXT))
  model_prefix = directory / "demo"
  # Identity normalisation, kept whitespace and byte fallback make the model lossless, so text round-trips.
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(model_prefix), vocab_size=320, hard_vocab_limit=False,
      model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=3, eos_piece="<|endoftext|>",
      user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
  return pathlib.Path(f"{model_prefix}.model")


@pytest.fixture(scope="module")
def processor(sentencepiece_model):
  return sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))


_SENTENCEPIECE_ROUND_TRIP = [
    "the quick brown fox",
    "what is 12 + 30? the answer is 42.",
    "  two leading spaces\n\nand a blank line\n",
    "héllo wörld 🙂 新しい",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.mark.parametrize("text", _SENTENCEPIECE_ROUND_TRIP)
def test_sentencepiece_round_trip_and_parity(sentencepiece_model, processor, text):
  loaded = tokenizer_lib.load_tokenizer(sentencepiece_model)
  ids = loaded.encode(text)
  assert ids == processor.encode(text)
  assert loaded.decode(ids) == text


def test_sentencepiece_special_ids(sentencepiece_model, processor):
  loaded = tokenizer_lib.load_tokenizer(sentencepiece_model)
  assert loaded.vocab_size == processor.get_piece_size()
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 3)
  assert loaded.eos_ids == (2,)
  assert loaded.special_tokens == {
      "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<pad>"}
  assert loaded.encode("the fox", add_special_tokens=True) == [1] + processor.encode("the fox")


def test_sentencepiece_pad_falls_back_to_eos(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(_SENTENCEPIECE_TEXT * 50))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "no_pad"), vocab_size=60, hard_vocab_limit=False,
      pad_id=-1, minloglevel=2)
  loaded = tokenizer_lib.load_tokenizer(tmp_path)
  assert loaded.pad_id == loaded.eos_id == 2
  assert loaded.bos_id == 1


def test_sentencepiece_special_tokens_in_text(sentencepiece_model, processor):
  loaded = tokenizer_lib.load_tokenizer(sentencepiece_model)
  text = "<s>the answer<|endoftext|> fox<pad>"
  ids = loaded.encode(text)
  # sentencepiece alone spells control pieces out as ordinary text; we match them, as transformers does.
  assert 2 not in processor.encode(text)
  assert ids.count(1) == ids.count(2) == ids.count(3) == 1
  assert ids.index(1) < ids.index(2) < ids.index(3) == len(ids) - 1
  assert loaded.decode(ids) == text
  assert loaded.decode(ids, skip_special_tokens=True) == "the answer fox"
  # Chat markers trained as user-defined symbols stay single pieces.
  assert loaded.encode("<|im_start|>")[-1] == processor.piece_to_id("<|im_start|>")


def test_sentencepiece_decode_edge_cases(sentencepiece_model):
  loaded = tokenizer_lib.load_tokenizer(sentencepiece_model)
  assert loaded.decode([2]) == "<|endoftext|>"
  assert loaded.decode([2], skip_special_tokens=True) == ""
  assert loaded.decode(loaded.encode("fox") + [loaded.vocab_size + 1]) == "fox"


def test_sentencepiece_directory_with_config_and_save(sentencepiece_model, tmp_path):
  directory = tmp_path / "sp_checkpoint"
  directory.mkdir()
  shutil.copy(sentencepiece_model, directory / "anything.model")
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|im_end|>", "bos_token": None, "chat_template": tokenizer_lib.CHATML_CHAT_TEMPLATE,
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
  loaded = tokenizer_lib.load_tokenizer(directory)
  im_start, im_end = loaded.token_to_id("<|im_start|>"), loaded.token_to_id("<|im_end|>")
  # The config wins over the model's own pieces; what it leaves out still comes from the model.
  assert (loaded.eos_id, loaded.bos_id, loaded.pad_id) == (im_end, None, 3)
  messages = [{"role": "user", "content": "what is 12 + 30?"}]
  prompt = loaded.apply_chat_template(messages)
  assert prompt == "<|im_start|>user\nwhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
  ids = loaded.apply_chat_template(messages, tokenize=True)
  assert ids.count(im_start) == 2 and ids.count(im_end) == 1 and loaded.decode(ids) == prompt
  # Tokens the config names as special are skipped on decode.
  assert loaded.decode(ids, skip_special_tokens=True) == "user\nwhat is 12 + 30?\nassistant\n"
  # No bos: add_special_tokens adds nothing.
  assert loaded.encode("fox", add_special_tokens=True) == loaded.encode("fox")

  saved = tmp_path / "saved"
  loaded.save(saved)
  assert sorted(os.listdir(saved)) == ["tokenizer.model", "tokenizer_config.json"]
  reloaded = tokenizer_lib.load_tokenizer(saved)
  assert reloaded.apply_chat_template(messages, tokenize=True) == ids
  assert (reloaded.eos_ids, reloaded.bos_id, reloaded.pad_id) == (loaded.eos_ids, None, 3)


def test_several_sentencepiece_models_need_a_file_path(sentencepiece_model, tmp_path):
  for name in ("a.model", "b.model"):
    shutil.copy(sentencepiece_model, tmp_path / name)
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match="several sentencepiece models"):
    tokenizer_lib.load_tokenizer(tmp_path)
  assert tokenizer_lib.load_tokenizer(tmp_path / "b.model").vocab_size > 0


def test_corrupt_sentencepiece_model_is_an_error(tmp_path):
  for name, contents in (("garbage.model", b"\x08\x96\x01 this is not a model proto"), ("empty.model", b"")):
    path = tmp_path / name
    path.write_bytes(contents)
    with pytest.raises(tokenizer_lib.TokenizerLoadError, match="not a valid sentencepiece model") as error:
      tokenizer_lib.load_tokenizer(path)
    assert str(path) in str(error.value)
