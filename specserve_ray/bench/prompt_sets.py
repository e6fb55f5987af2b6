"""Prompt sets for `bench single`, cut mechanically from held-out code (never hand-picked).

completion  held-out source cut at line starts (prompts.held_out_prompts): the model
            continues code it has not seen; only a draft model can guess it.
edit        an editing task a code model answers by copying: a held-out function, a blank
            line, then the same function's first line again (without its newline, see
            edit_cases), so the natural continuation repeats the body (what prompt
            lookup / n-gram drafting is for). Functions are taken in file order from the held-out packages, the first one per file whose
            source fits the token range, so nothing is chosen by how well it drafts.
"""
from __future__ import annotations

import ast

from specserve_ray.prompts import held_out_files, held_out_prompts

PROMPT_SETS = ("completion", "edit")


def edit_cases(tokenizer, count: int, min_tokens: int = 120, max_tokens: int = 400
               ) -> list[tuple[list[int], str]]:
    """`count` edit prompts (function source + blank line + its first line, as token ids),
    each with the continuation a copying model would write (the function's body)."""
    cases = []
    for path in held_out_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(funcs, key=lambda n: n.lineno):
            source = "".join(lines[node.lineno - 1:node.end_lineno])
            ids = tokenizer(source, add_special_tokens=False)["input_ids"]
            if not min_tokens <= len(ids) <= max_tokens:
                continue
            # The first line without its newline: BPE merges a newline with the next
            # line's indentation ("):" then "\n   "), so a prompt ending in a bare "\n"
            # tells the model the next line is not indented, and it never copies the body.
            first_line = lines[node.lineno - 1].rstrip("\n")
            prompt = source.rstrip("\n") + "\n\n" + first_line
            cases.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                          source[len(first_line):]))
            if len(cases) == count:
                return cases
            break     # one per file: spread over the packages
    if not cases:
        raise RuntimeError("no held-out functions in the token range")
    return cases


def edit_prompts(tokenizer, count: int, min_tokens: int = 120, max_tokens: int = 400
                 ) -> list[list[int]]:
    """`count` edit prompts: function source + blank line + its first line, as token ids."""
    return [ids for ids, _ in edit_cases(tokenizer, count, min_tokens, max_tokens)]


def prompt_set(name: str, tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:
    if name == "completion":
        return held_out_prompts(tokenizer, count, prompt_tokens)
    if name == "edit":
        return edit_prompts(tokenizer, count)
    raise ValueError(f"unknown prompt set {name!r}; expected one of {PROMPT_SETS}")
