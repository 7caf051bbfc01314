"""The launchers that tests, benchmarks and the demo share: real processes, started one way.

Owns starting, waiting for and stopping by pid every process the project runs
around itself: the seed registry (Debian's docker-registry), the p2preg tracker
and nodes, private containerd daemons and `ctr`, nginx, and the images pushed
with skopeo; each on the machine or inside a named network namespace, which
`harness.netns` builds (bridge, veths, `tc` shaping in 198.18.0.0/15). It holds
no pytest fixtures, fault injectors or hostile inputs (those stay in tests/)
and no measurements (bench/); the product (p2preg, tracker) never imports it,
and it imports neither tests nor bench.
"""
