"""``vmagent dns serve``: placeholder until the DNS shell lands."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    dns = commands.add_parser("dns", help="the DNS proxy")
    sub = dns.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    sub.add_parser("serve", help="serve a NameTable file")


_ = argparse
