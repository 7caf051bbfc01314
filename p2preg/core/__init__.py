"""Domain types shared by the node (`p2preg`) and the tracker (`tracker`).

Everything here is sans-IO: pure functions and frozen dataclasses over bytes and
strings. Nothing in this package opens a socket or a file.
"""
