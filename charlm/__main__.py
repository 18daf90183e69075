"""`python -m charlm` is the `charlm` command."""

from .cli import main

if __name__ == "__main__":
    main()
