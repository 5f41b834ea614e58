"""Generated protobuf/gRPC code for Istio's protos (regenerate with ``scripts/gen-protos``)."""
