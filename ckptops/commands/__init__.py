"""CLI command modules. Each exposes ``COMMANDS``, a list of click commands/groups that
:mod:`ckptops.cli` registers on the ``ckptops`` group. They parse options, call the public
library functions and print; they hold no logic of their own."""
