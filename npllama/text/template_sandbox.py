"""The Jinja sandbox a chat template is compiled and rendered in, imported only by the
confined worker (npllama/text/confined.py) that runs it, so npllama's own process never
loads jinja2. What it bounds and how is chat_template.py's docstring: every string, list or
number a template builds is charged to MAX_BUILT before anything that can grow faster than
its inputs is built; the output to MAX_OUTPUT; rendering to the time limit, checked on every
line run; deep recursion and nesting are errors."""
from __future__ import annotations

import functools
import json
import re
import string
import sys
import time
from datetime import datetime

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError, UsageError
from .chat_template import MAX_BUILT, MAX_INT_BITS, MAX_OUTPUT


class _Budget(Exception):
    """A bound of this module was exceeded while rendering."""


def _size(value, limit: int) -> int:
    """Characters `value` stands for once printed or joined, shared references counted each
    time; stops counting past limit (so it is cheap whatever the structure)."""
    n, stack = 0, [value]
    while stack and n <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            n += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            n += 1 + len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            n += 1 + len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, int) and not isinstance(v, bool):
            n += v.bit_length() // 3 + 1
        else:
            n += 1
    return n


# printf-style conversions ('%-10.3f'): their widths and precisions
_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(widths, what: str) -> None:
    """No field wider than the output may be ('*' takes its width from the arguments: refused)."""
    for w in widths:
        if w == "*" or (w and (len(w) > 7 or int(w) > MAX_OUTPUT)):
            raise _Budget(f"{what} asks for a field wider than {MAX_OUTPUT:,} characters")


def _check_format(fmt, what: str) -> None:
    if isinstance(fmt, str):
        if what == "%":
            _check_widths([w for m in _PERCENT_SPEC.finditer(fmt) for w in m.groups()], what)
        else:
            for _, _, spec, _ in string.Formatter().parse(fmt):
                if "{" in (spec or ""):
                    raise _Budget(f"{what}: a width from the arguments ({{:{spec}}}) is not allowed")
                _check_widths(re.findall(r"\d+|\*", spec or ""), what)


def _predicted(name: str, a: list, kw: dict) -> int:
    """Characters the str method or filter `name` will produce, for the ones whose output can
    be far larger than their inputs (a[0] is the string or value it works on); 0 for the rest,
    which are charged after the call."""
    others = list(a[1:]) + list(kw.values())
    width = max((x for x in others if isinstance(x, int) and not isinstance(x, bool)), default=0)
    text = a[0] if a and isinstance(a[0], str) else ""
    base = _size(a[0], MAX_BUILT) if a else 0
    rest = _size(others, MAX_BUILT)
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(base, width) + rest
    if name == "expandtabs":
        return base + text.count("\t") * width
    if name == "indent":
        return base + (text.count("\n") + 1) * (width + rest)
    if name == "wordwrap":
        return base * (2 + rest)
    if name == "tojson":
        return (base + 1) * (width + 2)
    if name == "generate_lorem_ipsum":  # lipsum(n, html, min, max)
        width = max((x for x in a + list(kw.values()) if isinstance(x, int) and not isinstance(x, bool)), default=100)
        return 20 * width * width
    if name == "replace" and len(a) >= 3 and all(isinstance(x, str) for x in a[:3]):
        count = text.count(a[1]) if a[1] else len(text) + 1
        return len(text) + count * max(len(a[2]) - len(a[1]), 0)
    if name in ("format", "format_map", "%"):  # str.format, or printf-style ('%' and the format filter)
        _check_format(text, name)
        return base + rest
    if name == "join":  # a = [separator, items]
        sep, items = (a + ["", ""])[:2]
        return _size(items, MAX_BUILT) + len(items) * _size(sep, MAX_BUILT) if hasattr(items, "__len__") else 0
    return 0


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b`: charged like `+`
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationBlocks(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} (marks assistant tokens for
    training masks): renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace(): no underscore attributes (a way to CPython's internals)."""
    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox, with every binary operator, call and `~` checked against
    the per-render budget before it builds anything (`built`: characters so far)."""
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%", "//", "-"])

    def charge(self, value):
        self.built += _size(value, MAX_BUILT - self.built)
        if self.built > MAX_BUILT:
            raise _Budget(f"the template builds more than {MAX_BUILT:,} characters")
        return value

    def precharge(self, n: int, what: str):
        if self.built + n > MAX_BUILT:
            raise _Budget(f"{what} would build more than {MAX_BUILT:,} characters")

    def checked_concat(self, parts):
        self.precharge(sum(_size(p, MAX_BUILT) for p in parts), "~")
        return self.charge("".join(map(str, parts)))

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and \
                abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise _Budget(f"a power with more than {MAX_INT_BITS} bits")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                self.precharge(_size(seq, MAX_BUILT) * max(n, 0), "*")
            elif isinstance(seq, int) and isinstance(n, int) and \
                    seq.bit_length() + n.bit_length() > MAX_INT_BITS:
                raise _Budget(f"a product with more than {MAX_INT_BITS} bits")
        if operator == "+" and isinstance(left, (str, list, tuple)):
            self.precharge(_size(left, MAX_BUILT) + _size(right, MAX_BUILT), "+")
        if operator == "%" and isinstance(left, str):
            _check_format(left, "%")
            self.precharge(len(left) + _size(right, MAX_BUILT), "%")
        return self.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        name = getattr(target, "__name__", "")
        this = getattr(target, "__self__", None)
        if name == "join" and isinstance(this, str) and args and not hasattr(args[0], "__len__"):
            args = (list(args[0]), *args[1:])  # a generator: its items are counted first
        if isinstance(this, str) or name == "generate_lorem_ipsum":
            __self.precharge(_predicted(name, [this, *args] if isinstance(this, str) else list(args), kwargs),
                             name)
        return __self.charge(super().call(__context, __obj, *args, **kwargs))


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, json.dumps's options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """dict(...) and dict.fromkeys(...) without the dict type itself (its attributes)."""
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _new_environment() -> "_Sandbox":
    """The sandbox a template is compiled and rendered in, with transformers' settings and
    globals, every filter charged to the budget."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.built = 0
    env.filters["tojson"] = _tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _charged_filter(env, name, f)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env


def _charged_filter(env, name: str, f):
    """A filter that checks what it will build against the budget, and charges what it built.
    (jinja marks some filters with pass_context etc. on the function: keep those marks.)"""
    @functools.wraps(f)
    def filtered(*args, **kwargs):
        n_context = sum(map(_is_jinja_context, args[:1]))
        context, plain = args[:n_context], list(args[n_context:])
        if name == "join" and plain and not hasattr(plain[0], "__len__"):
            plain[0] = list(plain[0])  # a generator: its items are counted first
        # join(value, d): the separator first, as str.join has it
        predicted = _predicted("%" if name == "format" else name,  # the format filter is `value % args`
                               [(plain + [kwargs.get("d", "")])[1], plain[0]] if name == "join" and plain else plain,
                               {} if name == "join" else kwargs)
        env.precharge(predicted, f"the {name} filter")
        return env.charge(f(*context, *plain, **kwargs))
    return filtered


def _is_jinja_context(a) -> bool:
    return isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment))


class Renderer:
    """The compiled template: made, and run, inside the confined worker (confined.py), where
    compiling a 700,000-character template or a filter that never returns to Python meets
    the OS's limits. The budgets and line tracer above stop most templates sooner and with a
    more precise message."""

    def __init__(self, source: str, name: str, time_limit: float):
        self.name, self.time_limit = name, time_limit
        self.env = _new_environment()
        try:
            self.template = self.env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{name}: chat template line {e.lineno}: {e.message}") from None
        except (RecursionError, SyntaxError):   # SyntaxError: the generated Python nests too deeply
            raise TokenizerError(f"{name}: chat template nests too deeply") from None

    def __call__(self, variables: dict) -> str:
        self.env.built = 0
        deadline = time.monotonic() + self.time_limit

        def tracer(frame, event, arg):  # every line run while rendering: the template's and jinja's
            if time.monotonic() > deadline:
                raise _Budget(f"rendering took longer than {self.time_limit} s")
            return tracer

        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            return self._generate(variables)
        except _Budget as e:
            raise UsageError(f"{self.name}: chat template stopped: {e}") from None
        except RecursionError:
            raise UsageError(f"{self.name}: chat template stopped: recursion too deep") from None
        except MemoryError:
            raise UsageError(f"{self.name}: chat template stopped: out of memory") from None
        except jinja2.TemplateError as e:  # raise_exception, a sandbox refusal, an undefined call
            raise UsageError(f"{self.name}: chat template: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise UsageError(f"{self.name}: chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)
            self.env.built = 0

    def _generate(self, variables: dict) -> str:
        out, n = [], 0
        for piece in self.template.generate(**variables):
            n += len(piece)
            if n > MAX_OUTPUT:
                raise _Budget(f"the prompt is longer than {MAX_OUTPUT:,} characters")
            out.append(piece)
        return "".join(out)
