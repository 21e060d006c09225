"""A tenant backend in Python: grpcio stubs generated from proto/ during the
test, mTLS with a tenant client certificate (acme), the dispatcher used as a
tenant: enqueue a task, read it until it reaches a final status, and try
another tenant's side of the boundary.

Prints one JSON object with what it saw; the Rust test asserts on it.
"""

import json
import sys
import time

import grpc

from bulkhead.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

# How long the task may take to finish, and how often its status is read.
DEADLINE_SECS = 30
POLL_SECS = 0.1


def task_view(task) -> dict:
    return {
        "task_id": task.task_id,
        "tenant": task.tenant,
        "status": dispatcher_pb2.TaskStatus.Name(task.status),
        "attempt": task.attempt,
        "worker_id": task.worker_id,
        "run_id": task.run_id,
        "output_summary": task.output_summary,
    }


def code_of(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def main() -> None:
    addr, ca, cert, key, agent = sys.argv[1:6]
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    out = {}
    with grpc.secure_channel(addr, creds) as channel:
        dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        enqueued = dispatcher.Enqueue(
            dispatcher_pb2.EnqueueRequest(
                tenant="acme",
                agent=agent,
                payload=b"hello from python\n",
                idempotency_key="python-backend-1",
            ),
            timeout=10,
        )
        out["task_id"] = enqueued.task_id
        out["enqueued"] = task_view(enqueued.task)

        statuses = []
        deadline = time.monotonic() + DEADLINE_SECS
        while True:
            task = dispatcher.GetTask(
                dispatcher_pb2.GetTaskRequest(tenant="acme", task_id=enqueued.task_id),
                timeout=10,
            ).task
            name = dispatcher_pb2.TaskStatus.Name(task.status)
            if not statuses or statuses[-1] != name:
                statuses.append(name)
            if task.status in (
                dispatcher_pb2.TASK_STATUS_SUCCEEDED,
                dispatcher_pb2.TASK_STATUS_FAILED,
                dispatcher_pb2.TASK_STATUS_CANCELLED,
            ):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_SECS)
        out["statuses"] = statuses
        out["final"] = task_view(task)

        out["other_tenant"] = code_of(
            lambda: dispatcher.Enqueue(
                dispatcher_pb2.EnqueueRequest(tenant="globex", agent=agent, payload=b"x"),
                timeout=10,
            )
        )
        out["other_tenant_read"] = code_of(
            lambda: dispatcher.GetTask(
                dispatcher_pb2.GetTaskRequest(tenant="globex", task_id=enqueued.task_id),
                timeout=10,
            )
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
