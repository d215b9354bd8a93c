"""The command line, ``python -m sdconcepts`` and the ``sdconcepts`` script (``sdconcepts.cli:main``).

`main` builds the parser and runs a command; `arguments` holds what every command's arguments share (CommandError,
argparse types); each command or group of commands has its own module (`generate_command`, `img2img_command`,
`file_commands`, `embedding_commands`, `training_commands`, `toyworld_commands`, `web_ui_command`). Nothing in the
package imports this one: only the entry points (``sdconcepts.__main__``, ``sdconcepts.toyworld.__main__``) do.
"""

from sdconcepts.cli.main import main

__all__ = ["main"]
