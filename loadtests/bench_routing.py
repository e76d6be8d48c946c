"""Microbenchmark of routing decisions: microseconds per ``Router.plan()`` call.

Policies of 1, 20 and 200 rules, each in four shapes, decided for one request::

    python loadtests/bench_routing.py [--number 20000]

``model-indexed``  every rule has a model condition for another model: the memoised
                   per-model candidate list is empty, so rules cost nothing.
``key no-match``   every rule has a key condition that fails: one check per rule.
``regex no-match`` every rule must run its regular expression over a 1 KB last user
                   message (its ``stream: false`` condition passes first) and fails:
                   the worst case.
``last matches``   as ``key no-match``, but the last rule matches and splits, caps and
                   rewrites the body (includes re-serialising it with orjson).

Prints the best of five repeats (``timeit`` style), in microseconds per decision.
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import orjson

from proxy.parse import parse_chat_request
from proxy.routing import Router, RoutingPolicy
from proxy.types import Principal

PRINCIPAL = Principal(key_id="0123456789ab", name="alice", team="research")
TEXT = "Please summarise the following meeting notes for the team. " * 17  # ~1 KB


def rules(shape: str, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(count):
        if shape == "model-indexed":
            out.append({"name": f"r{i}", "match": {"model": f"vendor-{i}/*"}, "model": "x/y"})
        elif shape == "regex no-match":
            match = {"stream": False, "user_text": rf"(?i)\bneedle{i}\b"}
            out.append({"name": f"r{i}", "match": match, "model": "x/y"})
        else:
            out.append({"name": f"r{i}", "match": {"key": f"user-{i}"}, "model": "x/y"})
    if shape == "last matches":
        out[-1] = {
            "name": "ab",
            "match": {"key": "alice"},
            "split": [{"model": "openai/gpt-4o", "weight": 9}, {"model": "anthropic/claude-sonnet-4.5", "weight": 1}],
            "caps": {"max_tokens": 512},
            "fallbacks": ["openai/gpt-4o-mini"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20_000, help="decisions per repeat")
    args = parser.parse_args()
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": TEXT}], "user": "u-42"}
    call = parse_chat_request(orjson.dumps(body))
    shapes = ("model-indexed", "key no-match", "regex no-match", "last matches")
    print(f"{'rules':>5}  " + "  ".join(f"{s:>15}" for s in shapes) + "   (us per decision)")
    for count in (1, 20, 200):
        cells = []
        for shape in shapes:
            router = Router(RoutingPolicy.model_validate({"rules": rules(shape, count)}))
            router.plan(call, PRINCIPAL)  # warm the per-model memo
            best = min(timeit.repeat(lambda r=router: r.plan(call, PRINCIPAL), number=args.number, repeat=5))
            cells.append(f"{best / args.number * 1e6:>15.2f}")
        print(f"{count:>5}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
