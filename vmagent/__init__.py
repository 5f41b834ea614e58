"""vmagent: brings a virtual machine into an Istio service mesh."""

__version__ = "0.1.0"
