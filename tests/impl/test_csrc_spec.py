"""csrc/activation.h against fastgan.ops.spec.ACTIVATION_TABLE.

The C++ and CUDA kernels switch on the table's integer codes, and a code with
no case falls to identity, so a row added to the table without its C++ cases
would run silently wrong there. Here: the enum has one enumerator per row
("leaky_relu" -> kLeakyRelu) with the row's code, and each of the three
activation functions has a case for every row. The header is read as text: no
build needed.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from fastgan.ops.spec import ACTIVATION_TABLE

CSRC = Path(__file__).resolve().parents[2] / "csrc"
HEADER = CSRC / "activation.h"
FUNCTIONS = ("activate", "activate_grad", "activate_grad_from_output")
SENTINEL = "kActivationCount"


def enumerator(name: str) -> str:
    return "k" + "".join(part.title() for part in name.split("_"))


def _code(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def enum_codes(text: str) -> dict[str, int]:
    """Enumerator -> value of ``enum Activation``, the sentinel left out."""
    body = re.search(r"enum\s+Activation\s*:\s*int\s*\{(.*?)\}", _code(text), re.S)
    assert body, f"no enum Activation in {HEADER}"
    items = [i.strip() for i in body.group(1).split(",") if i.strip()]
    assert items[-1] == SENTINEL, f"{SENTINEL} must be the last enumerator, got {items[-1]}"
    codes = {}
    for item in items[:-1]:
        m = re.fullmatch(r"(k\w+)\s*=\s*(\d+)", item)
        assert m, f"enumerator {item!r} must have an explicit code"
        codes[m.group(1)] = int(m.group(2))
    return codes


def function_cases(text: str, function: str) -> set[str]:
    """The ``case kX:`` labels in the body of ``function``."""
    code = _code(text)
    m = re.search(rf"\b{function}\s*\([^)]*\)\s*\{{", code)
    assert m, f"no function {function} in {HEADER}"
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        i += 1
    return set(re.findall(r"case\s+(k\w+)\s*:", code[m.end():i]))


def mismatches(text: str, table) -> list[str]:
    """What the header gets wrong about ``table``; empty when it matches."""
    want = {enumerator(a.name): a.code for a in table}
    got = enum_codes(text)
    problems = [f"{name} = {code} in the table, {got.get(name)} in the enum"
                for name, code in want.items() if got.get(name) != code]
    problems += [f"{name} in the enum has no table row" for name in got.keys() - want.keys()]
    for function in FUNCTIONS:
        cases = function_cases(text, function)
        problems += [f"{function}() has no case {name}" for name in want.keys() - cases]
        problems += [f"{function}() has a case {name} with no table row"
                     for name in cases - want.keys()]
    return problems


def test_header_matches_the_table():
    assert mismatches(HEADER.read_text(), ACTIVATION_TABLE) == []


def test_codes_are_dense():
    """dispatch_activation (csrc/cpu/cpu_common.h) walks the codes 0 .. kActivationCount - 1."""
    assert sorted(a.code for a in ACTIVATION_TABLE) == list(range(len(ACTIVATION_TABLE)))


def test_a_row_without_its_cases_is_caught():
    gelu = SimpleNamespace(name="gelu", code=len(ACTIVATION_TABLE))
    problems = mismatches(HEADER.read_text(), (*ACTIVATION_TABLE, gelu))
    assert "kGelu = 4 in the table, None in the enum" in problems
    assert {f"{f}() has no case kGelu" for f in FUNCTIONS} <= set(problems)
    no_tanh_grad = HEADER.read_text().replace("case kTanh: return T(1) - a * a;", "")
    assert mismatches(no_tanh_grad, ACTIVATION_TABLE) == [
        "activate_grad_from_output() has no case kTanh"]


def test_one_definition():
    """No other C++ source defines the activations again."""
    others = [p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")
              and p != HEADER and re.search(r"\benum\s+Activation\b|\bkLeakyRelu\s*=",
                                            _code(p.read_text()))]
    assert others == []
