"""`python -m p2preg`: the console script, for when it is not installed. Nothing else."""

from p2preg.cli import main

raise SystemExit(main())
