"""The inference mesh's topics (built on ``sdk.messaging.topics``; ids cannot inject wildcards).

    autoglm/v1/inf/req/{node}           inference requests to one node
    autoglm/v1/inf/ads/{node}           retained inference node advertisements
"""

from __future__ import annotations

from sdk.messaging.topics import ROOT, validate_id


def inference_requests(node: str) -> str:
    return f"{ROOT}/inf/req/{validate_id(node, what='node id')}"


def inference_ad(node: str) -> str:
    return f"{ROOT}/inf/ads/{validate_id(node, what='node id')}"


#: Subscription filter over every node's advert.
ALL_INFERENCE_ADS = f"{ROOT}/inf/ads/+"

__all__ = ["inference_requests", "inference_ad", "ALL_INFERENCE_ADS"]
