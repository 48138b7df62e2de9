#!/usr/bin/env bash
# Regenerate the CRI protobuf module of the crio plugin (plugins/crio/proto/api_pb2.py[i])
# from plugins/crio/proto/api.proto (k8s.io/cri-api runtime/v1, taken from Debian's
# golang-k8s-cri-api-dev: `apt-get download golang-k8s-cri-api-dev/sid`, then dpkg -x;
# the file is usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto).
# Only messages are generated: the client calls the RuntimeService methods by name
# (plugins/crio/client.py), so no grpc stubs and no grpcio-tools at run time.
# grpcio-tools goes into a throwaway venv; its protoc decides the protobuf runtime the
# module needs (pyproject.toml's protobuf pin must match the "Protobuf Python Version" line).
set -euo pipefail
cd "$(dirname "$0")/../plugins/crio/proto"
TOOLS=${GRPCIO_TOOLS:-grpcio-tools==1.85.1}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$TOOLS"
"$venv/bin/python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. api.proto
grep -m1 "Protobuf Python Version" api_pb2.py
