"""Caching DNS proxy that answers mesh names from Istio's NameTable."""
