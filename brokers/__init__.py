"""Brokers for the SDK: the embedded amqtt broker (DID auth), a Mosquitto runner, test PKI.

    from brokers.embedded import EmbeddedBroker          # in-process, 127.0.0.1, DID holders only
    from brokers.mosquitto import MosquittoBroker, MosquittoConfig   # secure by default (TLS client certs)
    from brokers.certs import CertificateAuthority, make_test_pki
    from brokers.ejabberd import EjabberdCluster         # a clustered ejabberd on 127.0.0.1 (tests, benches)

Names are imported lazily so ``import brokers`` does not pull in amqtt. See docs/BROKERS.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "EmbeddedBroker": "brokers.embedded",
    "OPEN_ACL": "brokers.embedded",
    "OWN_TOPICS_ACL": "brokers.embedded",
    "MosquittoBroker": "brokers.mosquitto",
    "MosquittoConfig": "brokers.mosquitto",
    "BrokerStartError": "brokers.mosquitto",
    "find_mosquitto": "brokers.mosquitto",
    "free_port": "brokers.mosquitto",
    "secure_acl": "brokers.mosquitto",
    "EjabberdCluster": "brokers.ejabberd",
    "find_ejabberd": "brokers.ejabberd",
    "make_test_pki": "brokers.certs",
    "PKIFiles": "brokers.certs",
    "CertFiles": "brokers.certs",
    "CertificateAuthority": "brokers.certs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'brokers' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = sorted(_LAZY)
