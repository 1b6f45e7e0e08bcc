"""`tokenfleet` (also `python -m harness`): env, bench, project, capacity, report, compare.

Each verb module adds its commands to the one typer app in `harness.cli.common` when it is imported here; nothing
outside `harness.cli` imports the CLI.
"""

from harness.cli import capacity, measure, report  # noqa: F401 - importing a verb module registers its commands
from harness.cli.common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
