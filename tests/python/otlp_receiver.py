#!/usr/bin/env python3
"""A small OTLP trace receiver for the tracing tests, on the official `opentelemetry-proto`
package: OTLP/gRPC (`TraceService/Export`, grpcio) and OTLP/HTTP protobuf (`POST /v1/traces`,
the standard library's HTTP server).

  otlp_receiver.py --grpc-port G --http-port H --out FILE

Every received span is appended to FILE as one JSON line:
  {"via": "grpc"|"http", "service": <resource service.name>, "trace_id", "span_id",
   "parent_span_id" (hex, "" for a root), "name", "kind" (SERVER, CLIENT, ...), "attributes": {...},
   "status": "UNSET"|"OK"|"ERROR", "start_ns", "end_ns"}
It prints `ready` once both ports listen and exits 0 on SIGTERM/SIGINT.
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}

LOCK = threading.Lock()


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def record(request, via, out_path):
    lines = []
    for resource_spans in request.resource_spans:
        attrs = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
        service = attrs.get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                lines.append(
                    json.dumps(
                        {
                            "via": via,
                            "service": service,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": KINDS.get(span.kind, str(span.kind)),
                            "attributes": {a.key: value_of(a.value) for a in span.attributes},
                            "status": STATUS.get(span.status.code, str(span.status.code)),
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                        }
                    )
                )
    with LOCK, open(out_path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out_path):
        self.out_path = out_path

    def Export(self, request, context):
        record(request, "grpc", self.out_path)
        return trace_service_pb2.ExportTraceServiceResponse()


def http_handler(out_path):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            request = trace_service_pb2.ExportTraceServiceRequest()
            try:
                request.ParseFromString(body)
            except Exception:  # a malformed body is the sender's error
                self.send_error(400)
                return
            record(request, "http", out_path)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(args.out), server)
    server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", args.http_port), http_handler(args.out))
    threading.Thread(target=http.serve_forever, daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    http.shutdown()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
