"""p2preg: a peer-to-peer layer distribution network with an OCI registry facade."""

__version__ = "0.1.0"
