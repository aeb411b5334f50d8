"""`python -m hostd` is the `hostd` command."""

from hostd.cli import main

raise SystemExit(main())
