"""The bounded Jinja sandbox chat templates render in (`render_template`).

Unlike `transformers`, rendering here is *bounded*: a template from a checkpoint is untrusted code,
so one that loops for ever, recurses without end or builds a huge string raises
`ChatTemplateLimitError` within `RenderLimits.timeout_s` (2 s by default) instead of hanging
or exhausting memory. The bounds are enforced at *guard points*:

* every ``{% for %}`` iteration, every call (functions, methods, macros, ``loop()``), every
  filter, every intercepted operator (``*``, ``+``, ``**``, ``%``) and every piece of output is
  one step: the step count and the wall-clock deadline are checked there;
* operations that could allocate a lot in one go are checked *before* they run (string / list
  repetition and concatenation, ``~``, big integer powers and products, format widths,
  ``center``/``ljust``/``rjust``/``zfill``/``expandtabs``/``replace``/``join``/``indent``/
  ``wordwrap``/``tojson``/``batch``/``slice``/``sum``/``lipsum``);
* every string or list produced at a guard point is capped in length, all characters produced
  are charged to a total budget, and the final output is streamed (``Template.generate``) and
  capped;
* nested macro calls are capped in depth (Python's own ``RecursionError`` is caught too).

Templates that stay within the limits render exactly as in `transformers`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import re
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

class ChatTemplateError(ValueError, jinja2.TemplateError):
    """A chat template could not be compiled or rendered (syntax error, `raise_exception`, bad input, …).

    A ValueError, and also a `jinja2.TemplateError` (what `transformers` raises), so either catches it.
    """

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ChatTemplateLimitError(ChatTemplateError):
    """A chat template exceeded a `RenderLimits` bound (time, steps, size or recursion depth)."""


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Bounds on one rendering of a chat template (see the module docstring).

    Attributes:
      timeout_s: wall-clock seconds for compiling and rendering.
      max_steps: loop iterations + calls + filters + intercepted operators + output pieces.
      max_output_chars: length of the rendered prompt.
      max_string_chars: length of any one string built while rendering.
      max_items: length of any one list/tuple built while rendering.
      max_total_chars: all characters of the strings produced at guard points (output pieces,
        including those captured by macros and ``{% set %}`` blocks, filter and call results).
      max_depth: nesting of calls (macro recursion, recursive loops).
      max_int_bits: size of an integer built by ``*`` or ``**``.
      max_indent: ``tojson(indent=...)`` width.
    """

    timeout_s: float = 2.0
    max_steps: int = 1_000_000
    max_output_chars: int = 4_000_000
    max_string_chars: int = 4_000_000
    max_items: int = 1_000_000
    max_total_chars: int = 64_000_000
    max_depth: int = 64
    max_int_bits: int = 4096
    max_indent: int = 64

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"RenderLimits.{f.name} must be a positive number, got {value!r}")


DEFAULT_LIMITS = RenderLimits()


# --------------------------------------------------------------------------- the per-render budget

class _Budget:
    """What one rendering may still spend; checked at every guard point."""

    __slots__ = ("limits", "deadline", "steps", "chars", "depth")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.steps = 0
        self.chars = 0
        self.depth = 0

    def step(self) -> None:
        """One unit of work: count it and check the deadline."""
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise ChatTemplateLimitError(f"chat template ran more than {self.limits.max_steps:,} steps "
                                         "(loop iterations, calls, filters); it may loop for ever")
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(f"chat template rendering took longer than {self.limits.timeout_s:g} s")

    def check_chars(self, n: int, what: str) -> None:
        """Refuse to build a string of `n` characters if that is over the cap."""
        if n > self.limits.max_string_chars:
            raise ChatTemplateLimitError(f"chat template {what} would build a string of {n:,} characters "
                                         f"(limit {self.limits.max_string_chars:,})")

    def check_items(self, n: int, what: str) -> None:
        """Refuse to build a list of `n` items if that is over the cap."""
        if n > self.limits.max_items:
            raise ChatTemplateLimitError(f"chat template {what} would build a sequence of {n:,} items "
                                         f"(limit {self.limits.max_items:,})")

    def charge(self, n: int) -> None:
        """Account for `n` characters produced."""
        self.chars += n
        if self.chars > self.limits.max_total_chars:
            raise ChatTemplateLimitError(f"chat template produced more than {self.limits.max_total_chars:,} "
                                         "characters in all while rendering")

    def result(self, value: Any, what: str) -> Any:
        """Check (and charge) a value produced at a guard point; wrap lazy iterators so they count steps."""
        if isinstance(value, str):
            self.check_chars(len(value), what)
            self.charge(len(value))
        elif isinstance(value, (list, tuple)):
            self.check_items(len(value), what)
        elif isinstance(value, types.GeneratorType):
            return _Counted(value, self)
        return value

    def check_container(self, value: Any, limit: int, what: str) -> None:
        """Refuse a container whose printed form would be longer than `limit` (references counted each time)."""
        if isinstance(value, _CONTAINERS):
            size = _estimate_size(value, limit)
            if size > limit:
                raise ChatTemplateLimitError(f"chat template {what} handles a value of more than {limit:,} "
                                             "characters")

    def enter(self) -> None:
        """One call deeper."""
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise ChatTemplateLimitError(f"chat template calls nested deeper than {self.limits.max_depth} "
                                         "(runaway macro recursion?)")

    def leave(self) -> None:
        self.depth -= 1


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("arlm_chat_budget", default=None)


def _current() -> _Budget:
    """The budget of the rendering in progress (a fresh default one outside rendering, e.g. when folding)."""
    budget = _BUDGET.get()
    return budget if budget is not None else _Budget(DEFAULT_LIMITS)


class _Counted:
    """An iterator that spends one step per item (what lazy filters return; truthy, like a generator)."""

    __slots__ = ("_source", "_it", "_budget")

    def __init__(self, source: Iterable[Any], budget: _Budget) -> None:
        self._source = source
        self._it = iter(source)
        self._budget = budget

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        self._budget.step()
        return item


class _CountedSized(_Counted):
    """A `_Counted` over a sized source (what ``{% for %}`` loops iterate over lists, dicts, strings)."""

    __slots__ = ()

    def __len__(self) -> int:          # lets `loop.length` work without consuming the source
        return len(self._source)


def _counted(source: Iterable[Any], budget: _Budget) -> _Counted:
    return (_CountedSized if hasattr(source, "__len__") else _Counted)(source, budget)


_CONTAINERS = (list, tuple, set, frozenset, Mapping, Namespace)


def _namespace_attrs(ns: Namespace) -> Mapping[str, Any]:
    try:
        return object.__getattribute__(ns, "_Namespace__attrs")
    except AttributeError:
        return {}


def _estimate_size(obj: Any, limit: int, indent: int = 0) -> int:
    """About how many characters `str(obj)` / `json.dumps(obj, indent=indent)` has; stops counting past `limit`.

    Shared references count every time (as printing them would); numbers count 8 (at most
    `RenderLimits.max_int_bits` bits each).
    """
    total, todo = 0, [(obj, 0)]
    while todo and total <= limit:
        item, depth = todo.pop()
        total += 1 + depth * indent
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, Mapping):
            todo.extend((x, depth + 1) for kv in item.items() for x in kv)
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend((x, depth + 1) for x in item)
        elif isinstance(item, Namespace):
            todo.extend((x, depth + 1) for kv in _namespace_attrs(item).items() for x in kv)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += 8 + item.bit_length() // 3
        else:
            total += 8
    return total


# --------------------------------------------------------------------------- pre-checks of single allocations

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_FORMAT_FIELD = re.compile(r"\{[^{}]*:((?:[^{}]|\{[^{}]*\})*)\}")
_DIGITS = re.compile(r"\d+")


def _big_ints(values: Iterable[Any], cap: int) -> bool:
    return any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > cap for v in values)


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """`fmt % args`: refuse field widths / precisions that would build a huge string."""
    cap = budget.limits.max_string_chars
    budget.check_container(args, cap, "'%' formatting")
    star = False
    for m in _PRINTF_SPEC.finditer(fmt):
        for group in m.groups():
            if group == "*":
                star = True
            elif group and int(group) > cap:
                budget.check_chars(int(group), "format width")
    if star:
        values = args if isinstance(args, tuple) else (args,)
        if _big_ints(values, cap):
            budget.check_chars(cap + 1, "format width")


def _check_str_format(budget: _Budget, fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """`fmt.format(...)`: refuse field widths / precisions that would build a huge string."""
    cap = budget.limits.max_string_chars
    budget.check_container(tuple(args), cap, "str.format")
    budget.check_container(dict(kwargs), cap, "str.format")
    for m in _FORMAT_FIELD.finditer(fmt):
        spec = m.group(1)
        if "{" in spec and _big_ints([*args, *kwargs.values()], cap):
            budget.check_chars(cap + 1, "format width")
        for digits in _DIGITS.findall(re.sub(r"\{[^{}]*\}", "", spec)):
            budget.check_chars(int(digits), "format width")


def _materialize(budget: _Budget, iterable: Any, what: str) -> list[Any]:
    """A list of the items, one step each, refusing more than the item cap."""
    if isinstance(iterable, (list, tuple)):
        budget.check_items(len(iterable), what)
        return list(iterable)
    if isinstance(iterable, str) or isinstance(iterable, jinja2.Undefined) or not isinstance(iterable, Iterable):
        return iterable
    out = []
    for item in iterable:
        budget.step()
        out.append(item)
        budget.check_items(len(out), what)
    return out


def _check_join(budget: _Budget, items: Any, sep: str, what: str) -> None:
    """Refuse a join whose result would be over the string cap (counted before joining)."""
    if not isinstance(items, list):
        return
    cap = budget.limits.max_string_chars
    total = len(sep) * max(len(items) - 1, 0)
    for item in items:
        total += len(item) if isinstance(item, str) else _estimate_size(item, cap)
        if total > cap:
            budget.check_chars(total, what)


def _replace_size(s: str, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _width(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _check_str_method(budget: _Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Pre-checks for ``str`` methods called from a template; may return new (materialized) args."""
    wrapped = getattr(method, "__wrapped__", None)   # the sandbox's str.format / format_map wrapper
    if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str):
        fmt = wrapped.__self__
        if wrapped.__name__ == "format_map":
            mapping = args[0] if args else {}
            _check_str_format(budget, fmt, (), mapping if isinstance(mapping, Mapping) else {})
        else:
            _check_str_format(budget, fmt, args, kwargs)
        return args
    s = getattr(method, "__self__", None)
    if not (isinstance(method, types.BuiltinMethodType) and isinstance(s, str)):
        return args
    name = method.__name__
    if name in ("center", "ljust", "rjust", "zfill"):
        budget.check_chars(max(len(s), _width(_arg(args, kwargs, 0, "width"))), f"str.{name}")
    elif name == "expandtabs":
        budget.check_chars(len(s) + s.count("\t") * max(_width(_arg(args, kwargs, 0, "tabsize", 8)), 1),
                           "str.expandtabs")
    elif name == "replace":
        budget.check_chars(_replace_size(s, _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new"),
                                         _arg(args, kwargs, 2, "count", -1)), "str.replace")
    elif name == "join" and args:
        items = _materialize(budget, args[0], "str.join")
        _check_join(budget, items, s, "str.join")
        return (items, *args[1:])
    return args


# --------------------------------------------------------------------------- filters

def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """`transformers`' tojson: plain `json.dumps` (no HTML escaping), non-ASCII kept by default."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _pre_center(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    budget.check_chars(max(len(str(value)), _width(_arg(args, kwargs, 0, "width", 80))), "center filter")


def _pre_indent(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    width = _arg(args, kwargs, 0, "width", 4)
    width = len(width) if isinstance(width, str) else _width(width)
    s = str(value)
    budget.check_chars(len(s) + (s.count("\n") + 1) * width, "indent filter")


def _pre_wordwrap(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    width = max(_width(_arg(args, kwargs, 0, "width", 79)), 1)
    wrap = _arg(args, kwargs, 2, "wrapstring")
    s = str(value)
    budget.check_chars(len(s) + (len(s) // width + 1) * (len(wrap) if isinstance(wrap, str) else 2),
                       "wordwrap filter")


def _pre_replace(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    budget.check_chars(_replace_size(str(value), _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new"),
                                     _arg(args, kwargs, 2, "count")), "replace filter")


def _pre_format(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    _check_printf(budget, str(value), tuple(args) or tuple(kwargs.values()))


def _pre_tojson(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    indent = _arg(args, kwargs, 1, "indent")
    width = len(indent) if isinstance(indent, str) else _width(indent)
    if width > budget.limits.max_indent:
        raise ChatTemplateLimitError(f"chat template asks tojson for indent={width} "
                                     f"(limit {budget.limits.max_indent})")
    cap = budget.limits.max_string_chars
    budget.check_chars(_estimate_size(value, cap, width), "tojson filter")


def _pre_stringify(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    if not isinstance(value, str):
        budget.check_chars(_estimate_size(value, budget.limits.max_string_chars), "string conversion")


def _pre_batch(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    budget.check_items(_width(_arg(args, kwargs, 0, "linecount")), "batch filter")


def _pre_slice(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    budget.check_items(_width(_arg(args, kwargs, 0, "slices")), "slice filter")


# Filters that take a container without printing it; every other filter may print its value, so a
# container given to one is measured first. (Containers of shared references are cheap to build; only
# printing them is guarded: output, ~, %, str.format, printing filters, tojson, join, raise_exception.)
_CONTAINER_FILTERS = frozenset({
    "attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items", "join", "last", "length",
    "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse", "select", "selectattr", "slice",
    "sort", "sum", "tojson", "unique"})

_FILTER_PRECHECKS: dict[str, Callable[[_Budget, Any, tuple, dict], None]] = {
    "center": _pre_center, "indent": _pre_indent, "wordwrap": _pre_wordwrap, "replace": _pre_replace,
    "format": _pre_format, "tojson": _pre_tojson, "string": _pre_stringify, "pprint": _pre_stringify,
    "e": _pre_stringify, "escape": _pre_stringify, "forceescape": _pre_stringify, "urlencode": _pre_stringify,
    "xmlattr": _pre_stringify, "batch": _pre_batch, "slice": _pre_slice,
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with a step, its pre-check (if any) and a check of its result."""
    precheck = _FILTER_PRECHECKS.get(name)
    lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0   # context / eval_ctx / environment
    what = f"{name} filter"

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.step()
        if len(args) > lead:
            value, rest = args[lead], args[lead + 1:]
            if name not in _CONTAINER_FILTERS:     # the filter may print its value
                budget.check_container(value, budget.limits.max_string_chars, what)
            if precheck is not None:
                precheck(budget, value, rest, kwargs)
            if name in ("join", "sum", "list", "unique", "sort"):
                value = _materialize(budget, value, what)
                if name == "join":
                    sep = _arg(rest, kwargs, 0, "d", "")
                    _check_join(budget, value, sep if isinstance(sep, str) else "", what)
                if name == "sum":
                    return budget.result(_linear_sum(func, args[:lead], value, rest, kwargs), what)
                args = (*args[:lead], value, *rest)
        return budget.result(func(*args, **kwargs), what)

    return guarded


def _linear_sum(func: Callable[..., Any], lead: tuple, items: Any, rest: tuple, kwargs: dict) -> Any:
    """The sum filter; a list/tuple `start` is concatenated in linear time (Python's sum is quadratic)."""
    start = _arg(rest, kwargs, 1, "start", 0)
    if not isinstance(start, (list, tuple)) or _arg(rest, kwargs, 0, "attribute") is not None \
            or not isinstance(items, list):
        return func(*lead, items, *rest, **kwargs)
    budget, out = _current(), list(start)
    for item in items:
        if type(item) is not type(start):
            raise TypeError(f'can only concatenate {type(start).__name__} (not "{type(item).__name__}") '
                            f"to {type(start).__name__}")
        budget.check_items(len(out) + len(item), "sum filter")
        out.extend(item)
    return type(start)(out)


@jinja2.pass_context
def _loop_guard(context: Any, iterable: Any) -> Any:
    """Wraps the iterable of every ``{% for %}``: one step per iteration."""
    if isinstance(iterable, jinja2.Undefined):
        return iterable
    return _counted(iterable, _current())


@jinja2.pass_context
def _emit_guard(context: Any, value: Any) -> Any:
    """Wraps every piece of output (top level, macros, blocks): one step, and its characters charged."""
    budget = _current()
    budget.step()
    if type(value) is not str and not isinstance(value, (int, float, jinja2.Undefined)):
        budget.check_chars(_estimate_size(value, budget.limits.max_string_chars), "output")
        value = str(value)
    if isinstance(value, str):
        budget.check_chars(len(value), "output")
        budget.charge(len(value))
    return value


@jinja2.pass_context
def _concat_guard(context: Any, operands: tuple) -> str:
    """Every ``a ~ b ~ …``: the operands are checked before they are printed and joined (as Jinja does)."""
    from jinja2.runtime import markup_join, str_join

    budget = _current()
    budget.step()
    cap = budget.limits.max_string_chars
    total = 0
    for x in operands:
        total += len(x) if isinstance(x, str) else _estimate_size(x, cap)
        budget.check_chars(total, "~ concatenation")
    joined = (markup_join if context.eval_ctx.autoescape else str_join)(operands)
    return budget.result(joined, "~ concatenation")


_LOOP, _EMIT, _CONCAT = "_arlm_loop_guard", "_arlm_emit_guard", "_arlm_concat_guard"


class _Instrument(NodeTransformer):
    """Puts the guard filters into a parsed template: around loop iterables, output pieces and ``~``."""

    def __init__(self, environment: jinja2.Environment) -> None:
        self.environment = environment

    def _wrap(self, node: nodes.Expr, name: str) -> nodes.Expr:
        wrapped = nodes.Filter(node, name, [], [], None, None)
        wrapped.set_lineno(node.lineno or 1)
        wrapped.set_environment(self.environment)
        return wrapped

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._wrap(node.iter, _LOOP)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        node = self.generic_visit(node)
        operands = nodes.Tuple(list(node.nodes), "load")
        operands.set_lineno(node.lineno or 1)
        return self._wrap(operands, _CONCAT)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [self._wrap(child, _EMIT) for child in node.nodes]
        return node


# --------------------------------------------------------------------------- globals (as transformers)

def _raise_exception(message: Any) -> None:
    budget = _current()
    budget.check_container(message, budget.limits.max_string_chars, "raise_exception")
    raise ChatTemplateError(str(message))


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates, without access to the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


def _capped_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    from jinja2.utils import generate_lorem_ipsum

    if any(_width(v) > 1000 for v in (n, min, max)):
        raise ChatTemplateLimitError("chat template asks lipsum for more than 1000 paragraphs/words")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class _GenerationSpans:
    """While `render_template(..., generation_spans=True)` runs: the characters emitted so far and
    the (start, end) character span of every ``{% generation %}`` block's output."""

    __slots__ = ("emitted", "spans")

    def __init__(self) -> None:
        self.emitted = 0
        self.spans: list[tuple[int, int]] = []


_SPANS: contextvars.ContextVar[_GenerationSpans | None] = contextvars.ContextVar("arlm_generation_spans",
                                                                                  default=None)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body and, when spans are asked for, records
    where that body lands in the output (what transformers' assistant-token masks are made of).

    The output is streamed, so when a block is reached every piece before it has been emitted: its
    start is the count of characters emitted so far."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        body = caller()
        tracker = _SPANS.get()
        if tracker is not None:
            tracker.spans.append((tracker.emitted, tracker.emitted + len(body)))
        return body


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus the guard points of the module docstring."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _current()
        budget.step()
        if operator == "*":
            _check_mul(budget, left, right)
        elif operator == "+":
            _check_add(budget, left, right)
        elif operator == "**":
            _check_pow(budget, left, right)
        elif operator == "%" and isinstance(left, str):
            _check_printf(budget, left, right)
        return budget.result(self.binop_table[operator](left, right), f"'{operator}' operator")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.step()
        args = _check_str_method(budget, obj, args, kwargs)
        budget.enter()
        try:
            value = super().call(context, obj, *args, **kwargs)
        finally:
            budget.leave()
        return budget.result(value, "call")

    def compile(self, source: Any, name: str | None = None, filename: str | None = None, raw: bool = False,
                defer_init: bool = False) -> Any:
        if isinstance(source, str):
            source = _Instrument(self).visit(self.parse(source, name, filename))
        return super().compile(source, name, filename, raw, defer_init)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_mul(budget: _Budget, left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            times = max(int(n), 0)
            if isinstance(seq, str):
                budget.check_chars(len(seq) * times, "'*' repetition")
            else:
                budget.check_items(len(seq) * times, "'*' repetition")
            return
    if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > budget.limits.max_int_bits:
        raise ChatTemplateLimitError(f"chat template multiplies integers past {budget.limits.max_int_bits} bits")


def _check_add(budget: _Budget, left: Any, right: Any) -> None:
    if isinstance(left, str) and isinstance(right, str):
        budget.check_chars(len(left) + len(right), "'+' concatenation")
    elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        budget.check_items(len(left) + len(right), "'+' concatenation")


def _check_pow(budget: _Budget, left: Any, right: Any) -> None:
    if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1 \
            and (abs(left).bit_length() - 1) * right > budget.limits.max_int_bits:
        raise ChatTemplateLimitError(f"chat template raises an integer to a power past "
                                     f"{budget.limits.max_int_bits} bits")


@functools.lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    """The one sandboxed environment all chat templates compile in."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name, func in list(env.filters.items()):
        env.filters[name] = _guard_filter(name, func)
    env.filters[_LOOP], env.filters[_EMIT], env.filters[_CONCAT] = _loop_guard, _emit_guard, _concat_guard
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["lipsum"] = _capped_lipsum
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def render_template(source: str, variables: Mapping[str, Any], limits: RenderLimits | None = None, *,
                    generation_spans: bool = False) -> str | tuple[str, list[tuple[int, int]]]:
    """Compile (cached) and render a template with `variables`, within `limits`; errors are ChatTemplateError.

    With `generation_spans`, returns (text, spans): the (start, end) character offsets in text of
    each ``{% generation %}`` block's output, as transformers computes them for
    `apply_chat_template(..., return_assistant_tokens_mask=True)`.
    """
    if not isinstance(source, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(source).__name__}")
    limits = limits or DEFAULT_LIMITS
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    tracker = _GenerationSpans() if generation_spans else None
    spans_token = _SPANS.set(tracker)
    try:
        template = _compile(source)
        pieces, n = [], 0
        for piece in template.generate(**variables):
            n += len(piece)
            if n > limits.max_output_chars:
                raise ChatTemplateLimitError(f"chat template output is longer than {limits.max_output_chars:,} "
                                             "characters")
            budget.step()
            pieces.append(piece)
            if tracker is not None:
                tracker.emitted = n
        text = "".join(pieces)
        return (text, tracker.spans) if tracker is not None else text
    except ChatTemplateError:
        raise
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template syntax error (line {err.lineno}): {err.message}") from err
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template error: {err}") from err
    except RecursionError as err:
        raise ChatTemplateLimitError("chat template recursed too deeply") from err
    except OverflowError as err:        # e.g. the sandbox's range() cap, or a float overflow
        raise ChatTemplateLimitError(f"chat template overflowed: {err}") from err
    except MemoryError as err:
        raise ChatTemplateLimitError("chat template ran out of memory") from err
    except Exception as err:
        raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from err
    finally:
        _SPANS.reset(spans_token)
        _BUDGET.reset(token)


__all__ = ["DEFAULT_LIMITS", "ChatTemplateError", "ChatTemplateLimitError", "RenderLimits", "render_template"]
