"""A tenant backend in Python: grpcio stubs generated from proto/ during the
test, mTLS with a tenant client certificate, the audit API read as that tenant.

Prints one JSON object with what it saw; the Rust test asserts on it.
"""

import json
import sys

import grpc

from bulkhead.audit.v1 import audit_pb2, audit_pb2_grpc


def main() -> None:
    addr, ca, cert, key = sys.argv[1:5]
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    out = {}
    with grpc.secure_channel(addr, creds) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        own = audit.Query(audit_pb2.QueryRequest(tenant="acme", limit=100), timeout=10)
        out["own"] = [
            {"sequence": e.sequence, "type": e.type, "tenant": e.tenant, "actor": e.actor}
            for e in own.events
        ]
        try:
            audit.Query(audit_pb2.QueryRequest(tenant="globex", limit=100), timeout=10)
            out["other"] = "OK"
        except grpc.RpcError as err:
            out["other"] = err.code().name
        head = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10)
        out["tree_size"] = head.tree_head.tree_size
    print(json.dumps(out))


if __name__ == "__main__":
    main()
