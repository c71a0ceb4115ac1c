"""Tokenizers behind one small interface: Hugging Face `tokenizer.json` and sentencepiece `.model` files.

`load_tokenizer(path)` takes a checkpoint directory (or the path of the tokenizer file itself) and returns a
`Tokenizer` whose `encode`, `decode` and `apply_chat_template` give what transformers gives for the same files:

- `tokenizer.json` (Qwen2.5's byte-level BPE, or any other `tokenizers` serialization) runs on the `tokenizers`
  library, so special tokens written in the text (`<|im_start|>`) are matched as special tokens and the ids agree
  with transformers' fast tokenizer.
- a sentencepiece `.model` (for models trained with sentencepiece, and for the small CPU demo) runs on
  `sentencepiece`; its control pieces (`<s>`, `</s>`, ...) written in the text are matched too, as transformers
  matches special tokens in text.

Beside the tokenizer file the loader reads the companion files a Hugging Face checkpoint keeps:
`tokenizer_config.json` (named special tokens, and the chat template in transformers 4's layout),
`special_tokens_map.json` (older checkpoints' special tokens), `chat_template.jinja` (transformers 5's layout) and
`generation_config.json` (its `eos_token_id`, one id or a list, adds stop ids: Qwen2.5-Instruct stops on both
`<|im_end|>` and `<|endoftext|>`). `Tokenizer.save(directory)` writes all of them back, byte for byte, so a
checkpoint of ours keeps its tokenizer beside it.

Paths go through `etils.epath`, so checkpoints on GCS (`gs://...`) load and save like local ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import functools
import json
import os
from typing import Any

from etils import epath
import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2
import tokenizers

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Files read beside the tokenizer file and written back verbatim by `Tokenizer.save`.
COMPANION_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG, CHAT_TEMPLATE_FILE)

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# A plain ChatML template (transformers' old class default), for tokenizers that ship none. It is only used when
# asked for by name: `tokenizer.apply_chat_template(messages, chat_template=CHATML_CHAT_TEMPLATE)`.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Names a message's reasoning may be passed under; transformers 5 copies it to `reasoning_content` and `thinking`,
# the names chat templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerLoadError(ValueError):
  """A tokenizer file or one of its companion files is missing, unreadable or malformed."""


class Tokenizer:
  """Text <-> token ids, stop ids and chat formatting for one model.

  Build it with `load_tokenizer`. Attributes:
    source: the directory (or file) it was loaded from, for error messages.
    special_tokens: the named special tokens (`eos_token`, `pad_token`, ...) that are set, as strings; the chat
      template sees them as variables.
    chat_template: the Jinja chat template, or None when the checkpoint has none.
  """

  def __init__(
      self,
      backend: _TokenizersBackend | _SentencePieceBackend,
      *,
      source: str,
      special_tokens: Mapping[str, str],
      chat_template: str | None,
      generation_eos_ids: Sequence[int],
      companion_files: Mapping[str, bytes],
      add_bos_token: bool,
      add_eos_token: bool,
      missing_template_note: str = "",
  ):
    self._backend = backend
    self.source = source
    self.special_tokens = dict(special_tokens)
    self.chat_template = chat_template
    self._companion_files = dict(companion_files)
    self._add_bos_token = add_bos_token
    self._add_eos_token = add_eos_token
    self._missing_template_note = missing_template_note

    # Only the ids the rest of the code uses are resolved (and must exist); unk/sep/cls/mask stay strings for the
    # chat template, so a config naming one the vocabulary lacks still loads.
    token_ids = {name: self._id_of_named_token(name)
                 for name in ("bos_token", "eos_token", "pad_token") if name in self.special_tokens}
    self._bos_id = token_ids.get("bos_token")
    self._pad_id = token_ids.get("pad_token")
    for token_id in generation_eos_ids:
      if not 0 <= token_id < self.vocab_size:
        raise TokenizerLoadError(
            f"{_join(source, GENERATION_CONFIG)}: eos_token_id {token_id} is outside the tokenizer's vocabulary "
            f"of {self.vocab_size} tokens")
    # The tokenizer's own eos comes first: it is what a chat template appends and what `eos_id` names. The
    # generation config's ids follow, in their order, so that sampling stops on every one of them.
    eos_ids = [token_ids["eos_token"]] if "eos_token" in token_ids else []
    eos_ids += [token_id for token_id in generation_eos_ids if token_id not in eos_ids]
    self._eos_ids = tuple(eos_ids)

  def _id_of_named_token(self, name: str) -> int:
    token = self.special_tokens[name]
    token_id = self._backend.token_to_id(token)
    if token_id is None:
      raise TokenizerLoadError(
          f"{_join(self.source, TOKENIZER_CONFIG)} (or {SPECIAL_TOKENS_MAP}): {name} {token!r} is not a token of "
          f"the tokenizer ({self._backend.file_name}); expected a token of its vocabulary or added tokens")
    return token_id

  @property
  def vocab_size(self) -> int:
    """The tokenizer's own number of ids, added tokens included (the model's embedding may be padded larger)."""
    return self._backend.vocab_size

  @property
  def eos_id(self) -> int | None:
    """The tokenizer's end-of-sequence id (its `eos_token`, else the generation config's first), or None."""
    return self._eos_ids[0] if self._eos_ids else None

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a response: `eos_id`, then the generation config's `eos_token_id`s."""
    return self._eos_ids

  @property
  def pad_id(self) -> int | None:
    """The padding id: the tokenizer's `pad_token`, else `eos_id`."""
    return self._pad_id if self._pad_id is not None else self.eos_id

  @property
  def bos_id(self) -> int | None:
    """The beginning-of-sequence id, or None when the tokenizer has none (Qwen has none)."""
    return self._bos_id

  def token_to_id(self, token: str) -> int | None:
    """The id of one token string (`"<|im_end|>"`), or None when the vocabulary lacks it."""
    return self._backend.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in it (`<|im_start|>`) become their special ids.

    Args:
      text: the text to tokenize.
      add_special_tokens: also add what the tokenizer adds around a sequence, as transformers does: the
        `tokenizer.json` post-processor for Hugging Face tokenizers (Qwen's adds nothing), `bos_id` in front for
        sentencepiece (unless tokenizer_config.json sets `add_bos_token` false) and `eos_id` at the end when it
        sets `add_eos_token`.
    """
    if self._backend.applies_post_processor:
      return self._backend.encode(text, add_special_tokens=add_special_tokens)
    ids = self._backend.encode(text, add_special_tokens=False)
    if add_special_tokens:
      if self._add_bos_token and self.bos_id is not None:
        ids = [self.bos_id] + ids
      if self._add_eos_token and self.eos_id is not None:
        ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    """The text of `ids`. Ids outside the vocabulary (the padded rows of a model's embedding) decode to nothing."""
    ids = [int(token_id) for token_id in np.asarray(ids).reshape(-1)]
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = True,
      tokenize: bool = False,
      *,
      chat_template: str | None = None,
      tools: Sequence[Mapping[str, Any]] | None = None,
      documents: Sequence[Mapping[str, Any]] | None = None,
      **template_variables: Any,
  ) -> str | list[int]:
    """Renders a conversation with the chat template, as transformers' `apply_chat_template` does.

    Args:
      messages: the conversation, dicts with "role" and "content" (and whatever else the template reads, such as
        "tool_calls"). Keys whose value is None are dropped first, as transformers does.
      add_generation_prompt: end with the header that opens the assistant's turn.
      tokenize: return the token ids of the rendered text (encoded without added special tokens) instead of it.
      chat_template: a template to use instead of the tokenizer's own, e.g. `CHATML_CHAT_TEMPLATE` for a
        tokenizer that has none.
      tools: JSON schemas of the tools the model may call, for templates that support tools.
      documents: documents for retrieval-augmented templates.
      **template_variables: further variables for the template; they override the special tokens of the same
        name.

    Returns:
      The rendered text, or its token ids when `tokenize` is set.

    Raises:
      ValueError: the tokenizer has no chat template and none was passed, or `messages` is empty.
      jinja2.exceptions.TemplateError: the template rejected the conversation (`raise_exception`).
    """
    if chat_template is None:
      chat_template = self.chat_template
    if chat_template is None:
      raise ValueError(
          f"No chat_template was found for the tokenizer in {self.source} (looked for {CHAT_TEMPLATE_FILE} and the "
          f"'chat_template' key of {TOKENIZER_CONFIG}){self._missing_template_note}. Pass one explicitly, e.g. "
          "chat_template=CHATML_CHAT_TEMPLATE from dapo_jax.model.tokenizer for plain ChatML.")
    rendered = render_chat_template(
        chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
        **{**self.special_tokens, **template_variables})
    return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

  def save(self, directory: str | os.PathLike[str]) -> None:
    """Writes the tokenizer file and its companion files into `directory` (created if missing).

    The files are written as they were read, so transformers and `load_tokenizer` load the copy as they loaded
    the original. The tokenizer file takes its standard name (`tokenizer.json` or `tokenizer.model`) so that
    loading the directory finds it.
    """
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / self._backend.file_name).write_bytes(self._backend.serialized)
    for name, contents in self._companion_files.items():
      (directory / name).write_bytes(contents)

  def __repr__(self) -> str:
    return (f"Tokenizer(source={self.source!r}, backend={self._backend.file_name}, vocab_size={self.vocab_size}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, bos_id={self.bos_id})")


class _TokenizersBackend:
  """A Hugging Face `tokenizers` serialization (tokenizer.json)."""

  file_name = TOKENIZER_JSON
  # Special tokens around a sequence come from the tokenizer.json post-processor, as in transformers.
  applies_post_processor = True

  def __init__(self, serialized: bytes, path: str):
    self.serialized = serialized
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(serialized.decode("utf-8"))
    # `tokenizers` reports a malformed file with a bare Exception, so nothing narrower catches it.
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise TokenizerLoadError(
          f"{path} is not a valid tokenizer.json: expected a Hugging Face `tokenizers` serialization (JSON with "
          f"'model', 'added_tokens', ...); the tokenizers library says: {error}") from error
    # transformers ignores truncation and padding saved in tokenizer.json unless a call asks for them; so do we.
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
  """A sentencepiece model (.model)."""

  file_name = SENTENCEPIECE_MODEL
  # sentencepiece has no post-processor: `Tokenizer.encode` adds bos/eos itself.
  applies_post_processor = False

  def __init__(self, serialized: bytes, path: str, config_special_tokens: Sequence[str]):
    self.serialized = serialized
    model = sentencepiece_model_pb2.ModelProto()
    try:
      model.ParseFromString(serialized)
      processor = sentencepiece.SentencePieceProcessor(model_proto=serialized) if model.pieces else None
    # protobuf and sentencepiece report malformed bytes with several exception types.
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise TokenizerLoadError(
          f"{path} is not a valid sentencepiece model: expected a serialized sentencepiece ModelProto (the .model "
          f"file SentencePieceTrainer writes); reading it failed with: {error}") from error
    if processor is None:
      raise TokenizerLoadError(
          f"{path} is not a valid sentencepiece model: expected a serialized sentencepiece ModelProto with pieces, "
          "found none")
    control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    self._size = processor.get_piece_size()
    self.named_ids = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id(),
                      "unk_token": processor.unk_id(), "pad_token": processor.pad_id()}
    self.named_pieces = {name: processor.id_to_piece(token_id)
                         for name, token_id in self.named_ids.items() if token_id >= 0}
    # sentencepiece never matches control pieces (<s>, </s>, <pad>) in text, while transformers matches every
    # special token it finds in text. Turning the control pieces into user-defined ones, which sentencepiece does
    # match, gives transformers' behaviour with sentencepiece's own whitespace handling around them. The ids are
    # unchanged, and user-defined pieces also decode to their text, so one processor serves encode and decode.
    control_ids = [index for index, piece in enumerate(model.pieces) if piece.type == control]
    for index in control_ids:
      model.pieces[index].type = user_defined
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    # What `decode(skip_special_tokens=True)` drops: control pieces, the unknown piece, and the pieces the
    # tokenizer config names as special (chat markers trained as user-defined symbols, for instance).
    self._special_ids = set(control_ids) | {processor.unk_id()}
    for token in config_special_tokens:
      token_id = self.token_to_id(token)
      if token_id is not None:
        self._special_ids.add(token_id)

  @property
  def vocab_size(self) -> int:
    return self._size

  def token_to_id(self, token: str) -> int | None:
    token_id = self._processor.piece_to_id(token)
    # sentencepiece answers the unknown id for a piece it lacks; only the unknown piece itself maps there.
    if token_id == self._processor.unk_id() and token != self._processor.id_to_piece(token_id):
      return None
    return token_id

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    del add_special_tokens  # `Tokenizer.encode` adds bos and eos for sentencepiece.
    return self._processor.encode(text)

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    # Out-of-range ids decode to nothing, as in `tokenizers`, instead of sentencepiece's IndexError.
    ids = [token_id for token_id in ids if 0 <= token_id < self._size]
    if skip_special_tokens:
      ids = [token_id for token_id in ids if token_id not in self._special_ids]
    return self._processor.decode(ids)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Loads the tokenizer of a checkpoint directory, or a tokenizer file and the companion files beside it.

  Args:
    path: a directory holding `tokenizer.json` (preferred) or a sentencepiece `tokenizer.model` (or a single
      other `*.model`), or the path of such a file (`*.json` for `tokenizers`, `*.model` for sentencepiece).
      Companion files (tokenizer_config.json, special_tokens_map.json, generation_config.json,
      chat_template.jinja) are read from the same directory when present.

  Returns:
    The `Tokenizer`.

  Raises:
    TokenizerLoadError: a missing path, no tokenizer file in the directory, or a file that cannot be read or
      parsed; the message names the file and what was expected.
  """
  path = epath.Path(path)
  if not path.exists():
    raise TokenizerLoadError(
        f"{path} does not exist: expected a directory holding {TOKENIZER_JSON} or a sentencepiece "
        f"{SENTENCEPIECE_MODEL}, or the path of one of those files")
  if path.is_dir():
    directory, tokenizer_file = path, _find_tokenizer_file(path)
  else:
    directory, tokenizer_file = path.parent, path

  companion_files = {name: _read_bytes(directory / name) for name in COMPANION_FILES if (directory / name).exists()}
  config = _parse_json_object(companion_files, TOKENIZER_CONFIG, directory)
  special_tokens_map = _parse_json_object(companion_files, SPECIAL_TOKENS_MAP, directory)
  generation_config = _parse_json_object(companion_files, GENERATION_CONFIG, directory)

  # tokenizer_config.json decides; special_tokens_map.json (older checkpoints) fills the names it leaves out.
  named_tokens: dict[str, str | None] = {}
  for name in NAMED_SPECIAL_TOKENS:
    for source_name, source in ((TOKENIZER_CONFIG, config), (SPECIAL_TOKENS_MAP, special_tokens_map)):
      if name in source:
        named_tokens[name] = _token_content(source[name], name, directory / source_name)
        break

  serialized = _read_bytes(tokenizer_file)
  if tokenizer_file.suffix == ".json":
    backend = _TokenizersBackend(serialized, str(tokenizer_file))
  elif tokenizer_file.suffix == ".model":
    listed = [token for token in named_tokens.values() if token is not None]
    for key in ("additional_special_tokens", "extra_special_tokens"):
      extra = config.get(key) or special_tokens_map.get(key) or []
      # transformers 5 also writes extra_special_tokens as a {name: token} dict.
      extra = extra.values() if isinstance(extra, Mapping) else extra
      listed += [_token_content(token, key, directory / TOKENIZER_CONFIG) for token in extra]
    backend = _SentencePieceBackend(serialized, str(tokenizer_file), listed)
    # A bare sentencepiece model names its special pieces itself; the config still wins where it says something.
    for name, piece in backend.named_pieces.items():
      named_tokens.setdefault(name, piece)
  else:
    raise TokenizerLoadError(
        f"{tokenizer_file}: cannot tell the tokenizer kind from the file name; expected a Hugging Face "
        f"tokenizer.json (*.json) or a sentencepiece model (*.model)")

  chat_template, missing_template_note = _read_chat_template(companion_files, config, directory)
  return Tokenizer(
      backend,
      source=str(path),
      special_tokens={name: token for name, token in named_tokens.items() if token is not None},
      chat_template=chat_template,
      generation_eos_ids=_generation_eos_ids(generation_config, directory / GENERATION_CONFIG),
      companion_files=companion_files,
      add_bos_token=bool(config.get("add_bos_token", True)),
      add_eos_token=bool(config.get("add_eos_token", False)),
      missing_template_note=missing_template_note,
  )


def _find_tokenizer_file(directory: epath.Path) -> epath.Path:
  for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
    if (directory / name).is_file():
      return directory / name
  models = sorted(directory.glob("*.model"))
  if len(models) == 1:
    return models[0]
  if models:
    raise TokenizerLoadError(
        f"{directory} holds several sentencepiece models ({', '.join(model.name for model in models)}) and no "
        f"{TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}: pass the path of the one to use")
  found = sorted(entry.name for entry in directory.iterdir())
  listing = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "") if found else "nothing"
  raise TokenizerLoadError(
      f"{directory} holds no tokenizer: expected {TOKENIZER_JSON} (Hugging Face tokenizers) or a sentencepiece "
      f"{SENTENCEPIECE_MODEL} (or one *.model file); found {listing}")


def _read_bytes(path: epath.Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as error:
    raise TokenizerLoadError(f"cannot read {path}: {error}") from error


def _join(source: str, name: str) -> str:
  source_path = epath.Path(source)
  return str((source_path if source_path.is_dir() else source_path.parent) / name)


def _parse_json_object(files: Mapping[str, bytes], name: str, directory: epath.Path) -> dict[str, Any]:
  """The JSON object of one companion file, {} when the file is absent."""
  if name not in files:
    return {}
  try:
    parsed = json.loads(files[name].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise TokenizerLoadError(f"{directory / name} is not valid JSON: {error}") from error
  if not isinstance(parsed, dict):
    raise TokenizerLoadError(
        f"{directory / name}: expected a JSON object at the top level, found {type(parsed).__name__}")
  return parsed


def _token_content(value: Any, name: str, path: epath.Path) -> str | None:
  """A special token as written in a config: a string, null, or an AddedToken dict with its "content"."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerLoadError(
      f"{path}: {name} should be a token string, null or an AddedToken object with a 'content' string; "
      f"found {value!r}")


def _read_chat_template(
    files: Mapping[str, bytes], config: Mapping[str, Any], directory: epath.Path) -> tuple[str | None, str]:
  """The chat template and, when there is none, a note on what was found instead.

  transformers 5 writes the template to chat_template.jinja, which wins when both are present (as it does in
  transformers); transformers 4 keeps it in tokenizer_config.json, as a string or as a list of named templates
  of which "default" is the one used.
  """
  if CHAT_TEMPLATE_FILE in files:
    try:
      return files[CHAT_TEMPLATE_FILE].decode("utf-8"), ""
    except UnicodeDecodeError as error:
      raise TokenizerLoadError(f"{directory / CHAT_TEMPLATE_FILE} is not UTF-8 text: {error}") from error
  template = config.get("chat_template")
  if template is None or isinstance(template, str):
    return template, ""
  if isinstance(template, list) and all(isinstance(entry, Mapping) for entry in template):
    named = {entry.get("name"): entry.get("template") for entry in template}
    if isinstance(named.get("default"), str):
      return named["default"], ""
    return None, f" (only named templates without a 'default': {sorted(map(str, named))})"
  raise TokenizerLoadError(
      f"{directory / TOKENIZER_CONFIG}: chat_template should be a string or a list of "
      f"{{'name': ..., 'template': ...}} objects; found {type(template).__name__}")


def _generation_eos_ids(generation_config: Mapping[str, Any], path: epath.Path) -> list[int]:
  value = generation_config.get("eos_token_id")
  if value is None:
    return []
  values = value if isinstance(value, list) else [value]
  # bool is an int in Python; a true/false here is a mistake, not id 1/0.
  if not all(isinstance(token_id, int) and not isinstance(token_id, bool) for token_id in values):
    raise TokenizerLoadError(f"{path}: eos_token_id should be an integer id or a list of them; found {value!r}")
  return values


def render_chat_template(
    chat_template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **template_variables: Any,
) -> str:
  """Renders one conversation with a Jinja chat template the way transformers does.

  The messages are normalised as transformers 5 normalises them (None-valued keys dropped, reasoning copied to
  `reasoning_content` and `thinking`, everything rebuilt from plain JSON types), then rendered in transformers'
  sandboxed environment (`_compile_chat_template`) with the variables it passes: `messages`, `tools`,
  `documents`, `add_generation_prompt`, and `template_variables` (the tokenizer's named special tokens and any
  extras).
  """
  if not messages:
    raise ValueError("Cannot apply a chat template to an empty conversation: give at least one message.")
  for message in messages:
    if not isinstance(message, Mapping):
      raise TypeError(f"Chat messages should be dicts with 'role' and 'content', but got {message!r}.")
  if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
    raise TypeError("Tools should be JSON schemas (dicts); convert functions to schemas first.")
  if documents is not None and not all(isinstance(document, Mapping) for document in documents):
    raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys.")
  conversation = [{key: value for key, value in message.items() if value is not None} for message in messages]
  conversation = _alias_reasoning_fields(_plain_template_data(conversation))
  return _compile_chat_template(chat_template).render(
      messages=conversation,
      tools=_plain_template_data(tools),
      documents=_plain_template_data(documents),
      add_generation_prompt=add_generation_prompt,
      **_plain_template_data(template_variables),
  )


def _alias_reasoning_fields(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
  aliased = []
  for message in conversation:
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is not None:
      # An explicit `thinking` is kept; `reasoning_content` always carries the reasoning found.
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    aliased.append(message)
  return aliased


def _plain_template_data(value: Any) -> Any:
  """`value` rebuilt from plain JSON types, anything else replaced by a placeholder naming its type.

  Templates are untrusted code; rich objects carry methods the sandbox does not know to be dangerous, so, as in
  transformers, the template only ever sees str/int/float/bool/None, dicts, lists and tuples.
  """
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain_template_data(key): _plain_template_data(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_plain_template_data(item) for item in value]
  if isinstance(value, tuple):
    return tuple(_plain_template_data(item) for item in value)
  if isinstance(value, np.generic):
    return _plain_template_data(value.item())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {field.name: _plain_template_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
  return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`, which renders its body unchanged.

  transformers' templates use the tag to mark the assistant's tokens for training masks; the text is the same
  with or without it, but a template containing it must parse here too.
  """

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

  def _render_body(self, caller: jinja2.runtime.Macro) -> str:
    return caller()


class _TemplateDict:
  """The `dict` a template may call: builds dicts but exposes no class internals (as in transformers)."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """Jinja's `namespace()`, refusing underscore-prefixed attributes that could reach CPython internals."""

  def __init__(*args: Any, **kwargs: Any):  # pylint: disable=no-method-argument
    # Jinja's Namespace takes `self` from *args so that `namespace(self=...)` still works; so does this.
    self, args = args[0], args[1:]
    attributes = dict(*args, **kwargs)
    for name in attributes:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attributes)

  def __setitem__(self, name: str, value: Any) -> None:
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change tool schemas in prompts.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
  return datetime.datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(chat_template: str) -> jinja2.Template:
  """The template compiled in transformers' environment: sandboxed and immutable (templates come from model
  repositories and are untrusted), trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception,
  strftime_now, dict and namespace."""
  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  environment.filters["tojson"] = _tojson
  environment.globals["raise_exception"] = _raise_exception
  environment.globals["strftime_now"] = _strftime_now
  environment.globals["dict"] = _TemplateDict()
  environment.globals["namespace"] = _TemplateNamespace
  return environment.from_string(chat_template)
