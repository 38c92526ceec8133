"""The inference mesh: engines advertise as nodes, permitted peers route requests to them.

    MeshNode (node.py)     an Engine on the mesh: signed retained adverts + will, credential- and
                           scope-checked, rate-limited, end-to-end encrypted generation
    Mesh (router.py)       discovery, ranking, failover mid-stream; also a GenerationBackend
    gateway (gateway.py)   the OpenAI HTTP app over a Mesh
    credentials.py         InferenceAccessCredential (scope: models, max tokens) and AccessPolicy

Routers import no torch: ``sdk.inference`` types only; the node uses the engine it is given.
"""

from sdk.mesh.adverts import AdvertTable, NodeAdvert, NodeLoad
from sdk.mesh.credentials import (
    ACCESS_CREDENTIAL,
    AccessPolicy,
    AccessScope,
    access_scope,
    issue_access_credential,
)
from sdk.mesh.errors import MeshError, MeshOverloaded, MeshTimeout, NodeRequestError, NoNode, NotPermitted
from sdk.mesh.node import MeshNode, NodeConfig
from sdk.mesh.ranking import NodeFigures, RankedNode, RankingWeights, rank_nodes
from sdk.mesh.ratelimit import PeerBuckets, RateLimit
from sdk.mesh.router import Mesh, NodeView, RouterConfig

__all__ = [
    "Mesh",
    "RouterConfig",
    "NodeView",
    "MeshNode",
    "NodeConfig",
    "RateLimit",
    "PeerBuckets",
    "ACCESS_CREDENTIAL",
    "AccessPolicy",
    "AccessScope",
    "access_scope",
    "issue_access_credential",
    "NodeAdvert",
    "NodeLoad",
    "AdvertTable",
    "NodeFigures",
    "RankedNode",
    "RankingWeights",
    "rank_nodes",
    "MeshError",
    "NoNode",
    "NotPermitted",
    "MeshOverloaded",
    "MeshTimeout",
    "NodeRequestError",
]
