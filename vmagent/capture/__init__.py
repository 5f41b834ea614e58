"""Traffic capture: iptables rules sending the VM's DNS, outbound and inbound TCP to the agent
and Envoy, as Istio's ``istio-iptables`` does, with DNS failing open (docs/capture.md)."""

from vmagent.capture.shell import CaptureError, apply_capture, clean_capture, wanted

__all__ = ["CaptureError", "apply_capture", "clean_capture", "wanted"]
