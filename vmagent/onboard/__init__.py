"""Istio VM onboarding: ``vmagent onboard --from DIR`` installs the files
``istioctl x workload entry configure`` writes (docs/onboard.md)."""

from vmagent.onboard.core import Checked, OnboardError, check_files
from vmagent.onboard.hosts import remove_block, set_block

__all__ = ["Checked", "OnboardError", "check_files", "remove_block", "set_block"]
