"""The `ttc` command and `python -m ttc_lightning`."""

import sys


def main() -> None:
    """The CLI (`ttc_lightning.run.cli.entry_point`), imported here: its libraries take seconds to load, and Ctrl-C
    in them ends with one line, as it does later."""
    try:
        from ttc_lightning.run.cli import entry_point
    except KeyboardInterrupt:
        print("ttc: interrupted while starting; nothing was run", file=sys.stderr)
        raise SystemExit(130) from None
    entry_point()


if __name__ == "__main__":
    main()
