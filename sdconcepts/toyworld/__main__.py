"""``python -m sdconcepts.toyworld``: the toy-world command on its own."""

from sdconcepts.toyworld.cli import main

raise SystemExit(main())
