"""Loss expressions: the ``loss`` training setting parsed into weighted terms, checked before any work starts.

An expression is a sum of terms, each an optional positive weight times a registered loss with keyword
parameters::

    dice+ce
    0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)
    ce(weights=auto)+dice
    ce(weights=[0.2,1,4])+gdice

Grammar (whitespace is ignored)::

    expr  := term ("+" term)*
    term  := [NUMBER "*"] NAME ["(" [param ("," param)*] ")"]
    param := NAME "=" (NUMBER | NAME | "[" NUMBER ("," NUMBER)* "]")

The parser is a small recursive-descent one (never ``eval``). This module is pure Python (no torch): the
settings check it, :mod:`autoseg.networks.losses` builds the terms from :class:`LossExpression`.
What each loss computes, and its minimum, is documented there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from autoseg.errors import AutosegError

DEFAULT_LOSS = "dice+ce"


class LossSpecError(AutosegError):
    """A loss expression that does not parse or names an unknown loss or a parameter out of range; the
    message says what is allowed (the settings prefix it with the setting's name)."""


@dataclass(frozen=True)
class ParamSpec:
    kind: str
    """"prob": a number in [0, 1]; "nonneg": >= 0; "pos": > 0; "weights": ``auto`` or a list of numbers > 0."""
    default: float | str | None


@dataclass(frozen=True)
class LossInfo:
    params: dict[str, ParamSpec]
    regions: bool
    """Also defined for region-based plans (one sigmoid output per region)."""
    about: str


_TV = {"alpha": ParamSpec("prob", 0.3), "beta": ParamSpec("prob", 0.7)}
LOSSES: dict[str, LossInfo] = {
    "ce": LossInfo({"weights": ParamSpec("weights", None)}, True, "cross-entropy (binary per region)"),
    "wce": LossInfo({"weights": ParamSpec("weights", "auto")}, False, "class-weighted cross-entropy"),
    "dice": LossInfo({}, True, "soft Dice, nnU-Net form (minus the Dice, minimum -1)"),
    "dice_sq": LossInfo({}, True, "soft Dice, V-Net squared denominator (minimum -1)"),
    "gdice": LossInfo({}, True, "generalized Dice (1 - GD, minimum 0)"),
    "focal": LossInfo({"gamma": ParamSpec("nonneg", 2.0)}, True, "focal loss"),
    "tversky": LossInfo(dict(_TV), True, "Tversky (1 - TI, minimum 0)"),
    "focal_tversky": LossInfo(
        {**_TV, "gamma": ParamSpec("pos", 4 / 3)}, True, "focal Tversky ((1 - TI)^(1/gamma))"
    ),
    "lovasz": LossInfo({}, True, "Lovász-softmax (Lovász hinge of sigmoid probabilities per region)"),
    "boundary": LossInfo({}, True, "boundary loss (signed distance maps of the truth; beside a region loss)"),
}
"""The registered losses: parameters with their defaults, and whether region-based plans may use them."""

_ALLOWED = {
    "prob": "a number in [0, 1]",
    "nonneg": "a number >= 0",
    "pos": "a number > 0",
    "weights": "auto or a list of numbers > 0, one per class",
}


@dataclass(frozen=True)
class LossTerm:
    weight: float
    name: str
    params: tuple[tuple[str, object], ...]
    """Every parameter of the loss, given or default, in the registry's order (weights as a tuple)."""

    def param(self, key: str):
        return dict(self.params)[key]

    def text(self) -> str:
        shown = [f"{k}={_value_text(v)}" for k, v in self.params if v is not None]
        call = self.name + (f"({','.join(shown)})" if shown else "")
        return call if self.weight == 1 else f"{_number_text(self.weight)}*{call}"


@dataclass(frozen=True)
class LossExpression:
    terms: tuple[LossTerm, ...]

    def text(self) -> str:
        """The canonical spelling: weights of 1 dropped, every parameter written out (defaults included),
        so equal recipes compare equal."""
        return "+".join(t.text() for t in self.terms)

    def names(self) -> list[str]:
        return [t.name for t in self.terms]


def _number_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _value_text(v) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_number_text(x) for x in v) + "]"
    return v if isinstance(v, str) else _number_text(v)


_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|([A-Za-z_]\w*)|(.))")


def _tokens(text: str) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs: kind "num", "name" or the symbol itself; ends with ``("end", "")``."""
    out = []
    for m in _TOKEN.finditer(text):
        num, name, sym = m.groups()
        if num is not None:
            out.append(("num", num))
        elif name is not None:
            out.append(("name", name.lower()))
        elif sym is not None and not sym.isspace():
            if sym not in "+-*(),=[]":
                raise LossSpecError(f"unexpected {sym!r}; {_grammar()}")
            out.append((sym, sym))
    return out + [("end", "")]


def _grammar() -> str:
    return f"write a sum of [weight*]loss[(name=value,...)], losses: {', '.join(LOSSES)}"


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str:
        return self.toks[self.i][0]

    def take(self, *kinds: str) -> str:
        """The next token, which must be of one of ``kinds``."""
        k, v = self.toks[self.i]
        if k not in kinds:
            names = {"num": "a number", "name": "a name", "end": "the end"}
            want = " or ".join(names.get(kind, repr(kind)) for kind in kinds)
            got = {"end": "the end"}.get(k, repr(v))
            raise LossSpecError(f"expected {want}, found {got}; {_grammar()}")
        self.i += 1
        return v

    def expression(self) -> list[tuple[float, str, dict]]:
        terms = [self.term()]
        while self.peek() == "+":
            self.take("+")
            terms.append(self.term())
        self.take("end")
        return terms

    def term(self) -> tuple[float, str, dict]:
        weight = 1.0
        if self.peek() in ("num", "-"):
            weight = self.number()
            self.take("*")
        name = self.take("name")
        params: dict = {}
        if self.peek() == "(":
            self.take("(")
            while self.peek() != ")":
                if params:
                    self.take(",", ")")  # the loop ends at ")", so this takes "," or says both are allowed
                key = self.take("name")
                if key in params:
                    raise LossSpecError(f"{name}: parameter {key} given twice")
                self.take("=")
                params[key] = self.value()
            self.take(")")
        return weight, name, params

    def number(self) -> float:
        """A number, with an optional minus sign (so that a negative value is refused by its range)."""
        sign = -1.0 if self.peek() == "-" and self.take("-") else 1.0
        return sign * float(self.take("num"))

    def value(self):
        if self.peek() == "name":
            return self.take("name")
        if self.peek() != "[":
            return self.number()
        self.take("[")
        items = [self.number()]
        while self.peek() == ",":
            self.take(",")
            items.append(self.number())
        self.take("]")
        return tuple(items)


def parse_loss(text: str) -> LossExpression:
    """``text`` as a :class:`LossExpression`; :class:`LossSpecError` names the problem and what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise LossSpecError(f"must be a loss expression; {_grammar()}")
    terms = []
    for weight, name, params in _Parser(text).expression():
        if name not in LOSSES:
            raise LossSpecError(f"unknown loss {name!r}; losses: {', '.join(LOSSES)}")
        if not (math.isfinite(weight) and weight > 0):
            raise LossSpecError(f"{name}: weight {_number_text(weight)} must be a finite number > 0")
        terms.append(LossTerm(weight, name, _check_params(name, params)))
    return LossExpression(tuple(terms))


def _check_params(name: str, given: dict) -> tuple[tuple[str, object], ...]:
    specs = LOSSES[name].params
    for key in given:
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise LossSpecError(f"{name}: unknown parameter {key!r} (parameters: {known})")
    out = []
    for key, spec in specs.items():
        value = given.get(key, spec.default)
        if key in given and not _in_range(spec.kind, value):
            raise LossSpecError(f"{name}: {key}={_value_text(value)} must be {_ALLOWED[spec.kind]}")
        out.append((key, value))
    if name in ("tversky", "focal_tversky") and dict(out)["alpha"] + dict(out)["beta"] == 0:
        raise LossSpecError(f"{name}: alpha + beta must be > 0")
    return tuple(out)


def _in_range(kind: str, value) -> bool:
    if kind == "weights":
        if isinstance(value, tuple):
            return all(math.isfinite(v) and v > 0 for v in value)
        return value == "auto"
    if not isinstance(value, float) or not math.isfinite(value):
        return False
    return {"prob": 0 <= value <= 1, "nonneg": value >= 0, "pos": value > 0}[kind]


def check_for_plans(expr: LossExpression, region_based: bool, num_classes: int) -> None:
    """Refuse terms the plans' outputs cannot take: a loss without a region-based form on a region-based
    plan, or class weights whose number is not the number of classes (background included)."""
    for term in expr.terms:
        if region_based and not LOSSES[term.name].regions:
            ok = ", ".join(n for n, i in LOSSES.items() if i.regions)
            raise LossSpecError(f"{term.name} needs softmax classes; region-based plans take: {ok}")
        weights = dict(term.params).get("weights")
        if region_based and weights is not None:
            raise LossSpecError(f"{term.name}: class weights need softmax classes, not region-based plans")
        if isinstance(weights, tuple) and len(weights) != num_classes:
            raise LossSpecError(
                f"{term.name}: {len(weights)} weights given, the plans have {num_classes} classes "
                "(background included)"
            )
