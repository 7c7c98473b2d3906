"""Chat templates rendered as transformers renders them, bounded rendering, and the tokenizer side of
Hugging Face directories (read, written by save_hf, read back by arlm and by transformers).

The oracle is `transformers` on the same files: a small byte-level BPE is trained here, written as a
Hugging Face directory by arlm's writer, and loaded both by `AutoTokenizer` and by arlm; the chat
ids must be identical. The templates are written in the style of SmolLM2's, Llama-3's, Qwen2.5's
(tools, tojson), Gemma's and Mistral's. The SmolLM2 round trip (GGUF → save_hf → arlm.load and
transformers) is slow and needs the GGUF file.
"""

from __future__ import annotations

import _hf_oracle  # noqa: F401  (first: forces offline mode before anything imports transformers)

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

import arlm
from _params import random_params
from arlm.checkpoints import CheckpointFormatError, LoadedModel
from arlm.checkpoints.chat import (ChatTemplateError, ChatTemplateLimitError, RenderLimits, apply_chat_template,
                                   select_chat_template)
from arlm.checkpoints.hf_tokenizer import load_tokenizer_side, write_tokenizer_files
from arlm.data.tokenizers import BPETokenizer

# --------------------------------------------------------------------------- templates (family styles)

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nFunction signatures within <tools></tools>:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nAnswer calls as <tool_call>\\n{\\"name\\": <name>, \\"arguments\\": <args>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

MISTRAL = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- set ns.system = message.content %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '[INST] ' }}
        {%- if loop.last and ns.system %}
            {{- ns.system + '\\n\\n' }}
        {%- endif %}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for block in message.content %}
                {%- if block.type == 'text' %}
                    {{- block.text }}
                {%- elif block.type == 'image' %}
                    {{- '[IMG]' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {% generation %}{{- ' ' + message.content + eos_token }}{% endgeneration %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# tojson's options, loop controls, namespaces, slicing, dict(), string/number formatting
FEATURES = """{%- set ns = namespace(n=0) %}
{%- for m in messages[::-1] %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}
{{- ns.n }}|{{ messages|tojson(ensure_ascii=True, sort_keys=True) }}
{{- tools|tojson(indent=2) if tools }}|{{ messages[0]|tojson(separators=(',', ':')) }}
{{- dict(a=1, b=[2, 3])|tojson }}|{{ '%-5s|%03d' % ('ab', 7) }}|{{ '{:>6}'.format('x') }}|{{ 'é'|center(5) }}
{{- messages|map(attribute='role')|join(',') }}|{{ (messages|length * 'ab') }}|{{ extra_flag }}{{ unk_token }}
"""

SPECIALS = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}

# --------------------------------------------------------------------------- conversations

HELLO = [{"role": "user", "content": "Hello!"}]
INTL = [
    {"role": "system", "content": "Réponds en français 🙂"},
    {"role": "user", "content": "Ça va? 你好, 世界 😀 naïve café"},
    {"role": "assistant", "content": "Très bien, merci! 中文 🎉"},
    {"role": "user", "content": "  Ünïcödé ✓ — ½ ∑  "},
]
ALTERNATING = [m for m in INTL if m["role"] != "system"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "system", "content": "You answer with tools."},
    {"role": "user", "content": "Weather in Zürich and 東京?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "{\"temp\": 26}"},
    {"role": "user", "content": "Thanks!"},
]
BLOCKS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is in "}, {"type": "image", "url": "cat.png"},
                                 {"type": "text", "text": "? 🐱"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Sûr?"},
]

# family → (template, special tokens, [(conversation, template kwargs)])
FAMILIES = {
    "smollm2": (SMOLLM2, SPECIALS, [(HELLO, {}), (INTL, {}), (ALTERNATING, {})]),
    "llama3": (LLAMA3, {**SPECIALS, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               [(HELLO, {"date_string": "26 Jul 2024"}), (INTL, {"date_string": "1 Jan 2025"})]),
    "qwen2.5": (QWEN25, SPECIALS, [(HELLO, {}), (INTL, {}), (TOOL_CHAT, {"tools": TOOLS}), (HELLO, {"tools": TOOLS})]),
    "gemma": (GEMMA, {**SPECIALS, "eos_token": "<end_of_turn>"}, [(HELLO, {}), (ALTERNATING, {})]),
    "mistral": (MISTRAL, {**SPECIALS, "eos_token": "</s>"}, [(HELLO, {}), (INTL, {}), (BLOCKS, {})]),
    "features": (FEATURES, SPECIALS, [(INTL, {"extra_flag": True}), (TOOL_CHAT, {"tools": TOOLS, "extra_flag": 0})]),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
                  "[INST]", "[/INST]"]


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    """A small byte-level BPE trained on the conversations, with chat special tokens and two plain added tokens."""
    text = json.dumps([HELLO, INTL, TOOL_CHAT, BLOCKS, TOOLS], ensure_ascii=False) + SMOLLM2 + QWEN25 + GEMMA
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text] * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    return BPETokenizer(tok, eos_token="<|im_end|>", bos_token="<s>", parse_special_tokens=True)


def _transformers():
    _, transformers = _hf_oracle.import_oracle()
    transformers.logging.set_verbosity_error()
    return transformers


def _hf_chat(hf_tok, messages, add_generation_prompt, **kwargs) -> tuple[str, list[int]]:
    """transformers' prompt text and ids."""
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                      **kwargs)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                     return_dict=False, **kwargs)
    return text, _hf_oracle.input_ids(ids)


def _tiny_model(vocab_size: int) -> tuple[arlm.ModelConfig, dict]:
    config = arlm.ModelConfig.llama(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=256, rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False)
    return config, random_params(config, seed=3)


# --------------------------------------------------------------------------- 1. same text and ids as transformers

@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_ids_match_transformers(family, bpe, tmp_path):
    template, specials, cases = FAMILIES[family]
    write_tokenizer_files(str(tmp_path), bpe, chat_template=template, special_tokens=specials, model_max_length=256)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == template
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    side = load_tokenizer_side(str(tmp_path))
    assert side.special_tokens == hf_tok.special_tokens_map == specials
    assert side.chat_template == hf_tok.chat_template == template
    for messages, kwargs in cases:
        for add_generation_prompt in (True, False):
            text = apply_chat_template(side.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                       special_tokens=side.special_tokens, **kwargs)
            hf_text, hf_ids = _hf_chat(hf_tok, messages, add_generation_prompt, **kwargs)
            assert text == hf_text
            assert side.tokenizer.encode(text) == hf_ids
            assert len(hf_ids) > 5


def test_named_templates_in_tokenizer_config_are_selected_like_transformers(bpe, tmp_path):
    """The legacy list-of-named-templates form of tokenizer_config.json: default, tool_use with tools, by name."""
    write_tokenizer_files(str(tmp_path), bpe, special_tokens=SPECIALS)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "default", "template": SMOLLM2}, {"name": "tool_use", "template": QWEN25},
                            {"name": "gemma", "template": GEMMA}]
    cfg_path.write_text(json.dumps(cfg))
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    side = load_tokenizer_side(str(tmp_path))
    assert side.chat_template == SMOLLM2 and dict(side.chat_templates) == hf_tok.chat_template
    for messages, kwargs, expected in [(HELLO, {}, SMOLLM2), (TOOL_CHAT, {"tools": TOOLS}, QWEN25),
                                       (ALTERNATING, {"chat_template": "gemma"}, GEMMA),
                                       (HELLO, {"chat_template": LLAMA3, "date_string": "x"}, LLAMA3)]:
        assert select_chat_template(side.chat_templates, kwargs.get("chat_template"), kwargs.get("tools")) == expected
        text = apply_chat_template(side.chat_templates, messages, special_tokens=side.special_tokens, **kwargs)
        hf_text, hf_ids = _hf_chat(hf_tok, messages, True, **kwargs)
        assert text == hf_text and side.tokenizer.encode(text) == hf_ids


def test_template_files_win_over_the_config_and_named_files_round_trip(bpe, tmp_path):
    """chat_template.jinja + additional_chat_templates/ (what current transformers writes) beat the config's."""
    write_tokenizer_files(str(tmp_path), bpe, special_tokens=SPECIALS,
                          chat_template={"default": QWEN25, "tool_use": QWEN25 + "{# tools #}", "gemma": GEMMA})
    assert sorted(os.listdir(tmp_path / "additional_chat_templates")) == ["gemma.jinja", "tool_use.jinja"]
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": "IGNORED"}))
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    side = load_tokenizer_side(str(tmp_path))
    assert dict(side.chat_templates) == hf_tok.chat_template == {
        "default": QWEN25, "tool_use": QWEN25 + "{# tools #}", "gemma": GEMMA}
    text = apply_chat_template(side.chat_templates, ALTERNATING, chat_template="gemma",
                               special_tokens=side.special_tokens)
    assert text == _hf_chat(hf_tok, ALTERNATING, True, chat_template="gemma")[0]
    # a single template only in tokenizer_config.json (older transformers) is read too
    os.remove(tmp_path / "chat_template.jinja")
    for name in os.listdir(tmp_path / "additional_chat_templates"):
        os.remove(tmp_path / "additional_chat_templates" / name)
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": GEMMA}))
    side = load_tokenizer_side(str(tmp_path))
    assert side.chat_template == GEMMA and not side.chat_templates


def test_message_inputs_are_normalised_like_transformers(bpe, tmp_path):
    """None-valued keys dropped, objects made plain, reasoning aliased, non-string content passed through."""
    import dataclasses

    @dataclasses.dataclass
    class Msg:
        role: str
        content: object
        reasoning: str | None = None

    template = ("{% for m in messages %}{{ m.role }}:{{ m.content if m.content is defined else '-' }}"
                "|{{ m.reasoning_content | default('') }}|{{ m.thinking | default('') }}|{{ m.n | default('') }}"
                "{% if m.content is not string and m.content is defined %}#{{ m.content|length }}{% endif %}\n"
                "{% endfor %}")
    messages = [Msg("user", "hi"), Msg("assistant", None, reasoning="because"),
                {"role": "user", "content": [{"type": "text", "text": "x"}], "n": np.int64(3)},
                {"role": "user", "content": "v", "n": np.bool_(False)}]
    write_tokenizer_files(str(tmp_path), bpe, chat_template=template, special_tokens=SPECIALS)
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    ours = apply_chat_template(template, messages, add_generation_prompt=False)
    assert ours == _hf_chat(hf_tok, messages, False)[0]
    assert "assistant:-|because|because|" in ours and "#1" in ours and "|False" in ours


JINJA_FEATURES = [
    "{% macro row(m, sep='|') %}{{ m.role|upper }}{{ sep }}{{ caller() if caller else '' }}{% endmacro %}"
    "{% for m in messages %}{% call row(m, sep=': ') %}{{ m.content|trim|truncate(12, True, '…', 0) }}{% endcall %}"
    "{{ loop.cycle('\n', ';') }}{% endfor %}",
    "{% for role, group in messages|groupby('role') %}{{ role }}={{ group|map(attribute='content')|join('/') }};"
    "{% endfor %}{{ messages|selectattr('role', 'equalto', 'user')|list|length }}{{ messages|rejectattr('role', "
    "'in', ['user'])|map(attribute='role')|unique|sort|join(',') }}",
    "{% for k, v in {'b': 2, 'a': [1, {'c': none}]}|dictsort %}{{ k }}{{ v|tojson }}{% endfor %}"
    "{{ [3, 1, 2]|sort(reverse=true)|join }}{{ [1, 2, 3]|sum }}{{ range(7)|batch(3, 0)|list }}"
    "{{ range(7)|slice(3)|list }}{{ [1.256, 2]|map('round', 1)|list }}{{ '42'|int + '1.5'|float }}",
    "{% set ns = namespace(seen=[]) %}{% for m in messages %}{% if loop.changed(m.role) %}[{{ loop.index }}"
    "{{ '!' if loop.last }}{{ loop.revindex0 }}/{{ loop.length }}]{% endif %}{% endfor %}"
    "{% filter upper %}shout {{ messages[0].content[:5] }}{% endfilter %}{% set block %}B{{ 1 + 1 }}{% endset %}"
    "{{ block }}{% with x = 'w' %}{{ x * 3 }}{% endwith %}{% raw %}{{ raw }}{% endraw %}",
    "{%- for m in messages if m.content is string -%}\n  {{- m.content.strip().split(' ')[0] -}} |"
    "{{ m.content.startswith('Ça') }}{{ m.content.endswith('é') }}{{ m.content|wordcount }}\n{%- endfor %}"
    "{{ 'a-b-c'.replace('-', '+').title() }}{{ '{}/{}'.format(1, 'x') }}{{ '%.2f'|format(3.14159) }}"
    "{{ 'long text for wrapping here'|wordwrap(10) }}{{ 'x\ny'|indent(2, true) }}{{ none|default('d') }}"
    "{{ messages|first|tojson }}{{ (messages|last).role }}{{ messages|reverse|map(attribute='role')|join }}",
    "{% for x in [{'n': 'a', 'c': [{'n': 'b', 'c': []}, {'n': 'c', 'c': [{'n': 'd', 'c': []}]}]}] recursive %}"
    "{{ x.n }}{% if x.c %}({{ loop(x.c) }}){% endif %}{% endfor %}{{ 3 is divisibleby 3 }}{{ x is defined }}"
    "{{ none is none }}{{ {} is mapping }}{{ 'a' is in 'abc' }}{{ 2 ** 10 }}{{ 7 // 2 }}{{ 7 % 3 }}{{ -3|abs }}",
    "{% set j = joiner(', ') %}{% set c = cycler('a', 'b') %}{% for m in messages %}{{ j() }}{{ c.next() }}"
    "{{ loop.previtem.role if loop.previtem }}>{{ loop.nextitem.role if loop.nextitem }}{% endfor %}"
    "{% for k, v in {'x': 1, 'y': [2]}|items %}{{ k }}{{ v }}{% endfor %}{{ (messages|selectattr('role', "
    "'equalto', 'assistant')|first).content }}{{ messages|map(attribute='role')|reverse|join }}"
    "{% for b in messages|batch(3) %}<{{ b|length }}>{% endfor %}{{ messages|map(attribute='role')|list|last }}",
    "{{ {'a': 1, 'b': 'é'} }}{{ [1, 'a', none, true, 1.5] }}{{ none }}{{ true }}{{ 1/3 }}{{ 10**20 }}"
    "{{ 'é'|upper }}{{ messages|length > 2 and 'many' or 'few' }}{{ 'Ça' in messages[1].content }}"
    "{{ messages[1]|string|length }}{{ messages[0].content is string }}{{ (messages|map(attribute='content')"
    "|select('string')|list)[-1][-3:] }}{{ messages|tojson(indent=1)|length }}{{ 'ab' ~ 1 ~ none ~ [2] }}",
]


@pytest.mark.parametrize("index", range(len(JINJA_FEATURES)))
def test_jinja_features_render_like_transformers(index):
    """Macros with caller, groupby/dictsort/batch/slice, loop helpers, filter/set/with/raw blocks, string methods,
    recursive loops, tests and operators: the same text as transformers' renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    _transformers()
    template = JINJA_FEATURES[index]
    ours = apply_chat_template(template, INTL, add_generation_prompt=False)
    (theirs,), _ = render_jinja_template([INTL], chat_template=template, add_generation_prompt=False)
    assert ours == theirs and len(ours) > 10


def test_strftime_now_and_raise_exception_globals():
    year = time.strftime("%Y")
    assert apply_chat_template("{{ strftime_now('%Y') }}", HELLO) == year
    with pytest.raises(ChatTemplateError, match="^System role not supported$") as err:
        apply_chat_template(GEMMA, INTL, special_tokens=SPECIALS)
    assert isinstance(err.value, ValueError)
    import jinja2
    assert isinstance(err.value, jinja2.TemplateError)     # what transformers raises, for callers catching that


# --------------------------------------------------------------------------- 2. bounded rendering

HOSTILE = {
    "range_huge": "{% for i in range(10**12) %}x{% endfor %}",
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_output": "{% for i in range(100000) %}{% for j in range(100000) %}xy{% endfor %}{% endfor %}",
    "set_block": ("{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}{{ 'z' * 50 }}{% endfor %}"
                  "{% endfor %}{% endset %}{{ x|length }}"),
    "macro_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro_fanout": "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "recursive_loop": "{% for x in [1] recursive %}{{ loop([1, 1]) }}{% endfor %}",
    "string_repeat": "{{ 'x' * 10**10 }}",
    "list_repeat": "{{ ([0] * 10**10)|length }}",
    "doubling_tilde": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s|length }}",
    "doubling_plus": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}",
    "doubling_join": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s]|join %}"
                     "{% endfor %}",
    "big_power": "{{ 7 ** (10 ** 9) }}",
    "int_squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "center_filter": "{{ 'x'|center(10**10) }}",
    "ljust_method": "{{ 'x'.ljust(10**10) }}",
    "printf_width": "{{ '%99999999999s' % 'x' }}",
    "format_width": "{{ '{:>99999999999}'.format('x') }}",
    "replace_empty": "{{ ('x' * 1000)|replace('', 'y' * 100000) }}",
    "join_refs": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|join }}",
    "tojson_indent": "{{ messages|tojson(indent=10**9) }}",
    "lipsum": "{{ lipsum(10**9) }}",
    "batch_fill": "{{ [1]|batch(10**10, 0)|list }}",
    "print_refs": "{% set s = 'x' * 3000000 %}{{ [s] * 1000 }}",
    "tilde_refs": "{% set s = 'x' * 3000000 %}{{ ([s] * 1000) ~ '' }}",
    "fromkeys_refs": "{% set s = 'x' * 3000000 %}{{ dict.fromkeys(range(1000), s)|upper }}",
    "printf_refs": "{% set s = 'x' * 3000000 %}{{ '%s' % ([s] * 1000,) }}",
    "namespace_refs": "{% set s = 'x' * 3000000 %}{% set ns = namespace(a=[s, s]) %}"
                      "{% for i in range(30) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_raise_a_named_error_fast(name):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateLimitError) as err:
        apply_chat_template(HOSTILE[name], HELLO)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, (name, elapsed)
    assert isinstance(err.value, ChatTemplateError) and isinstance(err.value, ValueError)


def test_limits_are_adjustable_and_a_timeout_fires():
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateLimitError, match="longer than 0.2 s"):
        apply_chat_template(loop, HELLO, limits=RenderLimits(timeout_s=0.2, max_steps=10**12))
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ChatTemplateLimitError, match="output is longer than 100"):
        apply_chat_template("{% for i in range(1000) %}xx{% endfor %}", HELLO,
                            limits=RenderLimits(max_output_chars=100))
    assert apply_chat_template("{% for i in range(1000) %}xx{% endfor %}", HELLO) == "xx" * 1000
    with pytest.raises(ValueError, match="max_steps"):
        RenderLimits(max_steps=0)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ (lipsum|attr('__globals__')) }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{% set ns = namespace(_secret=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ dict.__call__.__globals__ }}",
    "{{ '{0.__class__}'.format('x') }}",
    "{% include 'etc/passwd' %}",
])
def test_sandbox_refuses_escapes(template):
    """Each attempt either raises a (non-limit) ChatTemplateError or renders nothing (an unsafe attribute
    is an Undefined, which prints as '')."""
    try:
        text = apply_chat_template(template, HELLO)
    except ChatTemplateLimitError:
        raise
    except ChatTemplateError:
        return
    assert text == ""


@pytest.mark.parametrize("messages,match", [
    ([], "empty conversation"),
    ("hello", "list of dicts"),
    (["hello"], "must be dicts"),
])
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        apply_chat_template(SMOLLM2, messages)


def test_bad_tools_and_documents_are_named():
    with pytest.raises(ChatTemplateError, match="JSON-schema dict"):
        apply_chat_template(QWEN25, HELLO, tools=[print])
    with pytest.raises(ChatTemplateError, match="documents"):
        apply_chat_template(QWEN25, HELLO, documents="text")
    with pytest.raises(ChatTemplateError, match="none is called 'default'"):
        apply_chat_template({"a": SMOLLM2, "b": GEMMA}, HELLO)
    with pytest.raises(ChatTemplateError, match="syntax error"):
        apply_chat_template("{% for x in %}", HELLO)


# --------------------------------------------------------------------------- 3./4. the tokenizer side, save_hf, load

def test_save_hf_round_trip_tiny_model(bpe, tmp_path):
    """save_hf writes everything; arlm.load and transformers read the same tokens, stop ids, template and logits."""
    config, params = _tiny_model(bpe.vocab_size)
    eot = bpe.hf_tokenizer.token_to_id("<|eot_id|>")
    model = LoadedModel(config, params, bpe, QWEN25, special_tokens=SPECIALS, eos_ids=(eot,))
    assert model.stop_ids == (bpe.eos_id, eot)
    directory = model.save_hf(str(tmp_path / "tiny"))
    names = set(os.listdir(directory))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "chat_template.jinja"} <= names
    hf_cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == \
        (bpe.bos_id, [bpe.eos_id, eot], bpe.eos_id)
    tok_cfg = json.loads((tmp_path / "tiny" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["model_max_length"] == 256

    back = arlm.load(directory)
    assert back.stop_ids == model.stop_ids and back.eos_ids == (bpe.eos_id, eot)
    assert dict(back.special_tokens) == SPECIALS and back.chat_template == QWEN25
    assert back.tokenizer.eos_id == bpe.eos_id and back.tokenizer.bos_id == bpe.bos_id

    transformers = _transformers()
    import torch

    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert hf_model.generation_config.eos_token_id == [bpe.eos_id, eot]
    assert hf_tok.eos_token_id == bpe.eos_id and hf_tok.special_tokens_map == SPECIALS
    for messages, kwargs in [(INTL, {}), (TOOL_CHAT, {"tools": TOOLS})]:
        ids = back.chat_prompt(messages, **kwargs)
        assert ids == model.chat_prompt(messages, **kwargs) == _hf_chat(hf_tok, messages, True, **kwargs)[1]
    ids = back.chat_prompt(INTL)
    ours = np.asarray(arlm.forward(back.config, back.params, jnp.asarray([ids], jnp.int32))[0], np.float32)
    theirs = _hf_oracle.hf_logits(hf_model, ids)
    assert ours.shape == theirs.shape == (len(ids), bpe.vocab_size)
    assert float(np.max(np.abs(ours - theirs))) <= 1e-4
    assert hf_tok.decode(ids) == back.tokenizer.decode(ids)


def test_add_bos_token_round_trips_and_transformers_prepends_bos(bpe, tmp_path):
    write_tokenizer_files(str(tmp_path), bpe, special_tokens=SPECIALS, add_bos_token=True)
    side = load_tokenizer_side(str(tmp_path))
    assert side.add_bos_token is True
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    assert _hf_oracle.input_ids(hf_tok("Hello")) == [bpe.bos_id] + bpe.encode("Hello")
    # without the config key, arlm infers it from tokenizer.json's post-processor
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["add_bos_token"]
    cfg_path.write_text(json.dumps(cfg))
    assert load_tokenizer_side(str(tmp_path)).add_bos_token is True
    write_tokenizer_files(str(tmp_path / "nobos"), bpe, special_tokens=SPECIALS)
    assert load_tokenizer_side(str(tmp_path / "nobos")).add_bos_token is False


def test_added_token_dicts_special_tokens_map_and_missing_specials(bpe, tmp_path):
    """AddedToken objects in tokenizer_config.json; special_tokens_map.json overriding it (legacy path);
    a special token that tokenizer.json lacks as an added token is matched whole, as transformers does."""
    write_tokenizer_files(str(tmp_path), bpe, special_tokens=SPECIALS, chat_template="{{ bos_token }}|{{ eos_token }}"
                          "|{{ image_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False, "special": True}
    cfg["image_token"] = "<img>"               # not in tokenizer.json at all: added as a special token
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({**SPECIALS, "eos_token": "<|eot_id|>",
                                                                  "bos_token": "<|begin_of_text|>"}))
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    side = load_tokenizer_side(str(tmp_path))
    assert dict(side.special_tokens) == hf_tok.special_tokens_map
    assert side.special_tokens["eos_token"] == "<|eot_id|>" and side.special_tokens["image_token"] == "<img>"
    messages = [{"role": "user", "content": "see <img> here <|im_start|>"}]
    text = apply_chat_template(side.chat_template, messages, special_tokens=side.special_tokens)
    hf_text, hf_ids = _hf_chat(hf_tok, messages, True)
    assert text == hf_text and side.tokenizer.encode(text) == hf_ids
    assert side.tokenizer.eos_id == hf_tok.eos_token_id


def test_added_tokens_decoder_wins_over_special_tokens_map(bpe, tmp_path):
    """With added_tokens_decoder in tokenizer_config.json (what Hub checkpoints carry), transformers ignores
    special_tokens_map.json and adds the listed tokens tokenizer.json lacks; arlm does the same."""
    write_tokenizer_files(str(tmp_path), bpe, special_tokens=SPECIALS, chat_template=SMOLLM2)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    cfg["added_tokens_decoder"] = {str(bpe.eos_id): {"content": "<|im_end|>", "special": True, **flags},
                                   str(bpe.vocab_size): {"content": "<new>", "special": False, **flags}}
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({**SPECIALS, "eos_token": "<|eot_id|>"}))
    hf_tok = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    side = load_tokenizer_side(str(tmp_path))
    assert dict(side.special_tokens) == hf_tok.special_tokens_map == SPECIALS
    assert side.tokenizer.eos_id == hf_tok.eos_token_id == bpe.eos_id
    messages = [{"role": "user", "content": "a <new> b"}]
    text, ids = _hf_chat(hf_tok, messages, True)
    assert side.tokenizer.encode(text) == ids and bpe.vocab_size in ids


def _write_dir(tmp_path, bpe) -> str:
    """A tokenizer directory whose template lives in tokenizer_config.json (files would take priority)."""
    write_tokenizer_files(str(tmp_path), bpe, special_tokens=SPECIALS)
    cfg_path = os.path.join(str(tmp_path), "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump({**cfg, "chat_template": SMOLLM2}, f)
    assert load_tokenizer_side(str(tmp_path)).chat_template == SMOLLM2
    return str(tmp_path)


@pytest.mark.parametrize("file,content,match", [
    ("tokenizer_config.json", "{\"eos_token\": ", r"tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", "[1, 2]", r"tokenizer_config.json must hold a JSON object"),
    ("tokenizer_config.json", {"eos_token": 5}, r"tokenizer_config.json: field 'eos_token'"),
    ("tokenizer_config.json", {"bos_token": {"content": 3}}, r"field 'bos_token'"),
    ("tokenizer_config.json", {"bos_token": {"content": "<s>", "lstrip": "no"}}, r"field 'bos_token.lstrip'"),
    ("tokenizer_config.json", {"chat_template": 7}, r"field 'chat_template'"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default"}]}, r"field 'chat_template\[0\]'"),
    ("tokenizer_config.json", {"add_bos_token": "yes"}, r"field 'add_bos_token'"),
    ("tokenizer_config.json", {"additional_special_tokens": "<x>"}, r"field 'additional_special_tokens'"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "a"}}}, r"added_tokens_decoder.x"),
    ("special_tokens_map.json", {"eos_token": [1]}, r"special_tokens_map.json: field 'eos_token'"),
    ("generation_config.json", "{", r"generation_config.json is not valid JSON"),
    ("generation_config.json", {"eos_token_id": "2"}, r"generation_config.json: field 'eos_token_id'"),
    ("generation_config.json", {"eos_token_id": [2, -1]}, r"field 'eos_token_id'"),
    ("generation_config.json", {"eos_token_id": True}, r"field 'eos_token_id'"),
    ("generation_config.json", {"eos_token_id": 10**6}, r"eos_token_id 1000000 is outside the tokenizer's vocab"),
    ("generation_config.json", {"pad_token_id": "x"}, r"field 'pad_token_id'"),
    ("tokenizer.json", "{\"model\": 1}", r"tokenizer.json is not a tokenizer file"),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", r"chat_template.jinja is not UTF-8"),
])
def test_malformed_tokenizer_files_name_file_and_field(bpe, tmp_path, file, content, match):
    directory = _write_dir(tmp_path, bpe)
    path = os.path.join(directory, file)
    if isinstance(content, dict):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f) if file != "chat_template.jinja" else {}
        content = json.dumps({**existing, **content})
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(CheckpointFormatError, match=match):
        load_tokenizer_side(directory)


def test_eos_falls_back_to_config_ids_and_missing_eos_is_named(bpe, tmp_path):
    directory = _write_dir(tmp_path, bpe)
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    cfg = json.load(open(cfg_path, encoding="utf-8"))
    del cfg["eos_token"]
    json.dump(cfg, open(cfg_path, "w", encoding="utf-8"))
    for name in ("special_tokens_map.json", "generation_config.json"):
        os.remove(os.path.join(directory, name))
    eot = bpe.hf_tokenizer.token_to_id("<|eot_id|>")
    json.dump({"eos_token_id": [eot, bpe.eos_id]}, open(os.path.join(directory, "config.json"), "w"))
    side = load_tokenizer_side(directory)
    assert side.tokenizer.eos_id == eot and side.eos_ids == (eot, bpe.eos_id)
    # no eos anywhere and no <|endoftext|> in the vocabulary: a named error
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.save(os.path.join(directory, "tokenizer.json"))
    os.remove(os.path.join(directory, "config.json"))
    json.dump({"bos_token": "a"}, open(cfg_path, "w", encoding="utf-8"))
    with pytest.raises(CheckpointFormatError, match="no end-of-sequence token"):
        load_tokenizer_side(directory)


def test_saving_again_drops_template_files_of_the_earlier_save(bpe, tmp_path):
    write_tokenizer_files(str(tmp_path), bpe, chat_template={"default": SMOLLM2, "tool_use": QWEN25})
    write_tokenizer_files(str(tmp_path), bpe, chat_template={"gemma": GEMMA})
    side = load_tokenizer_side(str(tmp_path))
    assert side.chat_template is None and dict(side.chat_templates) == {"gemma": GEMMA}
    write_tokenizer_files(str(tmp_path), bpe)
    side = load_tokenizer_side(str(tmp_path))
    assert side.chat_template is None and not side.chat_templates


def test_writer_refuses_bad_special_tokens_and_template_names(bpe, tmp_path):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        write_tokenizer_files(str(tmp_path), bpe, special_tokens={"pad_token": "<nope>"})
    with pytest.raises(ValueError, match="invalid chat template name"):
        write_tokenizer_files(str(tmp_path), bpe, chat_template={"../evil": "x"})
    with pytest.raises(ValueError, match="eos id"):
        write_tokenizer_files(str(tmp_path), bpe, eos_ids=[10**6])


def test_gguf_special_tokens_and_stop_ids(tmp_path):
    """tokenizer.ggml.* ids → named special tokens, add_bos_token and stop ids (eos + end-of-turn)."""
    import gguf

    from arlm.checkpoints.gguf_tokenizer import tokenizer_from_gguf

    alphabet = list(pre_tokenizers.ByteLevel.alphabet())
    tokens = sorted(alphabet) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>", "he"]
    types = [1] * (len(tokens) - 5) + [3, 3, 3, 3, 1]
    path = str(tmp_path / "tok.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_uint32("tokenizer.ggml.eot_token_id", tokens.index("<|eot|>"))
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = tokenizer_from_gguf(gguf.GGUFReader(path))
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert tok.add_bos_token is True
    assert tok.eos_ids == (tokens.index("<|im_end|>"), tokens.index("<|eot|>"))
    model = LoadedModel(None, None, tok, "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                        special_tokens=tok.special_tokens, eos_ids=tok.eos_ids)
    assert model.stop_ids == tok.eos_ids
    assert model.chat_prompt([{"role": "user", "content": "he"}]) == [
        tokens.index("<|im_start|>"), tokens.index("he"), tokens.index("<|im_end|>")]


# --------------------------------------------------------------------------- slow: SmolLM2 end to end

@pytest.mark.slow
def test_smollm2_special_tokens_match_transformers_gguf():
    path = _hf_oracle.gguf_path_or_skip("smollm2-135m-instruct")
    model = arlm.load("smollm2-135m-instruct")
    hf_tok = _hf_oracle.load_hf_tokenizer(path)
    assert dict(model.special_tokens) == hf_tok.special_tokens_map
    assert model.stop_ids == (hf_tok.eos_token_id,) and model.add_bos_token is False
    for messages in (HELLO, INTL, ALTERNATING):
        for add_generation_prompt in (True, False):
            text, ids = _hf_chat(hf_tok, messages, add_generation_prompt)
            assert model.chat_text(messages, add_generation_prompt) == text
            assert model.chat_prompt(messages, add_generation_prompt) == ids


def _greedy(model: LoadedModel, ids: list[int], n: int) -> list[int]:
    out = arlm.generate(model.config, model.params, [ids], key=jax.random.PRNGKey(0), max_new_tokens=n,
                        eos_id=model.tokenizer.eos_id, stop_ids=model.stop_ids)
    return [int(t) for t in np.asarray(out.tokens_BxN[0, :int(out.lengths_B[0])])]


@pytest.mark.slow
def test_smollm2_save_hf_round_trip(tmp_path):
    """SmolLM2 → save_hf → arlm.load and transformers: same eos / stop ids, template, prompt ids, logits,
    and the same greedy reply, which ends at <|im_end|> (not at the length limit)."""
    _hf_oracle.gguf_path_or_skip("smollm2-135m-instruct")
    torch, transformers = _hf_oracle.import_oracle()
    transformers.logging.set_verbosity_error()
    model = arlm.load("smollm2-135m-instruct")
    directory = model.save_hf(str(tmp_path / "smollm2"))
    back = arlm.load(directory)
    assert back.stop_ids == model.stop_ids == (2,) and back.tokenizer.eos_id == 2
    assert back.chat_template == model.chat_template and dict(back.special_tokens) == dict(model.special_tokens)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                         model.params, back.params))
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert hf_tok.eos_token_id == 2 and hf_model.generation_config.eos_token_id == 2
    assert hf_tok.chat_template == model.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = model.chat_prompt(messages)
    assert back.chat_prompt(messages) == ids == _hf_chat(hf_tok, messages, True)[1]
    n = 48
    ours, reloaded = _greedy(model, ids, n), _greedy(back, ids, n)
    x = torch.tensor([ids])
    with torch.no_grad():    # transformers stops by the saved generation_config alone
        theirs = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                   temperature=None, top_p=None, top_k=None)[0, len(ids):].tolist()
    print(f"\n[round trip] reply: {model.tokenizer.decode(ours)!r} ({len(ours)} tokens)")
    assert ours == reloaded == theirs
    assert ours[-1] == 2 and len(ours) < n and "Paris" in model.tokenizer.decode(ours)

    # Logits on the saved directory. Both sides run in float32, whose rounding over 30 layers is itself
    # ~1e-4 on logits of magnitude ~38 (measured: transformers float32 vs float64 on this input 9.3e-5,
    # arlm vs transformers float32 1.2e-4), so the reference is transformers in float64: arlm's float32
    # error must be no larger than 1.5x transformers' own float32 error, in max |Δ| and in relative L2.
    seq = ids + ours
    fwd = jax.jit(arlm.forward, static_argnums=0)
    a = np.asarray(fwd(back.config, back.params, jnp.asarray([seq], jnp.int32))[0], np.float64)
    b32 = _hf_oracle.hf_logits(hf_model, seq).astype(np.float64)
    with torch.no_grad():
        b64 = hf_model.double()(torch.tensor([seq])).logits[0].numpy()
    rel = lambda x: float(np.linalg.norm((x - b64).ravel()) / np.linalg.norm(b64.ravel()))  # noqa: E731
    ours_max, theirs_max = float(np.max(np.abs(a - b64))), float(np.max(np.abs(b32 - b64)))
    print(f"[round trip] logits vs transformers float64 on the saved dir: arlm max|Δ|={ours_max:.2e} "
          f"relL2={rel(a):.2e}; transformers float32 max|Δ|={theirs_max:.2e} relL2={rel(b32):.2e}; "
          f"arlm vs transformers float32 max|Δ|={np.max(np.abs(a - b32)):.2e}")
    assert ours_max <= 1.5 * theirs_max and rel(a) <= 1.5 * rel(b32)
    assert float(np.max(np.abs(a - b32))) <= 1e-3 and rel(a) <= 1e-5
