from p2preg.cli import main

raise SystemExit(main())
