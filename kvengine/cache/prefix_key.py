"""How the prefix cache names what it holds: request keys, tenant namespaces, public prefixes.

A request reaches the prefix cache as a `PrefixKey` (its token ids, its
tenant's salt, its press), never as an engine sequence. In the radix tree,
keys are namespaced by the model and the salt: one tenant's prompts never
speed up another's. A public prefix (`TreeKeys.add_public`, e.g. a shared
system prompt) is the one exception: the whole blocks a prompt shares with it
are keyed without a salt, and every later token is salted into its key, so
tenants share exactly the public text and nothing after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass

PUBLIC = "public"  # the salt of public prefixes' blocks


@dataclass(frozen=True)
class PrefixKey:
    """A request as the prefix cache sees it: token ids, its tenant's salt and, if any, its press.

    Plain (`press` None: no press, no shared context): `token_ids` are the
    tokens whose keys and values it may reuse (`attach`, `peek`, `prefetch`)
    or has computed (`publish`, `detach`). Compressed: `press` is the repr of
    the press (its class and every hyperparameter) and `token_ids` the context
    it compresses.
    """

    token_ids: list[int]
    salt: str = ""
    press: str | None = None


class TreeKeys:
    """Radix-tree keys of plain requests of one model: `(namespace, tokens)`."""

    def __init__(self, model_name: str, block_size: int) -> None:
        self.model_name = model_name
        self.block_size = block_size
        self._public: list[tuple[int, ...]] = []

    def add_public(self, token_ids: list[int]) -> None:
        """Let every tenant share the whole blocks of these tokens (and nothing after them)."""
        self._public.append(tuple(token_ids))

    def tree_key(self, token_ids: list[int], salt: str) -> tuple[Hashable, list[int]]:
        """The namespace and tree key of `token_ids` for the tenant `salt`.

        Without a public prefix: the tokens, under (model, salt). With one:
        the public blocks as they are, then every token salted (a 128-bit hash
        of the salt above its 32 bits), under (model, PUBLIC).
        """
        num_public = self._public_len(token_ids) if self._public else 0
        if num_public == 0:
            return (self.model_name, salt), token_ids
        bits = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:16], "big") << 32
        return (self.model_name, PUBLIC), token_ids[:num_public] + [t | bits for t in token_ids[num_public:]]

    def _public_len(self, tokens: list[int]) -> int:
        """Tokens of the longest run of whole blocks that `tokens` share with a public prefix."""
        best = 0
        for public in self._public:
            n = 0
            for a, b in zip(tokens, public, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best - best % self.block_size
