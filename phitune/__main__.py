"""`python -m phitune ARGS` runs `phitune ARGS`."""

from phitune.cli import main

if __name__ == "__main__":
    main()
