"""Routing: which model a chat completion goes to, decided by ``policies/routing.yaml``.

The policy holds model aliases and rules (README "Routing policies"). Modules, in the
order data flows through them:

=============  ==============================================================
``schema``     the YAML contract: pydantic models, per-field checks, JSON Schema
``checks``     checks across rules: shadowed rules, duplicate names, alias cycles
``patterns``   exact names and globs compiled into one matcher
``matching``   compiled ``match`` conditions over a lazy view of the request
``prefilter``  literals a ``user_text`` regex needs, and one gate for all of them
``actions``    compiled rule actions; merging the rules that matched; splits
``engine``     ``CompiledPolicy``: compile once, ``plan()`` per request
``router``     ``Router`` (swappable policy) and loading from a file with lines
``reload``     ``ReloadingRouter``: file watch and SIGHUP, last good policy kept
``context``    ``ContextGuard``: the context-window check against ``/models``
=============  ==============================================================
"""

from proxy.routing.context import ContextGuard
from proxy.routing.engine import CompiledPolicy
from proxy.routing.reload import ReloadingRouter
from proxy.routing.router import ROUTING_FILE, Router, compile_policy, load_policy, load_router
from proxy.routing.schema import RoutingPolicy, routing_schema

__all__ = [
    "ROUTING_FILE",
    "CompiledPolicy",
    "ContextGuard",
    "ReloadingRouter",
    "Router",
    "RoutingPolicy",
    "compile_policy",
    "load_policy",
    "load_router",
    "routing_schema",
]
