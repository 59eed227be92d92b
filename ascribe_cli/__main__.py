"""``python -m ascribe_cli``: the same as the installed ``ascribe`` command."""

from ascribe_cli import main

main()
