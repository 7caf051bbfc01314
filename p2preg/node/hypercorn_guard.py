"""The guard's former import path, kept for tracker/server.py alone.

Owns nothing: `install` is `p2preg.node.hypercorn_internals.install`, the one
version gate in front of every hypercorn patch, the guard's included. The node
imports the fence itself; this module must not grow code, and goes once
tracker/server.py no longer imports it (the tracker is leaving hypercorn).
"""

from __future__ import annotations

from p2preg.node.hypercorn_internals import install

__all__ = ["install"]
