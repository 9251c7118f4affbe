"""What `gb6 origin` and `gb6 edge` (node/origin_process.py, node/edge_process.py), the two
halves of `gb6 run` in processes of their own, share: the cluster's link secret.
"""

from __future__ import annotations

import os

from node.config import Config
from node.errors import invalid
from node.listen import is_loopback

# configs/cluster.toml's, for a cluster on one machine: anywhere else it is no secret.
SAMPLE_SECRET = "change-me-to-a-long-random-string"


def link_secret(config: Config, *, listening: bool = False) -> str:
    """The cluster's link secret. `listening` (an origin, whose link port takes it): the sample
    secret of configs/cluster.toml only on loopback (an edge only shows it)."""
    secret = os.environ.get("GB6_LINK_SECRET") or config.link_secret
    if len(secret) < 16:
        raise invalid(
            "a cluster needs a link secret of 16 characters or more: set "
            "[cluster] link_secret or GB6_LINK_SECRET, the same on every process"
        )
    if listening and secret == SAMPLE_SECRET and not is_loopback(config.host):
        raise invalid(
            f"the link secret is the sample of configs/cluster.toml, and {config.host} is not"
            " loopback: set a secret of your own ([cluster] link_secret or GB6_LINK_SECRET)"
        )
    return secret
