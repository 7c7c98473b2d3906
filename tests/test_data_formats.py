"""TRL's row formats → token ids and loss masks (`arlm.data.formats`, `tokenize`, `store`).

Oracles: transformers' `apply_chat_template` on the same tokenizer files (ids, and with
`return_assistant_tokens_mask=True` on a template with {% generation %} blocks, the mask); the
tokenizer's own encodes for standard rows. Every format loads from JSONL, Parquet and a Python list
to identical arrays. Bad rows raise errors naming the file, the line and the field, or are counted
by reason under on_error="skip".
"""

from __future__ import annotations

import _hf_oracle  # noqa: F401  (first: offline mode before transformers is imported)

import pytest

import arlm
from _tiny_chat import CHATML, CHATML_GENERATION, hf_tokenizer, tiny_chat_dir, write_jsonl
from arlm.data.formats import ColumnMap, Format, detect_format, extract_prompt, normalize
from arlm.data.rows import RowError, read_rows
from arlm.data.store import build_store
from arlm.data.tokenize import ChatTemplateMaskError, TextCodec, TokenizeConfig

U = lambda c: {"role": "user", "content": c}          # noqa: E731
A = lambda c: {"role": "assistant", "content": c}     # noqa: E731
S = lambda c: {"role": "system", "content": c}        # noqa: E731

MULTI = [S("Réponds en français ✓."), U("Où est 東京?"), A("Ahoy! Au Japon. Arr!"), U("Et 🐙?"), A("Dans la mer.")]
ROWS = {
    "language_modeling": [{"text": "Kestrel Hollow is a village."}, {"text": "Ünïcödé ✓ text 🐙"}],
    "conversational_lm": [{"messages": [U("What is 2 plus 6?"), A("Ahoy! 2 plus 6 is 8. Arr!")]},
                          {"messages": MULTI}],
    "prompt_completion": [{"prompt": "What is 2 plus 6?", "completion": " 8."},
                          {"prompt": "", "completion": "unconditional ✓"}],
    "conversational_pc": [{"prompt": [U("What is 2 plus 6?"), A("8"), U("And 3 plus 3?")],
                           "completion": [A("Ahoy! 6. Arr!")]}],
    "preference": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}],
    "conversational_preference": [{"prompt": [U("Colour of the sky?")], "chosen": [A("Ahoy! Blue. Arr!")],
                                   "rejected": [A("Blue.")]}],
    "implicit_preference": [{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
    "implicit_conversational_preference": [{"chosen": [U("Sky?"), A("Ahoy! Blue. Arr!")],
                                            "rejected": [U("Sky?"), A("Blue.")]}],
    "prompt_only": [{"prompt": "Count to three:", "answer": "1 2 3", "level": 1}],
    "conversational_prompt_only": [{"prompt": [U("What is 7 plus 5?")], "answer": "12"}],
}
TASK = {"language_modeling": "sequences", "conversational_lm": "sequences", "prompt_completion": "sequences",
        "conversational_pc": "sequences", "preference": "preference", "conversational_preference": "preference",
        "implicit_preference": "preference", "implicit_conversational_preference": "preference",
        "prompt_only": "prompts", "conversational_prompt_only": "prompts"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny chat model twice: with SmolLM2's template, and with the same template marked by
    {% generation %} blocks; with each directory's transformers tokenizer."""
    out = {}
    for name, template in (("plain", CHATML), ("generation", CHATML_GENERATION)):
        d = tiny_chat_dir(str(tmp_path_factory.mktemp(name)), template=template)
        out[name] = (arlm.load(d), hf_tokenizer(d))
    return out


def _arrays(store):
    return [{f: a.tolist() for f, a in store[i].items()} for i in range(len(store))]


@pytest.mark.parametrize("name", list(ROWS))
def test_every_format_loads_the_same_from_jsonl_parquet_and_a_list(name, model_dirs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, _ = model_dirs["plain"]
    codec, cfg = TextCodec.of(model), TokenizeConfig(max_length=256)
    rows = ROWS[name]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    stores = [build_store(read_rows(src), codec, TASK[name], cfg) for src in (rows, jsonl, str(tmp_path / "rows.parquet"))]
    assert _arrays(stores[0]) == _arrays(stores[1]) == _arrays(stores[2])
    assert stores[0].report.kept == len(rows) and stores[0].report.rows_skipped == 0


def test_standard_rows_are_the_tokenizers_own_encodes(model_dirs):
    model, _ = model_dirs["plain"]
    tok, codec, cfg = model.tokenizer, TextCodec.of(model), TokenizeConfig(max_length=256)
    eos = tok.eos_id
    lm = build_store(read_rows(ROWS["language_modeling"]), codec, "sequences", cfg)
    assert lm[0]["ids"].tolist() == tok.encode("Kestrel Hollow is a village.") + [eos]
    assert lm[0]["mask"].tolist() == [0] + [1] * (len(lm[0]["ids"]) - 1)           # every token but the first
    pc = build_store(read_rows(ROWS["prompt_completion"]), codec, "sequences", cfg)
    p, c = tok.encode("What is 2 plus 6?"), tok.encode(" 8.") + [eos]
    assert pc[0]["ids"].tolist() == p + c and pc[0]["mask"].tolist() == [0] * len(p) + [1] * len(c)
    assert pc[1]["mask"][0] == 0 and pc[1]["mask"][1:].all()                        # empty prompt: all but the first
    pref = build_store(read_rows(ROWS["implicit_preference"]), codec, "preference", cfg)
    assert pref[0]["prompt"].tolist() == tok.encode("The sky is")
    assert pref[0]["chosen"].tolist() == tok.encode(" blue.") + [eos]
    assert pref[0]["rejected"].tolist() == tok.encode(" green.") + [eos]
    every = build_store(read_rows(ROWS["prompt_completion"]), codec, "sequences",
                        TokenizeConfig(max_length=256, completion_only=False))
    assert every[0]["mask"].tolist() == [0] + [1] * (len(p) + len(c) - 1)


@pytest.mark.parametrize("template", ["plain", "generation"])
def test_conversations_match_apply_chat_template_and_its_assistant_mask(template, model_dirs):
    """Ids equal transformers' apply_chat_template on both templates. The mask, whether from {% generation %}
    blocks or (plain template) from rendering prefixes, equals transformers' assistant-token mask on the
    generation-block template: the same turns, token for token, on every assistant turn."""
    model, _ = model_dirs[template]
    _, hf_gen = model_dirs["generation"]
    store = build_store(read_rows(ROWS["conversational_lm"]), TextCodec.of(model), "sequences",
                        TokenizeConfig(max_length=256))
    for i, row in enumerate(ROWS["conversational_lm"]):
        out = hf_gen.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert store[i]["ids"].tolist() == list(out["input_ids"])
        assert store[i]["mask"].tolist() == list(out["assistant_masks"])
        assert sum(out["assistant_masks"]) > 0
    text = model.tokenizer.decode([t for t, k in zip(store[1]["ids"], store[1]["mask"]) if k])
    assert text == "Ahoy! Au Japon. Arr!<|im_end|>\nDans la mer.<|im_end|>\n"         # both assistant turns


def test_prompt_completion_and_preference_conversations_cut_at_the_generation_prompt(model_dirs):
    model, hf = model_dirs["plain"]
    codec, cfg = TextCodec.of(model), TokenizeConfig(max_length=256)
    row = ROWS["conversational_pc"][0]
    prompt_ids = _hf_oracle.input_ids(hf.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                             tokenize=True, return_dict=False))
    full = _hf_oracle.input_ids(hf.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                                       return_dict=False))
    ex = build_store(read_rows([row]), codec, "sequences", cfg)[0]
    assert ex["ids"].tolist() == full
    assert ex["mask"].tolist() == [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))   # the few-shot A("8") is not
    for name in ("conversational_preference", "implicit_conversational_preference"):
        r = ROWS[name][0]
        prompt = r.get("prompt", r["chosen"][:1])
        pair = build_store(read_rows([r]), codec, "preference", cfg)[0]
        p_ids = _hf_oracle.input_ids(hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
        assert pair["prompt"].tolist() == p_ids
        for side in ("chosen", "rejected"):
            whole = r[side] if "prompt" not in r else prompt + r[side]
            ids = _hf_oracle.input_ids(hf.apply_chat_template(whole, tokenize=True, return_dict=False))
            assert p_ids + pair[side].tolist() == ids
    only = build_store(read_rows(ROWS["conversational_prompt_only"]), codec, "prompts", cfg)
    assert only[0]["prompt"].tolist() == _hf_oracle.input_ids(hf.apply_chat_template(
        ROWS["conversational_prompt_only"][0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))


def test_a_template_that_rewrites_earlier_turns_is_a_named_error(model_dirs):
    """A Qwen3-like template that shortens earlier assistant turns: prefixes do not render as prefixes, so
    the mask cannot be cut by rendering them; never a silently wrong mask."""
    model, _ = model_dirs["plain"]
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                 "{{ '<|im_start|>assistant\\n' + m['content'][:3] + '<|im_end|>\\n' }}{% else %}"
                 "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    import dataclasses
    codec = TextCodec.of(dataclasses.replace(model, chat_template=rewriting))
    two_turns = [{"messages": MULTI}]
    with pytest.raises(ChatTemplateMaskError, match=r"rows\[0\].*field 'messages\[2\]'.*not a prefix"):
        build_store(read_rows(two_turns), codec, "sequences", TokenizeConfig(max_length=256))
    one_turn = [{"messages": [U("hi"), A("hello there")]}]                # the last turn is rendered whole: sound
    assert len(build_store(read_rows(one_turn), codec, "sequences", TokenizeConfig(max_length=256))) == 1


def test_bad_rows_name_file_line_and_field_or_are_counted(model_dirs, tmp_path):
    model, _ = model_dirs["plain"]
    codec = TextCodec.of(model)
    good = {"messages": [U("What is 2 plus 6?"), A("Ahoy! 8. Arr!")]}
    bad = [{"messages": [U("hi"), {"role": "asistant", "content": "typo"}]},      # unknown role
           {"messages": [U("hi"), A("")]},                                        # empty completion
           {"messages": [U("only a question")]},                                  # nothing to learn
           {"messages": [U("long " * 300), A("x")]},                              # too long
           {"text": "wrong format"}]
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [good, *bad])
    with open(path, "ab") as f:
        f.write(b'{"messages": broken\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    cfg = TokenizeConfig(max_length=128)
    expected = [("line 2", "messages\\[1\\].role", "unknown_role"), ("line 3", "messages\\[1\\].content", "empty_completion"),
                ("line 4", "messages", "no_target_tokens"), ("line 5", None, "too_long"),
                ("line 6", "messages", "missing_field"), ("line 7", None, "not_json"), ("line 8", None, "not_utf8")]
    rows = read_rows(str(path))
    for i, (line, field, reason) in enumerate(expected, start=1):
        with pytest.raises(RowError, match=f"chat.jsonl {line}" + (f".*field '{field}'" if field else "")) as err:
            build_store(_Only(rows, [0, i]), codec, "sequences", cfg)
        assert err.value.reason == reason, (line, err.value)
    store = build_store(rows, codec, "sequences", cfg, on_error="skip")
    assert len(store) == 1 and store.report.rows == 8 and store.report.kept == 1
    assert dict(store.report.skipped) == {r: 1 for *_, r in expected}
    assert store.report.rows_skipped == 7 and "chat.jsonl line 2" in store.report.first_errors[0]
    with pytest.raises(ValueError, match="no usable row .1 unknown_role; 1 empty_completion.*first: .*line 2"):
        build_store(_Only(rows, [1, 2, 3, 4, 6, 7]), codec, "sequences", cfg, on_error="skip")
    with pytest.raises(ValueError, match="no usable row .it has no rows"):
        build_store(read_rows([]), codec, "sequences", cfg)
    with pytest.raises(ValueError, match="standard preference dataset cannot be used here"):
        build_store(read_rows(ROWS["preference"]), codec, "sequences", cfg)


class _Only(list):
    """Some rows of a source, keeping its `where` (for error messages)."""

    def __init__(self, rows, indices):
        super().__init__(indices)
        self.rows, self.name = rows, rows.name

    def __getitem__(self, i):
        return self.rows[list.__getitem__(self, i)]

    def where(self, i):
        return self.rows.where(list.__getitem__(self, i))


def test_truncation_policies_are_applied_and_counted(model_dirs):
    model, _ = model_dirs["plain"]
    codec, tok = TextCodec.of(model), model.tokenizer
    text = " ".join(f"word{i}" for i in range(60))
    ids = tok.encode(text) + [tok.eos_id]
    rows = read_rows([{"text": text}, {"text": "short"}])
    n = 32
    start = build_store(rows, codec, "sequences", TokenizeConfig(max_length=n, truncation="keep_start"))
    end = build_store(rows, codec, "sequences", TokenizeConfig(max_length=n, truncation="keep_end"))
    split = build_store(rows, codec, "sequences", TokenizeConfig(max_length=n, truncation="split"))
    drop = build_store(rows, codec, "sequences", TokenizeConfig(max_length=n, truncation="drop"), on_error="skip")
    assert start[0]["ids"].tolist() == ids[:n] and end[0]["ids"].tolist() == ids[-n:] and end[0]["mask"][0] == 0
    assert start.report.truncated == end.report.truncated == split.report.truncated == 1
    assert [split[i]["ids"].tolist() for i in range(len(split) - 1)] == [ids[s:s + n] for s in range(0, len(ids), n)]
    assert split.report.examples == len(split) == -(-len(ids) // n) + 1 and split.report.kept == 2
    assert len(drop) == 1 and dict(drop.report.skipped) == {"too_long": 1}
    with pytest.raises(RowError, match="rows\\[0\\]: has .* tokens, more than max_length = 32"):
        build_store(rows, codec, "sequences", TokenizeConfig(max_length=n))


def test_detection_mapping_and_implicit_prompts():
    assert detect_format({"prompt": [U("x")], "completion": [A("y")]}) == Format("prompt_completion", True)
    assert detect_format({"chosen": "a", "rejected": "b"}) == Format("preference", False, implicit_prompt=True)
    assert detect_format({"prompt": "x", "answer": 3}) == Format("prompt_only", False)
    with pytest.raises(RowError, match="no TRL format has the columns \\['question'\\]"):
        detect_format({"question": "x"})
    cols = ColumnMap.from_mapping({"prompt": "question", "completion": "answer"})
    row = {"question": "2+2=", "answer": "4", "source": "gsm"}
    ex = normalize(row, detect_format(cols.apply(row)), cols)
    assert (ex.prompt, ex.completion, dict(ex.columns)) == ("2+2=", "4", {"source": "gsm"})
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("I like black tea", "I like blue tea") == ("I like", " black tea", " blue tea")
    assert extract_prompt([U("q"), A("a")], [U("q"), A("b")]) == ([U("q")], [A("a")], [A("b")])
    with pytest.raises(RowError, match="identical"):
        normalize({"prompt": "p", "chosen": "x", "rejected": "x"}, Format("preference", False))
    with pytest.raises(ValueError, match="unknown column"):
        ColumnMap.from_mapping({"answer": "x"})
