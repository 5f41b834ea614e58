"""vmagent: brings a virtual machine into an Istio service mesh."""

import os as _os

__version__ = "0.1.0"

# gRPC's C core logs handshake and resolver failures straight to stderr ("E0000 ... ssl_
# transport_security.cc ...") and reads GRPC_VERBOSITY only once, when grpc is first imported,
# so this must happen before any vmagent module imports grpc. vmagent reports those failures
# itself, in words (vmagent/identity/channel.py); set GRPC_VERBOSITY (e.g. =DEBUG, with
# GRPC_TRACE) to see gRPC's own lines again.
_os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# vmagent never uses gRPC in a forked child; without this, gRPC's fork handlers run on every
# fork with Python code in the child (a preexec_fn) and log "skipping fork() handlers".
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
