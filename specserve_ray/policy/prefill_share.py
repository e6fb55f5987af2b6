"""How a step's token budget is shared between decode rows, their drafts and waiting
prompts, under the SLO classes' budgets (pure).

Drafts yield to prompts (`prefill_need`, `spare_for_speculation`, `share_caps`). A step
that decodes has a token budget (`limits.max_num_batched_tokens`): each decode row
takes one token plus its k drafted ones, prompt chunks take what is left. While the budget
binds, every drafted token is a prompt token not scored this step, and a drafted token is
accepted with probability below one: in tokens of budget, speculation always costs more
per emitted token than plain decoding. It pays in time only because a step's time grows
slower than its token count, which no longer helps once the budget is full. So when
waiting prompts need the budget to meet their TTFT, speculation should use only what they
do not need, except for rows that need it to meet their own TPOT (rows already behind
their budget keep their k).

What the prompts need: prompt j (in the order they will be prefilled) gets its first
token after the chunks of itself and of every prompt before it, `ahead_j` tokens. At `p`
prompt tokens per step and `step_s` seconds per step that takes `ahead_j / p * step_s`,
which must fit in its TTFT slack `slack_j`: p >= ahead_j * step_s / slack_j. A prompt
already past its budget asks for all of `ahead_j` at once: under overload every waiting
prompt is late, and drafting on then would only slow the queue that made them late.
Prompts without a TTFT budget ask for nothing.

The budget grows into the rows' TPOT room (`tpot_step_budget`): a step may take as long
as the decode rows' TPOT budgets allow, so while they have room prompts get more of it;
how many tokens fit in that time comes from the learned step-time law (step_time_law.py).
"""
from __future__ import annotations

import math
from typing import Sequence


def prefill_need(pending: Sequence[tuple[int, float]], step_s: float) -> float:
    """Prompt tokens per step the waiting prompts need to meet their TTFT budgets.

    `pending`: (prompt tokens left, TTFT slack in seconds) per prompt, in prefill order;
    slack is +inf without a budget. 0.0 when none needs anything."""
    if step_s <= 0:
        return 0.0
    need, ahead = 0.0, 0
    for tokens, slack in pending:
        ahead += max(tokens, 0)
        if slack <= 0:                  # late: it needs everything ahead of it now
            need = max(need, float(ahead))
        elif slack < math.inf:
            need = max(need, ahead * step_s / slack)
    return need


def spare_for_speculation(budget: int, rows: int, need: float) -> int | None:
    """Drafted tokens the step may carry without taking budget the prompts need; None
    when the prompts need nothing (no cap)."""
    if need <= 0:
        return None
    return max(0, int(budget - rows - math.ceil(need)))


def share_caps(caps: Sequence[int], spare: int, exempt: Sequence[bool]) -> list[int]:
    """Per-row caps on k whose sum over the non-exempt rows fits in `spare` (what exempt
    rows keep is taken first): the largest uniform level L with sum(min(cap, L)) within
    what is left, so every row loses its deepest drafts first and rows stay even."""
    caps = [max(int(c), 0) for c in caps]
    left = spare - sum(c for c, e in zip(caps, exempt) if e)
    capped = [c for c, e in zip(caps, exempt) if not e]
    if sum(capped) <= left:
        return caps
    level = 0
    for candidate in range(max(capped, default=0), -1, -1):
        if sum(min(c, candidate) for c in capped) <= max(left, 0):
            level = candidate
            break
    return [c if e else min(c, level) for c, e in zip(caps, exempt)]


# Of the room the law says a step may fill, the part it plans for: the law is a line through
# steps of other batches, drafts and contexts, so a step errs short by this much.
LAW_MARGIN = 0.9


def tpot_step_budget(budget: int, ceiling: int, tpot_s: Sequence[float],
                     slack_s: Sequence[float], token_s: float, fixed_s: float = 0.0) -> int:
    """The step's token budget, grown into the decode rows' TPOT room.

    A step of T seconds keeps row i within its TPOT budget when T <= tpot_i + slack_i:
    the step emits at least one token for it, and it may spend the seconds it is ahead
    (counted up to four budgets, so one step never spends a long lead at once). A step
    of n tokens takes about `fixed_s + token_s * n` (policy/step_time_law.py), so it may
    carry (room - fixed_s) / token_s tokens, LAW_MARGIN of it when the law is fitted; with
    `fixed_s` 0 and `token_s` the mean seconds per step token (fixed costs spread in, the
    fallback before the law is fitted) the estimate errs short. Rows without a TPOT budget
    set no limit; never below `budget` (the configured one), never above `ceiling` (where
    bigger chunks stop paying: the idle budget)."""
    if token_s <= 0 or ceiling <= budget:
        return budget
    room = min((t + min(max(s, 0.0), 4.0 * t) for t, s in zip(tpot_s, slack_s)
                if math.isfinite(t)), default=math.inf)
    if not math.isfinite(room):
        return budget
    tokens = (room - fixed_s) / token_s * (LAW_MARGIN if fixed_s > 0 else 1.0)
    return int(max(budget, min(ceiling, tokens)))
