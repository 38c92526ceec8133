"""The inference mesh: engines advertise as nodes, permitted peers route requests to them.

    MeshNode (node.py)     an Engine on the mesh: signed retained adverts + will, credential- and
                           scope-checked, rate-limited, end-to-end encrypted generation
    Mesh (router.py)       discovery, ranking, failover mid-stream; also a GenerationBackend
    gateway (gateway.py)   the OpenAI HTTP app over a Mesh
    credentials.py         InferenceAccessCredential (scope: models, max tokens) and AccessPolicy;
                           InferenceNodeCredential (who may be a node, for which models) and NodePolicy
    revocation.py          LiveStatus: status lists followed over MQTT, grants dropped on each new list

Routers import no torch: ``sdk.inference`` types only; the node uses the engine it is given.
"""

from sdk.mesh.adverts import AdvertTable, NodeAdvert, NodeLoad
from sdk.mesh.capacity import AdvertFieldError, Capacity, Estimate
from sdk.mesh.credentials import (
    ACCESS_CREDENTIAL,
    NODE_CREDENTIAL,
    AccessPolicy,
    AccessScope,
    NodeGrant,
    NodePolicy,
    access_scope,
    issue_access_credential,
    issue_node_credential,
    node_grant,
)
from sdk.mesh.errors import (
    MeshError,
    MeshOverloaded,
    MeshTimeout,
    NoCapableNode,
    NodeRequestError,
    NoNode,
    NoNodeTrust,
    NotPermitted,
)
from sdk.mesh.node import MeshNode, NodeConfig
from sdk.mesh.prefixes import derive_prefix_key
from sdk.mesh.ranking import NodeFigures, RankedNode, RankingWeights, rank_nodes
from sdk.mesh.ratelimit import PeerBuckets, PeerStreams, RateLimit
from sdk.mesh.revocation import LiveStatus
from sdk.mesh.router import Mesh, NodeView, RouterConfig
from sdk.mesh.routing_policy import POLICY_CREDENTIAL, RoutingPolicy, issue_policy_credential, publish_policy

__all__ = [
    "Mesh",
    "RouterConfig",
    "NodeView",
    "MeshNode",
    "NodeConfig",
    "RateLimit",
    "PeerBuckets",
    "PeerStreams",
    "LiveStatus",
    "ACCESS_CREDENTIAL",
    "AccessPolicy",
    "AccessScope",
    "access_scope",
    "issue_access_credential",
    "NODE_CREDENTIAL",
    "NodePolicy",
    "NodeGrant",
    "node_grant",
    "issue_node_credential",
    "NodeAdvert",
    "NodeLoad",
    "AdvertTable",
    "NodeFigures",
    "RankedNode",
    "RankingWeights",
    "rank_nodes",
    "MeshError",
    "NoNode",
    "NoCapableNode",
    "NotPermitted",
    "MeshOverloaded",
    "MeshTimeout",
    "NodeRequestError",
    "NoNodeTrust",
    "AdvertFieldError",
    "Capacity",
    "Estimate",
    "derive_prefix_key",
    "POLICY_CREDENTIAL",
    "RoutingPolicy",
    "issue_policy_credential",
    "publish_policy",
]
