"""`tokenfleet` (also `python -m tokenfleet`): env, bench, project, capacity, report, compare.

Each verb module adds its commands to the one typer app in `tokenfleet.cli.common` when it is imported here; nothing
outside `tokenfleet.cli` imports the CLI.
"""

from tokenfleet.cli import capacity, measure, report  # noqa: F401 - importing a verb module registers its commands
from tokenfleet.cli.common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
