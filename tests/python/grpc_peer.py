#!/usr/bin/env python3
"""A Python gRPC peer of the cogmesh sample workload (`cogmesh.v1.Workload`), built on grpcio.

It checks that cogmesh speaks gRPC as another implementation expects, in both directions:

  grpc_peer.py server --port P --name NAME
      Serves Workload on 127.0.0.1:P with the same behaviour as `cogmesh workload`
      (served_by = NAME), prints `ready` once serving, and exits 0 on SIGTERM/SIGINT.

  grpc_peer.py client --target HOST:PORT --case unary|bidi|server_stream|client_stream|error
      Runs one case against TARGET and prints ONE JSON line with what it observed; exits 0 when
      the call went as the case expects, 1 otherwise.

The Python stubs are generated at start, with grpc_tools.protoc, from
proto/proto/cogmesh/v1/workload.proto (found relative to this file) into a temporary folder.
Needs grpcio and grpcio-tools.
"""

import argparse
import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "proto")
)
PROTO_FILE = "cogmesh/v1/workload.proto"
# Time a client gives each case (connect included), in seconds.
DEFAULT_TIMEOUT_SECS = 10.0
# How long a stopping server lets in-flight calls finish, in seconds.
SHUTDOWN_GRACE_SECS = 5.0
# Messages a bidi / client_stream / server_stream case exchanges.
STREAM_MESSAGES = 5
# Never go through an HTTP proxy from the environment: the peers are on loopback.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def load_stubs():
    """Generates the Workload stubs into a temporary folder and imports them."""
    with tempfile.TemporaryDirectory(prefix="cogmesh-grpc-peer-") as out:
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                PROTO_FILE,
            ]
        )
        if rc != 0:
            sys.exit(f"grpc_peer: protoc failed ({rc}) on {os.path.join(PROTO_ROOT, PROTO_FILE)}")
        sys.path.insert(0, out)
        try:
            from cogmesh.v1 import workload_pb2, workload_pb2_grpc  # noqa: PLC0415
        finally:
            sys.path.remove(out)
    return workload_pb2, workload_pb2_grpc


pb2, pb2_grpc = load_stubs()

STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


# === server ===


class WorkloadPeer(pb2_grpc.WorkloadServicer):
    """Workload as `cogmesh workload` serves it: each InferRequest costs work_ms, and a non-zero
    fail_code fails the call (or ends the stream) with that code and fail_message."""

    def __init__(self, name):
        self.name = name

    def _reply(self, text, seq):
        return pb2.InferReply(text=text, served_by=self.name, seq=seq)

    def _start(self, context):
        context.send_initial_metadata((("x-served-by", self.name),))

    @staticmethod
    def _work(request):
        if request.work_ms:
            time.sleep(request.work_ms / 1000.0)

    @staticmethod
    def _fail_if_asked(request, context):
        if request.fail_code:
            status = STATUS_BY_CODE.get(request.fail_code, grpc.StatusCode.UNKNOWN)
            context.abort(status, request.fail_message)

    def Infer(self, request, context):
        self._start(context)
        self._work(request)
        self._fail_if_asked(request, context)
        return self._reply("echo: " + request.prompt, 0)

    def Generate(self, request, context):
        self._start(context)
        self._work(request)
        for i in range(request.count):
            yield self._reply(f"part {i}", i)
        self._fail_if_asked(request, context)

    def Upload(self, request_iterator, context):
        self._start(context)
        prompts = []
        for request in request_iterator:
            self._work(request)
            self._fail_if_asked(request, context)
            prompts.append(request.prompt)
        return self._reply(",".join(prompts), len(prompts))

    def Converse(self, request_iterator, context):
        self._start(context)
        for seq, request in enumerate(request_iterator):
            self._work(request)
            self._fail_if_asked(request, context)
            yield self._reply("echo: " + request.prompt, seq)


def run_server(args):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb2_grpc.add_WorkloadServicer_to_server(WorkloadPeer(args.name), server)
    address = f"127.0.0.1:{args.port}"
    if server.add_insecure_port(address) == 0:
        sys.exit(f"grpc_peer: cannot listen on {address}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print("ready", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(SHUTDOWN_GRACE_SECS).wait()
    return 0


# === client ===


def case_unary(stub, timeout):
    reply, call = stub.Infer.with_call(pb2.InferRequest(prompt="hi"), timeout=timeout)
    ok = reply.text == "echo: hi" and reply.seq == 0
    return ok, {
        "text": reply.text,
        "served_by": reply.served_by,
        "seq": reply.seq,
        "x_served_by": dict(call.initial_metadata()).get("x-served-by"),
    }


def case_bidi(stub, timeout):
    # Lock step: the next message goes out only after the previous reply came back, so a proxy
    # that held the request stream back would stall the call (and hit the deadline).
    outbox = queue.Queue()
    done = object()

    def requests():
        while True:
            item = outbox.get()
            if item is done:
                return
            yield item

    replies = stub.Converse(requests(), timeout=timeout)
    texts, seqs, served_by = [], [], None
    try:
        for i in range(STREAM_MESSAGES):
            outbox.put(pb2.InferRequest(prompt=f"m{i}"))
            reply = next(replies)
            texts.append(reply.text)
            seqs.append(reply.seq)
            served_by = reply.served_by
    finally:
        outbox.put(done)
    extra = list(replies)
    ok = (
        texts == [f"echo: m{i}" for i in range(STREAM_MESSAGES)]
        and seqs == list(range(STREAM_MESSAGES))
        and not extra
    )
    return ok, {"texts": texts, "seqs": seqs, "served_by": served_by}


def case_server_stream(stub, timeout):
    replies = list(
        stub.Generate(pb2.InferRequest(prompt="hi", count=STREAM_MESSAGES), timeout=timeout)
    )
    texts = [r.text for r in replies]
    seqs = [r.seq for r in replies]
    ok = texts == [f"part {i}" for i in range(STREAM_MESSAGES)] and seqs == list(
        range(STREAM_MESSAGES)
    )
    return ok, {"texts": texts, "seqs": seqs, "served_by": replies[-1].served_by if replies else None}


def case_client_stream(stub, timeout):
    prompts = [f"p{i}" for i in range(STREAM_MESSAGES)]
    reply = stub.Upload(iter(pb2.InferRequest(prompt=p) for p in prompts), timeout=timeout)
    ok = reply.text == ",".join(prompts) and reply.seq == len(prompts)
    return ok, {"text": reply.text, "seq": reply.seq, "served_by": reply.served_by}


def case_error(stub, timeout):
    request = pb2.InferRequest(prompt="hi", fail_code=5, fail_message="no such model")
    try:
        reply = stub.Infer(request, timeout=timeout)
    except grpc.RpcError as error:
        code, details = error.code().name, error.details()
        return code == "NOT_FOUND" and details == "no such model", {"code": code, "details": details}
    return False, {"text": reply.text, "error": "the call succeeded"}


CASES = {
    "unary": case_unary,
    "bidi": case_bidi,
    "server_stream": case_server_stream,
    "client_stream": case_client_stream,
    "error": case_error,
}


def run_client(args):
    result = {"case": args.case}
    with grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
            ok, observed = CASES[args.case](pb2_grpc.WorkloadStub(channel), args.timeout)
        except grpc.FutureTimeoutError:
            ok, observed = False, {"error": f"cannot connect to {args.target}"}
        except grpc.RpcError as error:
            ok, observed = False, {"code": error.code().name, "details": error.details()}
        except StopIteration:
            ok, observed = False, {"error": "the stream ended early"}
    result["ok"] = ok
    result.update(observed)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server", help="serve Workload on 127.0.0.1:PORT")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--name", required=True)
    client = modes.add_parser("client", help="run one case against a Workload server")
    client.add_argument("--target", required=True, help="HOST:PORT")
    client.add_argument("--case", required=True, choices=sorted(CASES))
    client.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECS, help="seconds")
    args = parser.parse_args()
    return run_server(args) if args.mode == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
