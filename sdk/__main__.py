"""``python -m sdk`` and the ``autoglm`` script: the CLI, or one line naming the extra it needs."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the command line; without the [cli] extra, say how to install it (exit 1)."""
    try:
        from sdk.cli import main as cli_main
    except ImportError as exc:  # sdk.errors.MissingExtra is an ImportError
        from sdk.errors import MissingExtra

        if not isinstance(exc, MissingExtra):
            raise
        message = str(exc).split(": pip install", 1)[0]
        print(f"error: {exc.reason}: {message}", file=sys.stderr)
        print(f"hint: install the [{exc.extra}] extra: pip install 'open-autoglm-sdk[{exc.extra}]' "
              f"(in a checkout: pip install '.[{exc.extra}]')", file=sys.stderr)
        raise SystemExit(1) from None
    cli_main()


if __name__ == "__main__":
    main()
