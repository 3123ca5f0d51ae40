"""Workloads of `kvengine bench serve`: what each closed-loop client sends, drawn from a seed.

Prompts are random words from a fixed list (lengths count words; common short
English words are about one token each), so they need no tokenizer on the
client. Three shapes, by name: independent prompts (`random`), a few long
prefixes shared by many requests (`shared-prefix`), conversations that grow
by one turn per request (`multi-turn`), and `mixed`, all three at once. With
several API keys, each client belongs to one tenant (`LoadConfig.tenant_of`),
and each shared prefix to two tenants (`tenant_groups`). This
module builds request bodies only; sending and timing them is load.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.registry import Registry

# Common short English words, about one token each.
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education good new first last "
    "long great little own other old big high different small large next early young important "
    "few public bad same able red blue green open close read write run walk think make take see "
    "come"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class LoadConfig:
    """One load test: where, how many clients, for how long, and what they send.

    Lengths are in words (`*_len`); ranges are inclusive (low, high) and drawn
    uniformly per request. `prompt_len_range` is the whole prompt for `random`,
    the suffix after the group's prefix for `shared-prefix`, and each user
    message for `multi-turn`.
    """

    url: str = "http://127.0.0.1:8000"
    # Bearer keys; client i sends key i mod len(api_keys), and each key is one tenant (its index
    # is all the results record of it). Empty: no Authorization header, one tenant.
    api_keys: tuple[str, ...] = ()
    num_clients: int = 32
    duration_s: float = 60.0
    max_requests: int | None = None  # None: only the duration ends the run
    workload: str = "mixed"
    seed: int = 0
    prompt_len_range: tuple[int, int] = (64, 1024)
    max_tokens_range: tuple[int, int] = (16, 128)
    shared_prefix_len: int = 1024
    num_groups: int = 4
    turns: int = 4  # user turns per conversation in multi-turn
    request_timeout_s: float = 600.0  # bounds a request in flight when the run ends

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"url must start with http:// or https://, got {self.url!r}")
        for name in ("num_clients", "shared_prefix_len", "num_groups", "turns"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_requests is not None and self.max_requests < 1:
            raise InvalidRequestError(f"max_requests must be >= 1, got {self.max_requests}")
        if not self.duration_s > 0 or not self.request_timeout_s > 0:
            raise InvalidRequestError("duration_s and request_timeout_s must be > 0")
        for name in ("prompt_len_range", "max_tokens_range"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise InvalidRequestError(f"{name} must be LOW,HIGH with 1 <= LOW <= HIGH, got {low},{high}")
        WORKLOADS.lookup(self.workload)
        self._check_tenants()

    def _check_tenants(self) -> None:
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise InvalidRequestError("api keys must be non-empty strings")
        if len(set(self.api_keys)) != len(self.api_keys):
            raise InvalidRequestError("an api key is given twice: each key is one tenant")
        if len(self.api_keys) > self.num_clients:
            raise InvalidRequestError(
                f"{len(self.api_keys)} api keys but {self.num_clients} clients: each key needs a client"
            )
        uses_groups = self.workload in ("shared-prefix", "mixed")
        if uses_groups and self.num_tenants > 1 and self.num_groups < self.num_tenants:
            raise InvalidRequestError(
                f"num_groups ({self.num_groups}) must be >= the number of tenants ({self.num_tenants}): "
                "each shared prefix is given to two tenants and every tenant needs one"
            )

    @property
    def num_tenants(self) -> int:
        return max(1, len(self.api_keys))

    def tenant_of(self, client_index: int) -> int:
        """The tenant (index into `api_keys`) of a client: round-robin over the keys."""
        return client_index % self.num_tenants

    def tenant_groups(self, tenant: int) -> list[int]:
        """The shared-prefix groups a tenant's clients draw from: group g belongs to tenants g and
        g + 1 (mod the number of tenants), so every prefix text is sent by two tenants, and a hit
        across tenants would show. With one tenant, all groups."""
        t = self.num_tenants
        if t == 1:
            return list(range(self.num_groups))
        return [g for g in range(self.num_groups) if tenant in (g % t, (g + 1) % t)]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: the workload that made it, the API path and the JSON body; for a
    shared-prefix request, the index of its prefix group."""

    workload: str
    path: str
    body: dict[str, Any]
    group: int | None = None


def random_words(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


class Workload:
    """One client's source of requests.

    Contract: `next_request()` and `on_reply()` alternate; `on_reply` gets the
    reply's text, or None when the request failed. Randomness comes only from
    the seed and the client's index.
    """

    name = ""

    def __init__(self, config: LoadConfig, client_index: int) -> None:
        self.config = config
        self.tenant = config.tenant_of(client_index)
        self.rng = random.Random(f"{config.seed}:{self.name}:{client_index}")

    def next_request(self) -> RequestSpec:
        raise NotImplementedError

    def on_reply(self, text: str | None) -> None:
        """Nothing to remember by default."""

    def _words(self) -> str:
        return random_words(self.rng, self.rng.randint(*self.config.prompt_len_range))

    def _sampling(self) -> dict[str, Any]:
        max_tokens = self.rng.randint(*self.config.max_tokens_range)
        return {
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def _completion(self, prompt: str, group: int | None = None) -> RequestSpec:
        return RequestSpec(self.name, "/v1/completions", {"prompt": prompt, **self._sampling()}, group)


WORKLOADS: Registry[Workload] = Registry("workload", "workloads")


@WORKLOADS.register("random")
class RandomPrompts(Workload):
    """Independent prompts: nothing shared but what a tokenizer prepends."""

    name = "random"

    def next_request(self) -> RequestSpec:
        return self._completion(self._words())


@WORKLOADS.register("shared-prefix")
class SharedPrefix(Workload):
    """`num_groups` long prefixes (one text per group, the same for every client), each request one
    of them plus its own suffix: a system prompt or a document asked many questions. With several
    tenants, a client draws from its tenant's groups (`LoadConfig.tenant_groups`)."""

    name = "shared-prefix"

    def __init__(self, config: LoadConfig, client_index: int) -> None:
        super().__init__(config, client_index)
        self.groups = config.tenant_groups(self.tenant)
        self.prefixes = [
            random_words(random.Random(f"{config.seed}:prefix:{g}"), config.shared_prefix_len)
            for g in self.groups
        ]

    def next_request(self) -> RequestSpec:
        i = self.rng.randrange(len(self.prefixes))
        return self._completion(self.prefixes[i] + " " + self._words(), self.groups[i])


@WORKLOADS.register("multi-turn")
class MultiTurn(Workload):
    """A chat: each turn sends the whole conversation so far plus a new user message; after
    `turns` replies the client starts a new conversation."""

    name = "multi-turn"

    def __init__(self, config: LoadConfig, client_index: int) -> None:
        super().__init__(config, client_index)
        self.messages: list[dict[str, str]] = []

    def next_request(self) -> RequestSpec:
        self.messages.append({"role": "user", "content": self._words()})
        return RequestSpec(
            self.name, "/v1/chat/completions", {"messages": list(self.messages), **self._sampling()}
        )

    def on_reply(self, text: str | None) -> None:
        if text is None or len(self.messages) // 2 + 1 >= self.config.turns:
            self.messages = []  # a failed turn or a finished chat: start over
        else:
            self.messages.append({"role": "assistant", "content": text})


@WORKLOADS.register("mixed")
class Mixed(Workload):
    """Client i runs shared-prefix, multi-turn or random as i mod 3 says: all three at once."""

    name = "mixed"
    PARTS = ("shared-prefix", "multi-turn", "random")

    def __init__(self, config: LoadConfig, client_index: int) -> None:
        super().__init__(config, client_index)
        self.part = WORKLOADS.lookup(self.PARTS[client_index % len(self.PARTS)])(config, client_index)

    def next_request(self) -> RequestSpec:
        return self.part.next_request()

    def on_reply(self, text: str | None) -> None:
        self.part.on_reply(text)


def make_workload(config: LoadConfig, client_index: int) -> Workload:
    return WORKLOADS.lookup(config.workload)(config, client_index)
