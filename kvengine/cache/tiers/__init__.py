"""Storage tiers below the block pool: host memory, local disk, Redis; and a stack of them.

Importing this package registers every tier in `TIERS` ("host", "disk",
"redis", in that order: fastest first) and re-exports the public names, so
callers import from `kvengine.cache.tiers` and never from its modules. The
contract every tier keeps is `Tier`'s docstring in `base.py`.
"""

from __future__ import annotations

from kvengine.cache.tiers.base import TIERS, Tier, TierStats, make_tier

# Import order is registration order, which TIERS keeps (fastest first):
# error messages and registry-parametrized tests list the tiers in it.
# isort: off
from kvengine.cache.tiers.host import HostTier
from kvengine.cache.tiers.disk import DiskTier
from kvengine.cache.tiers.redis_tier import RedisTier

# isort: on
from kvengine.cache.tiers.stack import TierStack
from kvengine.errors import MissingDependencyError

__all__ = [
    "TIERS",
    "DiskTier",
    "HostTier",
    "MissingDependencyError",
    "RedisTier",
    "Tier",
    "TierStack",
    "TierStats",
    "make_tier",
]
