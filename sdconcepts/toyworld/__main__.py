"""``python -m sdconcepts.toyworld``: the toy-world command on its own."""

from sdconcepts.cli.toyworld_commands import main

raise SystemExit(main())
