"""Generated protobuf messages of the CRI (``runtime.v1``); see scripts/gen-cri-stubs.sh."""
